//! Joining a JetStream topology that other services made: a shared stream
//! that lists its subjects its own way (`orders.*`, not `prefix.>`), and
//! dead letters put outside the subjects those services' wildcard
//! consumers capture, by the `dead_letters` template.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tidings_core::testkit::{unique, within};
use tidings_core::{Consumer, Error, Event, HandlerError, Message, Publisher, PublisherExt};
use tidings_nats::{NatsBus, NatsConfig};

const SERVER: &str = "127.0.0.1:4222";

async fn client() -> async_nats::Client {
    async_nats::connect(SERVER).await.unwrap_or_else(|e| {
        panic!("cannot reach nats-server at {SERVER} ({e}); scripts/brokers.sh starts it")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_stream_with_its_own_subjects_and_dead_letters_outside_the_domain() {
    let ns = unique("dom").replace('-', "_");
    let stream = format!("EVT_{ns}");
    let client = client().await;
    let js = jetstream::new(client.clone());
    // What the other services declared: their subjects, and a place for
    // dead letters beside them (not under `orders.>`).
    js.create_stream(jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{ns}.orders.*"), format!("{ns}.dlq.>")],
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("the existing stream");
    // A service of theirs that reads every order event by wildcard.
    let mut domain = client
        .subscribe(format!("{ns}.orders.>"))
        .await
        .expect("a wildcard subscriber");
    let mut dead = client
        .subscribe(format!("{ns}.dlq.>"))
        .await
        .expect("a dead-letter watcher");
    // In place at the server once probes on the same connection come back
    // (a flush only empties the socket buffer). The domain's probe is on a
    // subject the stream does not capture.
    client
        .publish(format!("{ns}.orders.probe.x"), "probe".into())
        .await
        .expect("probe");
    client
        .publish(format!("{ns}.dlq.probe"), "probe".into())
        .await
        .expect("probe");
    within(10, "the domain probe", domain.next()).await;
    within(10, "the dead-letter probe", dead.next()).await;

    let config = NatsConfig::from_url(&format!(
        "nats://{SERVER}?stream={stream}&subject_prefix={ns}&dead_letters=dlq.{{group}}.{{topic}}"
    ))
    .expect("a valid configuration");
    let bus = NatsBus::connect(config)
        .await
        .expect("connects to the existing stream");
    let subscriber = bus.subscriber();
    assert_eq!(
        subscriber.dead_letter_topic("orders.created", "billing"),
        "dlq.billing.orders.created"
    );
    let consumer = Consumer::group(subscriber.clone(), "billing")
        .handle("orders.created", |e: Event<String>| async move {
            if e.data == "poison" {
                return Err(HandlerError::permanent("cannot bill this"));
            }
            Ok(())
        })
        .start()
        .await
        .expect("a consumer on the existing stream");
    let publisher = bus.publisher();
    for body in ["a", "poison", "b"] {
        publisher
            .publish_event("orders.created", Event::new(body.to_owned()))
            .await
            .expect("stored in the existing stream");
    }

    let letter = within(20, "the dead letter", dead.next())
        .await
        .expect("a dead letter");
    assert_eq!(
        letter.subject.as_str(),
        format!("{ns}.dlq.billing.orders.created")
    );
    assert_eq!(letter.payload.as_ref(), b"\"poison\"");
    let reason = letter
        .headers
        .as_ref()
        .and_then(|h| h.get("tidings-dlq-reason"))
        .map(|v| v.as_str().to_owned());
    assert_eq!(reason.as_deref(), Some("permanent-error"));

    // The domain's wildcard consumer saw the three events and nothing else.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let m = within(10, "the three events", domain.next())
            .await
            .expect("an event");
        seen.push((m.subject.to_string(), m.payload.clone()));
    }
    assert!(
        seen.iter()
            .all(|(s, _)| *s == format!("{ns}.orders.created")),
        "{seen:?}"
    );
    let extra = tokio::time::timeout(Duration::from_millis(300), domain.next()).await;
    assert!(extra.is_err(), "no dead letter under orders.>: {extra:?}");

    // A topic the stream does not capture is refused, saying why.
    let refused = publisher
        .publish("users.created", Message::new("x"))
        .await
        .expect_err("not captured by the shared stream");
    assert!(
        matches!(&refused, Error::Config { key, message } if key == "stream" && message.contains("does not capture")),
        "{refused}"
    );

    consumer.shutdown(Duration::from_secs(10)).await;
    js.delete_stream(&stream).await.expect("cleaned up");
}

#[test]
fn a_dead_letter_template_must_name_topic_and_group() {
    for bad in [
        "dlq.{topic}",
        "dlq.{group}",
        "dlq..{group}.{topic}",
        "dlq.>.{group}.{topic}",
    ] {
        let url = format!("nats://{SERVER}?dead_letters={bad}");
        let e = NatsConfig::from_url(&url).expect_err(bad);
        assert!(e.to_string().contains("dead_letters"), "{bad}: {e}");
    }
}
