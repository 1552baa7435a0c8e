//! Interop with plain Node.js services on NATS (nats.js, written the way the
//! common articles write them: `tests/node/nats.js`), on JetStream and core
//! NATS, in both directions, in the envelope dialect; and structured
//! CloudEvents both ways in the `cloudevents-structured` dialect.

use std::time::Duration;

use serde_json::Value;
use tidings_core::Consumer;
use tidings_core::testkit::interop::{self, Recorder};
use tidings_core::testkit::{ChildProcess, unique};
use tidings_nats::{NatsBus, NatsConfig};

const COUNT: usize = 100;
const SERVER: &str = "127.0.0.1:4222";

fn script() -> String {
    format!("{}/../../tests/node/nats.js", env!("CARGO_MANIFEST_DIR"))
}

async fn bus(core: bool, dialect: &str) -> NatsBus {
    let mut config = NatsConfig::from_url(&format!(
        "nats://{SERVER}?max_age=1h&connect_timeout=3s&dialect={dialect}"
    ))
    .expect("config");
    if core {
        config = config.core();
    }
    NatsBus::connect(config).await.unwrap_or_else(|e| {
        panic!("cannot reach nats-server at {SERVER} ({e}); start it with `nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/nats-js &`")
    })
}

fn mode(core: bool) -> &'static str {
    if core { "core" } else { "jetstream" }
}

/// Node publishes `format` (`envelope` or `cloudevents`, structured);
/// Tidings reads it in `dialect`.
async fn node_to_tidings(core: bool, format: &str, dialect: &str) {
    let bus = bus(core, dialect).await;
    let subject = unique("node-users");
    let recorder =
        Recorder::start(Consumer::group(bus.subscriber(), "tidings-svc"), &subject).await;
    let node = ChildProcess::node(
        script(),
        &[
            "publish",
            SERVER,
            &subject,
            &COUNT.to_string(),
            mode(core),
            format,
        ],
    );
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node publisher failed");
    recorder.wait_for(COUNT).await;
    let (seen, actions) = recorder.stop().await;
    let sent = interop::sent_envelopes(&lines);
    interop::check_received(&seen, &actions, &sent);
}

/// Tidings publishes in `dialect`; the Node consumer reads it (the envelope,
/// or a structured CloudEvent it maps to the envelope's shape).
async fn tidings_to_node(core: bool, dialect: &str) {
    let bus = bus(core, dialect).await;
    let subject = unique("node-orders");
    let stream = unique("NODE_ORDERS");
    let mut node = ChildProcess::node(
        script(),
        &[
            "consume",
            SERVER,
            &subject,
            &COUNT.to_string(),
            mode(core),
            &stream,
            "node-svc",
        ],
    );
    node.wait_for("ready", Duration::from_secs(30)).await;
    // On JetStream into the Node service's own stream, whatever it is named.
    let sent = interop::publish_orders(&*bus.publisher(), &subject, COUNT).await;
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node consumer failed: {lines:?}");
    let mut received = 0;
    for line in &lines {
        let v: Value = serde_json::from_str(line).expect("a JSON line");
        if let Some(pending) = v.get("pending") {
            assert_eq!(pending, 0, "nothing left pending at the Node consumer");
            continue;
        }
        let e = &v["event"];
        let id = e["id"].as_str().expect("an id");
        interop::check_order(
            &sent,
            id,
            &e["type"],
            &e["payload"],
            &e["metadata"]["correlationId"],
            &e["timestamp"],
        );
        if dialect == "envelope" {
            assert_eq!(v["correlationHeader"], e["metadata"]["correlationId"]);
            assert_eq!(v["contentType"], "application/json");
        } else {
            assert_eq!(v["contentType"], "application/cloudevents+json");
        }
        if !core {
            assert_eq!(v["msgId"], id, "Nats-Msg-Id is the event id");
        }
        received += 1;
    }
    assert_eq!(received, COUNT, "each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_node_to_tidings() {
    node_to_tidings(false, "envelope", "envelope").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_structured_cloudevents_from_node() {
    node_to_tidings(false, "cloudevents", "cloudevents-structured").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_tidings_to_node() {
    tidings_to_node(false, "envelope").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_structured_cloudevents_to_node() {
    tidings_to_node(false, "cloudevents-structured").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_node_to_tidings() {
    node_to_tidings(true, "envelope", "envelope").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_tidings_to_node() {
    tidings_to_node(true, "envelope").await;
}
