//! The consumer runtime: handlers registered per topic for one group,
//! bounded concurrency, per-key order, settlement and graceful shutdown.
//!
//! For each topic the runtime runs `concurrency` workers; whichever is free
//! reads the next delivery from the subscription, runs the middleware stack
//! and the handler, and settles the delivery by the result:
//!
//! | result | settlement |
//! |---|---|
//! | `Ok(())` | ack |
//! | retryable error, attempts left | nack, redelivered after the backoff (or the error's `retry_after`) |
//! | retryable error, last attempt | dead-letter (`attempts-exhausted`), then ack |
//! | permanent error | dead-letter (`permanent-error`), then ack |
//! | undecodable payload | dead-letter (`undecodable`), then ack |
//! | panic | a retryable error; the runtime keeps running |
//!
//! On brokers without redelivery (at-most-once), retries happen in process.
//! Nothing is read from the subscription while every worker is busy, and the
//! subscription's prefetch bounds what the adapter holds, so a slow handler
//! slows intake; memory does not grow.

mod builder;
mod dispatch;
mod routing;
mod settle;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{error, warn};

use crate::health::{Health, HealthCheck, State};
use crate::subscriber::Subscriber;

use dispatch::{Source, Stop};

pub use builder::ConsumerBuilder;
pub use routing::Unhandled;
use settle::WorkerCounts;
pub use settle::{SettleAction, Settlement};

/// A running consumer. Stop it with [`shutdown`](Consumer::shutdown) or
/// [`shutdown_on_signal`](Consumer::shutdown_on_signal); dropping it stops
/// intake too, but without waiting for in-flight handlers.
#[must_use = "dropping a consumer stops it"]
pub struct Consumer {
    stop: watch::Sender<bool>,
    stopping: Stop,
    tasks: Vec<JoinHandle<()>>,
    aborts: Vec<AbortHandle>,
    sources: Vec<Arc<Source>>,
    counts: Counts,
    /// Set when a subscription ended without being asked to.
    ended: Arc<watch::Sender<bool>>,
}

/// What every part of a consumer counted; each counter has one writer.
#[derive(Default)]
struct Counts {
    workers: Vec<Arc<WorkerCounts>>,
    released: Arc<AtomicU64>,
    restarts: Arc<AtomicU64>,
}

/// How a shutdown went: what was received, what was settled, and what was
/// left to the broker's redelivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Whether every delivery received was settled before the deadline,
    /// every task of the consumer ended in time, and no worker had to be
    /// started again. When not, what is unsettled is redelivered later.
    pub drained: bool,
    /// Deliveries taken from the broker.
    pub received: u64,
    /// Deliveries settled (acked, nacked or dead-lettered) with the broker's agreement.
    pub settled: u64,
    /// Settlements that failed or panicked: those messages come back.
    pub failed_settlements: u64,
    /// Deliveries not yet handled when the deadline passed, handed back to
    /// the broker unhandled (no attempt counted) so another member gets them
    /// at once.
    pub released: u64,
    /// Deliveries still in a handler when the deadline passed: abandoned,
    /// redelivered after the broker's visibility timeout.
    pub abandoned: u64,
    /// Workers that ended by a panic and were started again.
    pub worker_restarts: u64,
}

impl ShutdownReport {
    /// Drained, with no failed settlement: nothing left to come back.
    pub fn is_clean(&self) -> bool {
        self.drained && self.failed_settlements == 0
    }
}

impl Consumer {
    /// Starts building a consumer for `group`: every group receives every
    /// message of its topics; inside a group each message goes to one member.
    pub fn group(subscriber: Arc<dyn Subscriber>, group: impl Into<String>) -> ConsumerBuilder {
        ConsumerBuilder::new(subscriber, Some(group.into()))
    }

    /// Starts building a consumer with private subscriptions (no group), where the broker allows.
    pub fn private(subscriber: Arc<dyn Subscriber>) -> ConsumerBuilder {
        ConsumerBuilder::new(subscriber, None)
    }

