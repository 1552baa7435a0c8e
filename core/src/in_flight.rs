//! The bound on a subscription's unsettled deliveries (its prefetch), which
//! every adapter keeps the same way.
//!
//! A subscription's intake takes a [`Slot`] before it hands a delivery out;
//! the delivery's acker holds the slot and frees it when the delivery is
//! settled or dropped. So a consumer never holds more unsettled messages than
//! its prefetch, whatever the broker would send.
//!
//! Not `tokio::sync::Semaphore`: its release takes the lock of its waiters'
//! list on every call, and a release here is every settlement, made on a
//! handler's thread against the counter the intake reads (callgrind, in-process
//! bus: about 165 instructions per message for the permit's round trip). Here
//! taking a slot is a compare-and-swap and freeing one an atomic add; the
//! waiters' lock is taken only when a slot is freed while none was free, the
//! one time a take may be waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tokio::sync::Notify;

/// Slots for a subscription's unsettled deliveries. Clones share the slots.
#[derive(Clone)]
pub struct InFlight {
    shared: Arc<Shared>,
}

struct Shared {
    free: AtomicUsize,
    /// Takes waiting for a slot: while there are any, `try_take` takes
    /// none, so a slot freed for waiters is not taken by a task that does
    /// not wait. Waiters race for it among themselves (tokio's semaphore
    /// served them in order): none is passed over for good, as every
    /// waiter is woken by each slot freed while none was free.
    waiting: AtomicUsize,
    closed: AtomicBool,
    /// Signalled when a slot is freed while none was free, and on close.
    freed: Notify,
}

/// One unsettled delivery's slot, freed when dropped.
#[must_use = "a slot is freed when dropped"]
pub struct Slot {
    shared: Arc<Shared>,
}

impl InFlight {
    /// `limit` slots (at least one).
    pub fn new(limit: usize) -> Self {
        InFlight {
            shared: Arc::new(Shared {
                free: AtomicUsize::new(limit.max(1)),
                waiting: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                freed: Notify::new(),
            }),
        }
    }

    /// A free slot, if there is one and no [`take`](InFlight::take) waits
    /// for it; `None` once closed. A `take` counts as waiting until it
    /// ends or is dropped: one left pending and never polled again keeps
    /// `try_take` from taking.
    pub fn try_take(&self) -> Option<Slot> {
        self.shared.try_take().then(|| Slot {
            shared: self.shared.clone(),
        })
    }

    /// Waits for a free slot; `None` once closed.
    pub async fn take(&self) -> Option<Slot> {
        Shared::take(&self.shared).await.then(|| Slot {
            shared: self.shared.clone(),
        })
    }

    /// Closes: waiting and later takes get `None`; slots already taken are
    /// freed as usual.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.freed.notify_waiters();
    }

    /// Slots free now.
    pub fn free(&self) -> usize {
        self.shared.free.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn try_take(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) == 0 && self.take_free()
    }

    /// Takes a free slot whether or not others wait.
    fn take_free(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && self
                .free
                .fetch_update(Ordering::Acquire, Ordering::Relaxed, |free| {
                    free.checked_sub(1)
                })
                .is_ok()
    }

    /// Takes a slot (`true`), or sees the slots closed (`false`).
    async fn take(&self) -> bool {
        if self.try_take() {
            return true;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            // Registered before looking again, so that a slot freed after
            // this look wakes it.
            freed.as_mut().enable();
            if self.take_free() {
                return true;
            }
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            freed.await;
        }
    }
}

/// Counts a take as waiting until it ends, taken or dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Only a slot freed while none was free can have a take waiting for
        // it (a waiter that looked after this was freed finds it). Every
        // waiter is woken, as a second slot freed before the first waiter
        // ran wakes nobody: the waiter that does not get the first slot
        // gets the second one.
        if self.shared.free.fetch_add(1, Ordering::SeqCst) == 0 {
            self.shared.freed.notify_waiters();
        }
    }
}

/// [`InFlight`] for a hand-written `Stream`: slots taken by polling.
pub struct PollInFlight {
    in_flight: InFlight,
    /// The wait for a slot, while one is pending: boxed, as it is only
    /// set up when no slot was free.
    waiting: Option<BoxFuture<'static, Option<Slot>>>,
}

impl PollInFlight {
    /// Polls for slots of `in_flight`.
    pub fn new(in_flight: InFlight) -> Self {
        PollInFlight {
            in_flight,
            waiting: None,
        }
    }

