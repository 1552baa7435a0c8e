//! Settling one delivery: `XACK`, redelivery and dead letters, for
//! streams and for Pub/Sub mode.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::{RedisResult, Value};
use tidings_core::in_flight::Slot;
use tidings_core::{Acker, DeadLetter, Delivery, Error, Message, Receipt, Result};
use tokio::sync::oneshot;
use tracing::warn;

use crate::config::RedisMode;
use crate::headers;
use crate::publisher::{publish_cmd, write, xadd};

use super::read::{deliver, entries};
use super::shared::{AckRequest, Shared};

/// Where a delivery came from, and so how it is settled.
#[derive(Clone)]
pub(crate) enum Origin {
    /// A stream entry pending in a consumer group.
    Group { entry_id: String },
    /// A private stream read or a Pub/Sub message: nothing to settle on the broker.
    Local,
}

/// Settles one delivery.
pub(crate) struct RedisAcker {
    shared: Arc<Shared>,
    origin: Origin,
    message: Arc<Message>,
    topic: Arc<str>,
    attempt: u32,
    slot: Option<Slot>,
    settled: bool,
}

impl RedisAcker {
    pub(crate) fn delivery(
        shared: &Arc<Shared>,
        origin: Origin,
        message: Message,
        attempt: u32,
        slot: Slot,
    ) -> Delivery {
        let topic = shared.topic.clone();
        Self::delivery_shared(shared, origin, Arc::new(message), topic, attempt, slot)
    }

    /// A delivery whose topic is `topic` (the channel a pattern matched).
    pub(crate) fn delivery_shared(
        shared: &Arc<Shared>,
        origin: Origin,
        message: Arc<Message>,
        topic: Arc<str>,
        attempt: u32,
        slot: Slot,
    ) -> Delivery {
        let position = match &origin {
            Origin::Group { entry_id } => {
                if shared.config.heartbeat {
                    shared.held_lock().insert(entry_id.clone());
                }
                Some(Receipt::EntryId(entry_id.clone()))
            }
            Origin::Local => None,
        };
        let acker = RedisAcker {
            shared: shared.clone(),
            origin,
            message: message.clone(),
            topic: topic.clone(),
            attempt,
            slot: Some(slot),
            settled: false,
        };
        let delivery = Delivery::new(
            message,
            topic,
            shared.group.clone(),
            attempt,
            Box::new(acker),
        );
        match position {
            Some(position) => delivery.with_position(position),
            None => delivery,
        }
    }

    /// The entry is settled (or handed back): no longer kept alive.
    fn unhold(&self) {
        if let Origin::Group { entry_id } = &self.origin {
            self.shared.held_lock().remove(entry_id);
        }
    }

    fn settle_error(&self, e: redis::RedisError) -> Error {
        Error::Settle {
            id: self.message.id.clone(),
            source: Box::new(e),
        }
    }

    /// Delivers the message again to this subscription, not before `delay`.
    fn redeliver(&mut self, delay: Option<Duration>, attempt: u32) {
        self.settled = true;
        // The delay keeps it alive by itself (`touch`).
        self.unhold();
        self.slot = None;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        let origin = self.origin.clone();
        let message = self.message.clone();
        let topic = self.topic.clone();
        runtime.spawn(async move {
            redeliver(shared, origin, message, topic, delay, attempt).await;
        });
    }
}

