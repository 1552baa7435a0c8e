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
    store: Store,
    ttl: Duration,
    lease: Duration,
    key: Option<KeyFn>,
}

/// Where the layer records keys.
#[derive(Clone)]
enum Store {
    /// In process: called directly, without the boxed future of each
    /// `IdempotencyStore` call (three per message, about a fifth of the
    /// layer's cost).
    Memory(Arc<MemoryStore>),
    /// Any other store, through its trait.
    Other(Arc<dyn IdempotencyStore>),
}

impl Idempotency {
    /// Records handled keys in `store` for `ttl`.
    pub fn new<S: IdempotencyStore>(store: S, ttl: Duration) -> Self {
        let mut store = Some(store);
        let store = match (&mut store as &mut dyn Any).downcast_mut::<Option<MemoryStore>>() {
            Some(memory) => memory.take().map(|m| Store::Memory(Arc::new(m))),
            None => store.map(|s| Store::Other(Arc::new(s))),
        }
        .expect("the store is taken once");
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

    /// `<group>:<key>`: every group handles every message once.
    fn key_of(&self, delivery: &Delivery) -> Arc<str> {
        let message = delivery.message();
        let group = delivery.group().unwrap_or("-");
        let scoped = |key: &str| {
            // Not `format!`: its machinery cost more than the rest of the key's lookup.
            let mut scoped = String::with_capacity(group.len() + 1 + key.len());
            scoped.push_str(group);
            scoped.push(':');
            scoped.push_str(key);
            scoped
        };
        // An `Arc` the in-memory store keeps as it is; other stores take a `&str`.
        Arc::from(match &self.key {
            Some(f) => scoped(&f(message)),
            None => scoped(&message.id),
        })
    }

    async fn claim(&self, key: &Arc<str>) -> Result<Claim, BoxError> {
        match &self.store {
            Store::Memory(store) => Ok(store.claim_now(key, self.lease)),
            Store::Other(store) => store.claim(key, self.lease).await,
        }
    }

    /// Records the handler's outcome: done on success, the claim given up on failure.
    async fn record(&self, key: &Arc<str>, handled: bool) -> Result<(), BoxError> {
        match (&self.store, handled) {
            (Store::Memory(store), true) => {
                store.complete_now(key);
                Ok(())
            }
            (Store::Memory(store), false) => {
                store.release_now(key);
                Ok(())
            }
            (Store::Other(store), true) => store.complete(key, self.ttl).await,
            (Store::Other(store), false) => store.release(key).await,
        }
    }
}

#[async_trait]
impl Middleware for Idempotency {
    async fn handle(&self, delivery: &Delivery, next: Next<'_>) -> HandlerResult {
        let key = self.key_of(delivery);
        match self.claim(&key).await.map_err(HandlerError::retryable)? {
            Claim::Done => {
                tracing::debug!(id = %delivery.message().id, key = &*key, "duplicate skipped");
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
        if let Err(error) = self.record(&key, result.is_ok()).await {
            // The handler's outcome stands; the claim expires with its lease.
            tracing::warn!(key = &*key, %error, "recording the idempotency key failed");
        }
        result
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Record {
    Done,
    Claimed,
}

/// Handled keys in process memory, bounded in count, each kept for the TTL.
///
/// A map plus a queue of expiry times under one lock. (moka was measured
/// first: its bookkeeping cost about 4 µs per message in the full middleware
/// stack; this store keeps the stack under 2 µs.)
pub struct MemoryStore {
    capacity: usize,
    ttl: Duration,
    state: std::sync::Mutex<Entries>,
}

/// Keys are message ids from the network; foldhash keeps hashing them cheap
/// and is seeded per map, so they cannot be chosen to collide.
type Map = std::collections::HashMap<
    Arc<str>,
    (Record, tokio::time::Instant),
    foldhash::fast::RandomState,
>;

#[derive(Default)]
struct Entries {
    map: Map,
    /// Keys in the order their current record expires (stale entries are skipped).
    expiry: std::collections::VecDeque<(tokio::time::Instant, Arc<str>)>,
}

impl Entries {
    /// Drops the records at the front of the queue that are due: expired, or
    /// the oldest while the map is beyond its capacity. An entry whose key has
    /// a newer record since (a claim since completed) only goes when it is
    /// due itself, so the common case looks nothing up.
    fn evict(&mut self, now: tokio::time::Instant, capacity: usize) {
        while let Some((at, key)) = self.expiry.front() {
            if *at > now && self.map.len() <= capacity {
                break;
            }
            if self.map.get(key).is_some_and(|(_, until)| until == at) {
                self.map.remove(key);
            }
            self.expiry.pop_front();
        }
    }
}

impl MemoryStore {
    /// Keeps at most `capacity` keys, each for `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        MemoryStore {
            capacity: capacity.max(1) as usize,
            ttl,
            state: std::sync::Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // Every update is a single insert or remove: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `key` (one lookup; the map and the expiry queue share the `Arc`).
    fn claim_now(&self, key: &Arc<str>, lease: Duration) -> Claim {
        use std::collections::hash_map::Entry;
        let now = tokio::time::Instant::now();
        let mut entries = self.lock();
        entries.evict(now, self.capacity);
        let until = now + lease;
        let Entries { map, expiry } = &mut *entries;
        match map.entry(key.clone()) {
            Entry::Occupied(entry) => match entry.get() {
                (Record::Done, _) => return Claim::Done,
                (Record::Claimed, held) if *held > now => return Claim::InProgress,
                _ => *entry.into_mut() = (Record::Claimed, until),
            },
            Entry::Vacant(entry) => {
                entry.insert((Record::Claimed, until));
            }
        }
        expiry.push_back((until, key.clone()));
        Claim::Claimed
    }

    /// Records `key` as done for the store's TTL.
    fn complete_now(&self, key: &Arc<str>) {
        let until = tokio::time::Instant::now() + self.ttl;
        let mut entries = self.lock();
        let Entries { map, expiry } = &mut *entries;
        match map.get_mut(&**key) {
            Some(record) => *record = (Record::Done, until),
            // Evicted while it was handled (the store is over capacity).
            None => {
                map.insert(key.clone(), (Record::Done, until));
            }
        }
        expiry.push_back((until, key.clone()));
    }

    fn release_now(&self, key: &str) {
        self.lock().map.remove(key);
    }
}

/// Answers at once; the [`Idempotency`] layer calls these methods directly.
#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, BoxError> {
        Ok(self.claim_now(&Arc::from(key), lease))
    }

    /// Keeps `key` for the store's own TTL.
    async fn complete(&self, key: &str, _ttl: Duration) -> Result<(), BoxError> {
        self.complete_now(&Arc::from(key));
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<(), BoxError> {
        self.release_now(key);
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

    #[test]
    fn an_in_memory_store_is_called_directly_and_others_through_the_trait() {
        let ttl = Duration::from_secs(60);
        let direct = Idempotency::new(MemoryStore::new(10, ttl), ttl);
        assert!(matches!(direct.store, Store::Memory(_)));
        struct Elsewhere;
        #[async_trait]
        impl IdempotencyStore for Elsewhere {
            async fn claim(&self, _: &str, _: Duration) -> Result<Claim, BoxError> {
                Ok(Claim::Claimed)
            }
            async fn complete(&self, _: &str, _: Duration) -> Result<(), BoxError> {
                Ok(())
            }
            async fn release(&self, _: &str) -> Result<(), BoxError> {
                Ok(())
            }
        }
        let other = Idempotency::new(Elsewhere, ttl);
        assert!(matches!(other.store, Store::Other(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_store_forgets_after_the_ttl_and_beyond_capacity() {
        let store = MemoryStore::new(2, Duration::from_secs(60));
        let lease = Duration::from_secs(10);
        for key in ["a", "b"] {
            assert_eq!(store.claim(key, lease).await.unwrap(), Claim::Claimed);
            store.complete(key, Duration::from_secs(60)).await.unwrap();
        }
        assert_eq!(store.claim("a", lease).await.unwrap(), Claim::Done);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(
            store.claim("a", lease).await.unwrap(),
            Claim::Claimed,
            "expired after the TTL"
        );
        store.complete("a", Duration::from_secs(60)).await.unwrap();
        assert_eq!(store.claim("c", lease).await.unwrap(), Claim::Claimed);
        store.complete("c", Duration::from_secs(60)).await.unwrap();
        assert_eq!(store.claim("d", lease).await.unwrap(), Claim::Claimed);
        assert!(
            store.lock().map.len() <= 3,
            "bounded by capacity (plus the newest)"
        );
    }

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
