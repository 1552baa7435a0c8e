//! Hostile input on the real nats-server (JetStream): messages published
//! with plain async-nats, as any other client could, never wedge a consumer
//! (see `tidings_core::testkit::hostile`).

use async_nats::HeaderMap;
use bytes::Bytes;
use tidings_core::testkit::hostile::{self, Fate, big_payload};
use tidings_core::testkit::unique;
use tidings_core::{DeadLetterReason, SettleAction};
use tidings_nats::{NatsBus, NatsConfig};

mod support;

const SERVER: &str = "127.0.0.1:4222";

async fn bus(server: &str) -> NatsBus {
    let config = NatsConfig::from_url(&format!("nats://{server}?max_age=1h&connect_timeout=3s"))
        .expect("config");
    NatsBus::connect(config).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach nats-server with JetStream at {server} ({e}); start it with \
             `nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/nats-js &`"
        )
    })
}

/// One JetStream publish by a plain client, to the topic's subject.
async fn case_on(server: &str, kind: &str, headers: HeaderMap, body: Vec<u8>) -> Fate {
    let bus = bus(server).await;
    let topic = unique(kind);
    hostile::survives(
        bus.subscriber(),
        bus.publisher(),
        &topic,
        &unique("hostile"),
        async {
            let client = async_nats::connect(server).await.expect("plain client");
            let js = async_nats::jetstream::new(client);
            js.publish_with_headers(topic.clone(), headers, Bytes::from(body))
                .await
                .expect("published")
                .await
                .expect("stored");
        },
    )
    .await
}

async fn case(kind: &str, headers: HeaderMap, body: Vec<u8>) -> Fate {
    case_on(SERVER, kind, headers, body).await
}

fn dead_lettered_as(fate: &Fate, reason: DeadLetterReason) {
    assert_eq!(fate.last(), SettleAction::DeadLetter { reason }, "{fate:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_are_not_ours() {
    let mut headers = HeaderMap::new();
    headers.insert("X-Anything", "1");
    headers.insert("eventType", "user.registered");
    let fate = case("foreign-headers", headers, b"{\"a\":1}".to_vec()).await;
    assert_eq!(fate.last(), SettleAction::Ack);
    assert_eq!(fate.message.headers["X-Anything"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_near_the_server_limit() {
    // A default nats-server takes at most 1 MiB per message: a 10 MB one is
    // refused at publish, so the largest that can arrive is tested.
    let fate = case("big", HeaderMap::new(), big_payload(1000 * 1024)).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
    assert_eq!(fate.message.payload.len(), 1000 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_payload_on_a_server_that_takes_it() {
    let server = support::Server::start(Some("max_payload: 16777216\n")).await;
    let fate = case_on(
        &server.addr(),
        "ten-mb",
        HeaderMap::new(),
        big_payload(10 * 1024 * 1024),
    )
    .await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
    assert_eq!(fate.message.payload.len(), 10 * 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_that_is_not_json() {
    let fate = case("not-json", HeaderMap::new(), vec![0xff, 0x00, b'<']).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_time_that_is_not_a_time() {
    let mut headers = HeaderMap::new();
    headers.insert("ce_time", "+275760-09-13T00:00:00Z");
    let fate = case("bad-time", headers, b"{}".to_vec()).await;
    assert_eq!(fate.last(), SettleAction::Ack);
    assert_eq!(fate.message.metadata.time, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_and_depth_that_are_not_numbers() {
    let mut headers = HeaderMap::new();
    headers.insert("tidings-attempt", "NaN");
    headers.insert("tidings-chain-depth", "99999999999999999999");
    headers.insert("tidings-first-failure", "0000-00-00");
    let fate = case("bad-numbers", headers, b"{}".to_vec()).await;
    assert_eq!(fate.last(), SettleAction::Ack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_message() {
    let fate = case("empty", HeaderMap::new(), Vec::new()).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
    // No `ce_id`, no `Nats-Msg-Id`: the stream position names it.
    let (stream, sequence) = fate.message.id.rsplit_once(':').expect("stream:sequence");
    assert!(!stream.is_empty(), "{}", fate.message.id);
    assert!(sequence.parse::<u64>().is_ok(), "{}", fate.message.id);
}