    /// A slot, or `Pending` with the task woken when one is freed;
    /// `Ready(None)` once closed.
    pub fn poll_take(&mut self, cx: &mut Context<'_>) -> Poll<Option<Slot>> {
        let waiting = match &mut self.waiting {
            Some(waiting) => waiting,
            None => {
                if let Some(slot) = self.in_flight.try_take() {
                    return Poll::Ready(Some(slot));
                }
                let in_flight = self.in_flight.clone();
                self.waiting
                    .insert(Box::pin(async move { in_flight.take().await }))
            }
        };
        let slot = std::task::ready!(waiting.as_mut().poll(cx));
        self.waiting = None;
        Poll::Ready(slot)
    }

    /// The slots polled for.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("free", &self.free())
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl std::fmt::Debug for PollInFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollInFlight")
            .field("in_flight", &self.in_flight)
            .field("waiting", &self.waiting.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn takes_up_to_the_limit_and_frees_on_drop() {
        let in_flight = InFlight::new(2);
        let a = in_flight.try_take().expect("first");
        let _b = in_flight.try_take().expect("second");
        assert!(in_flight.try_take().is_none());
        drop(a);
        assert_eq!(in_flight.free(), 1);
        assert!(in_flight.try_take().is_some());
    }

    #[test]
    fn a_limit_of_zero_is_one() {
        assert_eq!(InFlight::new(0).free(), 1);
    }

    #[tokio::test]
    async fn a_waiting_take_is_woken_by_a_freed_slot() {
        let in_flight = InFlight::new(1);
        let held = in_flight.try_take().expect("free");
        let waiting = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.take().await.is_some() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(held);
        let took = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("joined");
        assert!(took);
    }

    #[tokio::test]
    async fn close_ends_a_waiting_take_and_later_ones() {
        let in_flight = InFlight::new(1);
        let _held = in_flight.try_take().expect("free");
        let waiting = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.take().await.is_none() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "waits while no slot is free");
        in_flight.close();
        let ended = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("joined");
        assert!(ended);
        assert!(in_flight.try_take().is_none());
    }

    #[tokio::test]
    async fn two_slots_freed_back_to_back_reach_two_waiters() {
        // The second slot is freed while one was already free, which wakes
        // nobody: only waking every waiter at the first gets it taken.
        let in_flight = InFlight::new(2);
        let (a, b) = (in_flight.try_take().unwrap(), in_flight.try_take().unwrap());
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let in_flight = in_flight.clone();
                tokio::spawn(async move { in_flight.take().await.is_some() })
            })
            .collect();
        tokio::task::yield_now().await;
        drop(a);
        drop(b);
        for waiter in waiters {
            let took = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("every waiter gets a slot")
                .expect("joined");
            assert!(took);
        }
    }

    #[tokio::test]
    async fn a_slot_freed_for_a_waiter_is_not_taken_by_try_take() {
        let in_flight = InFlight::new(1);
        let held = in_flight.try_take().expect("free");
        let waiting = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.take().await }
        });
        // On this one-thread runtime the waiter runs up to its wait here.
        tokio::task::yield_now().await;
        drop(held);
        assert!(in_flight.try_take().is_none(), "taken from the waiter");
        let slot = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiter gets it")
            .expect("joined");
        assert!(slot.is_some());
        assert!(in_flight.try_take().is_none(), "the waiter holds it");
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_no_longer_counts() {
        let in_flight = InFlight::new(1);
        let held = in_flight.try_take().expect("free");
        {
            let abandoned = in_flight.take();
            let mut abandoned = std::pin::pin!(abandoned);
            assert!(futures::poll!(abandoned.as_mut()).is_pending());
        }
        drop(held);
        assert!(in_flight.try_take().is_some(), "nobody waits any more");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slots_freed_on_other_threads_are_never_lost() {
        // An intake that takes 20,000 slots of 4, freed by tasks on the
        // other worker as soon as taken: every slot comes back, so the
        // intake never waits forever.
        let mut poll = PollInFlight::new(InFlight::new(4));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Slot>();
        let freer = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        for _ in 0..20_000 {
            let slot = tokio::time::timeout(
                Duration::from_secs(5),
                std::future::poll_fn(|cx| poll.poll_take(cx)),
            )
            .await
            .expect("a slot comes back in time")
            .expect("open");
            tx.send(slot).expect("freer runs");
        }
        drop(tx);
        freer.await.expect("joined");
        assert_eq!(poll.in_flight().free(), 4);
    }
}
