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
//! Stores: [`MemoryStore`] (moka, TTL and size bound, one process) and,
//! with the `redis` feature, [`RedisStore`] (`SET NX PX`, shared by replicas).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tidings_core::middleware::Next;
use tidings_core::{BoxError, Delivery, HandlerError, HandlerResult, Message, Middleware};

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours to handle.
    Claimed,
    /// The key was handled successfully before.
    Done,
    /// Someone else holds an unexpired claim on it.
    InProgress,
}

/// Where handled keys are recorded.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for `lease` unless it is done or claimed.
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, BoxError>;
    /// Records `key` as done for `ttl`.
    async fn complete(&self, key: &str, ttl: Duration) -> Result<(), BoxError>;
    /// Gives up a claim (the handler failed), so a redelivery may claim it.
    async fn release(&self, key: &str) -> Result<(), BoxError>;
}

type KeyFn = Arc<dyn Fn(&Message) -> String + Send + Sync>;

/// The idempotency layer; see the [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use tidings_middleware::idempotency::Idempotency;
/// let dedup = Idempotency::in_memory(Duration::from_secs(3600))
///     // deduplicate on a business key instead of the message id:
///     .key(|m| m.headers.get("order-id").cloned().unwrap_or_else(|| m.id.clone()));
/// # let _ = dedup;
/// ```
#[derive(Clone)]
pub struct Idempotency {
    store: Arc<dyn IdempotencyStore>,
    ttl: Duration,
    lease: Duration,
    key: Option<KeyFn>,
}

