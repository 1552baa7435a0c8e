//! Replaying a dead letter reaches only the group that failed it, on every
//! broker: the topic's other groups ack the replay without running their
//! handlers, and the dead-letter destination is empty afterwards. Two
//! operators replaying everything at once deliver each letter once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidings::layers::dead_letters::{DeadLetterInbox, Filter};
use tidings::prelude::*;
use tidings::testkit::{unique, within};
use tidings::{DeadLetterReason, SettleAction};
use tidings_tests::kafka_mock;

/// What one group's consumer did: handler runs and settlements by id.
#[derive(Default)]
struct Seen {
    handled: AtomicUsize,
    settled: Mutex<HashMap<String, Vec<SettleAction>>>,
}

impl Seen {
    fn settled(&self, id: &str) -> Vec<SettleAction> {
        self.settled
            .lock()
            .expect("lock")
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    async fn until(&self, what: &str, id: &str, n: usize) {
        within(60, what, async {
            while self.settled(id).len() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

/// A consumer of `group` whose handler fails permanently until `fixed`.
fn consumer(
    bus: &Bus,
    topic: &str,
    group: &str,
    seen: &Arc<Seen>,
    fixed: &Arc<AtomicBool>,
) -> tidings::ConsumerBuilder {
    let (handled, fixed, record) = (seen.clone(), fixed.clone(), seen.clone());
    bus.consumer(group)
        .handle(topic, move |_: Event<String>| {
            let (handled, fixed) = (handled.clone(), fixed.clone());
            async move {
                if !fixed.load(Ordering::SeqCst) {
                    return Err(HandlerError::permanent("the mail server rejects it"));
                }
                handled.handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .on_settle(move |s| {
            record
                .settled
                .lock()
                .expect("lock")
                .entry(s.delivery.message().id.to_string())
                .or_default()
                .push(s.action);
        })
}

async fn inbox(bus: &Bus, topic: &str) -> DeadLetterInbox {
    let dlq = bus.subscriber().dead_letter_topic(topic, "billing");
    DeadLetterInbox::open(&**bus.subscriber(), bus.publisher().clone(), &dlq, 100)
        .await
        .expect("the inbox opens")
}

async fn replay_reaches_only_the_failed_group(url: &str) {
    let bus = tidings::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}; scripts/brokers.sh starts the brokers"));
    let topic = unique("replay");
    let (billing, audit) = (Arc::new(Seen::default()), Arc::new(Seen::default()));
    let broken = Arc::new(AtomicBool::new(false));
    let always = Arc::new(AtomicBool::new(true));
    let billing_consumer = consumer(&bus, &topic, "billing", &billing, &broken)
        .start()
        .await
        .expect("billing");
    let audit_consumer = consumer(&bus, &topic, "audit", &audit, &always)
        .start()
        .await
        .expect("audit");

    let event = Event::new("welcome mail".to_owned());
    let id = event.id().to_owned();
    bus.publish_event(&topic, event).await.expect("published");
    billing.until("billing to dead-letter it", &id, 1).await;
    audit.until("audit to handle it", &id, 1).await;
    assert_eq!(
        billing.settled(&id),
        [SettleAction::DeadLetter {
            reason: DeadLetterReason::Permanent
        }]
    );

    // The operator fixes the mail server, then replays.
    broken.store(true, Ordering::SeqCst);
    let mut letters = inbox(&bus, &topic).await;
    within(60, "the letter in the inbox", async {
        while letters.fetch(Duration::from_millis(200)).await == 0 {}
    })
    .await;
    letters.replay(&id).await.expect("replayed");
    letters.close().await.expect("closed");

    billing.until("billing to handle the replay", &id, 2).await;
    audit.until("audit to receive the replay", &id, 2).await;
    assert_eq!(
        billing.handled.load(Ordering::SeqCst),
        1,
        "billing handled it"
    );
    assert_eq!(
        audit.handled.load(Ordering::SeqCst),
        1,
        "audit's handler did not run again"
    );
    assert_eq!(audit.settled(&id), [SettleAction::Ack, SettleAction::Ack]);

    // The destination no longer holds it.
    let mut after = inbox(&bus, &topic).await;
    let left = after.fetch(Duration::from_millis(1500)).await;
    assert_eq!(
        left, 0,
        "the replayed letter left the dead-letter destination"
    );
    let purged = after.purge(&Filter::default()).await.expect("purge");
    assert_eq!(purged, 0);
    after.close().await.expect("closed");
    billing_consumer.shutdown(Duration::from_secs(10)).await;
    audit_consumer.shutdown(Duration::from_secs(10)).await;
}

/// `n` messages the group `billing` dead-lettered, its consumer still running
/// (its handler fails until `fixed`).
struct Letters {
    bus: Bus,
    topic: String,
    billing: Arc<Seen>,
    fixed: Arc<AtomicBool>,
    consumer: tidings::Consumer,
    ids: Vec<String>,
}

async fn dead_letters(url: &str, name: &str, n: usize) -> Letters {
    let bus = tidings::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}; scripts/brokers.sh starts the brokers"));
    let topic = unique(name);
    let billing = Arc::new(Seen::default());
    let fixed = Arc::new(AtomicBool::new(false));
    let consumer = consumer(&bus, &topic, "billing", &billing, &fixed)
        .start()
        .await
        .expect("billing");
    let mut ids = Vec::new();
    for n in 0..n {
        let event = Event::new(format!("mail {n}"));
        ids.push(event.id().to_owned());
        bus.publish_event(&topic, event).await.expect("published");
    }
    for id in &ids {
        billing.until("every message dead-lettered", id, 1).await;
    }
    Letters {
        bus,
        topic,
        billing,
        fixed,
        consumer,
        ids,
    }
}

/// Two inboxes open at once on the same letters (two operators), both
/// replay everything: the fixed group handles each letter exactly once.
async fn concurrent_replays_deliver_once(url: &str) {
    const LETTERS: usize = 20;
    let Letters {
        bus,
        topic,
        billing,
        fixed,
        consumer,
        ids,
    } = dead_letters(url, "replay-twice", LETTERS).await;
    fixed.store(true, Ordering::SeqCst);

    let (mut first, mut second) = tokio::join!(inbox(&bus, &topic), inbox(&bus, &topic));
    within(
        60,
        "the two inboxes to hold every letter between them",
        async {
            loop {
                tokio::join!(
                    first.fetch(Duration::from_millis(200)),
                    second.fetch(Duration::from_millis(200))
                );
                let mut held: Vec<String> = first
                    .list()
                    .chain(second.list())
                    .map(|(m, _)| m.id.to_string())
                    .collect();
                held.sort_unstable();
                held.dedup();
                if held.len() == LETTERS {
                    break;
                }
            }
        },
    )
    .await;
    let all = Filter::default();
    let (a, b) = tokio::join!(first.replay_all(&all), second.replay_all(&all));
    let (a, b) = (a.expect("replayed"), b.expect("replayed"));
    assert_eq!(
        a + b,
        LETTERS,
        "each letter replayed by one of them ({a} + {b})"
    );
    let (x, y) = tokio::join!(first.close(), second.close());
    x.expect("closed");
    y.expect("closed");

    for id in &ids {
        billing.until("billing to handle the replay", id, 2).await;
    }
    // Nothing more comes: a second delivery would follow the first within
    // the broker's redelivery of a handed-back letter, well inside this.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        billing.handled.load(Ordering::SeqCst),
        LETTERS,
        "each handled once"
    );
    for id in &ids {
        assert_eq!(
            billing.settled(id),
            [
                SettleAction::DeadLetter {
                    reason: DeadLetterReason::Permanent
                },
                SettleAction::Ack
            ],
            "{id}"
        );
    }
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// An operator's commands one after another: each opens an inbox, reads
/// the letters and closes it, handing them back. Every next inbox holds
/// each letter exactly once.
async fn handed_back_letters_come_to_the_next_inbox_once(url: &str) {
    const LETTERS: usize = 2;
    let Letters {
        bus,
        topic,
        consumer,
        mut ids,
        ..
    } = dead_letters(url, "handed-back", LETTERS).await;
    ids.sort_unstable();
    for round in 1..=4 {
        let mut letters = inbox(&bus, &topic).await;
        within(30, "the inbox to hold every letter", async {
            while letters.fetch(Duration::from_millis(200)).await < LETTERS {}
        })
        .await;
        // A copy would come in the same wave as the letters themselves.
        letters.fetch(Duration::from_millis(500)).await;
        let mut held: Vec<String> = letters.list().map(|(m, _)| m.id.to_string()).collect();
        held.sort_unstable();
        assert_eq!(held, ids, "round {round}: each letter held once");
        letters.close().await.expect("closed");
    }
    let mut last = inbox(&bus, &topic).await;
    within(30, "the last inbox to hold every letter", async {
        while last.fetch(Duration::from_millis(200)).await < LETTERS {}
    })
    .await;
    assert_eq!(
        last.purge(&Filter::default()).await.expect("purged"),
        LETTERS
    );
    last.close().await.expect("closed");
    consumer.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_back_on_memory() {
    handed_back_letters_come_to_the_next_inbox_once("memory://?history=1000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_back_on_redis() {
    handed_back_letters_come_to_the_next_inbox_once("redis://127.0.0.1:6379").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_back_on_rabbitmq() {
    handed_back_letters_come_to_the_next_inbox_once("amqp://guest:guest@127.0.0.1:5672/%2f").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_back_on_jetstream() {
    handed_back_letters_come_to_the_next_inbox_once("nats://127.0.0.1:4222").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_back_on_kafka() {
    handed_back_letters_come_to_the_next_inbox_once(&format!(
        "kafka://{}?auto_create_topics=true",
        kafka_mock()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_memory() {
    replay_reaches_only_the_failed_group("memory://?history=1000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis() {
    replay_reaches_only_the_failed_group("redis://127.0.0.1:6379").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq() {
    replay_reaches_only_the_failed_group("amqp://guest:guest@127.0.0.1:5672/%2f").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream() {
    replay_reaches_only_the_failed_group("nats://127.0.0.1:4222").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka() {
    replay_reaches_only_the_failed_group(&format!(
        "kafka://{}?auto_create_topics=true",
        kafka_mock()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replays_at_once_on_memory() {
    concurrent_replays_deliver_once("memory://?history=1000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replays_at_once_on_redis() {
    concurrent_replays_deliver_once("redis://127.0.0.1:6379").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replays_at_once_on_rabbitmq() {
    concurrent_replays_deliver_once("amqp://guest:guest@127.0.0.1:5672/%2f").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replays_at_once_on_jetstream() {
    concurrent_replays_deliver_once("nats://127.0.0.1:4222").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replays_at_once_on_kafka() {
    concurrent_replays_deliver_once(&format!("kafka://{}?auto_create_topics=true", kafka_mock()))
        .await;
}
