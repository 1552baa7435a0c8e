//! The in-process store.

use std::collections::VecDeque;
use std::collections::hash_map::{Entry, HashMap, RandomState};
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tidings_core::BoxError;
use tokio::time::Instant;

use super::{Claim, ClaimToken, IdempotencyStore};

/// Handled keys in process memory, bounded in count, each kept for the TTL.
///
/// The capacity bounds the records kept; claims of calls in flight come on
/// top and are never evicted (a capacity below the calls in flight evicts
/// every record as it is written).
///
/// A map plus a queue of expiry times under one lock. (moka was measured
/// first: its bookkeeping cost about 4 µs per message in the full
/// middleware stack.)
///
/// Keys are kept as 128-bit digests: SipHash-1-3 (std's hasher) and
/// foldhash, each under secret keys of the process (varied per store). So a
/// key costs the same however long it is, and nothing is allocated per
/// message: a 24-byte slot in the map (the digest, and the record's state
/// and time in one word) and one 24-byte entry in the expiry queue: at a
/// million keys about 77 bytes a key with the table's spare room, and up to
/// 100 while the table grows. Two
/// different keys share a digest only if both hashes collide: by chance
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

/// A record in one word: the time it ends in the low 63 bits (microseconds
/// since the store's epoch, 292,000 years of them), and whether the key is
/// done (rather than claimed) in the top bit. Two words would make every
/// slot of the map a third larger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp(u64);

impl Stamp {
    const DONE: u64 = 1 << 63;

    const UNTIL: u64 = !Self::DONE;

    fn claimed(until: Micros) -> Self {
        Stamp(until.min(Self::UNTIL))
    }

    fn done(until: Micros) -> Self {
        Stamp(until.min(Self::UNTIL) | Self::DONE)
    }

    fn is_done(self) -> bool {
        self.0 & Self::DONE != 0
    }

    fn until(self) -> Micros {
        self.0 & Self::UNTIL
    }
}

/// Digests are uniformly random already; foldhash only spreads them over
/// the map, in a few instructions.
type Map = HashMap<Digest, Stamp, foldhash::fast::RandomState>;

/// Entries the expiry queue may hold beyond twice the live records before
/// its stale ones (records since released, completed or claimed again)
/// are dropped.
const SLACK: usize = 1024;

#[derive(Default)]
struct Entries {
    map: Map,
    /// Keys in the order their records were written, with the record
    /// (whose time is when it expires; an entry whose key has another
    /// record since is stale). The layer's claims have no entry: their
    /// [`Held`] guard records or releases them.
    expiry: VecDeque<(Stamp, Digest)>,
}

impl Entries {
    /// Drops the records at the front of the queue that are due: expired, or
    /// the oldest while the map is beyond its capacity. A stale entry (a
    /// claim since completed) only goes when it is due itself, so the common
    /// case looks nothing up.
    fn evict(&mut self, now: Micros, capacity: usize) {
        while let Some((at, key)) = self.expiry.front() {
            if at.until() > now && self.map.len() <= capacity {
                break;
            }
            if is_current(&self.map, key, *at) {
                self.map.remove(key);
            }
            self.expiry.pop_front();
        }
        // Stale entries wait at the front until they are due, which bounds
        // the queue while handlers succeed. When most claims made through
        // the `IdempotencyStore` methods are released instead (failures),
        // their entries would pile up for a lease: dropped once they are
        // more than the live ones, which costs one lookup per entry pushed
        // since.
        if self.expiry.len() > 2 * self.map.len() + SLACK {
            let Entries { map, expiry } = self;
            expiry.retain(|(at, key)| is_current(map, key, *at));
            expiry.shrink_to(2 * expiry.len() + SLACK);
        }
    }
}

/// Whether the queue entry `(record, key)` is the key's current record.
fn is_current(map: &Map, key: &Digest, record: Stamp) -> bool {
    map.get(key) == Some(&record)
}

