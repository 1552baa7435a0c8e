//! One group's (or one private subscription's) queue, and the room that
//! bounds it.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;

use tidings_core::{Error, Message, Result};

/// One group's (or one private subscription's) queue.
pub(crate) struct Queue {
    /// The topic it belongs to: every delivery from it names this one.
    pub topic: Arc<str>,
    pub group: Option<Arc<str>>,
    pub entries: Entries,
    pub room: Room,
}

/// A queued message and its attempt.
pub(crate) struct Entry {
    pub message: Body,
    pub attempt: u32,
}

/// A queued message: by value when one queue takes it, shared when several
/// do (or the history keeps it, or it comes back for another attempt).
///
/// By value because of who frees it. The `Arc` a delivery holds is freed
/// by the consumer's thread; allocated by the publisher's thread, a block
/// of a message's size (about 300 bytes, too large for glibc's lock-free
/// free lists) goes back to the publisher's arena under its lock, which the
/// publisher takes for every allocation: measured on two threads, that lock
/// was most of a message's cost. Moved through the queue instead, the
/// message is put in its `Arc` by the thread that will free it. (Hence the
/// size difference clippy warns of: boxing the large variant is the
/// allocation this type exists to avoid.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum Body {
    Owned(Message),
    Shared(Arc<Message>),
}

impl Body {
    pub fn into_shared(self) -> Arc<Message> {
        match self {
            Body::Owned(message) => Arc::new(message),
            Body::Shared(message) => message,
        }
    }
}

impl Queue {
    pub fn new(capacity: usize, topic: Arc<str>, group: Option<Arc<str>>) -> Arc<Queue> {
        Arc::new(Queue {
            topic,
            group,
            entries: Entries::default(),
            room: Room::new(capacity),
        })
    }

    /// Queues a first attempt of a message, room for it taken.
    pub fn push_taken(&self, message: Body) {
        self.requeue(Entry {
            message,
            attempt: 1,
        });
    }

    /// Queues the message if there is room; `false` if the group is full.
    pub fn try_push(&self, message: &Arc<Message>) -> bool {
        let room = self.room.try_take_new();
        if room {
            self.push_taken(Body::Shared(message.clone()));
        }
        room
    }

    /// Waits (up to `wait`) for room, then queues the message.
    pub async fn push(&self, message: &Arc<Message>, wait: Duration) -> Result<()> {
        tokio::time::timeout(wait, self.room.take())
            .await
            .map_err(|_| Error::Timeout {
                operation: "publishing to a full in-process group",
                after: wait,
            })?;
        self.push_taken(Body::Shared(message.clone()));
        Ok(())
    }

    /// Queues a message that already holds room (another attempt).
    pub fn requeue(&self, entry: Entry) {
        self.entries.push(entry);
    }
}

/// A queue's entries, and the subscriptions waiting for one.
///
/// Written here rather than taken from a channel crate because entries
/// hold their message by value (see [`Body`]): flume moved each 300-byte
/// entry seven times on its way through its generic code (callgrind: about
/// 450 instructions of copying per message), where a `VecDeque` under a
/// mutex moves it in once and out once and keeps its buffer (async-channel
/// allocated a block per 31 entries, which glibc made the publisher pay
/// for). Unbounded: [`Room`] bounds a group.
///
/// A push wakes every waiting subscription, as flume does: a subscription
/// whose poll was abandoned (a timeout around `next()`, a batch gathered up
/// to its deadline) stays registered with a task that may not poll it
/// again, and waking only one could pick that one while another member
/// sleeps with the entry queued. A consumer's workers read their
/// subscription one at a time, so each process's member waits once.
#[derive(Default)]
pub(crate) struct Entries {
    state: Mutex<Queued>,
}

#[derive(Default)]
struct Queued {
    queued: VecDeque<Entry>,
    /// Subscriptions (by reader id) that found the queue empty, with the
    /// waker of their last poll, until a push wakes them or they take an
    /// entry or leave.
    readers: Vec<(u64, Waker)>,
}

/// Ids of the subscriptions reading queues, unique in the process.
static READERS: AtomicU64 = AtomicU64::new(0);

impl Entries {
    fn lock(&self) -> MutexGuard<'_, Queued> {
        // Every operation leaves the state consistent, so a poisoned lock
        // (which no code here can cause) is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new reader id for a subscription.
    pub fn reader() -> u64 {
        READERS.fetch_add(1, Ordering::Relaxed)
    }

    fn push(&self, entry: Entry) {
        let woken = {
            let mut state = self.lock();
            state.queued.push_back(entry);
            std::mem::take(&mut state.readers)
        };
        // Woken outside the lock, so that they find it free.
        for (_, reader) in woken {
            reader.wake();
        }
    }