    /// Phased shutdown: stops intake, lets in-flight handlers finish and
    /// settle, and waits for the adapter to finish closing
    /// ([`DeliveryStream::closed`]: Kafka's final commit and leaving the
    /// group), all within `deadline`. Past it, deliveries not yet handled are
    /// handed back to the broker, handlers still running are stopped (their
    /// messages are redelivered after the visibility timeout), and the
    /// report says `drained: false`.
    ///
    /// [`DeliveryStream::closed`]: crate::DeliveryStream::closed
    pub async fn shutdown(mut self, deadline: Duration) -> ShutdownReport {
        self.signal_stop();
        let tasks = std::mem::take(&mut self.tasks);
        let joined = tokio::time::timeout(deadline, futures::future::join_all(tasks)).await;
        let in_time = match &joined {
            Ok(results) => {
                let failed = results.iter().filter(|r| r.is_err()).count();
                if failed > 0 {
                    error!(failed, "consumer tasks ended by a panic");
                }
                failed == 0
            }
            Err(_) => false,
        };
        if joined.is_err() {
            warn!(
                ?deadline,
                "shutdown deadline passed; handing back what was not handled"
            );
            let mut waiting = Vec::new();
            for source in &self.sources {
                if let Some(keys) = &source.keys {
                    waiting.extend(keys.drain());
                }
            }
            dispatch::release(waiting, &self.counts.released);
            for abort in &self.aborts {
                abort.abort();
            }
        }
        self.report(in_time)
    }

    /// A consumer of the tasks `start` spawned.
    fn from_parts(
        stop: watch::Sender<bool>,
        stopping: Stop,
        tasks: Vec<JoinHandle<()>>,
        sources: Vec<Arc<Source>>,
        counts: Counts,
        ended: Arc<watch::Sender<bool>>,
    ) -> Self {
        let aborts = tasks.iter().map(JoinHandle::abort_handle).collect();
        Consumer {
            stop,
            stopping,
            tasks,
            aborts,
            sources,
            counts,
            ended,
        }
    }

    fn signal_stop(&self) {
        self.stopping.raise();
        self.stop.send_replace(true);
    }

    fn report(&self, in_time: bool) -> ShutdownReport {
        let c = &self.counts;
        let (received, settled, failed_settlements) =
            c.workers.iter().fold((0, 0, 0), |(r, s, f), w| {
                (
                    r + w.received.load(Ordering::Relaxed),
                    s + w.settled.load(Ordering::Relaxed),
                    f + w.failed.load(Ordering::Relaxed),
                )
            });
        let released = c.released.load(Ordering::Relaxed);
        let worker_restarts = c.restarts.load(Ordering::Relaxed);
        let abandoned = received.saturating_sub(settled + failed_settlements + released);
        ShutdownReport {
            drained: in_time && abandoned == 0 && released == 0 && worker_restarts == 0,
            received,
            settled,
            failed_settlements,
            released,
            abandoned,
            worker_restarts,
        }
    }

    /// Resolves when one of the consumer's subscriptions ended without a
    /// shutdown asking it to (the adapter gave up on it): the consumer no
    /// longer receives everything it should. A host takes the service down
    /// (or restarts it) on it; never resolves otherwise.
    pub async fn ended(&self) {
        let mut rx = self.ended.subscribe();
        let _ = rx.wait_for(|ended| *ended).await;
        if *rx.borrow() {
            return;
        }
        std::future::pending::<()>().await;
    }

    /// Whether a subscription ended on its own (see [`ended`](Consumer::ended)).
    pub fn has_ended(&self) -> bool {
        *self.ended.borrow()
    }

    /// A check of this consumer for health probes, which outlives it:
    /// `running`, `draining` once a shutdown began, `stopped` once it ended
    /// (or a subscription ended on its own, with that as the detail).
    pub fn health(&self) -> ConsumerHealth {
        ConsumerHealth {
            stop: self.stop.subscribe(),
            ended: self.ended.clone(),
        }
    }

    /// Waits for Ctrl-C or SIGTERM ([`shutdown_signal`]), then shuts down with `deadline`.
    pub async fn shutdown_on_signal(self, deadline: Duration) -> ShutdownReport {
        shutdown_signal().await;
        self.shutdown(deadline).await
    }
}

/// A consumer's [`HealthCheck`], from [`Consumer::health`].
#[derive(Clone, Debug)]
pub struct ConsumerHealth {
    stop: watch::Receiver<bool>,
    /// Shared with the consumer's intake tasks, which set it.
    ended: Arc<watch::Sender<bool>>,
}

impl ConsumerHealth {
    /// The state now.
    pub fn health(&self) -> Health {
        if *self.ended.borrow() {
            return Health::because(State::Stopped, "a subscription ended on its own");
        }
        // The consumer drops its end of `stop` when its shutdown returns.
        if self.stop.has_changed().is_err() {
            Health::new(State::Stopped)
        } else if *self.stop.borrow() {
            Health::new(State::Draining)
        } else {
            Health::new(State::Running)
        }
    }
}

impl HealthCheck for ConsumerHealth {
    fn check(&self) -> BoxFuture<'_, Health> {
        let health = self.health();
        Box::pin(async move { health })
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("tasks", &self.tasks.len())
            .finish()
    }
}

/// Resolves when the process is asked to stop: Ctrl-C (SIGINT) or, on
/// Unix, SIGTERM (what container platforms send).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
