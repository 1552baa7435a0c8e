//! Dialects on Kafka: records written by a plain producer in the articles'
//! JSON envelope are read by a Tidings consumer in the envelope dialect,
//! Tidings writes the same shape back, and a value the dialect cannot read
//! is dead-lettered where observers see it.

mod common;

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use tidings_core::testkit::interop::Recorder;
use tidings_core::testkit::{unique, within};
use tidings_core::{Consumer, DeadLetterReason, Event, PublisherExt, SettleAction};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_articles_envelope_both_ways() {
    let target = common::Target::from_env();
    let topic = unique("envelope");
    target.create_topic(&topic, 1).await;
    let mut config = target.config();
    config.dialect = tidings_core::Dialect::parse("envelope").expect("a dialect");
    let bus = target.bus_with(config).await;

    // A plain producer's records: one envelope, one value that is no envelope.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", target.brokers())
        .create()
        .expect("plain producer");
    let envelope = r#"{"id":"e-1","type":"user.registered","timestamp":"2024-05-01T10:00:00.123Z",
        "payload":{"name":"Zoë ✓"},"metadata":{"correlationId":"c-1"}}"#;
    for value in [envelope, "not an envelope"] {
        producer
            .send(
                FutureRecord::<(), str>::to(&topic).payload(value),
                Duration::from_secs(10),
            )
            .await
            .expect("produced");
    }
    let recorder = Recorder::start(
        Consumer::group(bus.subscriber(), unique("g"))
            .start_from(tidings_core::StartFrom::Earliest),
        &topic,
    )
    .await;
    // The envelope is handled and the other value dead-lettered.
    within(60, "both records settled", async {
        while recorder.settled() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (seen, actions) = recorder.stop().await;
    assert_eq!(seen.len(), 1, "only the envelope reached the handler");
    let got = &seen["e-1"][0];
    assert_eq!(got.event_type.as_deref(), Some("user.registered"));
    assert_eq!(got.correlation_id.as_deref(), Some("c-1"));
    assert_eq!(got.data["name"], "Zoë ✓");
    assert!(actions.contains(&SettleAction::Ack));
    assert!(actions.contains(&SettleAction::DeadLetter {
        reason: DeadLetterReason::Undecodable
    }));

    // What Tidings writes in the envelope dialect.
    let out = unique("envelope-out");
    target.create_topic(&out, 1).await;
    let event = Event::new(serde_json::json!({ "orderId": 7 }))
        .with_type("order.placed")
        .with_correlation_id("c-7");
    let id = event.id().to_owned();
    bus.publisher()
        .publish_event(&out, event)
        .await
        .expect("published");
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", target.brokers())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("plain consumer");
    reader.subscribe(&[&out]).expect("subscribed");
    let value: Value = within(60, "the record", async {
        loop {
            if let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) {
                return serde_json::from_slice(m.payload().expect("a value")).expect("JSON");
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(value["id"], id);
    assert_eq!(value["type"], "order.placed");
    assert_eq!(value["payload"]["orderId"], 7);
    assert_eq!(value["metadata"]["correlationId"], "c-7");
}
