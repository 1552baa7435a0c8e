//! Settling NATS deliveries: JetStream acks, naks and terms, core NATS's
//! dead letters, and progress reports for deliveries still being handled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::AckKind;
use async_trait::async_trait;
use bytes::Bytes;
use tracing::debug;

use tidings_core::in_flight::Slot;
use tidings_core::{Acker, DeadLetter, Dialect, Error, Message, Result};

use crate::stale_pull::PullEnd;
use crate::{NAME, Shared, headers};

/// Deliveries still being handled, reported in progress (`+WPI`) on a timer.
pub(super) struct Tracker {
    next: AtomicU64,
    inflight: Mutex<HashMap<u64, Subject>>,
}

impl Tracker {
    /// A tracker whose timer runs while the tracker lives; `None` when progress reports are off.
    pub(super) fn start(shared: &Arc<Shared>) -> Option<Arc<Tracker>> {
        let interval = shared.config.progress_interval?;
        let tracker = Arc::new(Tracker {
            next: AtomicU64::new(0),
            inflight: Mutex::default(),
        });
        let weak: Weak<Tracker> = Arc::downgrade(&tracker);
        let client = shared.client.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(tracker) = weak.upgrade() else {
                    return;
                };
                let replies: Vec<Subject> = tracker.lock().values().cloned().collect();
                drop(tracker);
                for reply in replies {
                    if let Err(e) = client.publish(reply, Bytes::from(AckKind::Progress)).await {
                        debug!(error = %e, "progress report failed");
                    }
                }
            }
        });
        Some(tracker)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Subject>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn track(self: &Arc<Self>, reply: Subject) -> (Arc<Tracker>, u64) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, reply);
        (self.clone(), id)
    }
}

fn settle_error(id: &str, e: impl Into<tidings_core::BoxError>) -> Error {
    Error::Settle {
        id: id.into(),
        source: e.into(),
    }
}

/// How often the dead letter of a message the server gave up on is tried.
const GIVEN_UP_TRIES: u32 = 8;

/// Settles one JetStream delivery of a durable consumer.
pub(super) struct JsAcker {
    pub(super) shared: Arc<Shared>,
    /// `None` for a message the server gave up on: nothing to ack.
    pub(super) reply: Option<Subject>,
    pub(super) message: Arc<Message>,
    pub(super) topic: Arc<str>,
    pub(super) group: Arc<str>,
    pub(super) settled: bool,
    pub(super) tracked: Option<(Arc<Tracker>, u64)>,
    /// The subscription's pull stream's end, on servers before 2.10: naks
    /// wait for its requests to expire (see `stale_pull`).
    pub(super) pull_end: Option<Arc<PullEnd>>,
    pub(super) _slot: Slot,
}

impl JsAcker {
    fn untrack(&mut self) {
        if let Some((tracker, id)) = self.tracked.take() {
            tracker.lock().remove(&id);
        }
    }

    async fn send(mut self: Box<Self>, kind: AckKind) -> Result<()> {
        self.settled = true;
        self.untrack();
        if !matches!(kind, AckKind::Ack)
            && let Some(end) = &self.pull_end
        {
            end.wait().await;
        }
        let Some(reply) = self.reply.clone() else {
            // The server no longer delivers it: an ack has nothing to do,
            // and nothing can bring it back.
            return match kind {
                AckKind::Ack => Ok(()),
                _ => Err(Error::Unsupported {
                    adapter: NAME,
                    what: "redelivering a message the server gave up on (max_deliver)".into(),
                }),
            };
        };
        self.shared
            .client
            .publish(reply, Bytes::from(kind))
            .await
            .map_err(|e| settle_error(&self.message.id, e))
    }
}

