//! Limits around handlers: a time limit per call, a concurrency limit, a rate
//! limit, and a maximum event-chain depth.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use tidings_core::middleware::Next;
use tidings_core::{Delivery, HandlerError, HandlerResult, Middleware};

/// Fails a handler call that runs longer than the limit (a retryable error;
/// the call is dropped at its next await point).
#[derive(Debug, Clone, Copy)]
pub struct Timeout(pub Duration);

/// A handler call ran out of time.
#[derive(Debug, thiserror::Error)]
#[error("handler timed out after {0:?}")]
pub struct Elapsed(pub Duration);

#[async_trait]
impl Middleware for Timeout {
    async fn handle(&self, delivery: &Delivery, next: Next<'_>) -> HandlerResult {
        use std::future::Future;
        use std::task::Poll;
        let Some(deadline) = Instant::now().checked_add(self.0) else {
            return next.run(delivery).await; // no end in sight
        };
        let mut call = std::pin::pin!(next.run(delivery));
        // The timer is set up at the call's first wait: a call that finishes
        // without waiting (most of them) needs none, and a timer is the
        // costliest part of this layer.
        let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = call.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            if timer.is_none() {
                timer.set(Some(tokio::time::sleep_until(deadline)));
            }
            match timer.as_mut().as_pin_mut().map(|t| t.poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(HandlerError::retryable(Elapsed(self.0)))),
                _ => Poll::Pending,
            }
        })
        .await
    }
}

/// At most `n` calls at once across every consumer that shares this layer
/// (the consumer's own `concurrency` limits one topic).
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit(Arc<Semaphore>);

impl ConcurrencyLimit {
    /// At most `n` calls at once.
    pub fn new(n: usize) -> Self {
        ConcurrencyLimit(Arc::new(Semaphore::new(n.max(1))))
    }
}

#[async_trait]
impl Middleware for ConcurrencyLimit {
    async fn handle(&self, delivery: &Delivery, next: Next<'_>) -> HandlerResult {
        // A free permit is taken without setting up a waiter.
        let _permit = match self.0.try_acquire() {
            Ok(permit) => permit,
            Err(_) => self.0.acquire().await.map_err(HandlerError::retryable)?,
        };
        next.run(delivery).await
    }
}

/// At most `n` calls started per `interval` (a fixed window); calls beyond
/// wait for the next window, which slows intake.
#[derive(Debug, Clone)]
pub struct RateLimit {
    n: u32,
    interval: Duration,
    window: Arc<Mutex<(Instant, u32)>>,
}

impl RateLimit {
    /// At most `n` calls per `interval`.
    pub fn new(n: u32, interval: Duration) -> Self {
        RateLimit {
            n: n.max(1),
            interval,
            window: Arc::new(Mutex::new((Instant::now(), 0))),
        }
    }

    /// Takes a slot, or says when the next window opens.
    fn try_take(&self) -> Option<Instant> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now >= w.0 + self.interval {
            *w = (now, 0);
        }
        if w.1 < self.n {
            w.1 += 1;
            None
        } else {
            Some(w.0 + self.interval)
        }
    }
}

#[async_trait]
impl Middleware for RateLimit {
    async fn handle(&self, delivery: &Delivery, next: Next<'_>) -> HandlerResult {
        while let Some(until) = self.try_take() {
            tokio::time::sleep_until(until).await;
        }
        next.run(delivery).await
    }
}

/// Stops runaway event loops: a message deeper than `max` in its event chain
/// (counted by [`Message::caused_by`](tidings_core::Message::caused_by)) is
/// dead-lettered as a permanent error instead of handled.
#[derive(Debug, Clone, Copy)]
pub struct MaxChainDepth(pub u32);

/// The event chain is deeper than allowed.
#[derive(Debug, thiserror::Error)]
#[error(
    "event chain depth {depth} exceeds the limit of {max}: a runaway event loop? (causation id {causation:?})"
)]
pub struct ChainTooDeep {
    /// The message's depth.
    pub depth: u32,
    /// The limit.
    pub max: u32,
    /// The message's cause.
    pub causation: Option<String>,
}

#[async_trait]
impl Middleware for MaxChainDepth {
    async fn handle(&self, delivery: &Delivery, next: Next<'_>) -> HandlerResult {
        let message = delivery.message();
        let depth = message.chain_depth();
        if depth > self.0 {
            return Err(HandlerError::permanent(ChainTooDeep {
                depth,
                max: self.0,
                causation: message.metadata.causation_id.clone(),
            }));
        }
        next.run(delivery).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_opens_a_new_window_each_interval() {
        let limit = RateLimit::new(2, Duration::from_secs(1));
        let start = Instant::now();
        assert!(limit.try_take().is_none());
        assert!(limit.try_take().is_none());
        assert_eq!(limit.try_take(), Some(start + Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(limit.try_take().is_none());
    }
}
