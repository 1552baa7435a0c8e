//! The per-partition settlement ledger: which offsets are settled, what
//! the engine may commit, and the state the engine and the ackers share.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList as Tpl;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tidings_core::in_flight::InFlight;
use tracing::warn;

use crate::config::PartitionOrder;

use super::gate::Gate;

/// Per-partition settlement ledger.
pub(super) struct Part {
    pub(super) generation: u64,
    /// Yielded and not settled yet.
    pub(super) pending: BTreeSet<i64>,
    /// Dropped unsettled: never committed past.
    abandoned: BTreeSet<i64>,
    /// One past the highest offset yielded; -1 before the first.
    pub(super) next: i64,
    /// The last committed position; -1 when unknown.
    committed: i64,
}

impl Part {
    /// The offset to commit: everything below it is settled.
    fn position(&self) -> Option<i64> {
        let floor = [self.pending.first(), self.abandoned.first()]
            .into_iter()
            .flatten()
            .min()
            .copied();
        let pos = floor.unwrap_or(self.next);
        (pos >= 0 && pos > self.committed).then_some(pos)
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) parts: HashMap<(Arc<str>, i32), Part>,
    generation: u64,
    dirty: bool,
    /// Bumped on every assignment change, so the engine re-applies pauses.
    pub(super) assignment: u64,
    /// The settled prefix this member last reached per partition. A broker
    /// may reject the commit made on revoke (a group in rebalance); when the
    /// partition comes back, the higher of this and the committed offset wins.
    pub(super) known: HashMap<(Arc<str>, i32), i64>,
}

pub(super) struct Shared {
    state: Mutex<State>,
    settled: Condvar,
    pub(super) in_flight: InFlight,
    /// Deliveries handed out and not settled or dropped yet.
    pub(super) live: AtomicUsize,
    /// Records in the channel, not yet taken by the stream.
    pub(super) queued: AtomicUsize,
    /// The stream was closed or dropped.
    pub(super) closing: AtomicBool,
    /// Past the close deadline: revokes no longer wait.
    pub(super) abandon: AtomicBool,
    pub(super) buffer: usize,
    /// Holds back records whose lane has an unsettled delivery.
    pub(super) gate: Gate,
    /// Set when the engine thread ended: final commit made, consumer
    /// closed, group left.
    pub(super) done: tokio::sync::watch::Sender<bool>,
}

/// Sets [`Shared::done`] when dropped, after everything else of the engine thread.
pub(super) struct Done(pub(super) Arc<Shared>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.done.send_replace(true);
    }
}

impl Shared {
    pub(super) fn new(prefetch: usize, order: PartitionOrder) -> Self {
        Shared {
            state: Mutex::default(),
            settled: Condvar::new(),
            in_flight: InFlight::new(prefetch),
            live: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            // Records fetched but not yet handed out. Pausing is costly
            // (librdkafka drops a paused partition's prefetched records and
            // fetches them again on resume), so the buffer is kept well above
            // the prefetch: measured, a buffer equal to a prefetch of 1,000
            // stalled intake to 0.3 of bare rdkafka, 4,096 reached parity.
            buffer: (prefetch * 4).clamp(4096, 16384),
            gate: Gate {
                order,
                state: Mutex::default(),
            },
            done: tokio::sync::watch::channel(false).0,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few field writes; a panic cannot leave it half done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn assign(&self, tpl: &Tpl) {
        let mut st = self.lock();
        st.generation += 1;
        st.assignment += 1;
        let generation = st.generation;
        for e in tpl.elements() {
            st.parts.insert(
                (Arc::from(e.topic()), e.partition()),
                Part {
                    generation,
                    pending: BTreeSet::new(),
                    abandoned: BTreeSet::new(),
                    next: -1,
                    committed: match e.offset() {
                        Offset::Offset(n) => n,
                        _ => -1,
                    },
                },
            );
        }
    }

    /// Waits (bounded) for the in-flight deliveries of `keys`, then retires
    /// them and returns what to commit.
    pub(super) fn retire(&self, keys: &[(Arc<str>, i32)], wait: Duration) -> TopicPartitionList {
        let deadline = Instant::now() + wait;
        let mut st = self.lock();
        loop {
            let busy = keys
                .iter()
                .any(|k| st.parts.get(k).is_some_and(|p| !p.pending.is_empty()));
            let now = Instant::now();
            if !busy || now >= deadline || self.abandon.load(Ordering::Acquire) {
                if busy {
                    warn!(
                        "revoke: in-flight deliveries did not settle in time; they will be redelivered"
                    );
                }
                break;
            }
            st = match self.settled.wait_timeout(st, deadline - now) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
        let mut commit = TopicPartitionList::new();
        for k in keys {
            // The full position, even if an async commit already sent it:
            // that one may have failed in the rebalance.
            if let Some(mut p) = st.parts.remove(k)
                && let Some(pos) = {
                    p.committed = -1;
                    p.position()
                }
            {
                let _ = commit.add_partition_offset(&k.0, k.1, Offset::Offset(pos));
                st.known.insert(k.clone(), pos);
            }
        }
        st.assignment += 1;
        commit
    }

    /// Positions to commit now, marked as committed.
    pub(super) fn due(&self) -> Option<TopicPartitionList> {
        let mut st = self.lock();
        if !st.dirty {
            return None;
        }
        st.dirty = false;
        let mut tpl = TopicPartitionList::new();
        let mut known = Vec::new();
        for ((topic, partition), part) in st.parts.iter_mut() {
            if let Some(pos) = part.position() {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(pos));
                part.committed = pos;
                known.push(((topic.clone(), *partition), pos));
            }
        }
        st.known.extend(known);
        (tpl.count() > 0).then_some(tpl)
    }

    /// Makes the next [`due`](Shared::due) send every settled position again.
    pub(super) fn recommit(&self) {
        let mut st = self.lock();
        for p in st.parts.values_mut() {
            p.committed = -1;
        }
        st.dirty = true;
    }

    /// Whether the partition is still assigned in the same generation as
    /// when a record of it was handed out.
    pub(super) fn owns(&self, key: &(Arc<str>, i32), generation: u64) -> bool {
        self.lock()
            .parts
            .get(key)
            .is_some_and(|p| p.generation == generation)
    }

    pub(super) fn settle(
        &self,
        key: &(Arc<str>, i32),
        generation: u64,
        offset: i64,
        abandoned: bool,
    ) {
        let mut st = self.lock();
        if let Some(p) = st.parts.get_mut(key)
            && p.generation == generation
        {
            p.pending.remove(&offset);
            if abandoned {
                p.abandoned.insert(offset);
            }
            st.dirty = true;
        }
        drop(st);
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.settled.notify_all();
    }
}
