//! Nothing a message does ends a consumer: panics in settlement, messages
//! the adapter could not read, a slow key under per-key order, and a
//! shutdown whose deadline passes are all survived and reported.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidings_core::testkit::ScriptedSubscriber;
use tidings_core::{
    Consumer, DeadLetterReason, Event, HandlerError, Message, MessageId, SettleAction, Settlement,
};

fn word(w: &str) -> Message {
    Message::new(serde_json::to_vec(w).expect("json"))
}

type Seen = Arc<Mutex<Vec<(MessageId, SettleAction, bool)>>>;

fn recorder() -> (Seen, impl Fn(&Settlement<'_>) + Send + Sync + 'static) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    (seen, move |s: &Settlement<'_>| {
        record.lock().expect("lock").push((
            s.delivery.message().id.clone(),
            s.action,
            s.result.is_ok(),
        ))
    })
}

#[tokio::test]
async fn panics_in_settlement_are_caught_counted_and_observed() {
    // More panicking settlements than workers: before, each one killed the
    // worker that settled it, and the consumer went silent.
    let mut subscriber = ScriptedSubscriber::new();
    let mut poison = Vec::new();
    for i in 0..20 {
        let m = word(&format!("poison-{i}"));
        poison.push(m.id.clone());
        subscriber = subscriber.with("t", m.clone()).panicking(&m.id);
    }
    let fine = word("fine");
    subscriber = subscriber.with("t", fine.clone());
    let (seen, observe) = recorder();
    let consumer = Consumer::group(subscriber.clone().into_arc(), "g")
        .concurrency(4)
        .handle("t", |_: Event<String>| async { Ok::<_, HandlerError>(()) })
        .on_settle(observe)
        .start()
        .await
        .expect("started");
    subscriber.wait_settled(21, Duration::from_secs(10)).await;
    let report = consumer.shutdown(Duration::from_secs(10)).await;

    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 21, "every settlement observed: {seen:?}");
    for (id, action, ok) in &seen {
        assert_eq!(*action, SettleAction::Ack);
        assert_eq!(
            *ok,
            *id == fine.id,
            "{id}: a panicked settlement is a failed one"
        );
    }
    assert_eq!(report.received, 21);
    assert_eq!(report.settled, 1);
    assert_eq!(report.failed_settlements, 20);
    assert_eq!(report.worker_restarts, 0, "the guard caught every panic");
    assert!(report.drained);
    assert!(
        !report.is_clean(),
        "failed settlements come back: not clean"
    );
}

#[tokio::test]
async fn a_delivery_the_adapter_could_not_read_is_dead_lettered_and_observed() {
    let unreadable = word("whatever");
    let subscriber = ScriptedSubscriber::new()
        .with("t", unreadable.clone())
        .rejecting(&unreadable.id)
        .with("t", word("fine"));
    let handled = Arc::new(AtomicUsize::new(0));
    let count = handled.clone();
    let (seen, observe) = recorder();
    let consumer = Consumer::group(subscriber.clone().into_arc(), "g")
        .concurrency(1)
        .handle("t", move |_: Event<String>| {
            count.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, HandlerError>(()) }
        })
        .on_settle(observe)
        .start()
        .await
        .expect("started");
    subscriber.wait_settled(2, Duration::from_secs(10)).await;
    consumer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        handled.load(Ordering::SeqCst),
        1,
        "the handler never saw it"
    );
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen[0],
        (
            unreadable.id.clone(),
            SettleAction::DeadLetter {
                reason: DeadLetterReason::Undecodable
            },
            true
        )
    );
    assert_eq!(seen[1].1, SettleAction::Ack);
}

