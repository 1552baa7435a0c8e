//! From the subscription to the workers: intake, the queue between them, and
//! per-key order that never lets one key hold up another.
//!
//! Intake reads the subscription and puts deliveries on one queue that every
//! worker takes from. Under `ordered_by_key`, a delivery whose key already
//! has one queued or running is parked behind it instead (in [`Keys`]); the
//! worker that settles a key's delivery goes on with the next one parked for
//! that key. So a key is handled by one worker at a time, in the order
//! received, and a slow key parks only its own deliveries: every other key
//! keeps flowing to the free workers. What is parked is counted against the
//! subscription's in-flight bound like everything else, so memory stays
//! bounded; a key whose handler stays slower than its arrival rate fills
//! that bound in the end, and then intake waits.

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio::sync::watch;
use tracing::{error, warn};

use super::settle::{Route, WorkerCounts};
use crate::delivery::Delivery;
use crate::subscriber::DeliveryStream;

/// The keys that have a delivery queued or running, each with the
/// deliveries parked behind it.
#[derive(Default)]
pub(crate) struct Keys {
    busy: Mutex<HashMap<u64, VecDeque<Delivery>>>,
}

impl Keys {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, VecDeque<Delivery>>> {
        // The map is consistent after every operation, so a poisoned lock
        // (which no code here can cause) is still usable.
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a delivery of key `hash`: `Some` to queue it now, `None` when it
    /// was parked behind the key's earlier one.
    fn admit(&self, hash: u64, delivery: Delivery) -> Option<Delivery> {
        match self.lock().entry(hash) {
            Entry::Occupied(mut parked) => {
                parked.get_mut().push_back(delivery);
                None
            }
            Entry::Vacant(slot) => {
                slot.insert(VecDeque::new());
                Some(delivery)
            }
        }
    }

    /// The key's current delivery is settled: its next parked one, if any,
    /// which the caller handles at once (the key stays busy).
    fn next(&self, hash: u64) -> Option<Delivery> {
        let mut busy = self.lock();
        let parked = busy.get_mut(&hash)?;
        let next = parked.pop_front();
        if next.is_none() {
            busy.remove(&hash);
        }
        next
    }

    /// Every parked delivery, for handing back at shutdown.
    pub(crate) fn drain(&self) -> Vec<Delivery> {
        self.lock().drain().flat_map(|(_, parked)| parked).collect()
    }
}

/// The order lane of a delivery under `ordered_by_key`; `None` for
/// deliveries without a key, which need no order.
fn key_hash(delivery: &Delivery) -> Option<u64> {
    let key = delivery.message().key.as_ref()?;
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    Some(h.finish())
}

/// One topic's queue between intake and workers.
#[derive(Clone)]
pub(crate) struct Lanes {
    /// Deliveries ready to handle.
    pub queue: async_channel::Receiver<Delivery>,
    /// Per-key parking, under `ordered_by_key`.
    pub keys: Option<Arc<Keys>>,
}

/// Intake's side of [`Lanes`].
pub(crate) struct Dispatch {
    queue: async_channel::Sender<Delivery>,
    keys: Option<Arc<Keys>>,
}

impl Dispatch {
    /// `buffer` is the subscription's prefetch: deliveries waiting here are
    /// already counted against it, so the queue adds no memory beyond that bound.
    pub fn new(buffer: usize, keyed: bool) -> (Dispatch, Lanes) {
        let (tx, rx) = async_channel::bounded(buffer.max(1));
        let keys = keyed.then(Arc::default);
        (
            Dispatch {
                queue: tx,
                keys: keys.clone(),
            },
            Lanes { queue: rx, keys },
        )
    }

