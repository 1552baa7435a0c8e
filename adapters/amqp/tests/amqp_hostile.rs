//! Hostile input on the real RabbitMQ: messages published with plain lapin,
//! as any other client could, never wedge a consumer (see
//! `tidings_core::testkit::hostile`).

mod common;

use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tidings_amqp::QueueType;
use tidings_core::testkit::hostile::{self, Fate, big_payload};
use tidings_core::testkit::{unique, within};
use tidings_core::{DeadLetterReason, SettleAction, Subscription};

const EXCHANGE: &str = "tidings-test";

async fn raw_publish(topic: &str, props: BasicProperties, body: &[u8]) {
    let conn = Connection::connect(
        &format!("amqp://guest:guest@{}/%2f", common::BROKER),
        ConnectionProperties::default(),
    )
    .await
    .expect("raw lapin connection");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch.basic_publish(
        EXCHANGE.into(),
        topic.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .expect("publish")
    .await
    .expect("confirmed");
    let _ = conn.close(200, "OK".into()).await;
}

async fn case(kind: &str, props: BasicProperties, body: Vec<u8>) -> Fate {
    let bus = common::connect(common::config(common::BROKER, QueueType::Quorum)).await;
    let topic = unique(kind);
    let group = unique("hostile");
    hostile::survives(bus.subscriber(), bus.publisher(), &topic, &group, async {
        raw_publish(&topic, props, &body).await
    })
    .await
}

fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(k), v);
    }
    t
}

fn dead_lettered_as(fate: &Fate, reason: DeadLetterReason) {
    assert_eq!(fate.last(), SettleAction::DeadLetter { reason }, "{fate:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn millisecond_timestamp_from_node() {
    // amqplib with `timestamp: Date.now()`, and a body no typed handler reads:
    // this killed every worker (a panic formatting the year 55000 time).
    let props = BasicProperties::default()
        .with_timestamp(1_700_000_000_123)
        .with_message_id("node-1".into())
        .with_content_type("application/json".into());
    let fate = case("ms-timestamp", props, b"not json".to_vec()).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
    assert_eq!(fate.message.id, "node-1");
    let time = fate.message.metadata.time.expect("the time was read");
    assert_eq!(
        time,
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_timestamp() {
    let props = BasicProperties::default().with_timestamp(u64::MAX);
    let fate = case("absurd-timestamp", props, b"{}".to_vec()).await;
    assert_eq!(fate.last(), SettleAction::Ack);
    assert_eq!(fate.message.metadata.time, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_headers_of_every_type() {
    let headers = table(vec![
        ("x-table", AMQPValue::FieldTable(FieldTable::default())),
        ("x-array", AMQPValue::FieldArray(FieldArray::default())),
        ("x-bool", AMQPValue::Boolean(true)),
        ("x-stamp", AMQPValue::Timestamp(u64::MAX)),
        ("x-signed", AMQPValue::LongLongInt(-1)),
    ]);
    let props = BasicProperties::default().with_headers(headers);
    let fate = case("foreign-headers", props, b"{\"a\":1}".to_vec()).await;
    assert_eq!(fate.last(), SettleAction::Ack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_header_values() {
    let headers = table(vec![
        (
            "x-bin",
            AMQPValue::LongString(LongString::from(vec![0xc3, 0x28, 0xff])),
        ),
        (
            "cloudEvents:type",
            AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])),
        ),
    ]);
    let props = BasicProperties::default().with_headers(headers);
    let fate = case("bad-utf8", props, b"{}".to_vec()).await;
    assert_eq!(fate.last(), SettleAction::Ack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_payload() {
    let fate = case(
        "ten-mb",
        BasicProperties::default(),
        big_payload(10 * 1024 * 1024),
    )
    .await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
    assert_eq!(fate.message.payload.len(), 10 * 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_that_is_not_json() {
    let fate = case(
        "not-json",
        BasicProperties::default(),
        b"\x00\x01<xml/>".to_vec(),
    )
    .await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_time_that_is_not_a_time() {
    let headers = table(vec![(
        "cloudEvents:time",
        AMQPValue::LongString(LongString::from("yesterday at noon")),
    )]);
    let props = BasicProperties::default().with_headers(headers);
    let fate = case("bad-time", props, b"{}".to_vec()).await;
    assert_eq!(fate.last(), SettleAction::Ack);
    assert_eq!(fate.message.metadata.time, None);
    assert_eq!(
        fate.message.headers["cloudEvents:time"],
        "yesterday at noon"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_and_depth_headers_that_are_not_numbers() {
    let headers = table(vec![
        (
            "tidings-attempt",
            AMQPValue::LongString(LongString::from("many")),
        ),
        (
            "tidings-chain-depth",
            AMQPValue::LongString(LongString::from("deep")),
        ),
        (
            "tidings-first-failure",
            AMQPValue::LongString(LongString::from("never")),
        ),
    ]);
    let props = BasicProperties::default().with_headers(headers);
    let fate = case("bad-numbers", props, b"{}".to_vec()).await;
    assert_eq!(fate.last(), SettleAction::Ack);
}

/// Publishes a message with `forged` headers through the topic exchange to
/// a group on `queue_type`, and checks that its first delivery is attempt 1
/// and its redelivery after a nack attempt 2: the forged count skips no
/// retry.
async fn forged_count_skips_no_retry(forged: (&str, AMQPValue), queue_type: QueueType) {
    let props = BasicProperties::default().with_headers(table(vec![forged]));
    let bus = common::connect(common::config(common::BROKER, queue_type)).await;
    let topic = unique("forged");
    let mut stream = bus
        .subscriber()
        .subscribe(Subscription::group(topic.as_str(), unique("g").as_str()))
        .await
        .expect("subscribed");
    raw_publish(&topic, props, b"{}").await;
    let mut first = match within(30, "the forged message", stream.next()).await {
        Some(Ok(d)) => d,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        first.attempt(),
        1,
        "{queue_type:?}: the forged count is not Tidings' or the broker's"
    );
    first.nack(None).await.expect("nacked");
    let mut second = match within(30, "the redelivery", stream.next()).await {
        Some(Ok(d)) => d,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        second.attempt(),
        2,
        "{queue_type:?}: what the broker counted still counts"
    );
    second.ack().await.expect("acked");
    stream.close().await.expect("closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_attempt_header_does_not_skip_the_retries() {
    // Any client can write `tidings-attempt`; through the topic exchange it
    // is not Tidings' count, so a failing message still gets every attempt.
    let forged = (
        "tidings-attempt",
        AMQPValue::LongString(LongString::from("4294967295")),
    );
    forged_count_skips_no_retry(forged, QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_delivery_count_does_not_skip_the_retries() {
    // `x-delivery-count` is the broker's own count only on a quorum queue's
    // redeliveries; written by a client, on either queue type, it does not
    // make the first failure final.
    for queue_type in [QueueType::Quorum, QueueType::Classic] {
        let forged = ("x-delivery-count", AMQPValue::LongLongInt(1000));
        forged_count_skips_no_retry(forged, queue_type).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_message() {
    let fate = case("empty", BasicProperties::default(), Vec::new()).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
    assert!(!fate.message.id.is_empty());
}
