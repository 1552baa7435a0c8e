//! A subscription's deliveries and their settlement.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use futures::future::BoxFuture;
use tidings_core::{Acker, DeadLetter, Delivery, DeliveryStream, Error, Message, Result};
use tokio::sync::{mpsc, watch};

use crate::event_store::{EventStore, ExpectedVersion};
use crate::position::GlobalPosition;

use super::reader::Settle;

/// Settles one event of a subscription.
pub(super) struct StoreAcker {
    pub(super) position: GlobalPosition,
    pub(super) message: Arc<Message>,
    pub(super) attempt: u32,
    pub(super) settle: mpsc::UnboundedSender<Settle>,
    pub(super) store: EventStore,
    pub(super) dead_letters: String,
    pub(super) group: Option<Arc<str>>,
    pub(super) settled: bool,
}

impl StoreAcker {
    fn again(&mut self, attempt: u32, delay: Option<Duration>) {
        self.settled = true;
        let _ = self.settle.send(Settle::Again {
            position: self.position,
            message: self.message.clone(),
            attempt,
            delay,
        });
    }
}

#[async_trait]
impl Acker for StoreAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settled = true;
        let _ = self.settle.send(Settle::Done(self.position));
        Ok(())
    }

    async fn nack(mut self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let attempt = self.attempt.saturating_add(1);
        self.again(attempt, delay);
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<()> {
        let mut dead = letter.letter_for(&self.message);
        // Its own id: the event's id is taken by the event itself.
        let group = self.group.as_deref().unwrap_or("");
        dead.id = format!("{}:dlq:{group}", self.message.id).into();
        let stream = format!("{}-{}", self.dead_letters, self.message.id);
        self.store
            .append(&stream, ExpectedVersion::Any, vec![dead])
            .await
            .map_err(|e| Error::Settle {
                id: self.message.id.clone(),
                source: Box::new(e),
            })?;
        self.settled = true;
        let _ = self.settle.send(Settle::Done(self.position));
        Ok(())
    }

    async fn release(mut self: Box<Self>) -> Result<()> {
        let attempt = self.attempt;
        self.again(attempt, None);
        Ok(())
    }
}

impl Drop for StoreAcker {
    fn drop(&mut self) {
        if !self.settled {
            // Unsettled: handed out again, not counted as an attempt.
            let attempt = self.attempt;
            self.again(attempt, None);
        }
    }
}

/// The deliveries of one subscription.
pub(super) struct StoreStream {
    pub(super) rx: mpsc::Receiver<Result<Delivery>>,
    pub(super) stop: watch::Sender<bool>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
}

impl Stream for StoreStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl DeliveryStream for StoreStream {
    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        self.stop.send_replace(true);
        self.rx.close();
        // Queued and never taken: handed back now (their ackers say so),
        // not left for the drain to wait on.
        while let Ok(queued) = self.rx.try_recv() {
            drop(queued);
        }
        Box::pin(async { Ok(()) })
    }

    /// Waits (bounded) for the reader to save its last checkpoint and let
    /// go of the group, so the next member starts after what was settled.
    fn closed(&mut self) -> BoxFuture<'_, ()> {
        let task = self.task.take();
        Box::pin(async move {
            if let Some(task) = task {
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            }
        })
    }
}

impl Drop for StoreStream {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
