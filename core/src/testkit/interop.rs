//! The Tidings side of an interop test against a plain client of another
//! language: a consumer that records what it read, and a publisher of
//! numbered orders, with the checks every broker's test makes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::{
    Consumer, ConsumerBuilder, Event, HandlerError, Publisher, PublisherExt, SettleAction,
};

/// What a handler read of one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The event type.
    pub event_type: Option<String>,
    /// The event time.
    pub time: Option<SystemTime>,
    /// The correlation id.
    pub correlation_id: Option<String>,
    /// The data, as JSON.
    pub data: Value,
}

/// A running consumer that records every message it handles (by id, each
/// handling) and every settlement.
pub struct Recorder {
    consumer: Consumer,
    seen: Arc<Mutex<HashMap<String, Vec<Observed>>>>,
    actions: Arc<Mutex<Vec<SettleAction>>>,
}

impl Recorder {
    /// Starts `builder` with a JSON handler on `topic` that records.
    ///
    /// # Panics
    /// When the consumer cannot start.
    pub async fn start(builder: ConsumerBuilder, topic: &str) -> Recorder {
        let seen: Arc<Mutex<HashMap<String, Vec<Observed>>>> = Arc::default();
        let actions: Arc<Mutex<Vec<SettleAction>>> = Arc::default();
        let (record, settled) = (seen.clone(), actions.clone());
        let consumer = builder
            .handle(topic, move |e: Event<Value>| {
                let record = record.clone();
                async move {
                    let m = e.metadata();
                    let observed = Observed {
                        event_type: m.event_type.clone(),
                        time: m.time,
                        correlation_id: m.correlation_id.clone(),
                        data: e.data.clone(),
                    };
                    lock(&record)
                        .entry(e.id().to_owned())
                        .or_default()
                        .push(observed);
                    Ok::<_, HandlerError>(())
                }
            })
            .on_settle(move |s| lock(&settled).push(s.action))
            .start()
            .await
            .expect("the recording consumer starts");
        Recorder {
            consumer,
            seen,
            actions,
        }
    }

    /// Waits until `n` distinct messages were handled.
    ///
    /// # Panics
    /// When that takes 60 s.
    pub async fn wait_for(&self, n: usize) {
        crate::testkit::within(60, "every message at the Tidings handler", async {
            while lock(&self.seen).len() < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// How many settlements were made so far.
    pub fn settled(&self) -> usize {
        lock(&self.actions).len()
    }

    /// How many distinct messages were handled so far.
    pub fn count(&self) -> usize {
        lock(&self.seen).len()
    }

    /// Shuts the consumer down; what it saw, and every settlement.
    pub async fn stop(self) -> (HashMap<String, Vec<Observed>>, Vec<SettleAction>) {
        self.consumer.shutdown(Duration::from_secs(10)).await;
        let seen = lock(&self.seen).clone();
        let actions = lock(&self.actions).clone();
        (seen, actions)
    }
}

/// The JSON lines a Node publisher printed, one envelope
/// `{ id, type, timestamp, payload, metadata: { correlationId } }` each, as
/// [`check_received`] takes them.
///
/// # Panics
/// On a line that is not such an envelope.
pub fn sent_envelopes(lines: &[String]) -> Vec<(String, String, String, String, Value)> {
    lines
        .iter()
        .map(|line| {
            let e: Value = serde_json::from_str(line).expect("a JSON line");
            let s = |v: &Value| v.as_str().expect("a string").to_owned();
            (
                s(&e["id"]),
                s(&e["type"]),
                s(&e["timestamp"]),
                s(&e["metadata"]["correlationId"]),
                e["payload"].clone(),
            )
        })
        .collect()
}

/// Checks recorded messages against what the other side sent (by id):
/// each handled once, with type, time, correlation id and data intact, and
/// nothing dead-lettered. `sent` gives, per message, its id, type, time
/// (RFC 3339), correlation id and data.
///
/// # Panics
/// On the first difference.
pub fn check_received(
    seen: &HashMap<String, Vec<Observed>>,
    actions: &[SettleAction],
    sent: &[(String, String, String, String, Value)],
) {
    assert_eq!(seen.len(), sent.len(), "each message arrived");
    for (id, event_type, time, correlation, data) in sent {
        let got = seen.get(id).unwrap_or_else(|| panic!("{id} never arrived"));
        assert_eq!(got.len(), 1, "{id} handled once");
        let got = &got[0];
        assert_eq!(
            got.event_type.as_deref(),
            Some(event_type.as_str()),
            "type of {id}"
        );
        assert_eq!(
            got.correlation_id.as_deref(),
            Some(correlation.as_str()),
            "correlation of {id}"
        );
        assert_eq!(got.time, crate::time::parse_rfc3339(time), "time of {id}");
        assert_eq!(&got.data, data, "data of {id}");
    }
    assert!(
        actions.iter().all(|a| *a == SettleAction::Ack),
        "nothing dead-lettered: {actions:?}"
    );
}

/// What [`publish_orders`] sent, by id: the data and the time.
pub type Sent = HashMap<String, (Value, Option<SystemTime>)>;

/// Publishes `count` `order.placed` events with non-ASCII data and a
/// correlation id `corr-<n>` to `topic`.
///
/// # Panics
/// When a publish fails.
pub async fn publish_orders(publisher: &dyn Publisher, topic: &str, count: usize) -> Sent {
    let mut sent = HashMap::new();
    for i in 0..count {
        let event = Event::new(serde_json::json!({
            "orderId": i,
            "customer": format!("Jürgen Ōtsuka {i} ✓"),
        }))
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

/// Checks one order as the other side read it: its id was sent, type
/// `order.placed`, the data, correlation id `corr-<orderId>`, and the time
/// (RFC 3339) to the millisecond.
///
/// # Panics
/// On a difference.
pub fn check_order(
    sent: &Sent,
    id: &str,
    event_type: &Value,
    data: &Value,
    correlation: &Value,
    time: &Value,
) {
    let (sent_data, sent_time) = sent.get(id).unwrap_or_else(|| panic!("{id} was not sent"));
    assert_eq!(event_type, "order.placed", "type of {id}");
    assert_eq!(data, sent_data, "data of {id}");
    let i = sent_data["orderId"].as_u64().expect("orderId");
    assert_eq!(
        correlation,
        &Value::String(format!("corr-{i}")),
        "correlation of {id}"
    );
    let ms = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis()
    };
    let stamp = time
        .as_str()
        .and_then(crate::time::parse_rfc3339)
        .unwrap_or_else(|| panic!("{id}: `{time}` is no RFC 3339 time"));
    assert_eq!(ms(stamp), ms(sent_time.expect("a time")), "time of {id}");
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
