//! The conformance suite: one specification, run by every adapter against
//! its real broker.
//!
//! Each test is a function of a [`Harness`]; [`conformance_tests!`](crate::conformance_tests)
//! turns them into `#[tokio::test]`s in the adapter's test crate:
//!
//! ```ignore
//! struct Redis;
//! #[async_trait::async_trait]
//! impl tidings_core::testkit::Harness for Redis { /* connect, prepare, disrupt */ }
//! tidings_core::conformance_tests!(Redis);
//! ```
//!
//! Tests that need a capability the adapter does not declare
//! ([`Capabilities`](crate::Capabilities)) print why they do not apply and
//! return. Every wait is bounded; a hang fails the test with what it waited for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use super::{Harness, unique, within};
use crate::{
    Backoff, Consumer, DeadLetter, DeadLetterReason, Delivery, DeliveryStream, Error, Event,
    HandlerError, Message, MessageId, Publisher, PublisherExt, RetryPolicy, StartFrom, Subscriber,
    Subscription,
};

/// Generates one `#[tokio::test]` per conformance test for a harness expression.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@cases $harness;
            round_trip, volume, isolation, fan_out, competing_consumers,
            nack_redelivers_with_rising_attempt, delayed_nack_waits,
            dead_letter_after_max_attempts, undecodable_payload_dead_lettered,
            retained_for_declared_group, replay_from_earliest, order_per_key,
            slow_key_holds_up_only_itself,
            in_flight_bound, close_and_reopen_under_load, shutdown_drains_in_flight,
            reconnect, api_contract, panicking_handler_is_retried);
    };
    (@cases $harness:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let harness = $harness;
            $crate::testkit::conformance::$name(&harness).await;
        }
    )*};
}

/// The suite's core cases, one after another on one harness: what a test
/// of a cluster (whose start is too slow to repeat per case) runs on it.
/// Round trip (1 MiB, binary, headers), competing consumers, redelivery
/// with rising attempts, dead letters, retention for a declared group,
/// order per key.
pub async fn core_cases<H: Harness>(h: &H) {
    round_trip(h).await;
    competing_consumers(h).await;
    nack_redelivers_with_rising_attempt(h).await;
    dead_letter_after_max_attempts(h).await;
    retained_for_declared_group(h).await;
    order_per_key(h).await;
}

/// The typed event the suite publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// A sequence number.
    pub n: u64,
    /// Free text.
    pub text: String,
}

fn not_applicable(test: &str, adapter: &str, why: &str) {
    eprintln!("conformance: `{test}` does not apply to {adapter}: {why}");
}

async fn setup<H: Harness>(h: &H, name: &str) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>, String) {
    let (publisher, subscriber) = within(30, "connecting", h.connect()).await;
    let topic = unique(name);
    within(30, "preparing the topic", h.prepare(&topic)).await;
    (publisher, subscriber, topic)
}

async fn publish_ok(p: &dyn Publisher, topic: &str, message: Message) {
    let id = message.id.clone();
    if let Err(e) = within(30, "a publish confirmation", p.publish(topic, message)).await {
        panic!("publishing {id} to {topic} failed: {e}");
    }
}

async fn next_delivery(stream: &mut Box<dyn DeliveryStream>, what: &str) -> Delivery {
    match within(30, what, stream.next()).await {
        Some(Ok(d)) => d,
        Some(Err(e)) => panic!("subscription error while waiting for {what}: {e}"),
        None => panic!("subscription ended while waiting for {what}"),
    }
}

async fn subscribe(s: &dyn Subscriber, sub: Subscription) -> Box<dyn DeliveryStream> {
    let topic = sub.topic.clone();
    match within(30, "subscribing", s.subscribe(sub)).await {
        Ok(stream) => stream,
        Err(e) => panic!("subscribing to {topic} failed: {e}"),
    }
}

