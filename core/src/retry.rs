//! Retry policy: how many attempts, and how long between them.

use std::time::Duration;

/// How many attempts a message gets and how long to wait between them.
///
/// The consumer runtime applies it to retryable handler errors: a failed
/// attempt is redelivered after [`Backoff::delay`] until `max_attempts`
/// attempts failed, then the message is dead-lettered.
///
/// ```
/// use std::time::Duration;
/// use tidings_core::{Backoff, RetryPolicy};
/// let policy = RetryPolicy::new(5).with_backoff(Backoff::exponential(Duration::from_millis(100)));
/// assert_eq!(policy.max_attempts, 5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The delay before each redelivery.
    pub backoff: Backoff,
}

impl RetryPolicy {
    /// `max_attempts` attempts with the default backoff.
    pub fn new(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            backoff: Backoff::default(),
        }
    }

    /// Sets the backoff.
    #[must_use]
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
}

impl Default for RetryPolicy {
    /// Five attempts, exponential backoff from 100 ms to 30 s with full jitter.
    fn default() -> Self {
        RetryPolicy::new(5)
    }
}

/// Exponential backoff with optional full jitter.
///
/// The delay before attempt `n + 1` is `initial * multiplier^(n-1)`, capped at
/// `max`; with jitter it is drawn uniformly from zero to that value ("full
/// jitter"), which spreads the retries of many consumers apart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The delay after the first failed attempt.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
    /// The growth factor per attempt.
    pub multiplier: f64,
    /// Whether to draw the delay uniformly from zero to the computed value.
    pub jitter: bool,
}

impl Backoff {
    /// Exponential from `initial`, doubling, capped at 30 s, with full jitter.
    pub fn exponential(initial: Duration) -> Self {
        Backoff {
            initial,
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: true,
        }
    }

    /// The same delay every time, without jitter.
    pub fn fixed(delay: Duration) -> Self {
        Backoff {
            initial: delay,
            max: delay,
            multiplier: 1.0,
            jitter: false,
        }
    }

    /// Sets the largest delay.
    #[must_use]
    pub fn with_max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// Turns jitter on or off.
    #[must_use]
    pub fn with_jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let ceiling = self.initial.mul_f64(exp.min(1e9)).min(self.max);
        if self.jitter {
            ceiling.mul_f64(fastrand::f64())
        } else {
            ceiling
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::exponential(Duration::from_millis(100))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_grows_and_caps() {
        let b = Backoff::exponential(Duration::from_millis(100))
            .with_max(Duration::from_millis(500))
            .with_jitter(false);
        let delays: Vec<_> = (1..=5).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
    }

    #[test]
    fn full_jitter_stays_below_the_ceiling() {
        let b = Backoff::exponential(Duration::from_millis(100));
        for attempt in 1..10 {
            let ceiling = Duration::from_millis(100) * 2u32.pow(attempt - 1);
            assert!(b.delay(attempt) <= ceiling.min(Duration::from_secs(30)));
        }
    }
}
