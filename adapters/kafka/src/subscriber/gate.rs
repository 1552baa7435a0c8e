//! Per-lane order: records wait while an earlier one of their lane is
//! unsettled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use crate::config::PartitionOrder;

use super::engine::Item;

/// An ordering lane: a partition, or a key inside a partition (by hash: a
/// collision only makes two keys wait for each other).
pub(super) type Lane = ((Arc<str>, i32), Option<u64>);

/// Per-partition ordering ([`PartitionOrder`]): a record whose lane has an
/// unsettled delivery is parked here (still counted in `Shared::queued`, so
/// intake back-pressure covers it) until the acker of that delivery releases
/// the lane; records of other lanes pass. Only the stream reserves a lane;
/// only the acker (or the stream, for a record it discards) releases it.
pub(super) struct Gate {
    pub(super) order: PartitionOrder,
    pub(super) state: Mutex<GateState>,
}

#[derive(Default)]
pub(super) struct GateState {
    /// Lanes with a delivery out, or with a record released to `ready`.
    busy: HashSet<Lane>,
    /// Records waiting for their lane, in fetch order. Non-empty only for busy lanes.
    parked: HashMap<Lane, VecDeque<Item>>,
    /// Records whose lane was released to them, for the stream to take.
    ready: VecDeque<Item>,
    /// The stream's waker, woken when `ready` gains a record.
    waker: Option<Waker>,
}

impl Gate {
    pub(super) fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lane of a record of partition `key` with message key `message_key`.
    pub(super) fn lane(&self, key: &(Arc<str>, i32), message_key: Option<&str>) -> Option<Lane> {
        match self.order {
            PartitionOrder::None => None,
            PartitionOrder::Partition => Some((key.clone(), None)),
            PartitionOrder::Key => message_key.map(|k| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                k.hash(&mut h);
                (key.clone(), Some(h.finish()))
            }),
        }
    }

    /// A record released to the stream (its lane is reserved for it), or
    /// none, with the stream's waker registered under the same lock.
    pub(super) fn ready(&self, waker: &Waker) -> Option<Item> {
        let mut st = self.lock();
        let item = st.ready.pop_front();
        if item.is_none() && !st.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            st.waker = Some(waker.clone());
        }
        item
    }

    /// A record from the channel: returned with its lane reserved if the lane
    /// is free (or it has none), parked otherwise.
    pub(super) fn enter(&self, item: Item) -> Option<Item> {
        let Some(lane) = &item.lane else {
            return Some(item);
        };
        let mut st = self.lock();
        if st.busy.contains(lane) {
            let lane = lane.clone();
            st.parked.entry(lane).or_default().push_back(item);
            None
        } else {
            st.busy.insert(lane.clone());
            Some(item)
        }
    }

    /// The delivery holding `lane` was settled or dropped: the lane's next
    /// parked record is released to the stream, or the lane becomes free.
    pub(super) fn release(&self, lane: &Lane) {
        let mut st = self.lock();
        let next = match st.parked.get_mut(lane) {
            Some(queue) => {
                let next = queue.pop_front();
                if queue.is_empty() {
                    st.parked.remove(lane);
                }
                next
            }
            None => None,
        };
        let waker = match next {
            Some(item) => {
                st.ready.push_back(item);
                st.waker.take()
            }
            None => {
                st.busy.remove(lane);
                None
            }
        };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }
}