impl Idempotency {
    /// Records handled keys in `store` for `ttl`.
    pub fn new(store: impl IdempotencyStore, ttl: Duration) -> Self {
        Idempotency {
            store: Arc::new(store),
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

    fn key_of(&self, delivery: &Delivery) -> String {
        let message = delivery.message();
        let key = match &self.key {
            Some(f) => f(message),
            None => message.id.clone(),
        };
        // Scoped by group: every group handles every message once.
        format!("{}:{}", delivery.group().unwrap_or("-"), key)
    }
}

#[async_trait]
impl Middleware for Idempotency {
    async fn handle(&self, delivery: &Delivery, next: Next<'_>) -> HandlerResult {
        let key = self.key_of(delivery);
        match self
            .store
            .claim(&key, self.lease)
            .await
            .map_err(HandlerError::retryable)?
        {
            Claim::Done => {
                tracing::debug!(id = %delivery.message().id, key, "duplicate skipped");
                return Ok(());
            }
            Claim::InProgress => {
                return Err(HandlerError::retryable(format!(
                    "{key} is being handled by another consumer"
                ))
                .with_retry_after(self.lease.min(Duration::from_secs(1))));
            }
            Claim::Claimed => {}
        }
        let result = next.run(delivery).await;
        let recorded = match &result {
            Ok(()) => self.store.complete(&key, self.ttl).await,
            Err(_) => self.store.release(&key).await,
        };
        if let Err(error) = recorded {
            // The handler's outcome stands; the claim expires with its lease.
            tracing::warn!(key, %error, "recording the idempotency key failed");
        }
        result
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Record {
    Done,
    Claimed(tokio::time::Instant),
}

/// Handled keys in process memory, bounded in count, each kept for the TTL.
pub struct MemoryStore {
    cache: moka::future::Cache<String, Record>,
}

impl MemoryStore {
    /// Keeps at most `capacity` keys, each for `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        MemoryStore {
            cache: moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, BoxError> {
        use moka::ops::compute::Op;
        let now = tokio::time::Instant::now();
        let mut claim = Claim::Claimed;
        self.cache
            .entry(key.to_owned())
            .and_compute_with(|existing| {
                let op = match existing.map(|e| e.into_value()) {
                    Some(Record::Done) => {
                        claim = Claim::Done;
                        Op::Nop
                    }
                    Some(Record::Claimed(until)) if until > now => {
                        claim = Claim::InProgress;
                        Op::Nop
                    }
                    _ => Op::Put(Record::Claimed(now + lease)),
                };
                std::future::ready(op)
            })
            .await;
        Ok(claim)
    }

    async fn complete(&self, key: &str, _ttl: Duration) -> Result<(), BoxError> {
        self.cache.insert(key.to_owned(), Record::Done).await;
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<(), BoxError> {
        self.cache.invalidate(key).await;
        Ok(())
    }
}

#[cfg(feature = "redis")]
pub use self::redis_store::RedisStore;

#[cfg(feature = "redis")]
mod redis_store {
    use super::*;

    /// Handled keys in Redis, shared by every replica: `SET key NX PX` claims,
    /// a done record with the TTL completes, a token-checked delete releases.
    pub struct RedisStore {
        connection: redis::aio::ConnectionManager,
        prefix: String,
        token: String,
    }

    const DONE: &str = "done";

    impl RedisStore {
        /// Connects to `url` (`redis://127.0.0.1:6379`); keys are `tidings:idem:<group>:<key>`.
        pub async fn connect(url: &str) -> Result<Self, BoxError> {
            let client = redis::Client::open(url)?;
            let connection = redis::aio::ConnectionManager::new(client).await?;
            Ok(RedisStore {
                connection,
                prefix: "tidings:idem:".to_owned(),
                token: format!("claimed:{:016x}", fastrand_u64()),
            })
        }

        /// Sets the key prefix.
        #[must_use]
        pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
            self.prefix = prefix.into();
            self
        }
    }

    fn fastrand_u64() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        h.finish()
    }

    #[async_trait]
    impl IdempotencyStore for RedisStore {
        async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, BoxError> {
            let mut c = self.connection.clone();
            let key = format!("{}{key}", self.prefix);
            let lease_ms = lease.as_millis().max(1) as u64;
            // Two rounds at most: a claim can expire between SET NX and GET.
            for _ in 0..2 {
                let set: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&self.token)
                    .arg("NX")
                    .arg("PX")
                    .arg(lease_ms)
                    .query_async(&mut c)
                    .await?;
                if set.is_some() {
                    return Ok(Claim::Claimed);
                }
                let current: Option<String> =
                    redis::cmd("GET").arg(&key).query_async(&mut c).await?;
                match current.as_deref() {
                    Some(DONE) => return Ok(Claim::Done),
                    Some(_) => return Ok(Claim::InProgress),
                    None => continue,
                }
            }
            Ok(Claim::InProgress)
        }

        async fn complete(&self, key: &str, ttl: Duration) -> Result<(), BoxError> {
            let mut c = self.connection.clone();
            let () = redis::cmd("SET")
                .arg(format!("{}{key}", self.prefix))
                .arg(DONE)
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .query_async(&mut c)
                .await?;
            Ok(())
        }

        async fn release(&self, key: &str) -> Result<(), BoxError> {
            let mut c = self.connection.clone();
            // Delete only our own claim, never another replica's or a done record.
            let script = redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
            );
            let _: i64 = script
                .key(format!("{}{key}", self.prefix))
                .arg(&self.token)
                .invoke_async(&mut c)
                .await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn memory_store_claims_completes_and_expires_leases() {
        let store = MemoryStore::new(100, Duration::from_secs(3600));
        let lease = Duration::from_secs(10);
        assert_eq!(store.claim("a", lease).await.unwrap(), Claim::Claimed);
        assert_eq!(store.claim("a", lease).await.unwrap(), Claim::InProgress);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(
            store.claim("a", lease).await.unwrap(),
            Claim::Claimed,
            "an expired lease is free"
        );
        store
            .complete("a", Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(store.claim("a", lease).await.unwrap(), Claim::Done);
        assert_eq!(store.claim("b", lease).await.unwrap(), Claim::Claimed);
        store.release("b").await.unwrap();
        assert_eq!(store.claim("b", lease).await.unwrap(), Claim::Claimed);
    }
}