pub(super) async fn redeliver(
    shared: Arc<Shared>,
    origin: Origin,
    message: Arc<Message>,
    topic: Arc<str>,
    delay: Option<Duration>,
    attempt: u32,
) {
    let mut touched = Instant::now();
    if let Some(delay) = delay.filter(|d| !d.is_zero()) {
        let deadline = touched + delay;
        // Keep the entry ours during long delays: others reclaim it only
        // after it was idle for the visibility timeout.
        let keep_alive = (shared.config.visibility_timeout / 2).max(Duration::from_millis(5));
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if !shared.sleep((deadline - now).min(keep_alive)).await {
                break;
            }
            if Instant::now() < deadline
                && let Origin::Group { entry_id } = &origin
            {
                shared.touch(entry_id).await;
                touched = Instant::now();
            }
        }
    }
    let slot = match shared.slot().await {
        Some(slot) => slot,
        None => {
            // Closed: leave it to the other members, at once.
            if let Origin::Group { entry_id } = &origin {
                shared.release(entry_id, attempt.saturating_sub(1)).await;
            }
            return;
        }
    };
    match &origin {
        Origin::Local => {
            let d =
                RedisAcker::delivery_shared(&shared, Origin::Local, message, topic, attempt, slot);
            shared.send(d);
        }
        Origin::Group { entry_id } => {
            // Claim it back only if nobody else claimed it since we last held it.
            let margin = (shared.config.visibility_timeout / 4).min(Duration::from_millis(100));
            let min_idle = touched.elapsed().saturating_sub(margin);
            let reply: RedisResult<Value> = redis::cmd("XCLAIM")
                .arg(&*shared.topic)
                .arg(shared.group_name())
                .arg(&shared.consumer)
                .arg(Shared::millis(min_idle))
                .arg(entry_id)
                .arg("RETRYCOUNT")
                .arg(attempt)
                .query_async(&mut shared.control.clone())
                .await;
            match reply {
                Ok(reply) => {
                    let mut slot = Some(slot);
                    for (id, fields) in entries(reply) {
                        if let Some(slot) = slot.take() {
                            deliver(&shared, id, fields, attempt, slot).await;
                        }
                    }
                }
                Err(error) => {
                    warn!(%error, entry_id, "claiming a nacked entry back failed; it is reclaimed after the visibility timeout");
                }
            }
        }
    }
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settled = true;
        self.slot = None;
        // Held until the batcher's XACK went through.
        let Origin::Group { entry_id } = &self.origin else {
            return Ok(());
        };
        let Some(acks) = &self.shared.acks else {
            return Ok(());
        };
        let confirm = self.shared.config.confirm_acks;
        let (done, confirmed) = if confirm {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let request = AckRequest {
            entry_id: Some(entry_id.clone()),
            done,
        };
        if acks.send(request).is_err() {
            self.unhold();
            return Err(Error::Closed("ack batcher"));
        }
        match confirmed {
            None => Ok(()),
            Some(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(self.settle_error(e)),
                Err(_) => Err(Error::Closed("ack batcher")),
            },
        }
    }

    async fn nack(mut self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let attempt = self.attempt.saturating_add(1);
        self.redeliver(delay, attempt);
        Ok(())
    }

    async fn release(mut self: Box<Self>) -> Result<()> {
        if let Some((shared, entry_id, count)) = self.hand_back() {
            shared.release(&entry_id, count).await;
        }
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<()> {
        self.settled = true;
        self.unhold();
        let dead = letter.letter_for(&self.message);
        let shared = self.shared.clone();
        let mut conn = shared.control.clone();
        let mut writes = shared.writes.clone();
        match &self.origin {
            Origin::Group { entry_id } => {
                // Dead letters are Tidings' own: always in its default layout.
                let letter = xadd(
                    &shared.config,
                    &headers::Layout::default(),
                    &shared.dead_letters,
                    &dead,
                );
                let added = write(&mut writes, &shared.config, letter).await;
                added.map_err(|e| self.settle_error(e))?;
                let acked: RedisResult<Value> = redis::cmd("XACK")
                    .arg(&*shared.topic)
                    .arg(shared.group_name())
                    .arg(entry_id)
                    .query_async(&mut conn)
                    .await;
                acked.map(drop).map_err(|e| self.settle_error(e))
            }
            Origin::Local => {
                let cmd = match shared.config.mode {
                    RedisMode::Streams => xadd(
                        &shared.config,
                        &headers::Layout::default(),
                        &shared.dead_letters,
                        &dead,
                    ),
                    RedisMode::PubSub => {
                        publish_cmd(&headers::Layout::default(), &shared.dead_letters, &dead)
                    }
                };
                let sent = write(&mut writes, &shared.config, cmd).await;
                sent.map(drop).map_err(|e| self.settle_error(e))
            }
        }
    }
}

impl RedisAcker {
    /// Hands the delivery back unsettled: to this subscription again while
    /// it runs (same attempt); once it is closed, what the caller must
    /// release to make the entry available to the other members at once.
    fn hand_back(&mut self) -> Option<(Arc<Shared>, String, u32)> {
        self.settled = true;
        self.unhold();
        match (&self.origin, self.shared.is_closed()) {
            (_, false) => {
                let attempt = self.attempt;
                self.redeliver(None, attempt);
                None
            }
            (Origin::Group { entry_id }, true) => Some((
                self.shared.clone(),
                entry_id.clone(),
                self.attempt.saturating_sub(1),
            )),
            (Origin::Local, true) => None,
        }
    }
}

impl Drop for RedisAcker {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Some((shared, entry_id, count)) = self.hand_back()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move { shared.release(&entry_id, count).await });
        }
    }
}
