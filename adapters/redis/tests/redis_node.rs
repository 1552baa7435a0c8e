//! Interop with plain Node.js services on Redis (ioredis, written the way
//! the common articles write them: `tests/node/redis.js`), in both
//! directions: Streams entries `type / data / timestamp / correlationId`,
//! and Pub/Sub JSON bodies.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tidings_core::testkit::{ChildProcess, unique, within};
use tidings_core::{Consumer, Event, HandlerError, PublisherExt, SettleAction, Subscriber};
use tidings_redis::RedisBus;

const COUNT: usize = 100;
const URL: &str = "redis://127.0.0.1:6379/";
/// The articles' stream entries: the body in `data`, `type`, `timestamp`,
/// `correlationId` (read by its common spelling, written under it).
const STREAM_FIELDS: &str = "payload_field=data&field.type=type&field.time=timestamp&field.correlation_id=correlationId&field.id=id";
/// The Pub/Sub JSON bodies: `{ id, type, timestamp, correlationId, data }`.
const PUBSUB_ENVELOPE: &str = "mode=pubsub&dialect=envelope&envelope.data=data&envelope.correlation_id=correlationId&envelope.causation_id=";

fn script() -> String {
    format!("{}/../../tests/node/redis.js", env!("CARGO_MANIFEST_DIR"))
}

type Seen =
    Arc<Mutex<HashMap<String, Vec<(Option<String>, Option<SystemTime>, Option<String>, Value)>>>>;

async fn consume_all(
    subscriber: Arc<dyn Subscriber>,
    group: &str,
    topic: &str,
    seen: Seen,
    actions: Arc<Mutex<Vec<SettleAction>>>,
) -> Consumer {
    Consumer::group(subscriber, group)
        .handle(topic, move |e: Event<Value>| {
            let seen = seen.clone();
            async move {
                let m = e.metadata();
                seen.lock()
                    .expect("lock")
                    .entry(e.id().to_owned())
                    .or_default()
                    .push((
                        m.event_type.clone(),
                        m.time,
                        m.correlation_id.clone(),
                        e.data.clone(),
                    ));
                Ok::<_, HandlerError>(())
            }
        })
        .on_settle(move |s| actions.lock().expect("lock").push(s.action))
        .start()
        .await
        .expect("the consumer starts")
}

