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
    HandlerError, HandlerResult, Message, MessageId, Publisher, PublisherExt, RetryPolicy,
    StartFrom, Subscriber, Subscription,
};

mod delivery;
mod failures;
mod lifecycle;
mod ordering;
mod retention;

pub use delivery::{competing_consumers, fan_out, isolation, round_trip, volume};
pub use failures::{
    dead_letter_after_max_attempts, delayed_nack_waits, nack_redelivers_with_rising_attempt,
    panicking_handler_is_retried, undecodable_payload_dead_lettered,
};
pub use lifecycle::{
    api_contract, close_and_reopen_under_load, in_flight_bound, reconnect,
    shutdown_drains_in_flight,
};
pub use ordering::{order_per_key, slow_key_holds_up_only_itself};
pub use retention::{replay_from_earliest, retained_for_declared_group};

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
    /// A handler that records every probe it is given and succeeds.
    fn recorder(
        &self,
    ) -> impl Fn(Event<Probe>) -> std::future::Ready<HandlerResult> + Clone + Send + Sync + 'static
    {
        let seen = self.clone();
        move |e| {
            seen.record(&e);
            std::future::ready(Ok(()))
        }
    }
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
