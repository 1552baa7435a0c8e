//! Idempotency: a message whose id (or business key) a group already handled
//! successfully is skipped — exactly-once *effect* on top of at-least-once delivery.
//!
//! Per message the layer **claims** the key in a store (an in-progress marker
//! with a lease), runs the handler, and on success **completes** it (a done
//! record kept for the TTL); on failure it **releases** the claim so a
//! redelivery can try again. A second delivery of a done key is acked without
//! running the handler. A delivery that finds another replica's in-progress
//! marker is nacked for later: two replicas never run the same message at
//! once, and a crashed replica's marker expires with its lease.
//!
//! Stores: [`MemoryStore`] (TTL and size bound, one process) and,
//! with the `redis` feature, `RedisStore` (`SET NX PX`, shared by replicas).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tidings_core::middleware::Next;
use tidings_core::{BoxError, Delivery, HandlerError, HandlerResult, Message, Middleware};

mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours to handle, under this claim's token.
    Claimed(ClaimToken),
    /// The key was handled successfully before.
    Done,
    /// Someone else holds an unexpired claim on it.
    InProgress,
}

/// Names one claim of a key, made by the store that granted it, so that
/// [`release`](IdempotencyStore::release) frees that claim and no other:
/// a handler that outlived its lease, failing, must not free a newer
/// claim of the same key (a redelivery being handled, perhaps by another
/// worker of the same process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimToken(u64);

impl ClaimToken {
    /// A token with the store's own number for a claim.
    pub fn new(number: u64) -> Self {
        ClaimToken(number)
    }

    /// The store's number for the claim.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Where handled keys are recorded.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for `lease` unless it is done or claimed.
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, BoxError>;
    /// Records `key` as done for `ttl`.
    async fn complete(&self, key: &str, ttl: Duration) -> Result<(), BoxError>;
    /// Gives up the claim `claim` of `key` (the handler failed), so a
    /// redelivery may claim it; changes nothing once the key was claimed
    /// again or completed.
    async fn release(&self, key: &str, claim: ClaimToken) -> Result<(), BoxError>;
}

type KeyFn = Arc<dyn Fn(&Message) -> String + Send + Sync>;

/// The idempotency layer; see the [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use tidings_middleware::idempotency::Idempotency;
/// let dedup = Idempotency::in_memory(Duration::from_secs(3600))
///     // deduplicate on a business key instead of the message id:
///     .key(|m| m.headers.get("order-id").cloned().unwrap_or_else(|| m.id.to_string()));
/// # let _ = dedup;
/// ```
#[derive(Clone)]
pub struct Idempotency {
    store: Store,
    ttl: Duration,
    lease: Duration,
    key: Option<KeyFn>,
}

/// Where the layer records keys.
#[derive(Clone)]
enum Store {
    /// In process: called directly, without the boxed future of each
    /// `IdempotencyStore` call, and given the key in parts, so nothing is
    /// allocated for it.
    Memory(Arc<MemoryStore>),
    /// Any other store, through its trait.
    Other(Arc<dyn IdempotencyStore>),
}

impl Idempotency {
    /// Records handled keys in `store` for `ttl`.
    pub fn new<S: IdempotencyStore>(store: S, ttl: Duration) -> Self {
        let store = Arc::new(store);
        let any: Arc<dyn Any + Send + Sync> = store.clone();
        let store = match any.downcast::<MemoryStore>() {
            Ok(memory) => Store::Memory(memory),
            Err(_) => Store::Other(store),
        };
        Idempotency {
            store,
            ttl,
            lease: Duration::from_secs(60),
            key: None,
        }
    }

    /// An in-process store keeping at most 1,000,000 keys for `ttl`.
    pub fn in_memory(ttl: Duration) -> Self {
        Self::new(MemoryStore::new(1_000_000, ttl), ttl)
    }