async fn wait_count(seen: &Seen, n: usize) {
    within(60, "every message at the Tidings handlers", async {
        while seen
            .lock()
            .expect("lock")
            .values()
            .map(Vec::len)
            .sum::<usize>()
            < n
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

fn check_against_node(seen: &Seen, lines: &[String]) {
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.len(), COUNT, "each message once");
    for line in lines {
        let sent: Value = serde_json::from_str(line).expect("a JSON line");
        let id = sent["id"].as_str().expect("id");
        let got = seen.get(id).unwrap_or_else(|| panic!("{id} never arrived"));
        assert_eq!(got.len(), 1, "{id} handled once");
        let (event_type, time, correlation, data) = &got[0];
        assert_eq!(event_type.as_deref(), sent["type"].as_str(), "type of {id}");
        assert_eq!(
            correlation.as_deref(),
            sent["correlationId"].as_str(),
            "correlation of {id}"
        );
        let expected =
            tidings_core::time::parse_rfc3339(sent["timestamp"].as_str().expect("timestamp"));
        assert_eq!(*time, expected, "time of {id}");
        assert_eq!(data, &sent["data"], "data of {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stream_entries_are_read() {
    let bus = common::bus(common::REDIS, STREAM_FIELDS).await;
    let stream = unique("node-users");
    let (seen, actions): (Seen, Arc<Mutex<Vec<SettleAction>>>) = Default::default();
    let consumer = consume_all(
        bus.subscriber(),
        "tidings-svc",
        &stream,
        seen.clone(),
        actions.clone(),
    )
    .await;
    let node = ChildProcess::node(
        script(),
        &["streams-publish", URL, &stream, &COUNT.to_string()],
    );
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node publisher failed");
    wait_count(&seen, COUNT).await;
    consumer.shutdown(Duration::from_secs(10)).await;
    check_against_node(&seen, &lines);
    assert!(
        actions
            .lock()
            .expect("lock")
            .iter()
            .all(|a| *a == SettleAction::Ack),
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidings_writes_the_entries_the_node_consumer_reads() {
    let bus = common::bus(common::REDIS, STREAM_FIELDS).await;
    let stream = unique("node-orders");
    let mut node = ChildProcess::node(
        script(),
        &[
            "streams-consume",
            URL,
            &stream,
            "node-svc",
            &COUNT.to_string(),
        ],
    );
    node.wait_for("ready", Duration::from_secs(30)).await;
    let sent = publish_orders(&bus, &stream).await;
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node consumer failed: {lines:?}");
    check_at_node(&sent, &lines, "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pubsub_bodies_are_read_once_per_group() {
    let channel = unique("node-events");
    let (seen, actions): (Seen, Arc<Mutex<Vec<SettleAction>>>) = Default::default();
    // Two replicas of one group: each message is handled by one of them
    // (the claim needs an id: the body's own).
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let bus = common::bus(common::REDIS, PUBSUB_ENVELOPE).await;
        consumers.push(
            consume_all(
                bus.subscriber(),
                "tidings-svc",
                &channel,
                seen.clone(),
                actions.clone(),
            )
            .await,
        );
    }
    let node = ChildProcess::node(
        script(),
        &["pubsub-publish", URL, &channel, &COUNT.to_string()],
    );
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node publisher failed");
    wait_count(&seen, COUNT).await;
    for c in consumers {
        c.shutdown(Duration::from_secs(10)).await;
    }
    check_against_node(&seen, &lines);
    assert!(
        actions
            .lock()
            .expect("lock")
            .iter()
            .all(|a| *a == SettleAction::Ack),
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidings_publishes_the_bodies_the_node_subscriber_reads() {
    let bus = common::bus(common::REDIS, PUBSUB_ENVELOPE).await;
    let channel = unique("node-orders");
    let mut node = ChildProcess::node(
        script(),
        &["pubsub-subscribe", URL, &channel, &COUNT.to_string()],
    );
    node.wait_for("ready", Duration::from_secs(30)).await;
    let sent = publish_orders(&bus, &channel).await;
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node subscriber failed: {lines:?}");
    check_at_node(&sent, &lines, "done");
}

/// Publishes `COUNT` events; what was sent, by id.
async fn publish_orders(
    bus: &RedisBus,
    topic: &str,
) -> HashMap<String, (Value, Option<SystemTime>)> {
    let publisher = bus.publisher();
    let mut sent = HashMap::new();
    for i in 0..COUNT {
        let event = Event::new(
            serde_json::json!({ "orderId": i, "customer": format!("Jürgen Ōtsuka {i} ✓") }),
        )
        .with_type("order.placed")
        .with_correlation_id(format!("corr-{i}"));
        sent.insert(
            event.id().to_owned(),
            (event.data.clone(), event.metadata().time),
        );
        publisher
            .publish_event(topic, event)
            .await
            .expect("published");
    }
    sent
}

/// Checks what the Node side printed against what Tidings sent; the line
/// with `summary` (pending entries / a count) ends it.
fn check_at_node(
    sent: &HashMap<String, (Value, Option<SystemTime>)>,
    lines: &[String],
    summary: &str,
) {
    let ms = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis()
    };
    let mut received = 0;
    for line in lines {
        let v: Value = serde_json::from_str(line).expect("a JSON line");
        if let Some(s) = v.get(summary) {
            if summary == "pending" {
                assert_eq!(s, 0, "the Node group's pending list is empty afterwards");
            }
            continue;
        }
        let id = v["id"].as_str().expect("an id");
        let (data, time) = sent.get(id).unwrap_or_else(|| panic!("{id} was not sent"));
        assert_eq!(v["type"], "order.placed");
        assert_eq!(&v["data"], data);
        let i = data["orderId"].as_u64().expect("orderId");
        assert_eq!(v["correlationId"], format!("corr-{i}"));
        let stamp = tidings_core::time::parse_rfc3339(v["timestamp"].as_str().expect("timestamp"))
            .expect("ISO time");
        assert_eq!(ms(stamp), ms(time.expect("a time")));
        received += 1;
    }
    assert_eq!(received, COUNT, "each message once");
}
