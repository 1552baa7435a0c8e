//! The in-process store.

use std::collections::VecDeque;
use std::collections::hash_map::{Entry, HashMap, RandomState};
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tidings_core::BoxError;
use tokio::time::Instant;

use super::{Claim, IdempotencyStore};

/// Handled keys in process memory, bounded in count, each kept for the TTL.
///
/// A map plus a queue of expiry times under one lock. (moka was measured
/// first: its bookkeeping cost about 4 µs per message in the full
/// middleware stack.)
///
/// Keys are kept as 128-bit digests: SipHash-1-3 (std's hasher) and
/// foldhash, each under a secret seed drawn for each store. So a key costs
/// the same however long it is (a 32-byte slot in the map and two 24-byte
/// entries in the expiry queue), and nothing is allocated per message. Two
/// different keys share a digest only if both hashes collide: by chance
/// about 2⁻¹²⁸ per pair (10⁻²⁷ among a million keys); by choice, not
/// without SipHash's secret key.
pub struct MemoryStore {
    capacity: usize,
    ttl: Duration,
    /// The digest's two hashes, with their secret seeds.
    sip: RandomState,
    fold: foldhash::quality::RandomState,
    /// What the records' times count from.
    epoch: Instant,
    state: Mutex<Entries>,
}

/// A key's digest; see [`MemoryStore`].
pub(super) type Digest = (u64, u64);

/// Microseconds since the store's epoch.
type Micros = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Record {
    Done,
    Claimed,
}

/// Digests are uniformly random already; foldhash only spreads them over
/// the map, in a few instructions.
type Map = HashMap<Digest, (Record, Micros), foldhash::fast::RandomState>;

#[derive(Default)]
struct Entries {
    map: Map,
    /// Keys in the order their records were written, with the time each
    /// record expires (an entry whose key has a newer record since is stale).
    expiry: VecDeque<(Micros, Digest)>,
}

impl Entries {
    /// Drops the records at the front of the queue that are due: expired, or
    /// the oldest while the map is beyond its capacity. A stale entry (a
    /// claim since completed) only goes when it is due itself, so the common
    /// case looks nothing up.
    fn evict(&mut self, now: Micros, capacity: usize) {
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
            sip: RandomState::new(),
            fold: foldhash::quality::RandomState::default(),
            epoch: Instant::now(),
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // Every update is a single insert or remove: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Micros {
        self.epoch.elapsed().as_micros() as Micros
    }

    /// The digest of `key` within `group` (`str`'s `Hash` ends each part
    /// with a marker, so no other pair of parts has the same bytes).
    pub(super) fn digest(&self, group: &str, key: &str) -> Digest {
        (
            self.sip.hash_one((group, key)),
            self.fold.hash_one((group, key)),
        )
    }

    /// Claims `key` for `lease` unless it is done or claimed (one lookup).
    pub(super) fn claim_digest(&self, key: Digest, lease: Duration) -> Claim {
        let now = self.now();
        let until = now.saturating_add(lease.as_micros() as Micros);
        let mut entries = self.lock();
        entries.evict(now, self.capacity);
        let Entries { map, expiry } = &mut *entries;
        match map.entry(key) {
            Entry::Occupied(entry) => match entry.get() {
                (Record::Done, _) => return Claim::Done,
                (Record::Claimed, held) if *held > now => return Claim::InProgress,
                _ => *entry.into_mut() = (Record::Claimed, until),
            },
            Entry::Vacant(entry) => {
                entry.insert((Record::Claimed, until));
            }
        }
        expiry.push_back((until, key));
        Claim::Claimed
    }

    /// Records a claimed key's outcome: done for the store's TTL when it
    /// was handled, free for a redelivery to claim when it was not.
    pub(super) fn record_digest(&self, key: Digest, handled: bool) {
        if !handled {
            self.lock().map.remove(&key);
            return;
        }
        let until = self.now().saturating_add(self.ttl.as_micros() as Micros);
        let mut entries = self.lock();
        // Inserted again if it was evicted while it was handled (the store
        // is beyond its capacity).
        entries.map.insert(key, (Record::Done, until));
        entries.expiry.push_back((until, key));
    }
}

/// Answers at once; the [`Idempotency`](super::Idempotency) layer calls it
/// directly rather than through these methods.
#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, BoxError> {
        Ok(self.claim_digest(self.digest("", key), lease))
    }

    /// Keeps `key` for the store's own TTL.
    async fn complete(&self, key: &str, _ttl: Duration) -> Result<(), BoxError> {
        self.record_digest(self.digest("", key), true);
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<(), BoxError> {
        self.record_digest(self.digest("", key), false);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn digests_tell_groups_and_keys_apart() {
        let store = MemoryStore::new(10, Duration::from_secs(60));
        let digest = store.digest("billing", "order-1");
        assert_eq!(digest, store.digest("billing", "order-1"));
        assert_ne!(digest, store.digest("shipping", "order-1"));
        assert_ne!(digest, store.digest("billing", "order-2"));
        assert_ne!(store.digest("a:b", "c"), store.digest("a", "b:c"));
        assert_ne!(store.digest("ab", "c"), store.digest("a", "bc"));
        let other = MemoryStore::new(10, Duration::from_secs(60));
        assert_ne!(digest, other.digest("billing", "order-1"), "keys per store");
    }
}
