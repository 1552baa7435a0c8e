//! Settlement: what a handler's result becomes (one decision, made here),
//! and carrying it out under a guard so nothing a message does can end the
//! worker that settles it.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use tracing::{debug, error, warn};

use crate::batch::{BatchEndpoint, BatchFailure, BatchOptions};
use crate::delivery::{DeadLetter, DeadLetterReason, Delivery, header};
use crate::error::{Error, Result};
use crate::extract::StateMap;
use crate::handler::{Endpoint, HandlerError, HandlerResult, HandlerSlot, Panicked};
use crate::middleware::{Middleware, Next};
use crate::retry::RetryPolicy;
use crate::subscriber::Capabilities;

/// Whether a replayed dead letter names another group than the one
/// receiving it ([`header::REPLAY_FOR`]).
fn replayed_for_another_group(delivery: &Delivery) -> bool {
    match (
        delivery.message().headers.get(header::REPLAY_FOR),
        delivery.group(),
    ) {
        (Some(target), Some(group)) => target != group,
        _ => false,
    }
}

/// A settlement observer: see [`ConsumerBuilder::on_settle`](super::ConsumerBuilder::on_settle).
pub(crate) type Observer = Arc<dyn Fn(&Settlement<'_>) + Send + Sync>;

/// What the runtime did with a delivery once its handler was done, and
/// whether the adapter took it: given to the observers of
/// [`ConsumerBuilder::on_settle`](super::ConsumerBuilder::on_settle).
///
/// Retries made in process (on brokers without redelivery) are not
/// settlements: only the final ack or dead letter is observed there.
#[derive(Debug)]
#[non_exhaustive]
pub struct Settlement<'a> {
    /// The delivery, as settled ([`is_settled`](Delivery::is_settled) is
    /// true even when `result` is an error).
    pub delivery: &'a Delivery,
    /// What the runtime asked of the adapter.
    pub action: SettleAction,
    /// `Err` when settling failed (the connection dropped, the broker
    /// refused, the adapter panicked). On brokers with redelivery the
    /// message then comes back; on at-most-once ones (core NATS, Redis
    /// Pub/Sub) a failed dead letter is lost. Adapters that settle
    /// asynchronously report only what they know at once: Kafka records an
    /// ack and commits it later, so its acks do not fail here.
    pub result: std::result::Result<(), &'a Error>,
}

impl<'a> Settlement<'a> {
    /// A settlement, for tests of observers.
    pub fn new(
        delivery: &'a Delivery,
        action: SettleAction,
        result: std::result::Result<(), &'a Error>,
    ) -> Self {
        Settlement {
            delivery,
            action,
            result,
        }
    }
}

/// How the runtime settled a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SettleAction {
    /// Acked: handled.
    Ack,
    /// Nacked, to be delivered again after `delay`.
    Nack {
        /// The backoff before the next attempt.
        delay: Duration,
    },
    /// Sent to the dead-letter destination, then removed.
    DeadLetter {
        /// Why.
        reason: DeadLetterReason,
    },
}

impl SettleAction {
    /// `ack`, `nack` or `dead_letter`, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SettleAction::Ack => "ack",
            SettleAction::Nack { .. } => "nack",
            SettleAction::DeadLetter { .. } => "dead_letter",
        }
    }

    /// The one decision of what a handler's result becomes: `Ok` acks; a
    /// final error (permanent, undecodable, exhausted) dead-letters; a
    /// retryable one is nacked with its `retry_after` or the policy's
    /// backoff, unless `attempt` was the policy's last, which dead-letters
    /// as [`AttemptsExhausted`](DeadLetterReason::AttemptsExhausted).
    ///
    /// The runtime settles by it; layers that report outcomes (telemetry)
    /// call it rather than deciding again.
    pub fn decide(policy: &RetryPolicy, attempt: u32, result: &HandlerResult) -> SettleAction {
        match result {
            Ok(()) => SettleAction::Ack,
            Err(error) => match error.dead_letter_reason() {
                Some(reason) => SettleAction::DeadLetter { reason },
                None if attempt >= policy.max_attempts => SettleAction::DeadLetter {
                    reason: DeadLetterReason::AttemptsExhausted,
                },
                None => SettleAction::Nack {
                    delay: error
                        .retry_after()
                        .unwrap_or_else(|| policy.backoff.delay(attempt)),
                },
            },
        }
    }
}

