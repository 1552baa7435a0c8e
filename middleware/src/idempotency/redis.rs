//! The Redis store: handled keys shared by every replica.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionLike;
use tidings_core::BoxError;

use super::{Claim, ClaimToken, IdempotencyStore};

/// Handled keys in Redis, shared by every replica: `SET key NX PX` claims,
/// a done record with the TTL completes, a delete checked against the
/// claim's own token releases.
///
/// Every command names one key, so any connection serves: the redis
/// crate's own to one server ([`connect`](RedisStore::connect)), or a bus's
/// (`tidings_redis::RedisBus::connection`, `RedisConnection::connect`),
/// which reaches a cluster's nodes or the master behind Sentinel and
/// follows failovers.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// use std::time::Duration;
/// use tidings_middleware::idempotency::{Idempotency, RedisStore};
/// use tidings_redis::{RedisBus, RedisConfig};
/// let config = RedisConfig::from_url("redis://10.0.0.1:6379,10.0.0.2:6379?cluster=true")?;
/// let bus = RedisBus::connect(config).await?;
/// let dedup = Idempotency::new(RedisStore::new(bus.connection()), Duration::from_secs(3600));
/// # let _ = dedup; Ok(()) }
/// ```
pub struct RedisStore<C = redis::aio::ConnectionManager> {
    connection: C,
    prefix: String,
    /// This store's random number: claims are written as
    /// `claimed:<replica>:<claim>`, so one replica's release never frees
    /// another's claim.
    replica: u64,
    /// The number of this store's last claim: a release frees only the
    /// claim it was given, not a later one of the same key.
    claims: AtomicU64,
}

const DONE: &str = "done";

impl RedisStore {
    /// Connects to the one server at `url` (`redis://127.0.0.1:6379`).
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        let client = redis::Client::open(url)?;
        let connection = redis::aio::ConnectionManager::new(client).await?;
        Ok(RedisStore::new(connection))
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Keeps keys through `connection`; keys are `tidings:idem:<group>:<key>`.
    pub fn new(connection: C) -> Self {
        RedisStore {
            connection,
            prefix: "tidings:idem:".to_owned(),
            replica: fastrand_u64(),
            claims: AtomicU64::new(0),
        }
    }

    /// Sets the key prefix.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

impl<C> RedisStore<C> {
    /// The value a claim is written as.
    fn claimed(&self, claim: ClaimToken) -> String {
        format!("claimed:{:016x}:{:x}", self.replica, claim.get())
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
impl<C> IdempotencyStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, BoxError> {
        let mut c = self.connection.clone();
        let key = format!("{}{key}", self.prefix);
        let lease_ms = lease.as_millis().max(1) as u64;
        let claim = ClaimToken::new(self.claims.fetch_add(1, Ordering::Relaxed) + 1);
        let claimed = self.claimed(claim);
        // Two rounds at most: a claim can expire between SET NX and GET.
        for _ in 0..2 {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&claimed)
                .arg("NX")
                .arg("PX")
                .arg(lease_ms)
                .query_async(&mut c)
                .await?;
            if set.is_some() {
                return Ok(Claim::Claimed(claim));
            }
            let current: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut c).await?;
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

    async fn release(&self, key: &str, claim: ClaimToken) -> Result<(), BoxError> {
        let mut c = self.connection.clone();
        // Delete only this claim: never a later claim of the key, another
        // replica's, or a done record.
        let script = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
        );
        let _: i64 = script
            .key(format!("{}{key}", self.prefix))
            .arg(self.claimed(claim))
            .invoke_async(&mut c)
            .await?;
        Ok(())
    }
}