    /// The next entry's message and attempt for `reader`, or `Pending` with
    /// `reader` registered to be woken by the next push.
    ///
    /// Puts an owned message in its `Arc` here, once the lock is let go:
    /// handing the 300-byte entry out by value cost three copies of it on
    /// the way to the caller (callgrind).
    pub fn poll_pop(&self, reader: u64, cx: &mut Context<'_>) -> Poll<(Arc<Message>, u32)> {
        let mut state = self.lock();
        let registered = state.readers.iter().position(|(id, _)| *id == reader);
        let Some(Entry { message, attempt }) = state.queued.pop_front() else {
            match registered {
                Some(at) => state.readers[at].1.clone_from(cx.waker()),
                None => state.readers.push((reader, cx.waker().clone())),
            }
            return Poll::Pending;
        };
        if let Some(at) = registered {
            state.readers.swap_remove(at);
        }
        drop(state);
        Poll::Ready((message.into_shared(), attempt))
    }

    /// `reader` reads no more.
    pub fn leave(&self, reader: u64) {
        self.lock().readers.retain(|(id, _)| *id != reader);
    }

    /// Entries queued, not yet handed out.
    pub fn len(&self) -> usize {
        self.lock().queued.len()
    }
}

/// Room for messages in a group: taken when a message is published, given
/// back when it leaves the group (ack or dead letter), not when it is
/// handed out.
///
/// Not a `tokio::sync::Semaphore`, whose release takes its lock on every
/// call: here a release is every ack, made on the consumer's thread against
/// the counter the publisher's thread takes from. Taking and giving back
/// are one atomic operation each while no publisher waits.
///
/// A publisher that found the group full is woken once a batch of room is
/// free ([`Room::batch`]), not at every ack: when publishing outran the
/// handlers, waking it for each freed slot cost the consumer's thread a
/// wake-up (a system call) per message. So that a consumer that stops with
/// less than a batch freed does not hold it up, a waiting publisher also
/// takes what is free every [`BATCH_WAIT`]. While publishers wait, a new
/// publish waits too rather than take the room freed for them; the waiting
/// ones, woken together, are in no particular order among themselves.
pub(crate) struct Room {
    capacity: usize,
    /// Free room at which waiting publishers are woken.
    batch: usize,
    free: AtomicUsize,
    /// Publishers waiting for room.
    waiting: AtomicUsize,
    freed: Notify,
}

/// How long a waiting publisher waits for a batch of room before it takes
/// what is free.
const BATCH_WAIT: Duration = Duration::from_millis(1);

impl Room {
    fn new(capacity: usize) -> Room {
        Room {
            capacity,
            batch: (capacity / 16).clamp(1, 64),
            free: AtomicUsize::new(capacity),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    /// Takes room for a new message, if there is some and no publisher
    /// waits for it.
    pub fn try_take_new(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) == 0 && self.try_take()
    }

    /// Takes room for one message, if there is some.
    fn try_take(&self) -> bool {
        self.free
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |free| {
                free.checked_sub(1)
            })
            .is_ok()
    }

    /// Waits for room for one message and takes it.
    pub async fn take(&self) {
        if self.try_take_new() {
            return;
        }
        // Counted before it sleeps, so that new publishes leave the room
        // to it, and then it takes room only once woken: by a give-back
        // that makes a batch (it is registered with `freed` from the
        // `notified()` call on, and `give_back` sees the count) or by its
        // own timer, which also bounds any race between the two.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _counted = Waiting(&self.waiting);
        let mut look_again = pin!(tokio::time::sleep(BATCH_WAIT));
        let mut woken = false;
        loop {
            let freed = self.freed.notified();
            if woken && self.try_take() {
                return;
            }
            tokio::select! {
                biased;
                () = freed => {}
                () = look_again.as_mut() => {
                    look_again
                        .as_mut()
                        .reset(tokio::time::Instant::now() + BATCH_WAIT);
                }
            }
            woken = true;
        }
    }

    /// Gives back room for one message.
    pub fn give_back(&self) {
        let free = self.free.fetch_add(1, Ordering::SeqCst) + 1;
        if free == self.batch && self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Messages holding room: queued or handed out and not yet settled.
    pub fn held(&self) -> usize {
        self.capacity
            .saturating_sub(self.free.load(Ordering::Relaxed))
    }
}

/// A publisher counted in [`Room::waiting`]; uncounted when it stops
/// waiting, by taking room or by being dropped (its publish timed out).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
