//! Interop with plain Node.js services on Redis (ioredis, written the way
//! the common articles write them: `tests/node/redis.js`), in both
//! directions: Streams entries `type / data / timestamp / correlationId`,
//! and Pub/Sub JSON bodies.

mod common;

use std::time::Duration;

use serde_json::Value;
use tidings_core::Consumer;
use tidings_core::testkit::interop::{self, Recorder, Sent};
use tidings_core::testkit::{ChildProcess, unique};

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

/// The flat JSON lines the Node side prints, as `check_received` takes them.
fn sent_by_node(lines: &[String]) -> Vec<(String, String, String, String, Value)> {
    lines
        .iter()
        .map(|line| {
            let e: Value = serde_json::from_str(line).expect("a JSON line");
            let s = |v: &Value| v.as_str().expect("a string").to_owned();
            (
                s(&e["id"]),
                s(&e["type"]),
                s(&e["timestamp"]),
                s(&e["correlationId"]),
                e["data"].clone(),
            )
        })
        .collect()
}

/// Checks the flat JSON lines the Node side printed of what Tidings sent;
/// the line holding `summary` ends it (and says `pending: 0` for Streams).
fn check_at_node(sent: &Sent, lines: &[String], summary: &str) {
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
        interop::check_order(
            sent,
            id,
            &v["type"],
            &v["data"],
            &v["correlationId"],
            &v["timestamp"],
        );
        received += 1;
    }
    assert_eq!(received, COUNT, "each message once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stream_entries_are_read() {
    let bus = common::bus(common::REDIS, STREAM_FIELDS).await;
    let stream = unique("node-users");
    let recorder = Recorder::start(Consumer::group(bus.subscriber(), "tidings-svc"), &stream).await;
    let node = ChildProcess::node(
        script(),
        &["streams-publish", URL, &stream, &COUNT.to_string()],
    );
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node publisher failed");
    recorder.wait_for(COUNT).await;
    let (seen, actions) = recorder.stop().await;
    interop::check_received(&seen, &actions, &sent_by_node(&lines));
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
    let sent = interop::publish_orders(&*bus.publisher(), &stream, COUNT).await;
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node consumer failed: {lines:?}");
    check_at_node(&sent, &lines, "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pubsub_bodies_are_read_once_per_group() {
    let channel = unique("node-events");
    // Two replicas of one group: each message is handled by one of them
    // (the claim needs an id: the body's own).
    let mut recorders = Vec::new();
    for _ in 0..2 {
        let bus = common::bus(common::REDIS, PUBSUB_ENVELOPE).await;
        recorders.push(
            Recorder::start(Consumer::group(bus.subscriber(), "tidings-svc"), &channel).await,
        );
    }
    let node = ChildProcess::node(
        script(),
        &["pubsub-publish", URL, &channel, &COUNT.to_string()],
    );
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node publisher failed");
    let mut seen = std::collections::HashMap::new();
    let mut actions = Vec::new();
    // Every message at one replica or the other: wait for the sum.
    tidings_core::testkit::within(60, "every message at one replica", async {
        loop {
            // Each replica's count, read without stopping it.
            let total: usize = recorders.iter().map(Recorder::count).sum();
            if total >= COUNT {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for recorder in recorders {
        let (s, a) = recorder.stop().await;
        for (id, observed) in s {
            seen.entry(id).or_insert_with(Vec::new).extend(observed);
        }
        actions.extend(a);
    }
    interop::check_received(&seen, &actions, &sent_by_node(&lines));
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
    let sent = interop::publish_orders(&*bus.publisher(), &channel, COUNT).await;
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node subscriber failed: {lines:?}");
    check_at_node(&sent, &lines, "done");
}
