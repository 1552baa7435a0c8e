//! Message ids: UUID v7, made without a lock.
//!
//! `uuid::Uuid::now_v7` keeps its ordering counter behind a process-wide
//! mutex and reads the clock itself: about 560 instructions per message
//! (callgrind), plus a second clock read for the event time. Here one
//! clock read serves both, and the ordering counter is one atomic value;
//! the `uuid` crate still lays out the bits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Bits of the counter that orders ids made in the same millisecond: the
/// 12 bits of `rand_a` and the top 6 of `rand_b` (RFC 9562, method 1). The
/// 56 bits after them are random. Each millisecond's counter starts at a
/// random value below 2^17, as `uuid`'s own context reseeds its counter,
/// so ids of different processes in the same millisecond differ in 73
/// random bits.
const COUNTER_BITS: u32 = 18;

/// The last id's millisecond and counter (`millis << COUNTER_BITS | counter`),
/// shared by the whole process so that its ids sort in the order they were
/// made, whichever thread made them.
static LAST: AtomicU64 = AtomicU64::new(0);

/// A fresh message id: a UUID v7, which sorts by creation time, and in the
/// order of creation within a process.
pub fn new_id() -> String {
    id_at(since_epoch(SystemTime::now()))
}

/// A fresh id and the time it was made, to the microsecond (the precision
/// `ce_time` carries), from one clock read: what a new message takes.
pub(crate) fn id_and_time() -> (String, SystemTime) {
    let since = since_epoch(SystemTime::now());
    (
        id_at(since),
        UNIX_EPOCH + Duration::from_micros(since.as_micros() as u64),
    )
}

fn since_epoch(now: SystemTime) -> Duration {
    now.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// A fresh id made `since` the Unix epoch.
fn id_at(since: Duration) -> String {
    // 122 random bits from `uuid`'s generator (`fast-rng`: rand's
    // thread-local generator, seeded from the operating system).
    let random = uuid::Uuid::new_v4().as_u128();
    let seed = random as u64 & ((1 << (COUNTER_BITS - 1)) - 1);
    let stamp = next_stamp(since.as_millis() as u64, seed);
    let counter = stamp & ((1 << COUNTER_BITS) - 1);
    let mut bytes = [0u8; 10];
    // rand_a: the counter's top 12 bits (the builder sets the version in
    // the high nibble of byte 0); then its low 6 bits (the builder sets the
    // variant in the top two bits of byte 2); then randomness.
    bytes[0] = (counter >> 14) as u8 & 0x0f;
    bytes[1] = (counter >> 6) as u8;
    bytes[2] = counter as u8 & 0x3f;
    bytes[3..].copy_from_slice(&((random >> 64) as u64).to_le_bytes()[..7]);
    let uuid = uuid::Builder::from_unix_timestamp_millis(stamp >> COUNTER_BITS, &bytes).into_uuid();
    // Encoding into a stack buffer skips the formatting machinery of `to_string`.
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid.hyphenated().encode_lower(&mut text).to_owned()
}

/// The next (millisecond, counter) after the last one handed out, and not
/// before `millis`; a new millisecond's counter starts at `seed`.
fn next_stamp(millis: u64, seed: u64) -> u64 {
    let last = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(after(last, millis, seed))
        })
        .unwrap_or_else(|last| last);
    after(last, millis, seed)
}

/// The stamp that follows `last` at `millis`. A counter that runs out
/// within a millisecond carries into the next one, as `uuid`'s own context
/// does; a clock that went back does not send ids back with it.
fn after(last: u64, millis: u64, seed: u64) -> u64 {
    if last >> COUNTER_BITS >= millis {
        last + 1
    } else {
        (millis << COUNTER_BITS) | seed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid_v7_of_the_current_millisecond() {
        let before = SystemTime::now();
        let id = uuid::Uuid::parse_str(&new_id()).expect("a UUID");
        let after = SystemTime::now();
        assert_eq!(id.get_version(), Some(uuid::Version::SortRand));
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        let (secs, nanos) = id.get_timestamp().expect("v7 has a time").to_unix();
        let at = UNIX_EPOCH + Duration::new(secs, nanos);
        let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert!(ms(before) <= ms(at) && ms(at) <= ms(after), "{at:?}");
    }

    #[test]
    fn ids_sort_in_the_order_they_were_made_across_threads() {
        // Each thread's ids increase; all ids are distinct; and an id made
        // after another one was seen (here: after the threads were joined)
        // sorts after it.
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..20_000).map(|_| new_id()).collect::<Vec<_>>()))
            .collect();
        let mut all = Vec::new();
        for thread in threads {
            let ids = thread.join().expect("joined");
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "a thread's ids out of order"
            );
            all.extend(ids);
        }
        let later = new_id();
        assert!(all.iter().all(|id| *id < later));
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 80_000);
    }

    #[test]
    fn a_full_counter_carries_into_the_next_millisecond() {
        let millis = 1_800_000_000_000;
        let full = (millis << COUNTER_BITS) | ((1 << COUNTER_BITS) - 1);
        assert_eq!(after(full, millis, 5), (millis + 1) << COUNTER_BITS);
        // A clock that went back does not send ids back with it.
        assert_eq!(after(full, millis - 5, 5), (millis + 1) << COUNTER_BITS);
        // A new millisecond starts at the seed.
        assert_eq!(
            after(full, millis + 3, 5),
            ((millis + 3) << COUNTER_BITS) | 5
        );
    }

    #[test]
    fn ids_of_one_millisecond_differ_beyond_the_counter() {
        // Two ids made with the same stamp (as two processes would) still
        // differ: the tail after the counter is random.
        let ids: std::collections::HashSet<_> =
            (0..1_000).map(|_| new_id()[21..].to_owned()).collect();
        assert_eq!(ids.len(), 1_000);
    }

    #[test]
    fn the_event_time_is_the_ids_time_to_the_microsecond() {
        let (id, time) = id_and_time();
        let since = time.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(since.subsec_nanos() % 1_000, 0);
        let (secs, nanos) = uuid::Uuid::parse_str(&id)
            .unwrap()
            .get_timestamp()
            .unwrap()
            .to_unix();
        // The same clock read: the id's millisecond is the event time's,
        // unless another thread's later read was counted first.
        let id_at = Duration::new(secs, nanos);
        assert!(
            id_at.as_millis() >= since.as_millis(),
            "{id_at:?} {since:?}"
        );
        assert!(
            id_at.as_millis() - since.as_millis() < 1_000,
            "{id_at:?} {since:?}"
        );
    }
}
