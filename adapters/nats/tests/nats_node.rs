//! Interop with plain Node.js services on NATS (nats.js, written the way the
//! common articles write them: `tests/node/nats.js`), on JetStream and core
//! NATS, in both directions, in the envelope dialect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tidings_core::testkit::{ChildProcess, unique, within};
use tidings_core::{Consumer, Event, HandlerError, PublisherExt, SettleAction};
use tidings_nats::{NatsBus, NatsConfig};

const COUNT: usize = 100;
const SERVER: &str = "127.0.0.1:4222";

fn script() -> String {
    format!("{}/../../tests/node/nats.js", env!("CARGO_MANIFEST_DIR"))
}

async fn bus(core: bool) -> NatsBus {
    let mut config = NatsConfig::from_url(&format!(
        "nats://{SERVER}?max_age=1h&connect_timeout=3s&dialect=envelope"
    ))
    .expect("config");
    if core {
        config = config.core();
    }
    NatsBus::connect(config).await.unwrap_or_else(|e| {
        panic!("cannot reach nats-server at {SERVER} ({e}); start it with `nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/nats-js &`")
    })
}

type Seen =
    Arc<Mutex<HashMap<String, Vec<(Option<String>, Option<SystemTime>, Option<String>, Value)>>>>;

async fn node_to_tidings(core: bool) {
    let bus = bus(core).await;
    let subject = unique("node-users");
    let seen: Seen = Arc::default();
    let actions: Arc<Mutex<Vec<SettleAction>>> = Arc::default();
    let (record, settled) = (seen.clone(), actions.clone());
    let consumer = Consumer::group(bus.subscriber(), "tidings-svc")
        .handle(&subject, move |e: Event<Value>| {
            let record = record.clone();
            async move {
                let m = e.metadata();
                record
                    .lock()
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
        .on_settle(move |s| settled.lock().expect("lock").push(s.action))
        .start()
        .await
        .expect("the consumer starts");
    let mode = if core { "core" } else { "jetstream" };
    let node = ChildProcess::node(
        script(),
        &["publish", SERVER, &subject, &COUNT.to_string(), mode],
    );
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node publisher failed");
    within(60, "every message at the Tidings handler", async {
        while seen.lock().expect("lock").len() < COUNT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
    let seen = seen.lock().expect("lock");
    for line in &lines {
        let sent: Value = serde_json::from_str(line).expect("a JSON line");
        let id = sent["id"].as_str().expect("id");
        let got = seen.get(id).unwrap_or_else(|| panic!("{id} never arrived"));
        assert_eq!(got.len(), 1, "{id} once");
        let (event_type, time, correlation, data) = &got[0];
        assert_eq!(event_type.as_deref(), sent["type"].as_str());
        assert_eq!(
            correlation.as_deref(),
            sent["metadata"]["correlationId"].as_str()
        );
        assert_eq!(
            *time,
            tidings_core::time::parse_rfc3339(sent["timestamp"].as_str().expect("time"))
        );
        assert_eq!(data, &sent["payload"]);
    }
    assert_eq!(seen.len(), COUNT);
    let actions = actions.lock().expect("lock");
    assert!(
        actions.iter().all(|a| *a == SettleAction::Ack),
        "nothing dead-lettered: {actions:?}"
    );
}

async fn tidings_to_node(core: bool) {
    let bus = bus(core).await;
    let subject = unique("node-orders");
    let stream = unique("NODE_ORDERS");
    let mode = if core { "core" } else { "jetstream" };
    let mut node = ChildProcess::node(
        script(),
        &[
            "consume",
            SERVER,
            &subject,
            &COUNT.to_string(),
            mode,
            &stream,
            "node-svc",
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
        // On JetStream into the Node service's own stream, whatever it is named.
        publisher
            .publish_event(&subject, event)
            .await
            .expect("published");
    }
    let (lines, ok) = node.finish(Duration::from_secs(60)).await;
    assert!(ok, "the Node consumer failed: {lines:?}");
    let ms = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis()
    };
    let mut received = 0;
    for line in &lines {
        let v: Value = serde_json::from_str(line).expect("a JSON line");
        if let Some(pending) = v.get("pending") {
            assert_eq!(pending, 0, "nothing left pending at the Node consumer");
            continue;
        }
        let e = &v["event"];
        let id = e["id"].as_str().expect("an id");
        let (data, time) = sent.get(id).unwrap_or_else(|| panic!("{id} was not sent"));
        assert_eq!(e["type"], "order.placed");
        assert_eq!(&e["payload"], data);
        let i = data["orderId"].as_u64().expect("orderId");
        assert_eq!(e["metadata"]["correlationId"], format!("corr-{i}"));
        assert_eq!(v["correlationHeader"], format!("corr-{i}"));
        assert_eq!(v["contentType"], "application/json");
        if !core {
            assert_eq!(v["msgId"], id, "Nats-Msg-Id is the event id");
        }
        let stamp = tidings_core::time::parse_rfc3339(e["timestamp"].as_str().expect("timestamp"))
            .expect("ISO");
        assert_eq!(ms(stamp), ms(time.expect("a time")));
        received += 1;
    }
    assert_eq!(received, COUNT, "each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_node_to_tidings() {
    node_to_tidings(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_tidings_to_node() {
    tidings_to_node(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_node_to_tidings() {
    node_to_tidings(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_tidings_to_node() {
    tidings_to_node(true).await;
}
