//! Circuit breaker: stop calling a dependency that keeps failing, then probe
//! it carefully before trusting it again.
//!
//! States: **closed** (calls flow; failures are counted), **open** (no calls
//! for `open_for`), **half-open** (up to `probes` calls at once; as many
//! successes close the breaker, one failure opens it again).
//!
//! On the handle path an open breaker **pauses intake**: workers wait at the
//! breaker instead of burning messages into the dead-letter destination, so
//! messages stay in the broker until the dependency is back. Only retryable
//! handler errors count as failures: a permanent or undecodable error says the
//! message is bad, not the dependency. On the publish path an open breaker
//! fails fast with a transient error.
//!
//! One breaker can guard both paths of the same dependency: it is `Clone`,
//! and clones share their state. Watch it with [`CircuitBreaker::watch`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use tidings_core::middleware::{Next, PublishNext};
use tidings_core::{
    Delivery, Error, Failure, HandlerResult, Message, Middleware, PublishMiddleware, Receipt,
    Result,
};

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// No calls until the open interval has passed.
    Open,
    /// A few probe calls decide.
    HalfOpen,
}

/// The breaker's state for health probes: an open breaker makes a
/// service not ready (its handlers cannot do their work); a closed or
/// probing one is ready.
impl tidings_core::HealthCheck for CircuitBreaker {
    fn check(&self) -> futures::future::BoxFuture<'_, tidings_core::Health> {
        use tidings_core::health::State;
        let state = match self.state() {
            BreakerState::Closed => State::BreakerClosed,
            BreakerState::Open => State::BreakerOpen,
            BreakerState::HalfOpen => State::BreakerHalfOpen,
        };
        Box::pin(async move { tidings_core::Health::new(state) })
    }
}

/// When the breaker opens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// After this many failures in a row.
    Consecutive(u32),
    /// When at least `ratio` of the last `window` calls failed (and the
    /// window is full).
    Ratio {
        /// Failed share, 0.0 to 1.0.
        ratio: f64,
        /// Calls in the window.
        window: u32,
    },
}

/// A circuit breaker; see the [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use tidings_middleware::breaker::{CircuitBreaker, Threshold};
/// let breaker = CircuitBreaker::new(Threshold::Consecutive(5))
///     .open_for(Duration::from_secs(30))
///     .probes(2);
/// let mut states = breaker.watch(); // a tokio watch::Receiver<BreakerState>
/// # let _ = states;
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

struct Inner {
    threshold: Threshold,
    open_for: Duration,
    probes: u32,
    machine: Mutex<Machine>,
    state: watch::Sender<BreakerState>,
    probe_freed: Notify,
}

struct Machine {
    state: BreakerState,
    consecutive: u32,
    window: VecDeque<bool>,
    opened_at: Instant,
    probes_running: u32,
    probes_succeeded: u32,
}

/// The right to make one call; report how it went with [`Permit::record`].
/// Dropped without a report, it counts for nothing.
#[must_use]
pub struct Permit {
    inner: Arc<Inner>,
    probe: bool,
    recorded: bool,
}

/// The breaker is open: calls are refused.
#[derive(Debug, thiserror::Error)]
#[error("circuit breaker open; retry in {retry_in:?}")]
pub struct CircuitOpen {
    /// When it will let a probe through.
    pub retry_in: Duration,
}

impl CircuitBreaker {
    /// A closed breaker that opens at `threshold`, stays open 30 s, and probes with one call.
    pub fn new(threshold: Threshold) -> Self {
        CircuitBreaker {
            inner: Arc::new(Inner {
                threshold,
                open_for: Duration::from_secs(30),
                probes: 1,
                machine: Mutex::new(Machine {
                    state: BreakerState::Closed,
                    consecutive: 0,
                    window: VecDeque::new(),
                    opened_at: Instant::now(),
                    probes_running: 0,
                    probes_succeeded: 0,
                }),
                state: watch::channel(BreakerState::Closed).0,
                probe_freed: Notify::new(),
            }),
        }
    }

