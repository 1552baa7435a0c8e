//! Hostile input on the real Redis: stream entries and channel messages
//! written with the plain redis client, as any other service could, never
//! wedge a consumer (see `tidings_core::testkit::hostile`).

mod common;

use tidings_core::testkit::hostile::{self, Fate, big_payload};
use tidings_core::testkit::unique;
use tidings_core::{DeadLetterReason, SettleAction};

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{}/", common::REDIS))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("{e}. {}", common::HOW_TO_START))
}

/// One `XADD <topic> * <fields...>` written by a plain client.
async fn stream_case(kind: &str, fields: Vec<(Vec<u8>, Vec<u8>)>) -> Fate {
    let bus = common::bus(common::REDIS, "").await;
    let topic = unique(kind);
    let fate = hostile::survives(
        bus.subscriber(),
        bus.publisher(),
        &topic,
        &unique("hostile"),
        async {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&topic).arg("*");
            for (name, value) in &fields {
                cmd.arg(name.as_slice()).arg(value.as_slice());
            }
            let _: String = cmd.query_async(&mut raw().await).await.expect("XADD");
        },
    )
    .await;
    let _: redis::RedisResult<()> = redis::cmd("DEL")
        .arg(&topic)
        .query_async(&mut raw().await)
        .await;
    fate
}

fn f(name: &str, value: &[u8]) -> (Vec<u8>, Vec<u8>) {
    (name.as_bytes().to_vec(), value.to_vec())
}

fn dead_lettered_as(fate: &Fate, reason: DeadLetterReason) {
    assert_eq!(fate.last(), SettleAction::DeadLetter { reason }, "{fate:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_that_are_not_ours() {
    // `XADD stream * type t data {...}`: before, the adapter dead-lettered
    // it on its own and no observer heard of it.
    let fate = stream_case(
        "foreign-fields",
        vec![f("type", b"user.registered"), f("data", b"{\"id\":1}")],
    )
    .await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
    assert_eq!(fate.message.headers["type"], "user.registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_names_and_values_that_are_not_utf8() {
    let fate = stream_case(
        "bad-utf8",
        vec![
            f("payload", b"{}"),
            (vec![0xff, 0xfe], b"x".to_vec()),
            f("ce_type", &[0xc3, 0x28]),
        ],
    )
    .await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_payload() {
    let fate = stream_case("ten-mb", vec![f("payload", &big_payload(10 * 1024 * 1024))]).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
    assert_eq!(fate.message.payload.len(), 10 * 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_that_is_not_json() {
    let fate = stream_case("not-json", vec![f("payload", b"<xml/>")]).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_time_that_is_not_a_time() {
    let fate = stream_case(
        "bad-time",
        vec![f("payload", b"{}"), f("ce_time", b"99999-99-99T99:99:99Z")],
    )
    .await;
    assert_eq!(fate.last(), SettleAction::Ack);
    assert_eq!(fate.message.metadata.time, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_and_depth_that_are_not_numbers() {
    let fate = stream_case(
        "bad-numbers",
        vec![
            f("payload", b"{}"),
            f("tidings-attempt", b"4294967296"),
            f("tidings-chain-depth", b"-1"),
            f("tidings-first-failure", b"never"),
        ],
    )
    .await;
    assert_eq!(fate.last(), SettleAction::Ack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_payload() {
    let fate = stream_case("empty", vec![f("payload", b"")]).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
}

/// One `PUBLISH <topic> <body>` written by a plain client.
async fn pubsub_case(kind: &str, body: Vec<u8>) -> Fate {
    let bus = common::bus(common::REDIS, "mode=pubsub").await;
    let topic = unique(kind);
    hostile::survives(
        bus.subscriber(),
        bus.publisher(),
        &topic,
        &unique("hostile"),
        async {
            let receivers: i64 = redis::cmd("PUBLISH")
                .arg(&topic)
                .arg(body.as_slice())
                .query_async(&mut raw().await)
                .await
                .expect("PUBLISH");
            assert_eq!(receivers, 1, "the consumer's subscription is in place");
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_corrupt_frame() {
    // Our magic, then nonsense: before, dropped with only an error on the stream.
    let fate = pubsub_case("corrupt-frame", b"TDG1\xff\xff\xff\xffgarbage".to_vec()).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_body_that_is_not_json() {
    let fate = pubsub_case("plain-body", vec![0xff, 0x00, 0x80]).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
}
