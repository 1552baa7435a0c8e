//! Ready-made middleware for Tidings handlers and publishers.
//!
//! Every layer implements [`Middleware`] (around handlers, added with
//! `ConsumerBuilder::layer`) and/or [`PublishMiddleware`] (around publishers,
//! added with `LayeredPublisher::layer`). They compose in the order added:
//! the first layer sees the message first.
//!
//! | module | layers |
//! |---|---|
//! | [`retry`] | [`Retry`] (broker or in-process, backoff with full jitter, predicate), [`PublishRetry`] |
//! | [`breaker`] | [`CircuitBreaker`]: pauses intake (handlers) or fails fast (publishers) |
//! | [`idempotency`] | [`Idempotency`] with an in-memory or Redis store |
//! | [`limit`] | [`Timeout`], [`ConcurrencyLimit`], [`RateLimit`], [`MaxChainDepth`] |
//! | [`dead_letters`] | [`DeadLetterInbox`]: list, inspect, replay, purge, threshold hook |
//! | [`handled`] | [`NotifyHandled`](handled::NotifyHandled) and [`publish_and_wait`](handled::publish_and_wait) |
//!
//! A stack in the recommended order (outermost first) — see `docs/middleware.md` for why:
//!
//! ```
//! use std::time::Duration;
//! use tidings_middleware::prelude::*;
//! # async fn f(subscriber: std::sync::Arc<dyn tidings_core::Subscriber>) {
//! let consumer = tidings_core::Consumer::group(subscriber, "billing")
//!     .layer(MaxChainDepth(16))
//!     .layer(Idempotency::in_memory(Duration::from_secs(3600)))
//!     .layer(Retry::exponential(Duration::from_millis(200)).max_attempts(5))
//!     .layer(CircuitBreaker::new(Threshold::Consecutive(10)))
//!     .layer(Timeout(Duration::from_secs(30)));
//! # let _ = consumer;
//! # }
//! ```

pub mod breaker;
pub mod dead_letters;
pub mod handled;
pub mod idempotency;
pub mod limit;
pub mod retry;

pub use breaker::{BreakerState, CircuitBreaker, Threshold};
pub use dead_letters::{DeadLetterInbox, Filter, ReplayTo};
pub use idempotency::{Idempotency, IdempotencyStore, MemoryStore};
pub use limit::{ConcurrencyLimit, MaxChainDepth, RateLimit, Timeout};
pub use retry::{PublishRetry, Retry, RetryMode};
pub use tidings_core::middleware::{Middleware, PublishMiddleware};

/// Every layer in one `use`.
pub mod prelude {
    pub use crate::breaker::{BreakerState, CircuitBreaker, Threshold};
    pub use crate::dead_letters::{DeadLetterInbox, Filter};
    pub use crate::handled::{NotifyHandled, publish_and_wait};
    pub use crate::idempotency::Idempotency;
    pub use crate::limit::{ConcurrencyLimit, MaxChainDepth, RateLimit, Timeout};
    pub use crate::retry::{PublishRetry, Retry, RetryMode};
}