/// Records what handlers saw, and wakes waiters on every change.
#[derive(Default, Clone)]
struct Seen {
    inner: Arc<SeenInner>,
}

/// (message id, attempt) in the order handled, and a wake-up for waiters.
type SeenInner = (Mutex<Vec<(String, u32)>>, Notify);

impl Seen {
    fn record(&self, event: &Event<impl Sized>) {
        self.lock().push((event.id().to_owned(), event.attempt()));
        self.inner.1.notify_waiters();
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, u32)>> {
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn ids(&self) -> Vec<String> {
        self.lock().iter().map(|(id, _)| id.clone()).collect()
    }
    fn unique_ids(&self) -> HashSet<String> {
        self.ids().into_iter().collect()
    }
    fn attempts_of(&self, id: &str) -> Vec<u32> {
        self.lock()
            .iter()
            .filter(|(i, _)| i == id)
            .map(|(_, a)| *a)
            .collect()
    }
    async fn wait(&self, secs: u64, what: &str, done: impl Fn(&Self) -> bool) {
        within(secs, what, async {
            loop {
                let notified = self.inner.1.notified();
                if done(self) {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

fn probe(n: u64) -> Event<Probe> {
    Event::new(Probe {
        n,
        text: format!("probe {n}"),
    })
}

/// Payload bytes (non-UTF-8, empty, 1 MiB), key, non-ASCII headers and all
/// metadata arrive intact.
pub async fn round_trip<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "round-trip").await;
    let mut stream = subscribe(&*s, Subscription::group(&topic, "rt")).await;
    let parent = Message::new("parent").with_correlation_id("corr-1");
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let sent = vec![
        Message::new(Bytes::from_static(&[0xff, 0x00, 0xfe, 0x80]))
            .with_key("kunde-ä-1")
            .with_header("grüße", "✓ ünïcödé ☃")
            .with_header("x-plain", "1")
            .with_type("order.placed")
            .with_source("/conformance")
            .with_schema_version("3")
            .with_content_type("application/octet-stream")
            .caused_by(&parent),
        Message::new(Bytes::new()).with_type("empty"),
        Message::new(Bytes::from(big)).with_key("big"),
        Message::new("plain text"),
    ];
    for m in &sent {
        publish_ok(&*p, &topic, m.clone()).await;
    }
    let mut received = HashMap::new();
    for _ in 0..sent.len() {
        let mut d = next_delivery(&mut stream, "a round-tripped message").await;
        assert_eq!(d.topic(), topic);
        assert_eq!(d.attempt(), 1);
        received.insert(d.message().id.clone(), d.message().clone());
        d.ack().await.expect("ack");
    }
    for m in &sent {
        let got = received
            .get(&m.id)
            .unwrap_or_else(|| panic!("message {} was not received", m.id));
        assert_eq!(got.payload, m.payload, "payload of {}", m.id);
        assert_eq!(got.key, m.key, "key of {}", m.id);
        assert_eq!(got.metadata, m.metadata, "metadata of {}", m.id);
        for (name, value) in &m.headers {
            assert_eq!(
                got.headers.get(name),
                Some(value),
                "header {name} of {}",
                m.id
            );
        }
    }
}

/// Thousands of messages from 20 concurrent publishers all arrive, none twice.
pub async fn volume<H: Harness>(h: &H) {
    const PUBLISHERS: u64 = 20;
    const EACH: u64 = 150;
    let (p, s, topic) = setup(h, "volume").await;
    let seen = Seen::default();
    let record = seen.clone();
    let consumer = Consumer::group(s, "volume")
        .concurrency(16)
        .handle(&topic, move |e: Event<Probe>| {
            let record = record.clone();
            async move {
                record.record(&e);
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let mut publishers = Vec::new();
    for i in 0..PUBLISHERS {
        let p = p.clone();
        let topic = topic.clone();
        publishers.push(tokio::spawn(async move {
            for j in 0..EACH {
                let n = i * EACH + j;
                p.publish_event(&topic, probe(n)).await.expect("publish");
            }
        }));
    }
    within(
        120,
        "the publishers",
        futures::future::try_join_all(publishers),
    )
    .await
    .expect("publisher task");
    let total = (PUBLISHERS * EACH) as usize;
    seen.wait(120, "every message to be handled", |s| {
        s.unique_ids().len() >= total
    })
    .await;
    let ids = seen.ids();
    assert_eq!(ids.len(), total, "some messages were handled twice");
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// Many topics at once: each subscription gets only its own topic's messages.
pub async fn isolation<H: Harness>(h: &H) {
    let (p, s, _) = setup(h, "isolation").await;
    let topics: Vec<String> = (0..8).map(|i| unique(&format!("iso{i}"))).collect();
    let mut streams = Vec::new();
    for t in &topics {
        within(30, "preparing the topic", h.prepare(t)).await;
        streams.push(subscribe(&*s, Subscription::group(t, "iso")).await);
    }
    for (i, t) in topics.iter().enumerate() {
        for n in 0..25 {
            let m = Message::new(format!("{i}:{n}"));
            publish_ok(&*p, t, m).await;
        }
    }
    for (i, (t, stream)) in topics.iter().zip(&mut streams).enumerate() {
        for _ in 0..25 {
            let mut d = next_delivery(stream, "an isolated message").await;
            assert_eq!(d.topic(), t.as_str());
            let body = String::from_utf8_lossy(&d.message().payload).into_owned();
            assert!(body.starts_with(&format!("{i}:")), "{t} received {body}");
            d.ack().await.expect("ack");
        }
    }
}

/// Two groups each get every message.
pub async fn fan_out<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "fan-out").await;
    if !s.capabilities().consumer_groups {
        return not_applicable("fan_out", s.name(), "no consumer groups");
    }
    let mut a = subscribe(&*s, Subscription::group(&topic, "a")).await;
    let mut b = subscribe(&*s, Subscription::group(&topic, "b")).await;
    let sent: HashSet<MessageId> = {
        let mut ids = HashSet::new();
        for n in 0..50 {
            let m = Message::new(format!("{n}"));
            ids.insert(m.id.clone());
            publish_ok(&*p, &topic, m).await;
        }
        ids
    };
    for stream in [&mut a, &mut b] {
        let mut got = HashSet::new();
        for _ in 0..sent.len() {
            let mut d = next_delivery(stream, "a fanned-out message").await;
            got.insert(d.message().id.clone());
            d.ack().await.expect("ack");
        }
        assert_eq!(got, sent);
    }
}

/// Two members of one group share the messages: each gets some, none gets one twice.
pub async fn competing_consumers<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "compete").await;
    if !s.capabilities().consumer_groups {
        return not_applicable("competing_consumers", s.name(), "no consumer groups");
    }
    let seen = Seen::default();
    let per_member: Vec<Arc<Mutex<usize>>> = (0..2).map(|_| Arc::default()).collect();
    let mut consumers = Vec::new();
    for count in &per_member {
        let (record, count) = (seen.clone(), count.clone());
        let s2 = h.connect().await.1;
        consumers.push(
            Consumer::group(s2, "members")
                .concurrency(1)
                .prefetch(1)
                .handle(&topic, move |e: Event<Probe>| {
                    let (record, count) = (record.clone(), count.clone());
                    async move {
                        // Simulated work, so that one member cannot take everything.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                        record.record(&e);
                        Ok(())
                    }
                })
                .start()
                .await
                .expect("start member"),
        );
    }
    drop(s);
    for n in 0..60 {
        p.publish_event(&topic, probe(n)).await.expect("publish");
    }
    seen.wait(60, "all 60 messages", |s| s.unique_ids().len() >= 60)
        .await;
    assert_eq!(seen.ids().len(), 60, "a message was handled twice");
    for (i, count) in per_member.iter().enumerate() {
        let n = *count.lock().unwrap_or_else(|e| e.into_inner());
        assert!(n > 0, "member {i} got no messages: the load was not shared");
    }
    for c in consumers {
        c.shutdown(Duration::from_secs(10)).await;
    }
}

/// A failing handler's message comes back with attempts 1, 2, 3 and is then acked.
pub async fn nack_redelivers_with_rising_attempt<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "nack").await;
    let seen = Seen::default();
    let record = seen.clone();
    let consumer = Consumer::group(s, "nack")
        .retry(RetryPolicy::new(5).with_backoff(Backoff::fixed(Duration::from_millis(20))))
        .handle(&topic, move |e: Event<Probe>| {
            let record = record.clone();
            async move {
                record.record(&e);
                if e.attempt() < 3 {
                    return Err(HandlerError::retryable("not yet"));
                }
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let event = probe(1);
    let id = event.id().to_owned();
    p.publish_event(&topic, event).await.expect("publish");
    seen.wait(60, "the third attempt", |s| s.attempts_of(&id).len() >= 3)
        .await;
    assert_eq!(seen.attempts_of(&id)[..3], [1, 2, 3]);
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// A nack with a delay is not redelivered before the delay.
pub async fn delayed_nack_waits<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "delayed-nack").await;
    if !s.capabilities().delayed_nack {
        return not_applicable("delayed_nack_waits", s.name(), "no delayed nack");
    }
    let mut stream = subscribe(&*s, Subscription::group(&topic, "delay")).await;
    let m = Message::new("later");
    publish_ok(&*p, &topic, m.clone()).await;
    let mut first = next_delivery(&mut stream, "the first delivery").await;
    let delay = Duration::from_millis(800);
    let nacked_at = Instant::now();
    first.nack(Some(delay)).await.expect("nack");
    let mut again = next_delivery(&mut stream, "the redelivery").await;
    let waited = nacked_at.elapsed();
    assert_eq!(again.message().id, m.id);
    assert_eq!(again.attempt(), 2);
    assert!(
        waited >= delay,
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    again.ack().await.expect("ack");
}

async fn dead_letters<H: Harness>(
    h: &H,
    s: &dyn Subscriber,
    topic: &str,
    group: &str,
) -> Box<dyn DeliveryStream> {
    let _ = h;
    let dlq = s.dead_letter_topic(topic, group);
    s.declare_group(&dlq, "inspect")
        .await
        .expect("declare the dead-letter group");
    subscribe(s, Subscription::group(dlq, "inspect")).await
}

/// After the last allowed attempt the message goes to the dead-letter
/// destination with the reason attached, and the consumer keeps going.
pub async fn dead_letter_after_max_attempts<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "dead-letter").await;
    let group = "dl";
    let mut dlq = dead_letters(h, &*s, &topic, group).await;
    let seen = Seen::default();
    let record = seen.clone();
    let consumer = Consumer::group(s.clone(), group)
        .retry(RetryPolicy::new(2).with_backoff(Backoff::fixed(Duration::from_millis(20))))
        .handle(&topic, move |e: Event<Probe>| {
            let record = record.clone();
            async move {
                record.record(&e);
                if e.data.text == "poison" {
                    return Err(HandlerError::retryable("always fails"));
                }
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let poison = Event::new(Probe {
        n: 1,
        text: "poison".into(),
    });
    let poison_id = poison.id().to_owned();
    p.publish_event(&topic, poison).await.expect("publish");
    let mut letter = next_delivery(&mut dlq, "the dead letter").await;
    let good = probe(2);
    let good_id = good.id().to_owned();
    p.publish_event(&topic, good).await.expect("publish");
    seen.wait(60, "the good message after the poison one", |s| {
        !s.attempts_of(&good_id).is_empty()
    })
    .await;
    assert_eq!(letter.message().id, poison_id);
    let info = DeadLetter::from_message(letter.message()).expect("dead-letter headers");
    assert_eq!(info.reason, DeadLetterReason::AttemptsExhausted);
    assert_eq!(info.attempts, 2);
    assert_eq!(info.topic, topic);
    assert_eq!(info.group.as_deref(), Some(group));
    assert!(
        info.error.contains("always fails"),
        "error text: {}",
        info.error
    );
    assert_eq!(seen.attempts_of(&poison_id), [1, 2]);
    letter.ack().await.expect("ack");
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// An undecodable payload is dead-lettered at once with the decode error,
/// and the next message is handled.
pub async fn undecodable_payload_dead_lettered<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "undecodable").await;
    let group = "typed";
    let mut dlq = dead_letters(h, &*s, &topic, group).await;
    let seen = Seen::default();
    let record = seen.clone();
    let consumer = Consumer::group(s.clone(), group)
        .handle(&topic, move |e: Event<Probe>| {
            let record = record.clone();
            async move {
                record.record(&e);
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let bad = Message::new("{not json").with_content_type("application/json");
    publish_ok(&*p, &topic, bad.clone()).await;
    let good = probe(7);
    let good_id = good.id().to_owned();
    p.publish_event(&topic, good).await.expect("publish");
    let mut letter = next_delivery(&mut dlq, "the dead letter").await;
    seen.wait(60, "the message after the bad one", |s| {
        !s.attempts_of(&good_id).is_empty()
    })
    .await;
    assert_eq!(letter.message().id, bad.id);
    assert_eq!(letter.message().payload, bad.payload);
    let info = DeadLetter::from_message(letter.message()).expect("dead-letter headers");
    assert_eq!(info.reason, DeadLetterReason::Undecodable);
    assert_eq!(info.attempts, 1);
    assert!(
        info.error.contains("Probe"),
        "error text names the type: {}",
        info.error
    );
    assert!(
        seen.attempts_of(&bad.id).is_empty(),
        "the handler saw the bad payload"
    );
    letter.ack().await.expect("ack");
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// Messages published after a group was declared, before its first consumer, reach it.
pub async fn retained_for_declared_group<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "declared").await;
    if !s.capabilities().retains_for_declared_groups {
        return not_applicable(
            "retained_for_declared_group",
            s.name(),
            "keeps nothing for absent consumers",
        );
    }
    s.declare_group(&topic, "late")
        .await
        .expect("declare group");
    let mut ids = HashSet::new();
    for n in 0..10 {
        let m = Message::new(format!("{n}"));
        ids.insert(m.id.clone());
        publish_ok(&*p, &topic, m).await;
    }
    let mut stream = subscribe(&*s, Subscription::group(&topic, "late")).await;
    let mut got = HashSet::new();
    for _ in 0..10 {
        let mut d = next_delivery(&mut stream, "a message published before the consumer").await;
        got.insert(d.message().id.clone());
        d.ack().await.expect("ack");
    }
    assert_eq!(got, ids);
}

/// A private subscription from the beginning replays what the broker holds.
pub async fn replay_from_earliest<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "replay").await;
    let caps = s.capabilities();
    if !caps.replay || !caps.private_subscriptions {
        return not_applicable(
            "replay_from_earliest",
            s.name(),
            "keeps no history to replay",
        );
    }
    let mut ids = Vec::new();
    for n in 0..10 {
        // One key: brokers that partition keep order per key only.
        let m = Message::new(format!("{n}")).with_key("replay");
        ids.push(m.id.clone());
        publish_ok(&*p, &topic, m).await;
    }
    let mut stream = subscribe(
        &*s,
        Subscription::private(&topic).starting_at(StartFrom::Earliest),
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..10 {
        let mut d = next_delivery(&mut stream, "a replayed message").await;
        got.push(d.message().id.clone());
        d.ack().await.expect("ack");
    }
    assert_eq!(got, ids, "replay is in publish order (per key)");
}

/// With concurrent handling of different keys, each key's messages are handled in order.
pub async fn order_per_key<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "order").await;
    if !s.capabilities().order_per_key {
        return not_applicable("order_per_key", s.name(), "no order per key");
    }
    const KEYS: u64 = 6;
    const EACH: u64 = 40;
    let order: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let seen = Seen::default();
    let (record, log) = (seen.clone(), order.clone());
    let consumer = Consumer::group(s, "ordered")
        .concurrency(8)
        .ordered_by_key()
        .handle(&topic, move |e: Event<Probe>| {
            let (record, log) = (record.clone(), log.clone());
            async move {
                for _ in 0..(e.data.n % 3) {
                    tokio::task::yield_now().await;
                }
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(e.key().unwrap_or_default().to_owned())
                    .or_default()
                    .push(e.data.n / KEYS);
                record.record(&e);
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    for n in 0..KEYS * EACH {
        let event = probe(n).with_key(format!("key-{}", n % KEYS));
        p.publish_event(&topic, event).await.expect("publish");
    }
    let total = (KEYS * EACH) as usize;
    seen.wait(120, "every ordered message", |s| s.ids().len() >= total)
        .await;
    let order = order.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(order.len(), KEYS as usize);
    for (key, seq) in order {
        let expected: Vec<u64> = (0..EACH).collect();
        assert_eq!(seq, expected, "order of {key}");
    }
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// Under per-key order, a key whose handler blocks holds up only its own
/// messages: every other key is handled meanwhile, each in order.
pub async fn slow_key_holds_up_only_itself<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "slow-key").await;
    if !s.capabilities().order_per_key {
        return not_applicable(
            "slow_key_holds_up_only_itself",
            s.name(),
            "no order per key",
        );
    }
    const KEYS: u64 = 15;
    const EACH: u64 = 4;
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let order: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let seen = Seen::default();
    let (gate, record, log) = (release.clone(), seen.clone(), order.clone());
    let consumer = Consumer::group(s, "slow-key")
        .concurrency(4)
        .prefetch(64)
        .ordered_by_key()
        .handle(&topic, move |e: Event<Probe>| {
            let (gate, record, log) = (gate.clone(), record.clone(), log.clone());
            async move {
                let key = e.key().unwrap_or_default().to_owned();
                if key == "slow" {
                    gate.acquire().await.expect("open").forget();
                }
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(key)
                    .or_default()
                    .push(e.data.n);
                record.record(&e);
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    for n in 0..3 {
        p.publish_event(&topic, probe(n).with_key("slow"))
            .await
            .expect("publish");
    }
    for n in 0..KEYS * EACH {
        let event = probe(100 + n).with_key(format!("key-{}", n % KEYS));
        p.publish_event(&topic, event).await.expect("publish");
    }
    let others = (KEYS * EACH) as usize;
    seen.wait(60, "every other key while one is blocked", |s| {
        s.ids().len() >= others
    })
    .await;
    assert!(
        !order
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key("slow"),
        "the slow key is still blocked"
    );
    release.add_permits(3);
    seen.wait(60, "the slow key once released", |s| {
        s.ids().len() >= others + 3
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
    let order = order.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(order["slow"], [0, 1, 2], "the slow key in order");
    for k in 0..KEYS {
        let expected: Vec<u64> = (0..EACH).map(|i| 100 + k + i * KEYS).collect();
        assert_eq!(order[&format!("key-{k}")], expected, "order of key-{k}");
    }
}

/// No delivery beyond the in-flight bound until an earlier one is settled.
pub async fn in_flight_bound<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "in-flight").await;
    if s.capabilities().at_most_once {
        return not_applicable(
            "in_flight_bound",
            s.name(),
            "at-most-once: nothing is held unsettled",
        );
    }
    let mut stream = subscribe(&*s, Subscription::group(&topic, "bound").with_prefetch(3)).await;
    for n in 0..6 {
        publish_ok(&*p, &topic, Message::new(format!("{n}"))).await;
    }
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next_delivery(&mut stream, "a delivery within the bound").await);
    }
    let beyond = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
    assert!(
        beyond.is_err(),
        "a fourth delivery arrived with three unsettled and a prefetch of 3"
    );
    held[0].ack().await.expect("ack");
    let mut fourth = next_delivery(&mut stream, "the delivery after one was settled").await;
    fourth.ack().await.expect("ack");
    for d in &mut held[1..] {
        d.ack().await.expect("ack");
    }
}

/// Consumers of one group are started and stopped repeatedly while messages
/// are published: every message is handled at least once.
pub async fn close_and_reopen_under_load<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "reopen").await;
    if s.capabilities().at_most_once {
        return not_applicable(
            "close_and_reopen_under_load",
            s.name(),
            "at-most-once loses messages without a consumer",
        );
    }
    const TOTAL: u64 = 600;
    s.declare_group(&topic, "reopen")
        .await
        .expect("declare group");
    let seen = Seen::default();
    let start = |s: Arc<dyn Subscriber>| {
        let record = seen.clone();
        Consumer::group(s, "reopen")
            .concurrency(4)
            .handle(&topic, move |e: Event<Probe>| {
                let record = record.clone();
                async move {
                    record.record(&e);
                    Ok(())
                }
            })
            .start()
    };
    let publisher = {
        let (p, topic) = (p.clone(), topic.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..TOTAL {
                let event = probe(n);
                ids.push(event.id().to_owned());
                p.publish_event(&topic, event).await.expect("publish");
                if n.is_multiple_of(20) {
                    tokio::task::yield_now().await;
                }
            }
            ids
        })
    };
    for round in 1..=4usize {
        let consumer = start(s.clone()).await.expect("start consumer");
        let target = round * 50;
        seen.wait(60, "progress between restarts", |s| {
            s.unique_ids().len() >= target.min(TOTAL as usize)
        })
        .await;
        let report = consumer.shutdown(Duration::from_secs(10)).await;
        assert!(report.drained, "round {round} did not drain");
    }
    let ids = within(120, "the publisher", publisher)
        .await
        .expect("publisher task");
    let consumer = start(s.clone()).await.expect("start consumer");
    seen.wait(120, "every message after the restarts", |s| {
        let got = s.unique_ids();
        ids.iter().all(|id| got.contains(id))
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// Shutdown lets running handlers finish and settles them.
pub async fn shutdown_drains_in_flight<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "drain").await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let finished: Arc<Mutex<Vec<String>>> = Arc::default();
    let done = finished.clone();
    let consumer = Consumer::group(s.clone(), "drain")
        .concurrency(4)
        .handle(&topic, move |e: Event<Probe>| {
            let (started, done) = (started_tx.clone(), done.clone());
            async move {
                let _ = started.send(());
                // Simulated work that is still running when shutdown begins.
                tokio::time::sleep(Duration::from_millis(300)).await;
                done.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(e.id().to_owned());
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let mut ids = HashSet::new();
    for n in 0..4 {
        let event = probe(n);
        ids.insert(event.id().to_owned());
        p.publish_event(&topic, event).await.expect("publish");
    }
    for _ in 0..4 {
        within(30, "the handlers to start", started.recv()).await;
    }
    let report = consumer.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained);
    let finished: HashSet<String> = finished
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    assert_eq!(
        finished, ids,
        "every running handler finished before shutdown returned"
    );
    if s.capabilities().at_most_once {
        return;
    }
    // Settled means acked: a new member of the group sees the marker, not the four.
    let seen = Seen::default();
    let record = seen.clone();
    let consumer = Consumer::group(s, "drain")
        .handle(&topic, move |e: Event<Probe>| {
            let record = record.clone();
            async move {
                record.record(&e);
                Ok(())
            }
        })
        .start()
        .await
        .expect("restart consumer");
    let marker = probe(99);
    let marker_id = marker.id().to_owned();
    p.publish_event(&topic, marker).await.expect("publish");
    seen.wait(60, "the marker", |s| !s.attempts_of(&marker_id).is_empty())
        .await;
    assert!(
        seen.unique_ids().is_disjoint(&ids),
        "a drained message was delivered again"
    );
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// The connection is cut (or the broker restarted) in the middle of a stream
/// of confirmed publishes: every confirmed message is handled afterwards.
pub async fn reconnect<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "reconnect").await;
    if s.capabilities().at_most_once {
        return not_applicable(
            "reconnect",
            s.name(),
            "at-most-once: messages in flight during the cut are lost by design",
        );
    }
    const TOTAL: u64 = 400;
    let seen = Seen::default();
    let record = seen.clone();
    let consumer = Consumer::group(s.clone(), "reconnect")
        .handle(&topic, move |e: Event<Probe>| {
            let record = record.clone();
            async move {
                record.record(&e);
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let mut confirmed = Vec::new();
    for n in 0..TOTAL {
        if n == TOTAL / 2 {
            let disrupted = within(120, "the disruption", h.disrupt()).await;
            if !disrupted {
                consumer.shutdown(Duration::from_secs(10)).await;
                return not_applicable(
                    "reconnect",
                    s.name(),
                    "the harness cannot disrupt the broker",
                );
            }
        }
        // A publish that fails during the cut is retried as a user would;
        // only confirmed messages are promised.
        let mut tries = 0;
        loop {
            let event = probe(n);
            let id = event.id().to_owned();
            match p.publish_event(&topic, event).await {
                Ok(_) => {
                    confirmed.push(id);
                    break;
                }
                Err(e) if tries < 60 => {
                    tries += 1;
                    eprintln!("publish {n} failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("publishing kept failing after the disruption: {e}"),
            }
        }
    }
    seen.wait(120, "every confirmed message after the disruption", |s| {
        let got = s.unique_ids();
        confirmed.iter().all(|id| got.contains(id))
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// Publishing on a closed publisher and settling twice are errors, not panics.
pub async fn api_contract<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "contract").await;
    let mut stream = subscribe(&*s, Subscription::group(&topic, "contract")).await;
    publish_ok(&*p, &topic, Message::new("once")).await;
    let mut d = next_delivery(&mut stream, "the delivery").await;
    d.ack().await.expect("first ack");
    assert!(matches!(d.ack().await, Err(Error::AlreadySettled { .. })));
    assert!(matches!(
        d.nack(None).await,
        Err(Error::AlreadySettled { .. })
    ));
    p.close().await.expect("close");
    let after = p.publish(&topic, Message::new("after close")).await;
    assert!(
        matches!(after, Err(Error::Closed(_))),
        "publish after close: {after:?}"
    );
    let unchecked = Subscription::group(&topic, "");
    assert!(
        s.subscribe(unchecked).await.is_err(),
        "an empty group name is rejected"
    );
}

/// A panicking handler is retried and the runtime keeps running.
pub async fn panicking_handler_is_retried<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "panic").await;
    let seen = Seen::default();
    let record = seen.clone();
    let consumer = Consumer::group(s, "panic")
        .retry(RetryPolicy::new(3).with_backoff(Backoff::fixed(Duration::from_millis(20))))
        .handle(&topic, move |e: Event<Probe>| {
            let record = record.clone();
            async move {
                record.record(&e);
                if e.attempt() == 1 {
                    panic!("handler bug on first attempt (expected in this test)");
                }
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let event = probe(1);
    let id = event.id().to_owned();
    p.publish_event(&topic, event).await.expect("publish");
    seen.wait(60, "the retry after the panic", |s| {
        s.attempts_of(&id).len() >= 2
    })
    .await;
    assert_eq!(seen.attempts_of(&id)[..2], [1, 2]);
    consumer.shutdown(Duration::from_secs(10)).await;
}
