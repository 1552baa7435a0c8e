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
/// foldhash, each under secret keys of the process (varied per store). So a
/// key costs the same however long it is (a 32-byte slot in the map and up
/// to two 24-byte entries in the expiry queue, with the table's spare room
/// 120–165 bytes at a million keys), and nothing is allocated per message.
/// Two different keys share a digest only if both hashes collide: by chance
/// about 2⁻¹²⁸ per pair (10⁻²⁷ among a million keys); by choice, not
/// without SipHash's secret key.
///
/// The [`Idempotency`](super::Idempotency) layer gives the store a group and
/// a key; keys given whole to the [`IdempotencyStore`] methods are digested
/// as they are, so the two do not meet: give a store to one layer.
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

/// Entries the expiry queue may hold beyond two per key before its stale
/// ones (records since released, completed or claimed again) are dropped.
const SLACK: usize = 1024;

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
            if is_current(&self.map, key, *at) {
                self.map.remove(key);
            }
            self.expiry.pop_front();
        }
        // Stale entries wait at the front until they are due, which bounds
        // the queue while handlers succeed (one claim and one completion per
        // key). When most are released instead (failures), they would pile
        // up for a lease: dropped once they are more than the live ones,
        // which costs one lookup per entry pushed since.
        if self.expiry.len() > 2 * self.map.len() + SLACK {
            let Entries { map, expiry } = self;
            expiry.retain(|(at, key)| is_current(map, key, *at));
            expiry.shrink_to(2 * expiry.len() + SLACK);
        }
    }
}

/// Whether the queue entry `(at, key)` is the key's current record.
fn is_current(map: &Map, key: &Digest, at: Micros) -> bool {
    map.get(key).is_some_and(|(_, until)| *until == at)
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
        micros(self.epoch.elapsed())
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
        let until = now.saturating_add(micros(lease));
        let mut entries = self.lock();
        entries.evict(now, self.capacity);
        let Entries { map, expiry } = &mut *entries;
        match map.entry(key) {
            Entry::Occupied(entry) => match entry.get() {
                // Records are dropped when their entry in the queue comes
                // due, which can be later than their own time (a claim's
                // lease ahead of a shorter TTL): their time decides.
                (Record::Done, until) if *until > now => return Claim::Done,
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
        let until = self.now().saturating_add(micros(self.ttl));
        let mut entries = self.lock();
        // Inserted again if it was evicted while it was handled (the store
        // is beyond its capacity).
        entries.map.insert(key, (Record::Done, until));
        entries.expiry.push_back((until, key));
    }
}

/// A duration in microseconds, at most `u64::MAX` (585,000 years).
fn micros(duration: Duration) -> Micros {
    Micros::try_from(duration.as_micros()).unwrap_or(Micros::MAX)
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

    #[tokio::test(start_paused = true)]
    async fn a_ttl_shorter_than_the_lease_still_ends_a_done_record() {
        let store = MemoryStore::new(100, Duration::from_secs(30));
        let lease = Duration::from_secs(60);
        assert_eq!(store.claim("a", lease).await.unwrap(), Claim::Claimed);
        store.complete("a", Duration::from_secs(30)).await.unwrap();
        assert_eq!(store.claim("a", lease).await.unwrap(), Claim::Done);
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(
            store.claim("a", lease).await.unwrap(),
            Claim::Claimed,
            "done for the TTL, not for the lease of the claim before it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn released_claims_do_not_pile_up_in_the_expiry_queue() {
        let store = MemoryStore::new(1_000_000, Duration::from_secs(3600));
        let lease = Duration::from_secs(60);
        for n in 0..20_000 {
            let key = format!("failing-{n}");
            assert_eq!(store.claim(&key, lease).await.unwrap(), Claim::Claimed);
            store.release(&key).await.unwrap();
        }
        let entries = store.lock();
        assert!(entries.map.is_empty());
        assert!(
            entries.expiry.len() <= SLACK + 1,
            "{} stale entries kept",
            entries.expiry.len()
        );
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
