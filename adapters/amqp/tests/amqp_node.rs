//! Interop with a plain Node.js service on RabbitMQ (amqplib, written the
//! way the common articles write one: `tests/node/rabbitmq.js`), in both
//! directions, in the envelope dialect; and joining the queue such a
//! service declared with its own arguments.

mod common;

use std::time::Duration;

use serde_json::Value;
use tidings_amqp::{AmqpBus, AmqpConfig};
use tidings_core::Consumer;
use tidings_core::testkit::interop::{self, Recorder};
use tidings_core::testkit::{ChildProcess, unique};

const COUNT: usize = 100;
const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn script() -> String {
    format!(
        "{}/../../tests/node/rabbitmq.js",
        env!("CARGO_MANIFEST_DIR")
    )
}

async fn bus(exchange: &str, options: &str) -> AmqpBus {
    let config = AmqpConfig::from_url(&format!(
        "{URL}?exchange={exchange}&dead_letter_exchange={exchange}.tidings-dlx&queue_expires=3m&dialect=envelope{options}"
    ))
    .expect("config");
    common::connect(config).await
}

/// Runs the Node publisher and checks what `recorder` read against it.
async fn node_publishes_to(recorder: Recorder, exchange: &str) {
    let node = ChildProcess::node(script(), &["publish", URL, exchange, &COUNT.to_string()]);
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node publisher failed");
    recorder.wait_for(COUNT).await;
    let (seen, actions) = recorder.stop().await;
    let sent = interop::sent_envelopes(&lines);
    interop::check_received(&seen, &actions, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publishes_the_articles_envelope_and_tidings_reads_it() {
    let exchange = unique("node-ex");
    let bus = bus(&exchange, "").await;
    let recorder = Recorder::start(
        Consumer::group(bus.subscriber(), unique("tidings-svc")),
        "user.*",
    )
    .await;
    node_publishes_to(recorder, &exchange).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidings_publishes_what_the_node_consumer_expects() {
    let exchange = unique("node-ex");
    let bus = bus(&exchange, "").await;
    let queue = unique("node-orders");
    let mut node = ChildProcess::node(
        script(),
        &[
            "consume",
            URL,
            &exchange,
            &queue,
            "order.#",
            &COUNT.to_string(),
        ],
    );
    node.wait_for("ready", Duration::from_secs(30)).await;
    let sent = interop::publish_orders(&*bus.publisher(), "order.placed", COUNT).await;
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node consumer failed: {lines:?}");
    let mut received = 0;
    for line in &lines {
        let v: Value = serde_json::from_str(line).expect("a JSON line");
        if let Some(remaining) = v.get("remaining") {
            assert_eq!(remaining, 0, "the Node service's queue is empty afterwards");
            continue;
        }
        let e = &v["event"];
        let id = e["id"].as_str().expect("the envelope has an id");
        interop::check_order(
            &sent,
            id,
            &e["type"],
            &e["payload"],
            &e["metadata"]["correlationId"],
            &e["timestamp"],
        );
        assert_eq!(v["correlationHeader"], e["metadata"]["correlationId"]);
        assert_eq!(v["messageId"], id);
        received += 1;
    }
    assert_eq!(received, COUNT, "each message once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidings_joins_the_queue_a_node_service_declared() {
    let exchange = unique("node-ex");
    let queue = unique("legacy-queue");
    // The Node service's queue, with its own dead-letter argument: declared
    // (and bound) by the Node consumer, which is then stopped.
    let mut declarer = ChildProcess::node(
        script(),
        &["consume", URL, &exchange, &queue, "user.*", "1"],
    );
    declarer.wait_for("ready", Duration::from_secs(30)).await;
    drop(declarer);
    let group = unique("tidings-svc");
    let bus = bus(&exchange, &format!("&queue.{group}={queue}")).await;
    let recorder =
        Recorder::start(Consumer::group(bus.subscriber(), group.as_str()), "user.*").await;
    node_publishes_to(recorder, &exchange).await;
    // Clean up the queue that no Tidings naming would expire.
    let conn = lapin::Connection::connect(URL, lapin::ConnectionProperties::default())
        .await
        .expect("raw");
    let ch = conn.create_channel().await.expect("channel");
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}
