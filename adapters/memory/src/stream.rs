//! A subscription's stream of deliveries, and how each is settled.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tidings_core::delivery::header;
use tidings_core::in_flight::{InFlight, PollInFlight, Slot};
use tidings_core::{Acker, DeadLetter, Delivery, DeliveryStream, Message, Result, StartFrom};

use crate::queue::{Body, Entries, Entry, Queue};
use crate::{DEAD_LETTER_GROUP, Inner};

/// What a subscription's deliveries settle against: the bus and the queue.
///
/// One per subscription, shared by its ackers, so that a delivery takes one
/// reference count that only the consumer's side touches, rather than the
/// bus's and the queue's, whose counts sit beside what the publisher reads.
struct Lane {
    bus: Arc<Inner>,
    queue: Arc<Queue>,
}

/// One subscription: polled by hand rather than built from an async
/// function, so that taking a queued message costs no future, no waker
/// registration and no copy of the stream's state.
pub(crate) struct MemoryStream {
    lane: Arc<Lane>,
    /// This subscription's reader id on the queue.
    reader: u64,
    in_flight: PollInFlight,
    /// A slot taken while no message was queued, kept for the next one.
    slot: Option<Slot>,
    closed: bool,
    /// A private subscription's queue, removed from its topic when closed.
    private: bool,
}

impl MemoryStream {
    pub fn new(bus: Arc<Inner>, queue: Arc<Queue>, prefetch: usize, private: bool) -> Self {
        MemoryStream {
            reader: Entries::reader(),
            lane: Arc::new(Lane { bus, queue }),
            in_flight: PollInFlight::new(InFlight::new(prefetch)),
            slot: None,
            closed: false,
            private,
        }
    }

    fn remove_private(&mut self) {
        if std::mem::take(&mut self.private) {
            let Lane { bus, queue } = &*self.lane;
            bus.remove_private(&queue.topic, queue);
        }
    }
}

impl futures::Stream for MemoryStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.closed {
            return Poll::Ready(None);
        }
        let slot = match self.slot.take() {
            Some(slot) => slot,
            None => match self.in_flight.poll_take(cx) {
                Poll::Ready(Some(slot)) => slot,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            },
        };
        let (message, attempt) = match self.lane.queue.entries.poll_pop(self.reader, cx) {
            Poll::Ready(popped) => popped,
            Poll::Pending => {
                self.slot = Some(slot);
                return Poll::Pending;
            }
        };
        let queue = &self.lane.queue;
        let (topic, group) = (queue.topic.clone(), queue.group.clone());
        let acker = MemoryAcker {
            lane: self.lane.clone(),
            entry: Some((message.clone(), attempt)),
            _slot: slot,
        };
        Poll::Ready(Some(Ok(Delivery::new(
            message,
            topic,
            group,
            attempt,
            Box::new(acker),
        ))))
    }
}

impl DeliveryStream for MemoryStream {
    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        self.closed = true;
        self.lane.queue.entries.leave(self.reader);
        self.remove_private();
        Box::pin(std::future::ready(Ok(())))
    }
}

impl Drop for MemoryStream {
    fn drop(&mut self) {
        self.lane.queue.entries.leave(self.reader);
        self.remove_private();
    }
}

/// Settles one delivery. Dropped unsettled, it puts the message back.
struct MemoryAcker {
    lane: Arc<Lane>,
    /// The message and its attempt, until settled.
    entry: Option<(Arc<Message>, u32)>,
    /// The subscription's in-flight slot, freed when this is settled or dropped.
    _slot: Slot,
}

impl MemoryAcker {
    fn redeliver(&mut self, delay: Option<Duration>) {
        let Some((mut message, attempt)) = self.entry.take() else {
            return;
        };
        let m = Arc::make_mut(&mut message);
        m.headers
            .entry(header::FIRST_FAILURE.to_owned())
            .or_insert_with(tidings_core::time::now_rfc3339);
        let entry = Entry {
            message: Body::Shared(message),
            attempt: attempt + 1,
        };
        let lane = self.lane.clone();
        match (delay, tokio::runtime::Handle::try_current()) {
            (Some(delay), Ok(runtime)) if !delay.is_zero() => {
                runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    lane.queue.requeue(entry);
                });
            }
            _ => lane.queue.requeue(entry),
        }
    }

    fn acked(&mut self) {
        if self.entry.take().is_some() {
            self.lane.queue.room.give_back();
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.acked();
        Ok(())
    }

    fn ack_now(&mut self) -> Option<Result<()>> {
        self.acked();
        Some(Ok(()))
    }

    async fn nack(mut self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        self.redeliver(delay);
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<()> {
        let Some((message, _)) = &self.entry else {
            return Ok(());
        };
        let bus = &self.lane.bus;
        let group = letter.group.as_deref().unwrap_or(&letter.topic);
        let topic = format!("{group}.dlq");
        // Dead letters are kept even when nobody declared a group for them yet.
        let has_group = bus
            .topics()
            .get(&topic)
            .is_some_and(|t| !t.groups.is_empty());
        if !has_group {
            bus.queue(&topic, Some(DEAD_LETTER_GROUP), StartFrom::Latest);
        }
        bus.publish(&topic, letter.letter_for(message)).await?;
        self.entry = None;
        self.lane.queue.room.give_back();
        Ok(())
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        // Unsettled (handled past a shutdown's deadline, or released): back
        // to the queue at once, counted as a delivery but not as a failure.
        if let Some((message, attempt)) = self.entry.take() {
            self.lane.queue.requeue(Entry {
                message: Body::Shared(message),
                attempt: attempt + 1,
            });
        }
    }
}
