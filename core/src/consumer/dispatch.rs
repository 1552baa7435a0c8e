//! From the subscription to the workers: one subscription shared by a
//! topic's workers, and per-key order that never lets one key hold up another.
//!
//! There is no intake task and no queue between the subscription and the
//! workers: a worker reads the next delivery from the subscription itself
//! ([`Source`]), handles it and settles it. A message therefore passes from
//! the adapter to its handler without a hand-off between tasks — no
//! channel, no wake-up of another task, no second thread touching it —
//! which on a multi-thread runtime is most of what a message costs.
//!
//! One worker reads at a time. While its handlers finish without waiting,
//! that worker goes on reading and the others stay idle: waking them would
//! only add hand-offs. When a handler has to wait (I/O, a timer), its
//! worker wakes an idle one to read meanwhile, so as many handlers wait at
//! once as the consumer's concurrency allows. A reader whose handlers never
//! wait also wakes one every [`HELP_AFTER`] messages, so that handlers that
//! only compute still spread over the runtime's threads when messages keep
//! coming, at one wake-up per that many messages.
//!
//! Under `ordered_by_key`, a delivery whose key already has one running is
//! parked behind it instead (in [`Keys`]); the worker that settles a key's
//! delivery goes on with the next one parked for that key. So a key is
//! handled by one worker at a time, in the order received, and a slow key
//! parks only its own deliveries: every other key keeps flowing to the free
//! workers. What is parked is counted against the subscription's in-flight
//! bound like everything else, so memory stays bounded; a key whose handler
//! stays slower than its arrival rate fills that bound in the end, and then
//! reading waits.

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::panic::AssertUnwindSafe;

use futures::lock::Mutex as AsyncMutex;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{error, warn};

use super::settle::{Handling, Route, WorkerCounts};
use crate::batch::BatchOptions;
use crate::delivery::Delivery;
use crate::handler::HandlerSlot;
use crate::subscriber::DeliveryStream;

/// The keys that have a delivery running, each with the deliveries parked
/// behind it.
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

    /// Takes a delivery of key `hash`: `Some` to handle it now, `None` when
    /// it was parked behind the key's earlier one.
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

/// One topic's subscription, read by whichever of its workers is free.
pub(crate) struct Source {
    /// Held by the worker that reads, also while it waits on the broker.
    /// Workers only try it (an idle one waits on `idle` instead); closing
    /// waits for it. `futures`' mutex rather than tokio's: unlocking it with
    /// nobody waiting is one atomic operation, and it is unlocked once per
    /// message.
    stream: AsyncMutex<Box<dyn DeliveryStream>>,
    /// Set once the subscription ended or was closed: nobody reads it again.
    done: AtomicBool,
    /// Per-key parking, under `ordered_by_key`.
    pub keys: Option<Keys>,
    /// Idle workers wait here for a reader's handler to wait.
    idle: Notify,
    /// Set when the subscription ended without being asked to (shared by
    /// every topic of the consumer).
    ended: Arc<watch::Sender<bool>>,
}

/// The consumer's stop signal: a flag read once per message, and a channel
/// to wait on while there is nothing to read.
#[derive(Clone)]
pub(crate) struct Stop {
    flag: Arc<AtomicBool>,
    signal: watch::Receiver<bool>,
}

impl Stop {
    pub fn new(signal: watch::Receiver<bool>) -> Self {
        Stop {
            flag: Arc::new(AtomicBool::new(false)),
            signal,
        }
    }

    /// Raises the flag; the caller then sends the signal.
    pub fn raise(&self) {
        self.flag.store(true, Ordering::Release);
    }

    /// The flag alone: it is raised before the signal is sent (the one
    /// place that sends it, `Consumer::signal_stop`, does both), and
    /// reading the signal takes its lock, once per message.
    fn is_raised(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    async fn raised(&mut self) {
        let _ = self.signal.wait_for(|stop| *stop).await;
    }
}

impl Source {
    pub fn new(
        stream: Box<dyn DeliveryStream>,
        keyed: bool,
        ended: Arc<watch::Sender<bool>>,
    ) -> Self {
        Source {
            stream: AsyncMutex::new(stream),
            done: AtomicBool::new(false),
            keys: keyed.then(Keys::default),
            idle: Notify::new(),
            ended,
        }
    }