#[async_trait]
impl Acker for JsAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.send(AckKind::Ack).await
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        self.send(AckKind::Nak(delay.filter(|d| !d.is_zero())))
            .await
    }

    async fn release(mut self: Box<Self>) -> Result<()> {
        // A nak without delay, counted by the server as a delivery but by
        // nobody as a failed attempt; flushed, so it reaches the server
        // even when the process exits next.
        self.settled = true;
        self.untrack();
        if let Some(end) = &self.pull_end {
            end.wait().await;
        }
        if let Some(reply) = self.reply.clone() {
            let client = &self.shared.client;
            client
                .publish(reply, Bytes::from(AckKind::Nak(None)))
                .await
                .map_err(crate::connection_error)?;
            client.flush().await.map_err(crate::connection_error)?;
        }
        Ok(())
    }

    async fn dead_letter(self: Box<Self>, letter: DeadLetter) -> Result<()> {
        let dead = letter.letter_for(&self.message);
        let topic = self
            .shared
            .topology
            .dead_letter_topic(&self.topic, &self.group);
        // Its own message id: in a shared stream the original id is taken.
        let msg_id = format!("{}:dlq:{}", self.message.id, self.group);
        // A message the server gave up on is never delivered again: its dead
        // letter is the only copy left, so it is tried harder (bounded).
        let tries = if self.reply.is_none() {
            GIVEN_UP_TRIES
        } else {
            1
        };
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            // Dead letters are Tidings' own: always in the default dialect.
            let published = self
                .shared
                .js_publish(&Dialect::CloudEventsBinary, &topic, &dead, &msg_id)
                .await;
            match published {
                Ok(_) => break,
                Err(e) if attempt < tries && e.is_transient() => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                Err(e) => {
                    if self.reply.is_none() {
                        tracing::error!(id = %self.message.id, error = %e,
                            "the dead letter of a message the server gave up on could not be published: the message is lost");
                    }
                    return Err(settle_error(&self.message.id, e));
                }
            }
        }
        self.send(AckKind::Ack).await
    }
}

impl Drop for JsAcker {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.untrack();
        // Unsettled: hand the message back now rather than after ack_wait.
        if let Ok(handle) = tokio::runtime::Handle::try_current()
            && let Some(reply) = self.reply.clone()
        {
            let client = self.shared.client.clone();
            let end = self.pull_end.clone();
            handle.spawn(async move {
                if let Some(end) = end {
                    end.wait().await;
                }
                let _ = client.publish(reply, Bytes::from(AckKind::Nak(None))).await;
            });
        }
    }
}

/// Settles a core NATS delivery: nothing to ack, nothing redelivered.
pub(super) struct CoreAcker {
    pub(super) shared: Arc<Shared>,
    pub(super) message: Arc<Message>,
    pub(super) topic: Arc<str>,
    pub(super) group: Option<Arc<str>>,
    pub(super) _slot: Slot,
}

#[async_trait]
impl Acker for CoreAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        Ok(())
    }

    async fn nack(self: Box<Self>, _delay: Option<Duration>) -> Result<()> {
        Err(Error::Unsupported {
            adapter: NAME,
            what: "redelivery in core NATS (at most once); use JetStream".into(),
        })
    }

    async fn dead_letter(self: Box<Self>, letter: DeadLetter) -> Result<()> {
        let dead = letter.letter_for(&self.message);
        let group = self.group.as_deref().unwrap_or("private");
        let topic = self.shared.topology.dead_letter_topic(&self.topic, group);
        let subject = self.shared.topology.subject(&topic)?;
        let client = &self.shared.client;
        client
            .publish_with_headers(subject, headers::to_nats(&dead, None), dead.payload.clone())
            .await
            .map_err(|e| settle_error(&self.message.id, e))?;
        client
            .flush()
            .await
            .map_err(|e| settle_error(&self.message.id, e))
    }
}

/// Settles a delivery of an ordered consumer: acks are not needed.
pub(super) struct NoAcker {
    pub(super) what: &'static str,
    pub(super) _slot: Slot,
}

#[async_trait]
impl Acker for NoAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        Ok(())
    }

    async fn nack(self: Box<Self>, _delay: Option<Duration>) -> Result<()> {
        Err(Error::Unsupported {
            adapter: NAME,
            what: format!("nack on {}; subscribe with a group", self.what),
        })
    }

    async fn dead_letter(self: Box<Self>, _letter: DeadLetter) -> Result<()> {
        Err(Error::Unsupported {
            adapter: NAME,
            what: format!("dead letters on {}; subscribe with a group", self.what),
        })
    }
}