    fn configure(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => f(inner),
            None => tracing::warn!("a circuit breaker was configured after being cloned; ignored"),
        }
        self
    }

    /// How long the breaker stays open before probing.
    #[must_use]
    pub fn open_for(self, interval: Duration) -> Self {
        self.configure(|i| i.open_for = interval)
    }

    /// How many probe calls run at once when half-open, and how many must
    /// succeed to close the breaker.
    #[must_use]
    pub fn probes(self, n: u32) -> Self {
        self.configure(|i| i.probes = n.max(1))
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        *self.inner.state.borrow()
    }

    /// Follows the state: every change is sent on this channel.
    pub fn watch(&self) -> watch::Receiver<BreakerState> {
        self.inner.state.subscribe()
    }

    /// A permit now, or the time until one may be had.
    pub fn try_acquire(&self) -> std::result::Result<Permit, CircuitOpen> {
        let inner = &self.inner;
        let mut m = inner.lock();
        if m.state == BreakerState::Open {
            let reopen = m.opened_at + inner.open_for;
            let now = Instant::now();
            if now < reopen {
                return Err(CircuitOpen {
                    retry_in: reopen - now,
                });
            }
            inner.enter(&mut m, BreakerState::HalfOpen);
        }
        let probe = m.state == BreakerState::HalfOpen;
        if probe {
            if m.probes_running >= inner.probes {
                // Probes are out; the caller waits for their verdict.
                return Err(CircuitOpen {
                    retry_in: Duration::ZERO,
                });
            }
            m.probes_running += 1;
        }
        Ok(Permit {
            inner: inner.clone(),
            probe,
            recorded: false,
        })
    }

    /// Waits until a call may be made.
    pub async fn acquire(&self) -> Permit {
        // Closed, the usual case: no waiter set up.
        if let Ok(permit) = self.try_acquire() {
            return permit;
        }
        loop {
            let freed = self.inner.probe_freed.notified();
            match self.try_acquire() {
                Ok(permit) => return permit,
                Err(CircuitOpen { retry_in }) if retry_in.is_zero() => freed.await,
                Err(CircuitOpen { retry_in }) => tokio::time::sleep(retry_in).await,
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Machine> {
        // Every update leaves the machine consistent; a poisoned lock is still usable.
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self, m: &mut Machine, state: BreakerState) {
        if m.state == state {
            return;
        }
        m.state = state;
        m.consecutive = 0;
        m.window.clear();
        m.probes_running = 0;
        m.probes_succeeded = 0;
        if state == BreakerState::Open {
            m.opened_at = Instant::now();
        }
        tracing::info!(?state, "circuit breaker state changed");
        self.state.send_replace(state);
        self.probe_freed.notify_waiters();
    }

    fn record(&self, probe: bool, success: bool) {
        let mut m = self.lock();
        match m.state {
            BreakerState::HalfOpen if probe => {
                m.probes_running = m.probes_running.saturating_sub(1);
                if !success {
                    self.enter(&mut m, BreakerState::Open);
                } else {
                    m.probes_succeeded += 1;
                    if m.probes_succeeded >= self.probes {
                        self.enter(&mut m, BreakerState::Closed);
                    } else {
                        self.probe_freed.notify_waiters();
                    }
                }
            }
            BreakerState::Closed => {
                let trip = match self.threshold {
                    Threshold::Consecutive(n) => {
                        m.consecutive = if success { 0 } else { m.consecutive + 1 };
                        m.consecutive >= n.max(1)
                    }
                    Threshold::Ratio { ratio, window } => {
                        m.window.push_back(!success);
                        while m.window.len() > window.max(1) as usize {
                            m.window.pop_front();
                        }
                        let failed = m.window.iter().filter(|f| **f).count();
                        m.window.len() >= window.max(1) as usize
                            && failed as f64 >= ratio * m.window.len() as f64
                    }
                };
                if trip {
                    self.enter(&mut m, BreakerState::Open);
                }
            }
            // A call that started before the breaker changed state: its
            // outcome no longer counts.
            _ => {}
        }
    }
}

impl Permit {
    /// Reports the call's outcome.
    pub fn record(mut self, success: bool) {
        self.recorded = true;
        self.inner.record(self.probe, success);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.recorded && self.probe {
            let mut m = self.inner.lock();
            m.probes_running = m.probes_running.saturating_sub(1);
            drop(m);
            self.inner.probe_freed.notify_waiters();
        }
    }
}

#[async_trait]
impl Middleware for CircuitBreaker {
    async fn handle(&self, delivery: &Delivery, next: Next<'_>) -> HandlerResult {
        let permit = self.acquire().await;
        let result = next.run(delivery).await;
        let failed = matches!(&result, Err(e) if e.kind() == Failure::Retryable);
        permit.record(!failed);
        result
    }
}

#[async_trait]
impl PublishMiddleware for CircuitBreaker {
    async fn publish(
        &self,
        topic: &str,
        message: Message,
        next: PublishNext<'_>,
    ) -> Result<Receipt> {
        let permit = self.try_acquire().map_err(|open| Error::Broker {
            broker: "circuit-breaker",
            source: Box::new(open),
        })?;
        let result = next.run(topic, message).await;
        let failed = matches!(&result, Err(e) if e.is_transient());
        permit.record(!failed);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(b: &CircuitBreaker, n: usize) {
        for _ in 0..n {
            b.try_acquire().expect("closed").record(false);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_closes_after_probes() {
        let b = CircuitBreaker::new(Threshold::Consecutive(3))
            .open_for(Duration::from_secs(10))
            .probes(2);
        let mut states = b.watch();
        fail(&b, 2);
        b.try_acquire().expect("closed").record(true); // resets the run
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(states.has_changed().expect("watch"));
        assert_eq!(*states.borrow_and_update(), BreakerState::Open);

        let refused = b.try_acquire().err().expect("open refuses");
        assert_eq!(refused.retry_in, Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(10)).await;

        let p1 = b.try_acquire().expect("first probe");
        let p2 = b.try_acquire().expect("second probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire().is_err(), "only two probes at once");
        p1.record(true);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        p2.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_again() {
        let b = CircuitBreaker::new(Threshold::Consecutive(1)).open_for(Duration::from_secs(5));
        fail(&b, 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        b.try_acquire().expect("probe").record(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.try_acquire().err().expect("open").retry_in,
            Duration::from_secs(5)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_needs_a_full_window() {
        let b = CircuitBreaker::new(Threshold::Ratio {
            ratio: 0.5,
            window: 4,
        });
        fail(&b, 1);
        b.try_acquire().expect("closed").record(true);
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Closed, "window not full yet");
        b.try_acquire().expect("closed").record(true);
        assert_eq!(b.state(), BreakerState::Open, "2 of 4 failed");
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_out_the_open_interval() {
        let b = CircuitBreaker::new(Threshold::Consecutive(1)).open_for(Duration::from_secs(7));
        fail(&b, 1);
        let start = Instant::now();
        let permit = b.acquire().await;
        assert_eq!(start.elapsed(), Duration::from_secs(7));
        permit.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