/// A claim the [`Idempotency`](super::Idempotency) layer holds while its
/// handler runs: [`record`](Held::record)ed when the handler ends, released
/// when the handler's future is dropped before (a timeout above the layer,
/// a shutdown). So the layer's claims need no entry in the expiry queue; a
/// handler that hangs past the lease still loses its claim to the next
/// delivery, which finds the lease over.
#[must_use = "a claim not recorded is released at once"]
pub(super) struct Held<'a> {
    store: &'a MemoryStore,
    key: Digest,
    stamp: Stamp,
    open: bool,
}

impl Held<'_> {
    /// Records the outcome: done for the store's TTL when the handler
    /// succeeded, free for a redelivery when it failed.
    pub(super) fn record(mut self, handled: bool) {
        self.open = false;
        if handled {
            self.store.complete_digest(self.key);
        } else {
            self.store.release_held(self.key, self.stamp);
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.open {
            self.store.release_held(self.key, self.stamp);
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

    /// Claims `key` for the layer's handler: the claim, held until it is
    /// recorded or dropped, or what was found instead (done, or claimed
    /// by another handler whose lease is not over).
    pub(super) fn hold(&self, key: Digest, lease: Duration) -> Result<Held<'_>, Claim> {
        let (found, stamp) = self.claim_digest(key, lease, false);
        match found {
            Claim::Claimed(_) => Ok(Held {
                store: self,
                key,
                stamp,
                open: true,
            }),
            other => Err(other),
        }
    }

    /// Claims `key` for `lease` unless it is done or claimed (one lookup),
    /// with the claim's stamp; `queued` gives the claim an entry in the
    /// expiry queue, so that one never recorded goes with its lease.
    fn claim_digest(&self, key: Digest, lease: Duration, queued: bool) -> (Claim, Stamp) {
        let now = self.now();
        // At least a microsecond: claims of one key at the same instant
        // must not share a stamp (a release checks it).
        let claim = Stamp::claimed(now.saturating_add(micros(lease).max(1)));
        let mut entries = self.lock();
        entries.evict(now, self.capacity);
        let Entries { map, expiry } = &mut *entries;
        match map.entry(key) {
            Entry::Occupied(entry) => {
                // Records are dropped when their entry in the queue comes
                // due, which can be later than their own time (a claim's
                // lease ahead of a shorter TTL), or never (the layer's
                // claims): their time decides.
                let found = *entry.get();
                if found.until() > now {
                    let claim = if found.is_done() {
                        Claim::Done
                    } else {
                        Claim::InProgress
                    };
                    return (claim, found);
                }
                *entry.into_mut() = claim;
            }
            Entry::Vacant(entry) => {
                entry.insert(claim);
            }
        }
        if queued {
            expiry.push_back((claim, key));
        }
        (Claim::Claimed(ClaimToken::new(claim.0)), claim)
    }

    /// Records `key` as done for the store's TTL (inserted again if a claim
    /// made through the `IdempotencyStore` methods was evicted while it was
    /// handled, the store beyond its capacity).
    fn complete_digest(&self, key: Digest) {
        let done = Stamp::done(self.now().saturating_add(micros(self.ttl)));
        let mut entries = self.lock();
        entries.map.insert(key, done);
        entries.expiry.push_back((done, key));
    }

    /// Gives up the layer's claim on `key`, unless the key holds another
    /// record since (a handler past its lease finds its claim taken).
    fn release_held(&self, key: Digest, claim: Stamp) {
        let mut entries = self.lock();
        if entries.map.get(&key) == Some(&claim) {
            entries.map.remove(&key);
        }
    }
}

/// A duration in microseconds, at most `u64::MAX` (585,000 years).
fn micros(duration: Duration) -> Micros {
    Micros::try_from(duration.as_micros()).unwrap_or(Micros::MAX)
}

/// Answers at once; the [`Idempotency`](super::Idempotency) layer calls it
/// directly (through its `hold`) rather than through these methods.
#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, BoxError> {
        Ok(self.claim_digest(self.digest("", key), lease, true).0)
    }

    /// Keeps `key` for the store's own TTL.
    async fn complete(&self, key: &str, _ttl: Duration) -> Result<(), BoxError> {
        self.complete_digest(self.digest("", key));
        Ok(())
    }

    async fn release(&self, key: &str, claim: ClaimToken) -> Result<(), BoxError> {
        self.release_held(self.digest("", key), Stamp(claim.get()));
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
            assert!(matches!(
                store.claim(key, lease).await.unwrap(),
                Claim::Claimed(_)
            ));
            store.complete(key, Duration::from_secs(60)).await.unwrap();
        }
        assert_eq!(store.claim("a", lease).await.unwrap(), Claim::Done);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(
            matches!(store.claim("a", lease).await.unwrap(), Claim::Claimed(_)),
            "expired after the TTL"
        );
        store.complete("a", Duration::from_secs(60)).await.unwrap();
        assert!(matches!(
            store.claim("c", lease).await.unwrap(),
            Claim::Claimed(_)
        ));
        store.complete("c", Duration::from_secs(60)).await.unwrap();
        assert!(matches!(
            store.claim("d", lease).await.unwrap(),
            Claim::Claimed(_)
        ));
        assert!(
            store.lock().map.len() <= 3,
            "bounded by capacity (plus the newest)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn memory_store_claims_completes_and_expires_leases() {
        let store = MemoryStore::new(100, Duration::from_secs(3600));
        let lease = Duration::from_secs(10);
        assert!(matches!(
            store.claim("a", lease).await.unwrap(),
            Claim::Claimed(_)
        ));
        assert_eq!(store.claim("a", lease).await.unwrap(), Claim::InProgress);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            matches!(store.claim("a", lease).await.unwrap(), Claim::Claimed(_)),
            "an expired lease is free"
        );
        store
            .complete("a", Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(store.claim("a", lease).await.unwrap(), Claim::Done);
        let Claim::Claimed(b) = store.claim("b", lease).await.unwrap() else {
            panic!("b is free");
        };
        store.release("b", b).await.unwrap();
        assert!(matches!(
            store.claim("b", lease).await.unwrap(),
            Claim::Claimed(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_frees_its_own_claim_only() {
        let store = MemoryStore::new(100, Duration::from_secs(3600));
        let lease = Duration::from_secs(10);
        let Claim::Claimed(first) = store.claim("a", lease).await.unwrap() else {
            panic!("a is free");
        };
        tokio::time::advance(Duration::from_secs(11)).await;
        let Claim::Claimed(second) = store.claim("a", lease).await.unwrap() else {
            panic!("the first lease is over");
        };
        assert_ne!(first, second);
        // The first handler, past its lease, fails.
        store.release("a", first).await.unwrap();
        assert_eq!(
            store.claim("a", lease).await.unwrap(),
            Claim::InProgress,
            "the second claim holds"
        );
        store
            .complete("a", Duration::from_secs(3600))
            .await
            .unwrap();
        store.release("a", second).await.unwrap();
        assert_eq!(
            store.claim("a", lease).await.unwrap(),
            Claim::Done,
            "a release does not undo a completion"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_ttl_shorter_than_the_lease_still_ends_a_done_record() {
        let store = MemoryStore::new(100, Duration::from_secs(30));
        let lease = Duration::from_secs(60);
        assert!(matches!(
            store.claim("a", lease).await.unwrap(),
            Claim::Claimed(_)
        ));
        store.complete("a", Duration::from_secs(30)).await.unwrap();
        assert_eq!(store.claim("a", lease).await.unwrap(), Claim::Done);
        tokio::time::advance(Duration::from_secs(40)).await;
        assert!(
            matches!(store.claim("a", lease).await.unwrap(), Claim::Claimed(_)),
            "done for the TTL, not for the lease of the claim before it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn released_claims_do_not_pile_up_in_the_expiry_queue() {
        let store = MemoryStore::new(1_000_000, Duration::from_secs(3600));
        let lease = Duration::from_secs(60);
        for n in 0..20_000 {
            let key = format!("failing-{n}");
            let Claim::Claimed(claim) = store.claim(&key, lease).await.unwrap() else {
                panic!("{key} is free");
            };
            store.release(&key, claim).await.unwrap();
        }
        let entries = store.lock();
        assert!(entries.map.is_empty());
        assert!(
            entries.expiry.len() <= SLACK + 1,
            "{} stale entries kept",
            entries.expiry.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_claim_is_recorded_or_released_and_never_queued() {
        let store = MemoryStore::new(100, Duration::from_secs(3600));
        let lease = Duration::from_secs(10);
        let key = store.digest("g", "a");
        let held = store.hold(key, lease).expect("claimed");
        assert_eq!(store.hold(key, lease).err(), Some(Claim::InProgress));
        assert!(store.lock().expiry.is_empty(), "a held claim has no entry");
        held.record(true);
        assert_eq!(store.hold(key, lease).err(), Some(Claim::Done));
        assert_eq!(store.lock().expiry.len(), 1, "one entry per handled key");

        let key = store.digest("g", "b");
        store.hold(key, lease).expect("claimed").record(false);
        let held = store.hold(key, lease).expect("free again after a failure");
        drop(held);
        assert!(
            store.hold(key, lease).is_ok(),
            "free again when the handler's future is dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn held_claims_outlast_eviction_for_capacity() {
        let store = MemoryStore::new(2, Duration::from_secs(3600));
        let lease = Duration::from_secs(10);
        let busy = store.digest("g", "busy");
        let held = store.hold(busy, lease).expect("claimed");
        for n in 0..5 {
            let key = store.digest("g", &format!("done-{n}"));
            store.hold(key, lease).expect("claimed").record(true);
        }
        let _ = store.hold(store.digest("g", "next"), lease);
        assert_eq!(
            store.hold(busy, lease).err(),
            Some(Claim::InProgress),
            "the claim in flight stays"
        );
        assert_eq!(
            store.hold(store.digest("g", "done-4"), lease).err(),
            Some(Claim::Done),
            "the newest record stays"
        );
        assert_eq!(
            store
                .hold(store.digest("g", "done-0"), lease)
                .map(|h| h.record(false)),
            Ok(()),
            "the oldest was evicted"
        );
        assert!(
            store.lock().map.len() <= 2 + 2,
            "capacity plus the claims in flight"
        );
        held.record(true);
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_past_its_lease_does_not_release_the_next_one() {
        let store = MemoryStore::new(100, Duration::from_secs(3600));
        let lease = Duration::from_secs(10);
        let key = store.digest("g", "slow");
        let slow = store.hold(key, lease).expect("claimed");
        tokio::time::advance(Duration::from_secs(11)).await;
        let next = store.hold(key, lease).expect("the lease is over");
        slow.record(false);
        assert_eq!(
            store.hold(key, lease).err(),
            Some(Claim::InProgress),
            "the late failure left the newer claim alone"
        );
        next.record(true);
        assert_eq!(store.hold(key, lease).err(), Some(Claim::Done));
    }

    #[test]
    fn a_stamp_keeps_its_state_and_time_in_one_word() {
        assert_eq!(std::mem::size_of::<Stamp>(), 8);
        let claimed = Stamp::claimed(1_234);
        let done = Stamp::done(1_234);
        assert!(!claimed.is_done() && done.is_done());
        assert_eq!((claimed.until(), done.until()), (1_234, 1_234));
        assert_ne!(claimed, done);
        let far = Stamp::done(Micros::MAX);
        assert!(
            far.is_done(),
            "a time beyond 63 bits saturates, keeping the state"
        );
        assert_eq!(far.until(), Micros::MAX >> 1);
        assert!(!Stamp::claimed(Micros::MAX).is_done());
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
