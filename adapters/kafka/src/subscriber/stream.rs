//! The stream of deliveries the consumer reads, and the acker that settles
//! each one.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::Stream;
use futures::future::BoxFuture;
use tidings_core::in_flight::{PollInFlight, Slot};
use tidings_core::{
    Acker, DeadLetter, Delivery, DeliveryStream, Dialect, Error, Message, Receipt, Result,
};
use tokio::sync::mpsc;
use tracing::warn;

use crate::headers;
use crate::publisher::KafkaPublisher;

use super::engine::Item;
use super::gate::Lane;
use super::ledger::Shared;

/// What every acker of one subscription shares.
pub(super) struct StreamCtx {
    pub(super) topic: Arc<str>,
    pub(super) group: Option<Arc<str>>,
    pub(super) retry_topic: Option<String>,
    pub(super) dlq_topic: String,
    pub(super) shared: Arc<Shared>,
    pub(super) sender: KafkaPublisher,
    pub(super) tx: mpsc::UnboundedSender<Item>,
    /// The longest [`DeliveryStream::closed`] waits for the engine thread.
    pub(super) close_wait: Duration,
}

/// The stream of one subscription.
pub(super) struct KafkaStream {
    pub(super) rx: mpsc::UnboundedReceiver<Item>,
    pub(super) in_flight: PollInFlight,
    pub(super) slot: Option<Slot>,
    pub(super) ctx: Arc<StreamCtx>,
    pub(super) closed: bool,
}

impl Stream for KafkaStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.closed {
            return Poll::Ready(None);
        }
        if this.slot.is_none() {
            match this.in_flight.poll_take(cx) {
                Poll::Ready(Some(slot)) => this.slot = Some(slot),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
        let gate = &this.ctx.shared.gate;
        loop {
            // Records released by a settlement first, then the channel; a
            // record whose lane is busy is parked in the gate.
            let item = match gate.ready(cx.waker()) {
                Some(item) => item,
                None => match this.rx.poll_recv(cx) {
                    Poll::Ready(Some(item)) => match gate.enter(item) {
                        Some(item) => item,
                        None => continue,
                    },
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => return Poll::Pending,
                },
            };
            // The item's lane (if any) is reserved for it now.
            this.ctx.shared.queued.fetch_sub(1, Ordering::AcqRel);
            let Some(slot) = this.slot.take() else {
                // Unreachable: the slot was taken above.
                if let Some(lane) = &item.lane {
                    gate.release(lane);
                }
                continue;
            };
            if !admit(&this.ctx, &item) {
                // Its partition was revoked meanwhile: discarded.
                this.slot = Some(slot);
                if let Some(lane) = &item.lane {
                    gate.release(lane);
                }
                continue;
            }
            let message = Arc::new(item.message);
            // For a retried message: the copy's place in the retry topic.
            let position = Receipt::Offset {
                partition: item.key.1,
                offset: item.offset,
            };
            let acker = KafkaAcker {
                ctx: this.ctx.clone(),
                lane: item.lane,
                key: item.key,
                generation: item.generation,
                offset: item.offset,
                attempt: item.attempt,
                message: message.clone(),
                settled: false,
                _slot: slot,
            };
            let delivery = Delivery::new(
                message,
                this.ctx.topic.clone(),
                this.ctx.group.clone(),
                item.attempt,
                Box::new(acker),
            )
            .with_position(position);
            return Poll::Ready(Some(Ok(match item.undecodable {
                Some(why) => delivery.rejected(why),
                None => delivery,
            })));
        }
    }
}

/// Records the item as yielded; false if its partition was revoked meanwhile.
pub(super) fn admit(ctx: &StreamCtx, item: &Item) -> bool {
    let mut st = ctx.shared.lock();
    if ctx.group.is_some() {
        match st.parts.get_mut(&item.key) {
            Some(p) if p.generation == item.generation => {
                p.pending.insert(item.offset);
                p.next = p.next.max(item.offset + 1);
            }
            _ => return false,
        }
    }
    drop(st);
    ctx.shared.live.fetch_add(1, Ordering::AcqRel);
    true
}