    /// Queues (or parks) a delivery; `Err` gives it back when every worker is gone.
    async fn send(&self, delivery: Delivery) -> Result<(), Delivery> {
        let delivery = match (&self.keys, key_hash(&delivery)) {
            (Some(keys), Some(hash)) => match keys.admit(hash, delivery) {
                Some(delivery) => delivery,
                None => return Ok(()),
            },
            _ => delivery,
        };
        self.queue.send(delivery).await.map_err(|e| e.into_inner())
    }
}

/// Reads the subscription into the dispatch until stopped or the
/// subscription ends, then closes the subscription and waits for the
/// adapter to finish closing.
pub(crate) async fn intake(
    mut stream: Box<dyn DeliveryStream>,
    dispatch: Dispatch,
    mut stop: watch::Receiver<bool>,
    received: Arc<AtomicU64>,
    released: Arc<AtomicU64>,
    ended: Arc<watch::Sender<bool>>,
) {
    // The stop signal is checked with a cheap read on every turn and only
    // raced (which registers a waker) while intake actually waits.
    while !*stop.borrow() {
        let item = tokio::select! {
            biased;
            item = stream.next() => item,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        match item {
            Some(Ok(delivery)) => {
                received.fetch_add(1, Ordering::Relaxed);
                let mut held = None;
                tokio::select! {
                    biased;
                    sent = dispatch.send(delivery) => if let Err(back) = sent { held = Some(back) },
                    // The delivery cannot be recovered from the cancelled
                    // send; dropped unsettled, the broker redelivers it.
                    _ = stop.wait_for(|stop| *stop) => {}
                }
                if let Some(delivery) = held {
                    release(vec![delivery], &released);
                    break;
                }
            }
            Some(Err(error)) => warn!(%error, "subscription error; the adapter recovers"),
            None => break,
        }
    }
    if !*stop.borrow() {
        // Not asked to stop: the subscription ended on its own.
        error!("a subscription ended on its own; this consumer no longer receives from it");
        ended.send_replace(true);
    }
    if let Err(error) = stream.close().await {
        warn!(%error, "closing the subscription failed");
    }
    // Workers drain their queues and end once `dispatch` is gone; the
    // adapter then finishes its close (Kafka's final commit and leaving the
    // group), so that when `shutdown` returns the next member of the group
    // starts after what this one settled, not before.
    drop(dispatch);
    stream.closed().await;
}

/// Hands unsettled deliveries back to the broker unhandled: each adapter's
/// acker, dropped unsettled, gives its message back as it was — no attempt
/// counted, no retry copy (Redis makes the entry claimable at once, NATS
/// naks it, RabbitMQ requeues it when the channel closes, Kafka leaves the
/// offset uncommitted, the in-process bus requeues it) — so another member
/// gets it now rather than after the visibility timeout.
pub(crate) fn release(deliveries: Vec<Delivery>, released: &AtomicU64) {
    released.fetch_add(deliveries.len() as u64, Ordering::Relaxed);
    drop(deliveries);
}

/// Runs one worker, starting it again if it ever ends by a panic (no
/// delivery can cause one: [`Route::process`] is guarded; this is the last
/// line). Returns once the queue is closed and empty.
pub(crate) async fn supervised_worker(
    lanes: Lanes,
    route: Arc<Route>,
    counts: Arc<WorkerCounts>,
    restarts: Arc<AtomicU64>,
) {
    loop {
        let run = tokio::spawn(worker(lanes.clone(), route.clone(), counts.clone()));
        // Aborting this task (a shutdown past its deadline) aborts the worker too.
        let _abort = AbortOnDrop(run.abort_handle());
        match run.await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                restarts.fetch_add(1, Ordering::Relaxed);
                error!(panic = %crate::handler::Panicked::from(e.into_panic()), "a consumer worker panicked; starting another");
            }
            // Cancelled: the consumer was aborted.
            Err(_) => return,
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn worker(lanes: Lanes, route: Arc<Route>, counts: Arc<WorkerCounts>) {
    while let Ok(delivery) = lanes.queue.recv().await {
        let mut current = Some(delivery);
        while let Some(mut delivery) = current.take() {
            let hash = lanes.keys.as_ref().and_then(|_| key_hash(&delivery));
            let turn = hash.map(|hash| KeyTurn {
                keys: lanes.keys.as_deref(),
                hash,
            });
            route.process(&mut delivery, &counts).await;
            current = turn.and_then(KeyTurn::next);
        }
    }
}

/// A key's turn on a worker. Ended normally it yields the key's next parked
/// delivery; dropped by a panic it frees the key, and what was parked
/// behind it goes back to the broker unsettled, so the key is never stuck.
struct KeyTurn<'a> {
    keys: Option<&'a Keys>,
    hash: u64,
}

impl KeyTurn<'_> {
    fn next(mut self) -> Option<Delivery> {
        self.keys.take().and_then(|keys| keys.next(self.hash))
    }
}

impl Drop for KeyTurn<'_> {
    fn drop(&mut self) {
        if let Some(keys) = self.keys {
            keys.lock().remove(&self.hash);
        }
    }
}
