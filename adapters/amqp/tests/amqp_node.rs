//! Interop with a plain Node.js service on RabbitMQ (amqplib, written the
//! way the common articles write one: `tests/node/rabbitmq.js`), in both
//! directions, in the envelope dialect; and joining the queue such a
//! service declared with its own arguments.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tidings_amqp::{AmqpBus, AmqpConfig};
use tidings_core::testkit::{ChildProcess, unique, within};
use tidings_core::{Consumer, Event, HandlerError, PublisherExt, SettleAction};

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

/// What a Tidings handler saw of each message, by id.
type Seen =
    Arc<Mutex<HashMap<String, (Option<String>, Option<SystemTime>, Option<String>, Value)>>>;

async fn consume_all(
    bus: &AmqpBus,
    group: &str,
    pattern: &str,
) -> (Consumer, Seen, Arc<Mutex<Vec<SettleAction>>>) {
    let seen: Seen = Arc::default();
    let actions: Arc<Mutex<Vec<SettleAction>>> = Arc::default();
    let (record, settled) = (seen.clone(), actions.clone());
    let consumer = Consumer::group(bus.subscriber(), group)
        .handle(pattern, move |e: Event<Value>| {
            let record = record.clone();
            async move {
                let m = e.metadata();
                record.lock().expect("lock").insert(
                    e.id().to_owned(),
                    (
                        m.event_type.clone(),
                        m.time,
                        m.correlation_id.clone(),
                        e.data.clone(),
                    ),
                );
                Ok::<_, HandlerError>(())
            }
        })
        .on_settle(move |s| settled.lock().expect("lock").push(s.action))
        .start()
        .await
        .expect("the consumer starts");
    (consumer, seen, actions)
}

async fn wait_count(seen: &Seen, n: usize) {
    within(60, "every message at the Tidings handler", async {
        while seen.lock().expect("lock").len() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Checks what Tidings read against what the Node publisher printed.
fn check_against_node(seen: &Seen, node_lines: &[String]) {
    let seen = seen.lock().expect("lock");
    let mut checked = 0;
    for line in node_lines {
        let sent: Value = serde_json::from_str(line).expect("a JSON line");
        let id = sent["id"].as_str().expect("id");
        let (event_type, time, correlation, data) =
            seen.get(id).unwrap_or_else(|| panic!("{id} never arrived"));
        assert_eq!(event_type.as_deref(), sent["type"].as_str(), "type of {id}");
        assert_eq!(
            correlation.as_deref(),
            sent["metadata"]["correlationId"].as_str(),
            "correlation of {id}"
        );
        let expected_time =
            tidings_core::time::parse_rfc3339(sent["timestamp"].as_str().expect("timestamp"));
        assert_eq!(*time, expected_time, "time of {id}");
        assert_eq!(data, &sent["payload"], "data of {id}");
        checked += 1;
    }
    assert_eq!(checked, COUNT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publishes_the_articles_envelope_and_tidings_reads_it() {
    let exchange = unique("node-ex");
    let bus = bus(&exchange, "").await;
    let (consumer, seen, actions) = consume_all(&bus, &unique("tidings-svc"), "user.*").await;
    let node = ChildProcess::node(script(), &["publish", URL, &exchange, &COUNT.to_string()]);
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node publisher failed");
    wait_count(&seen, COUNT).await;
    consumer.shutdown(Duration::from_secs(10)).await;
    check_against_node(&seen, &lines);
    let actions = actions.lock().expect("lock");
    assert!(
        actions.iter().all(|a| *a == SettleAction::Ack),
        "nothing dead-lettered: {actions:?}"
    );
    assert_eq!(actions.len(), COUNT, "each once");
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
            .publish_event("order.placed", event)
            .await
            .expect("published");
    }
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node consumer failed: {lines:?}");
    let mut received = 0;
    for line in &lines {
        let v: Value = serde_json::from_str(line).expect("a JSON line");
        if let Some(remaining) = v.get("remaining") {
            assert_eq!(remaining, 0, "the Node service's queue is empty afterwards");
            continue;
        }
        let event = &v["event"];
        let id = event["id"].as_str().expect("the envelope has an id");
        let (data, time) = sent.get(id).unwrap_or_else(|| panic!("{id} was not sent"));
        assert_eq!(event["type"], "order.placed");
        assert_eq!(&event["payload"], data);
        let i = data["orderId"].as_u64().expect("orderId");
        assert_eq!(event["metadata"]["correlationId"], format!("corr-{i}"));
        assert_eq!(v["correlationHeader"], format!("corr-{i}"));
        assert_eq!(v["messageId"], id);
        let ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970")
                .as_millis()
        };
        let stamp =
            tidings_core::time::parse_rfc3339(event["timestamp"].as_str().expect("timestamp"))
                .expect("ISO time");
        assert_eq!(ms(stamp), ms(time.expect("a time")));
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
    let (consumer, seen, actions) = consume_all(&bus, &group, "user.*").await;
    let node = ChildProcess::node(script(), &["publish", URL, &exchange, &COUNT.to_string()]);
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node publisher failed");
    wait_count(&seen, COUNT).await;
    consumer.shutdown(Duration::from_secs(10)).await;
    check_against_node(&seen, &lines);
    assert_eq!(actions.lock().expect("lock").len(), COUNT);
    // Clean up the queue that no Tidings naming would expire.
    let conn = lapin::Connection::connect(URL, lapin::ConnectionProperties::default())
        .await
        .expect("raw");
    let ch = conn.create_channel().await.expect("channel");
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}