    /// How long a claim holds before it expires (a crashed handler's claim
    /// frees the message after this). Longer than your slowest handler; default 60 s.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Deduplicates on `key(message)` instead of the message id.
    #[must_use]
    pub fn key(mut self, key: impl Fn(&Message) -> String + Send + Sync + 'static) -> Self {
        self.key = Some(Arc::new(key));
        self
    }

    /// Calls `f` with the delivery's group and key: every group handles
    /// every message once.
    fn with_key<R>(&self, delivery: &Delivery, f: impl FnOnce(&str, &str) -> R) -> R {
        let message = delivery.message();
        let group = delivery.group().unwrap_or("-");
        match &self.key {
            Some(key) => f(group, &key(message)),
            None => f(group, &message.id),
        }
    }

    /// What a claim that is not ours makes of the delivery: a duplicate is
    /// acked without running the handler; one another consumer is handling
    /// is retried after a while.
    fn skipped(&self, found: Claim, delivery: &Delivery) -> HandlerResult {
        let id = &delivery.message().id;
        match found {
            Claim::Done => {
                tracing::debug!(%id, group = delivery.group(), "duplicate skipped");
                Ok(())
            }
            // `Claimed` is ours and never passed here; were it, holding the
            // message back is the safe way to be wrong.
            Claim::InProgress | Claim::Claimed(_) => Err(HandlerError::retryable(format!(
                "the idempotency key of message {id} is being handled by another consumer"
            ))
            .with_retry_after(self.lease.min(Duration::from_secs(1)))),
        }
    }
}

/// `<group>:<key>`, the key a store other than the in-memory one is given.
fn scoped(group: &str, key: &str) -> String {
    let mut scoped = String::with_capacity(group.len() + 1 + key.len());
    scoped.push_str(group);
    scoped.push(':');
    scoped.push_str(key);
    scoped
}

#[async_trait]
impl Middleware for Idempotency {
    async fn handle(&self, delivery: &Delivery, next: Next<'_>) -> HandlerResult {
        match &self.store {
            Store::Memory(store) => {
                let key = self.with_key(delivery, |group, key| store.digest(group, key));
                let held = match store.hold(key, self.lease) {
                    Ok(held) => held,
                    Err(found) => return self.skipped(found, delivery),
                };
                let result = next.run(delivery).await;
                held.record(result.is_ok());
                result
            }
            Store::Other(store) => {
                let key = self.with_key(delivery, scoped);
                let token = match store
                    .claim(&key, self.lease)
                    .await
                    .map_err(HandlerError::retryable)?
                {
                    Claim::Claimed(token) => token,
                    found => return self.skipped(found, delivery),
                };
                let result = next.run(delivery).await;
                let recorded = match &result {
                    Ok(()) => store.complete(&key, self.ttl).await,
                    Err(_) => store.release(&key, token).await,
                };
                if let Err(error) = recorded {
                    // The handler's outcome stands; the claim expires with its lease.
                    tracing::warn!(key, %error, "recording the idempotency key failed");
                }
                result
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_in_memory_store_is_called_directly_and_others_through_the_trait() {
        let ttl = Duration::from_secs(60);
        let direct = Idempotency::new(MemoryStore::new(10, ttl), ttl);
        assert!(matches!(direct.store, Store::Memory(_)));
        struct Elsewhere;
        #[async_trait]
        impl IdempotencyStore for Elsewhere {
            async fn claim(&self, _: &str, _: Duration) -> Result<Claim, BoxError> {
                Ok(Claim::Claimed(ClaimToken::new(1)))
            }
            async fn complete(&self, _: &str, _: Duration) -> Result<(), BoxError> {
                Ok(())
            }
            async fn release(&self, _: &str, _: ClaimToken) -> Result<(), BoxError> {
                Ok(())
            }
        }
        let other = Idempotency::new(Elsewhere, ttl);
        assert!(matches!(other.store, Store::Other(_)));
    }
}