#[tokio::test]
async fn a_blocked_key_holds_up_only_its_own_messages() {
    // Three messages of a key whose handler blocks come first; then 15 other
    // keys. With per-worker lanes, the blocked key's lane (and intake, once
    // it was full) stalled keys that merely hashed alike.
    let mut subscriber = ScriptedSubscriber::new();
    for i in 0..3 {
        subscriber = subscriber.with("t", word(&format!("slow {i}")).with_key("slow"));
    }
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..60 {
        let key = format!("k{}", i % 15);
        let text = format!("{key} {i}");
        expected.entry(key.clone()).or_default().push(text.clone());
        subscriber = subscriber.with("t", word(&text).with_key(key));
    }
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let order: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let (gate, record) = (release.clone(), order.clone());
    let consumer = Consumer::group(subscriber.clone().into_arc(), "g")
        .concurrency(4)
        .prefetch(64)
        .ordered_by_key()
        .handle("t", move |e: Event<String>| {
            let (gate, record) = (gate.clone(), record.clone());
            async move {
                let key = e.key().unwrap_or_default().to_owned();
                if key == "slow" {
                    gate.acquire().await.expect("open").forget();
                }
                record
                    .lock()
                    .expect("lock")
                    .entry(key)
                    .or_default()
                    .push(e.data);
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("started");
    // Every other key is handled while the slow one is still blocked.
    subscriber.wait_settled(60, Duration::from_secs(10)).await;
    assert!(!order.lock().expect("lock").contains_key("slow"));
    release.add_permits(3);
    subscriber.wait_settled(63, Duration::from_secs(10)).await;
    consumer.shutdown(Duration::from_secs(10)).await;
    let mut order = order.lock().expect("lock").clone();
    assert_eq!(
        order.remove("slow").expect("slow handled"),
        ["slow 0", "slow 1", "slow 2"]
    );
    assert_eq!(order, expected, "each key in the order received");
}

#[tokio::test]
async fn a_shutdown_past_its_deadline_hands_back_what_was_not_handled() {
    // One key: the first message blocks in its handler past the deadline,
    // the other worker takes the rest and parks them behind it.
    let mut subscriber = ScriptedSubscriber::new();
    for i in 0..10 {
        subscriber = subscriber.with("t", word(&format!("m{i}")).with_key("k"));
    }
    let started = Arc::new(tokio::sync::Notify::new());
    let signal = started.clone();
    let consumer = Consumer::group(subscriber.clone().into_arc(), "g")
        .concurrency(2)
        .ordered_by_key()
        .handle("t", move |_: Event<String>| {
            signal.notify_one();
            // Outlives the deadline.
            async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("started");
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the first handler started");
    let report = consumer.shutdown(Duration::from_millis(200)).await;
    assert!(!report.drained);
    assert_eq!(report.abandoned, 1, "the one in the handler: {report:?}");
    assert!(report.received >= 2, "some were parked: {report:?}");
    assert_eq!(
        report.released,
        report.received - 1,
        "the parked ones were handed back: {report:?}"
    );
    // Handed back unhandled: dropped unsettled (the adapter gives each back
    // as it was), never nacked as a failed attempt.
    assert!(
        subscriber.settlements().is_empty(),
        "{:?}",
        subscriber.settlements()
    );
}

/// An extractor that panics on the word `extract`.
struct Touchy;

impl tidings_core::FromDelivery for Touchy {
    fn from_delivery(delivery: &tidings_core::Delivery) -> Result<Self, HandlerError> {
        if delivery.message().payload == "\"extract\"" {
            panic!("an extractor bug (expected in this test)");
        }
        Ok(Touchy)
    }
}

#[tokio::test]
async fn one_worker_goes_on_after_its_handler_and_an_extractor_panic() {
    // One worker, no layers: the handler's future lives in the worker's
    // reusable slot, which a panic must leave usable for the next message.
    let messages = ["handler", "extract", "fine", "fine"].map(word);
    let mut subscriber = ScriptedSubscriber::new();
    for m in &messages {
        subscriber = subscriber.with("t", m.clone());
    }
    let consumer = Consumer::group(subscriber.clone().into_arc(), "g")
        .concurrency(1)
        .handle("t", |e: Event<String>, _: Touchy| async move {
            if e.data == "handler" {
                panic!("a handler bug (expected in this test)");
            }
            Ok::<_, HandlerError>(())
        })
        .start()
        .await
        .expect("started");
    subscriber.wait_settled(4, Duration::from_secs(10)).await;
    consumer.shutdown(Duration::from_secs(10)).await;
    let outcomes: Vec<_> = subscriber
        .settlements()
        .into_iter()
        .map(|(_, how, ok)| (how, ok))
        .collect();
    assert_eq!(
        outcomes,
        [("nack", true), ("nack", true), ("ack", true), ("ack", true)],
        "both panics are failed attempts; the worker handles what follows"
    );
}

/// A handler's future that is done at once but holds a guard until it is
/// dropped, as a hand-written future, an `instrument`ed one (its span) or
/// one holding a permit does.
struct Guarded(tokio::sync::mpsc::UnboundedSender<()>);

impl std::future::Future for Guarded {
    type Output = tidings_core::HandlerResult;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

#[tokio::test]
async fn a_handlers_future_is_dropped_when_it_is_done_not_at_the_next_message() {
    let subscriber = ScriptedSubscriber::new().with("t", word("only"));
    let (dropped, mut drops) = tokio::sync::mpsc::unbounded_channel();
    let consumer = Consumer::group(subscriber.clone().into_arc(), "g")
        .concurrency(1)
        .handle("t", move |_: Event<String>| Guarded(dropped.clone()))
        .start()
        .await
        .expect("started");
    subscriber.wait_settled(1, Duration::from_secs(10)).await;
    // No second message comes: the worker is idle, its slot kept.
    tokio::time::timeout(Duration::from_secs(10), drops.recv())
        .await
        .expect("the handler's future is dropped once it is done")
        .expect("a drop");
    consumer.shutdown(Duration::from_secs(10)).await;
}
