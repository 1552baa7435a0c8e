//! Retry: exponential backoff with full jitter, a limit on attempts, and a
//! predicate for which errors are worth another attempt.
//!
//! Two modes on the handle path:
//! - [`RetryMode::Broker`] (the default): a failed attempt is nacked with the
//!   backoff as its delay, so other messages keep flowing and a restart does
//!   not lose the attempt count (the broker keeps it). This is what the
//!   consumer's own [`RetryPolicy`](tidings_core::RetryPolicy) does; the
//!   layer adds the predicate and a per-stack policy.
//! - [`RetryMode::InProcess`]: the handler is run again in place, the message
//!   staying in flight. Fast for short blips; holds a worker while it waits.
//!
//! When attempts run out, or the predicate says an error is not retryable,
//! the error becomes final and the runtime dead-letters the message.
//!
//! On the publish path, [`PublishRetry`] retries transient failures
//! ([`Error::is_transient`](tidings_core::Error::is_transient)) and never a rejected message.

use std::sync::Arc;

use async_trait::async_trait;
use tidings_core::middleware::{Next, PublishNext};
use tidings_core::{
    Backoff, Delivery, Failure, HandlerError, HandlerResult, Message, Middleware,
    PublishMiddleware, Receipt, Result,
};

/// Where the retries happen; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryMode {
    /// Nack with the backoff as delay; the broker redelivers.
    #[default]
    Broker,
    /// Run the handler again in place.
    InProcess,
}

type Predicate = Arc<dyn Fn(&HandlerError) -> bool + Send + Sync>;

/// The retry layer for handlers.
///
/// ```
/// use std::time::Duration;
/// use tidings_middleware::retry::{Retry, RetryMode};
/// let retry = Retry::exponential(Duration::from_millis(100))
///     .max_attempts(5)
///     .max_delay(Duration::from_secs(10))
///     .mode(RetryMode::InProcess)
///     .retry_if(|e| !e.to_string().contains("invalid"));
/// # let _ = retry;
/// ```
#[derive(Clone)]
pub struct Retry {
    max_attempts: u32,
    backoff: Backoff,
    mode: RetryMode,
    retryable: Option<Predicate>,
}

impl Retry {
    /// Exponential backoff from `initial`, doubling, full jitter, 5 attempts, broker mode.
    pub fn exponential(initial: std::time::Duration) -> Self {
        Retry {
            max_attempts: 5,
            backoff: Backoff::exponential(initial),
            mode: RetryMode::Broker,
            retryable: None,
        }
    }

    /// Attempts in all, the first included.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The largest delay between attempts.
    #[must_use]
    pub fn max_delay(mut self, max: std::time::Duration) -> Self {
        self.backoff = self.backoff.with_max(max);
        self
    }

    /// Turns the full jitter off (it is on by default).
    #[must_use]
    pub fn without_jitter(mut self) -> Self {
        self.backoff = self.backoff.with_jitter(false);
        self
    }

    /// Where the retries happen.
    #[must_use]
    pub fn mode(mut self, mode: RetryMode) -> Self {
        self.mode = mode;
        self
    }

    /// Only errors for which `predicate` is true are retried; the others are
    /// final at once (dead-lettered as permanent).
    #[must_use]
    pub fn retry_if(
        mut self,
        predicate: impl Fn(&HandlerError) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.retryable = Some(Arc::new(predicate));
        self
    }

    /// Decides what a failed attempt becomes: `Ok(delay)` to try again after
    /// `delay`, `Err(final error)` otherwise.
    fn next_step(
        &self,
        attempt: u32,
        error: HandlerError,
    ) -> std::result::Result<std::time::Duration, HandlerError> {
        if error.is_permanent() {
            return Err(error);
        }
        if let Some(retryable) = &self.retryable
            && !retryable(&error)
        {
            return Err(error.with_kind(Failure::Permanent));
        }
        if attempt >= self.max_attempts {
            return Err(error.with_kind(Failure::Exhausted));
        }
        Ok(error
            .retry_after()
            .unwrap_or_else(|| self.backoff.delay(attempt)))
    }
}

#[async_trait]
impl Middleware for Retry {
    async fn handle(&self, delivery: &Delivery, next: Next<'_>) -> HandlerResult {
        match self.mode {
            RetryMode::Broker => match next.run(delivery).await {
                Ok(()) => Ok(()),
                Err(error) => match self.next_step(delivery.attempt(), error) {
                    Ok(delay) => {
                        Err(HandlerError::retryable(RetryLater(delay)).with_retry_after(delay))
                    }
                    Err(last) => Err(last),
                },
            },
            RetryMode::InProcess => loop {
                // Attempts made earlier by the broker count too.
                let attempt = delivery.attempt();
                let error = match next.run(delivery).await {
                    Ok(()) => return Ok(()),
                    Err(error) => error,
                };
                let delay = self.next_step(attempt, error)?;
                tracing::debug!(id = %delivery.message().id, attempt, ?delay, "retrying in process");
                tokio::time::sleep(delay).await;
                delivery.next_attempt();
            },
        }
    }
}

/// The error text of a broker-mode retry: the delay chosen.
#[derive(Debug, thiserror::Error)]
#[error("retrying after {0:?}")]
struct RetryLater(std::time::Duration);

/// The retry layer for publishers: transient failures are retried with
/// backoff, rejected messages never.
#[derive(Debug, Clone)]
pub struct PublishRetry {
    max_attempts: u32,
    backoff: Backoff,
}

impl PublishRetry {
    /// Exponential backoff from `initial` with full jitter, 5 attempts.
    pub fn exponential(initial: std::time::Duration) -> Self {
        PublishRetry {
            max_attempts: 5,
            backoff: Backoff::exponential(initial),
        }
    }

    /// Attempts in all, the first included.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
}

#[async_trait]
impl PublishMiddleware for PublishRetry {
    async fn publish(
        &self,
        topic: &str,
        message: Message,
        next: PublishNext<'_>,
    ) -> Result<Receipt> {
        let mut attempt = 1;
        loop {
            // The same message (same id) each time, so brokers that
            // deduplicate by id store it once.
            match next.run(topic, message.clone()).await {
                Err(error) if error.is_transient() && attempt < self.max_attempts => {
                    let delay = self.backoff.delay(attempt);
                    tracing::debug!(topic, attempt, ?delay, %error, "publish failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }
}