impl DeliveryStream for KafkaStream {
    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        self.closed = true;
        self.ctx.shared.closing.store(true, Ordering::Release);
        self.rx.close();
        Box::pin(async { Ok(()) })
    }

    fn closed(&mut self) -> BoxFuture<'_, ()> {
        let mut done = self.ctx.shared.done.subscribe();
        let limit = self.ctx.close_wait;
        Box::pin(async move {
            if tokio::time::timeout(limit, done.wait_for(|done| *done))
                .await
                .is_err()
            {
                warn!(?limit, "the consumer did not finish closing in time");
            }
        })
    }
}

impl Drop for KafkaStream {
    fn drop(&mut self) {
        self.ctx.shared.closing.store(true, Ordering::Release);
    }
}

pub(super) struct KafkaAcker {
    ctx: Arc<StreamCtx>,
    /// The ordering lane this delivery holds; released when it is settled or dropped.
    lane: Option<Lane>,
    key: (Arc<str>, i32),
    generation: u64,
    offset: i64,
    attempt: u32,
    message: Arc<Message>,
    settled: bool,
    _slot: Slot,
}

impl KafkaAcker {
    /// Records the ack; the commit follows in the background, so acking
    /// needs no future (see `ack_now`).
    fn done(&mut self) {
        self.settled = true;
        self.ctx
            .shared
            .settle(&self.key, self.generation, self.offset, false);
    }

    fn settle_error(&self, e: Error) -> Error {
        Error::Settle {
            id: self.message.id.clone(),
            source: Box::new(e),
        }
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.done();
        Ok(())
    }

    fn ack_now(&mut self) -> Option<Result<()>> {
        self.done();
        Some(Ok(()))
    }

    fn is_held(&self) -> bool {
        self.ctx.shared.owns(&self.key, self.generation)
    }

    async fn nack(mut self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let not_before = SystemTime::now() + delay.unwrap_or_default();
        let attempt = self.attempt.saturating_add(1);
        match &self.ctx.retry_topic {
            Some(retry) => {
                let copy = headers::retry_copy(&self.message, attempt, not_before);
                self.ctx
                    .sender
                    .send_unchecked(retry, &copy)
                    .await
                    .map_err(|e| self.settle_error(e))?;
                self.done();
            }
            None => {
                // A private subscription has no retry topic: the copy is kept
                // in process and handed out again after the delay.
                let item = Item {
                    undecodable: None,
                    key: self.key.clone(),
                    lane: self.lane.clone(),
                    generation: self.generation,
                    offset: self.offset,
                    message: (*self.message).clone(),
                    attempt,
                    not_before: None,
                };
                let tx = self.ctx.tx.clone();
                let shared = self.ctx.shared.clone();
                let wait = delay.unwrap_or_default();
                self.done();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    shared.queued.fetch_add(1, Ordering::AcqRel);
                    if tx.send(item).is_err() {
                        shared.queued.fetch_sub(1, Ordering::AcqRel);
                    }
                });
            }
        }
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<()> {
        let dead = letter.letter_for(&self.message);
        // Dead letters are Tidings' own: always in the default dialect.
        self.ctx
            .sender
            .in_dialect(Dialect::CloudEventsBinary)
            .send_unchecked(&self.ctx.dlq_topic, &dead)
            .await
            .map_err(|e| self.settle_error(e))?;
        self.done();
        Ok(())
    }
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        if !self.settled {
            self.ctx
                .shared
                .settle(&self.key, self.generation, self.offset, true);
        }
        // After the ledger: the lane's next record goes out once this one counts as settled.
        if let Some(lane) = self.lane.take() {
            self.ctx.shared.gate.release(&lane);
        }
    }
}