/// Counts kept by one worker (so counting costs no contention), read by
/// the shutdown report.
#[derive(Debug, Default)]
pub(crate) struct WorkerCounts {
    /// Deliveries this worker took from the subscription.
    pub received: AtomicU64,
    /// Settlements the adapter took.
    pub settled: AtomicU64,
    /// Settlements that failed or panicked: the broker redelivers.
    pub failed: AtomicU64,
}

/// What runs a topic's deliveries.
pub(crate) enum Handling {
    /// One delivery at a time, through the middleware stack.
    One(Arc<dyn Endpoint>),
    /// Batches (no middleware: layers see one delivery at a time).
    Batch(Arc<dyn BatchEndpoint>, BatchOptions),
}

/// One topic's handler, its stack and how its deliveries are settled.
pub(crate) struct Route {
    pub stack: Arc<[Arc<dyn Middleware>]>,
    pub handling: Handling,
    pub retry: RetryPolicy,
    pub caps: Capabilities,
    pub observers: Arc<[Observer]>,
    /// The consumer's shared state, when it has any.
    pub state: Option<Arc<StateMap>>,
}

impl Route {
    async fn run_once(&self, delivery: &Delivery, slot: &mut HandlerSlot) -> HandlerResult {
        let endpoint = match &self.handling {
            Handling::One(endpoint) => endpoint,
            Handling::Batch(..) => {
                let mut results = self.run_batch(std::slice::from_ref(delivery)).await;
                return results.pop().unwrap_or(Ok(()));
            }
        };
        let run = async {
            if self.stack.is_empty() {
                // No layers: the handler's future goes in the worker's
                // slot rather than a box of its own.
                endpoint.call_in(delivery, slot);
                (&mut *slot).await
            } else {
                // The endpoint at the bottom of the stack catches a
                // handler's panic itself (so layers see it as a failed
                // attempt).
                Next::new(&self.stack, &**endpoint).run(delivery).await
            }
        };
        // This catches a layer's panic, or with no layers the handler's.
        match AssertUnwindSafe(run).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => {
                // What the panicking future left is not kept until the
                // worker's next message.
                *slot = HandlerSlot::empty();
                Err(HandlerError::retryable(Panicked::from(panic)))
            }
        }
    }

    /// Runs the batch handler on `deliveries`: the result of each, in order
    /// (an undecodable one fails alone; a panic fails them all).
    pub async fn run_batch(&self, deliveries: &[Delivery]) -> Vec<HandlerResult> {
        let Handling::Batch(batch, _) = &self.handling else {
            unreachable!("run_batch on a topic without a batch handler")
        };
        let prepared =
            match std::panic::catch_unwind(AssertUnwindSafe(|| batch.prepare(deliveries))) {
                Ok(prepared) => prepared,
                Err(panic) => {
                    let error = HandlerError::retryable(Panicked::from(panic));
                    return deliveries.iter().map(|_| Err(error.replicate())).collect();
                }
            };
        let mut results: Vec<HandlerResult> = deliveries.iter().map(|_| Ok(())).collect();
        for (i, error) in prepared.rejected {
            results[i] = Err(error);
        }
        let outcome = AssertUnwindSafe(prepared.run)
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                Err(BatchFailure::All(HandlerError::retryable(Panicked::from(
                    panic,
                ))))
            });
        match outcome {
            Ok(()) => {}
            Err(BatchFailure::All(error)) => {
                for &i in &prepared.positions {
                    results[i] = Err(error.replicate());
                }
            }
            Err(BatchFailure::Some(failed)) => {
                for (k, error) in failed {
                    match prepared.positions.get(k) {
                        Some(&i) => results[i] = Err(error),
                        None => warn!(
                            index = k,
                            size = prepared.positions.len(),
                            "a batch handler named an event outside its batch"
                        ),
                    }
                }
            }
        }
        results
    }

    /// Runs the handler (retrying in process where the broker does not
    /// redeliver) and decides the settlement.
    async fn handle(
        &self,
        delivery: &mut Delivery,
        first_failure: &mut Option<SystemTime>,
        mut ran: Option<HandlerResult>,
        slot: &mut HandlerSlot,
    ) -> (SettleAction, Option<HandlerError>) {
        loop {
            let result = match (delivery.take_rejection(), ran.take()) {
                // The adapter could not read it, or the broker gave up on
                // it: no handler runs, the error is final.
                (Some(rejection), _) => Err(rejection),
                // Run already, in a batch.
                (None, Some(result)) => result,
                (None, None) => self.run_once(delivery, slot).await,
            };
            let attempt = delivery.attempt();
            match SettleAction::decide(&self.retry, attempt, &result) {
                SettleAction::Nack { delay } if !self.caps.redelivery => {
                    // No redelivery from the broker: retry here.
                    first_failure.get_or_insert_with(SystemTime::now);
                    tokio::time::sleep(delay).await;
                    delivery.next_attempt();
                }
                action => return (action, result.err()),
            }
        }
    }

    /// Handles and settles one delivery. Never panics and never returns
    /// with the delivery unsettled unless settling itself failed (then the
    /// broker redelivers it). The handler's future is kept in `slot`, the
    /// worker's own.
    pub async fn process(
        &self,
        delivery: &mut Delivery,
        counts: &WorkerCounts,
        slot: &mut HandlerSlot,
    ) {
        self.settle_result(delivery, None, counts, slot).await;
    }

    /// Settles a delivery whose handler already ran (`ran`, in a batch), or
    /// runs it first (`None`), as [`process`](Self::process) does.
    pub async fn settle_result(
        &self,
        delivery: &mut Delivery,
        ran: Option<HandlerResult>,
        counts: &WorkerCounts,
        slot: &mut HandlerSlot,
    ) {
        delivery.set_max_attempts(self.retry.max_attempts);
        if let Some(state) = &self.state {
            delivery.set_state(state.clone());
        }
        let mut first_failure = first_failure_of(delivery);
        let (action, error) = if replayed_for_another_group(delivery) {
            // A dead letter replayed to the group that failed it: the
            // topic's other groups handled it already.
            (SettleAction::Ack, None)
        } else {
            self.handle(delivery, &mut first_failure, ran, slot).await
        };
        let settled = AssertUnwindSafe(self.settle(delivery, action, error, first_failure))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                Err(Error::Settle {
                    id: delivery.message().id.clone(),
                    source: Box::new(Panicked::from(panic)),
                })
            });
        match &settled {
            Ok(()) => counts.settled.fetch_add(1, Ordering::Relaxed),
            Err(error) => {
                error!(
                    id = %delivery.message().id,
                    topic = delivery.topic(),
                    group = delivery.group(),
                    action = action.as_str(),
                    %error,
                    "settling failed; the broker will redeliver"
                );
                counts.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        if !self.observers.is_empty() {
            let settlement = Settlement {
                delivery,
                action,
                result: settled.as_ref().map(|_| ()),
            };
            for observe in self.observers.iter() {
                // An observer's panic must not take the worker with it.
                if std::panic::catch_unwind(AssertUnwindSafe(|| observe(&settlement))).is_err() {
                    warn!(
                        id = %delivery.message().id,
                        topic = delivery.topic(),
                        "a settlement observer panicked"
                    );
                }
            }
        }
    }

    /// Asks the adapter to carry out `action`.
    async fn settle(
        &self,
        delivery: &mut Delivery,
        action: SettleAction,
        error: Option<HandlerError>,
        first_failure: Option<SystemTime>,
    ) -> Result<()> {
        match action {
            SettleAction::Ack => delivery.ack().await,
            SettleAction::Nack { delay } => {
                debug!(
                    id = %delivery.message().id,
                    topic = delivery.topic(),
                    group = delivery.group(),
                    attempt = delivery.attempt(),
                    ?delay,
                    "handler failed; redelivering"
                );
                delivery.nack(Some(delay)).await
            }
            SettleAction::DeadLetter { reason } => {
                let now = SystemTime::now();
                let m = delivery.message();
                let error = error.map(|e| e.to_string()).unwrap_or_default();
                warn!(
                    id = %m.id,
                    event_type = m.metadata.event_type.as_deref(),
                    correlation_id = m.metadata.correlation_id.as_deref(),
                    topic = delivery.topic(),
                    group = delivery.group(),
                    attempt = delivery.attempt(),
                    %reason,
                    %error,
                    "dead-lettering message"
                );
                let letter = DeadLetter {
                    reason,
                    error,
                    attempts: delivery.attempt(),
                    first_failure: first_failure.or(Some(now)),
                    last_failure: now,
                    topic: delivery.topic().to_owned(),
                    group: delivery.group().map(str::to_owned),
                };
                delivery.dead_letter(letter).await
            }
        }
    }
}

/// When the first attempt failed, from the header adapters carry on
/// redelivered copies; unknown when the broker redelivers the original.
fn first_failure_of(delivery: &Delivery) -> Option<SystemTime> {
    delivery
        .message()
        .headers
        .get(header::FIRST_FAILURE)
        .and_then(|v| crate::time::parse_rfc3339(v))
}