    /// The next delivery for a free worker; `None` once stopped or once the
    /// subscription ended. Under `ordered_by_key` a delivery parked behind
    /// its key is not returned (the key's worker takes it), and the key is
    /// admitted while the subscription is still held, so keys keep the
    /// order the broker gave.
    async fn next(&self, stop: &mut Stop, counts: &WorkerCounts) -> Option<Delivery> {
        loop {
            if self.done.load(Ordering::Acquire) || stop.is_raised() {
                return None;
            }
            let Some(mut stream) = self.stream.try_lock() else {
                // Another worker reads: wait until one is needed.
                let mut needed = std::pin::pin!(self.idle.notified());
                needed.as_mut().enable();
                if self.done.load(Ordering::Acquire) {
                    return None;
                }
                tokio::select! {
                    biased;
                    _ = needed => continue,
                    _ = stop.raised() => return None,
                }
            };
            if self.done.load(Ordering::Acquire) {
                return None;
            }
            // The stop signal is only raced (which registers a waker) when
            // the subscription has nothing ready. An adapter that panics
            // here ends the subscription (as if it ended on its own) rather
            // than the worker, which would be started again into the same
            // panic.
            let item = tokio::select! {
                biased;
                item = AssertUnwindSafe(stream.next()).catch_unwind() => match item {
                    Ok(item) => item,
                    Err(panic) => {
                        error!(panic = %crate::handler::Panicked::from(panic), "the subscription panicked");
                        None
                    }
                },
                _ = stop.raised() => return None,
            };
            match item {
                Some(Ok(delivery)) => {
                    counts.received.fetch_add(1, Ordering::Relaxed);
                    match (&self.keys, key_hash(&delivery)) {
                        (Some(keys), Some(hash)) => {
                            if let Some(delivery) = keys.admit(hash, delivery) {
                                return Some(delivery);
                            }
                        }
                        _ => return Some(delivery),
                    }
                }
                Some(Err(error)) => warn!(%error, "subscription error; the adapter recovers"),
                None => {
                    self.done.store(true, Ordering::Release);
                    self.idle.notify_waiters();
                    if !stop.is_raised() {
                        error!(
                            "a subscription ended on its own; this consumer no longer receives from it"
                        );
                        self.ended.send_replace(true);
                    }
                    return None;
                }
            }
        }
    }
}

/// Closes the subscription once the consumer stops (or once every worker
/// is gone, the subscription having ended), then waits for the workers to
/// settle what they hold and for the adapter to finish closing (Kafka's
/// final commit and leaving the group), so that when `shutdown` returns the
/// next member of the group starts after what this one settled.
///
/// `workers` yields `None` once every worker has ended: each holds a sender.
pub(crate) async fn close(
    source: Arc<Source>,
    mut stop: Stop,
    mut workers: mpsc::Receiver<std::convert::Infallible>,
) {
    tokio::select! {
        _ = stop.raised() => {}
        _ = workers.recv() => {}
    }
    let mut stream = source.stream.lock().await;
    source.done.store(true, Ordering::Release);
    source.idle.notify_waiters();
    if let Err(error) = stream.close().await {
        warn!(%error, "closing the subscription failed");
    }
    drop(stream);
    while workers.recv().await.is_some() {}
    source.stream.lock().await.closed().await;
}

/// Hands unsettled deliveries back to the broker unhandled: each adapter's
/// acker, dropped unsettled, gives its message back — no retry copy, no
/// failure recorded (Redis makes the entry claimable at once, NATS naks it,
/// RabbitMQ requeues it when the channel closes, Kafka leaves the offset
/// uncommitted, the in-process bus requeues it) — so another member gets
/// it now rather than after the visibility timeout. Brokers that count
/// deliveries (Redis, NATS, the in-process bus) count this one, so a
/// message that keeps being dropped still reaches its attempt limit.
pub(crate) fn release(deliveries: Vec<Delivery>, released: &AtomicU64) {
    released.fetch_add(deliveries.len() as u64, Ordering::Relaxed);
    drop(deliveries);
}

/// Runs one worker, starting it again if it ever ends by a panic (no
/// delivery can cause one: [`Route::process`] is guarded; this is the last
/// line). Returns once the subscription is stopped or ended. `_alive` tells
/// [`close`] when every worker is gone.
pub(crate) async fn supervised_worker(
    source: Arc<Source>,
    route: Arc<Route>,
    counts: Arc<WorkerCounts>,
    stop: Stop,
    restarts: Arc<AtomicU64>,
    _alive: mpsc::Sender<std::convert::Infallible>,
) {
    loop {
        let (source, route, counts, stop) =
            (source.clone(), route.clone(), counts.clone(), stop.clone());
        let run = match route.handling {
            Handling::Batch(_, options) => {
                tokio::spawn(batch_worker(source, route, counts, stop, options))
            }
            Handling::One(_) => tokio::spawn(worker(source, route, counts, stop)),
        };
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

/// How many messages in a row a reader handles without waiting before it
/// wakes an idle worker to share the load.
const HELP_AFTER: u32 = 32;

async fn worker(source: Arc<Source>, route: Arc<Route>, counts: Arc<WorkerCounts>, mut stop: Stop) {
    let mut in_a_row = 0;
    let mut slot = HandlerSlot::empty();
    while let Some(delivery) = source.next(&mut stop, &counts).await {
        let mut current = Some(delivery);
        while let Some(mut delivery) = current.take() {
            let hash = source.keys.as_ref().and_then(|_| key_hash(&delivery));
            let turn = hash.map(|hash| KeyTurn {
                keys: source.keys.as_ref(),
                hash,
            });
            {
                let mut handling = std::pin::pin!(route.process(&mut delivery, &counts, &mut slot));
                if futures::poll!(handling.as_mut()).is_pending() {
                    // This handler waits: an idle worker reads meanwhile.
                    source.idle.notify_one();
                    in_a_row = 0;
                    handling.await;
                } else {
                    in_a_row += 1;
                    if in_a_row == HELP_AFTER {
                        in_a_row = 0;
                        source.idle.notify_one();
                    }
                }
            }
            current = turn.and_then(KeyTurn::next);
            // A subscription that always has a message ready and a handler
            // that never waits would otherwise keep this thread forever:
            // give the runtime its turn when the task's budget is spent.
            tokio::task::consume_budget().await;
        }
    }
}

/// A worker of a batch handler: gathers up to `options.max` deliveries
/// (waiting at most `options.wait` after the first), runs the handler on
/// them at once, and settles each by its own result.
async fn batch_worker(
    source: Arc<Source>,
    route: Arc<Route>,
    counts: Arc<WorkerCounts>,
    mut stop: Stop,
    options: BatchOptions,
) {
    // Never filled: a batch topic's deliveries reach no single handler
    // (settling takes a slot all the same).
    let mut slot = HandlerSlot::empty();
    while let Some(first) = source.next(&mut stop, &counts).await {
        let mut deliveries = vec![first];
        let deadline = tokio::time::Instant::now() + options.wait;
        while deliveries.len() < options.max {
            match tokio::time::timeout_at(deadline, source.next(&mut stop, &counts)).await {
                Ok(Some(delivery)) => deliveries.push(delivery),
                _ => break,
            }
        }
        // What the adapter could not read is dead-lettered alone, without
        // the handler.
        let (mut rejected, mut batch): (Vec<_>, Vec<_>) = deliveries
            .into_iter()
            .partition(|d| d.rejection().is_some());
        {
            let handling = async {
                let results = route.run_batch(&batch).await;
                for (delivery, result) in batch.iter_mut().zip(results) {
                    route
                        .settle_result(delivery, Some(result), &counts, &mut slot)
                        .await;
                }
            };
            let mut handling = std::pin::pin!(handling);
            if futures::poll!(handling.as_mut()).is_pending() {
                // The handler or the settlements wait: an idle worker
                // gathers the next batch meanwhile.
                source.idle.notify_one();
                handling.await;
            }
        }
        for delivery in &mut rejected {
            route.process(delivery, &counts, &mut slot).await;
        }
        tokio::task::consume_budget().await;
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
