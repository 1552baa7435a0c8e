//! Hostile input on Kafka (the mock cluster, or `TIDINGS_KAFKA_BROKERS`):
//! records produced with plain rdkafka, as any other client could, never
//! wedge a consumer (see `tidings_core::testkit::hostile`).

mod common;

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tidings_core::testkit::hostile::{self, Fate, big_payload};
use tidings_core::testkit::unique;
use tidings_core::{DeadLetterReason, SettleAction};

async fn case(kind: &str, headers: Vec<(&str, Option<Vec<u8>>)>, body: Option<Vec<u8>>) -> Fate {
    let target = common::Target::from_env();
    let topic = unique(kind);
    target.create_topic(&topic, 1).await;
    let bus = target.bus().await;
    hostile::survives(
        bus.subscriber(),
        bus.publisher(),
        &topic,
        &unique("hostile"),
        async {
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", target.brokers())
                .set("message.max.bytes", "20000000")
                .create()
                .expect("plain producer");
            let mut h = OwnedHeaders::new();
            for (key, value) in &headers {
                h = h.insert(Header {
                    key,
                    value: value.as_deref(),
                });
            }
            let mut record = FutureRecord::<(), [u8]>::to(&topic).headers(h);
            if let Some(body) = &body {
                record = record.payload(body.as_slice());
            }
            producer
                .send(record, Duration::from_secs(10))
                .await
                .expect("produced");
        },
    )
    .await
}

fn dead_lettered_as(fate: &Fate, reason: DeadLetterReason) {
    assert_eq!(fate.last(), SettleAction::DeadLetter { reason }, "{fate:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_are_not_ours_or_not_utf8_or_null() {
    let fate = case(
        "foreign-headers",
        vec![
            ("eventType", Some(b"user.registered".to_vec())),
            ("x-bin", Some(vec![0xff, 0xfe, 0x00])),
            ("ce_type", Some(vec![0xc3, 0x28])),
            ("x-null", None),
        ],
        Some(b"{\"a\":1}".to_vec()),
    )
    .await;
    assert_eq!(fate.last(), SettleAction::Ack);
    assert_eq!(fate.message.headers["eventType"], "user.registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payload() {
    // The mock cluster's default record limit is about 1 MB.
    let fate = case("large", vec![], Some(big_payload(900 * 1024))).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
    assert_eq!(fate.message.payload.len(), 900 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_that_is_not_json() {
    let fate = case("not-json", vec![], Some(vec![0xff, b'<'])).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_time_that_is_not_a_time() {
    let fate = case(
        "bad-time",
        vec![("ce_time", Some(b"10000-01-01T00:00:00Z".to_vec()))],
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(fate.last(), SettleAction::Ack);
    assert_eq!(fate.message.metadata.time, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_and_depth_that_are_not_numbers() {
    let fate = case(
        "bad-numbers",
        vec![
            ("tidings-attempt", Some(b"-7".to_vec())),
            ("tidings-chain-depth", Some(b"x".to_vec())),
            ("tidings-not-before", Some(b"18446744073709551615".to_vec())),
        ],
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(fate.last(), SettleAction::Ack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_record_without_payload() {
    let fate = case("empty", vec![], None).await;
    dead_lettered_as(&fate, DeadLetterReason::Undecodable);
}
