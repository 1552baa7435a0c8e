//! Hostile input: a message written by some other client, published with the
//! broker's raw client, must never wedge a consumer.
//!
//! [`survives`] runs a consumer with a typed JSON handler, lets the test
//! publish one hostile message its own way, then publishes a well-formed
//! sentinel through Tidings, and checks what a user relies on: the hostile
//! message ends handled (acked) or dead-lettered, seen by settlement
//! observers, within the retry limit (never acked unhandled, never silently
//! dropped, never redelivered forever); the sentinel is handled afterwards
//! (the consumer kept running); no settlement failed, no worker restarted,
//! and nothing panicked anywhere in the process meanwhile.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use crate::{
    Backoff, Consumer, Event, HandlerError, Message, Publisher, RetryPolicy, SettleAction,
    StartFrom, Subscriber,
};

/// Attempts a hostile message gets before it is dead-lettered.
pub const MAX_ATTEMPTS: u32 = 3;

static PANICS: AtomicU64 = AtomicU64::new(0);

/// Counts every panic in the process (then reports it as usual), so a test
/// can tell that none happened while it ran.
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// How the hostile message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fate {
    /// Every settlement of it, in order.
    pub settlements: Vec<SettleAction>,
    /// The message as the handler or the dead letter saw it.
    pub message: Message,
}

impl Fate {
    /// The final settlement.
    pub fn last(&self) -> SettleAction {
        *self.settlements.last().expect("settled at least once")
    }
}

/// Runs the check described in the [module docs](self): `inject` publishes
/// the hostile message with the broker's own client after the consumer of
/// `group` on `topic` is in place. Returns how the message ended, for
/// checks of what was read from it.
///
/// # Panics
/// When any of the checks fails, or nothing settles within 30 s.
pub async fn survives<F>(
    subscriber: Arc<dyn Subscriber>,
    publisher: Arc<dyn Publisher>,
    topic: &str,
    group: &str,
    inject: F,
) -> Fate
where
    F: Future<Output = ()>,
{
    count_panics();
    let panics_before = PANICS.load(Ordering::SeqCst);
    let sentinel = Message::new(&b"\"sentinel\""[..]);
    let sentinel_id = sentinel.id.clone();
    type Seen = Vec<(Message, SettleAction, bool)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let changed = Arc::new(tokio::sync::Notify::new());
    let (record, notify) = (seen.clone(), changed.clone());
    // Topics are unique per test: from the earliest message where the broker
    // keeps history, so a group whose assignment completes after the publish
    // (Kafka) still sees it.
    let start = if subscriber.capabilities().replay {
        StartFrom::Earliest
    } else {
        StartFrom::Latest
    };
    let consumer = Consumer::group(subscriber, group)
        .start_from(start)
        .concurrency(2)
        .retry(
            RetryPolicy::new(MAX_ATTEMPTS).with_backoff(Backoff::fixed(Duration::from_millis(20))),
        )
        .handle(topic, |_: Event<serde_json::Value>| async {
            Ok::<_, HandlerError>(())
        })
        .on_settle(move |s| {
            record.lock().unwrap_or_else(|e| e.into_inner()).push((
                s.delivery.message().clone(),
                s.action,
                s.result.is_ok(),
            ));
            notify.notify_waiters();
        })
        .start()
        .await
        .expect("the consumer starts");
    inject.await;
    publisher
        .publish(topic, sentinel)
        .await
        .expect("the sentinel is published");

    let done = |seen: &Seen| {
        let sentinel = seen.iter().any(|(m, _, _)| m.id == sentinel_id);
        let hostile_final = seen.iter().any(|(m, action, _)| {
            m.id != sentinel_id && !matches!(action, SettleAction::Nack { .. })
        });
        sentinel && hostile_final
    };
    let wait = async {
        loop {
            let notified = changed.notified();
            if done(&seen.lock().unwrap_or_else(|e| e.into_inner())) {
                return;
            }
            notified.await;
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(30), wait).await;
    let report = consumer.shutdown(Duration::from_secs(10)).await;
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        finished.is_ok(),
        "within 30 s, the hostile message must end acked or dead-lettered and the sentinel be handled; seen: {:?}",
        seen.iter()
            .map(|(m, a, ok)| (&m.id, a, ok))
            .collect::<Vec<_>>()
    );
    assert!(
        seen.iter().all(|(_, _, ok)| *ok),
        "every settlement succeeded: {seen:?}"
    );
    let hostile: Vec<_> = seen
        .iter()
        .filter(|(m, _, _)| m.id != sentinel_id)
        .collect();
    let first_id = &hostile[0].0.id;
    assert!(
        hostile.iter().all(|(m, _, _)| &m.id == first_id),
        "one hostile message, keeping its id across redeliveries: {hostile:?}"
    );
    assert!(
        hostile.len() <= MAX_ATTEMPTS as usize,
        "settled at most once per allowed attempt: {hostile:?}"
    );
    assert_eq!(report.worker_restarts, 0, "{report:?}");
    assert_eq!(report.failed_settlements, 0, "{report:?}");
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        panics_before,
        "nothing panicked in the process"
    );
    Fate {
        settlements: hostile.iter().map(|(_, a, _)| *a).collect(),
        message: hostile[hostile.len() - 1].0.clone(),
    }
}

/// A payload of `len` bytes that is not JSON (nor UTF-8).
pub fn big_payload(len: usize) -> Vec<u8> {
    let mut payload = vec![0xfe_u8; len];
    for (i, b) in payload.iter_mut().enumerate().step_by(4096) {
        *b = (i % 251) as u8;
    }
    payload
}
