//! From the client to the consumer: the task that reads a subscription's
//! messages into deliveries, one in-flight slot each, and the stream the
//! consumer reads them from.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{self, DeliverPolicy, pull};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use tidings_core::dialect::Undecodable;
use tidings_core::in_flight::{InFlight, Slot};
use tidings_core::{
    Delivery, DeliveryStream, Dialect, Message, MessageId, Receipt, Result, StartFrom,
};

use crate::stale_pull::PullEnd;
use crate::{Shared, given_up, headers};

use super::ackers::{CoreAcker, JsAcker, NoAcker, Tracker};
use super::{ensure_consumer, ordered_messages, pull_messages};

/// Moves messages from the client into the delivery channel, one slot each.
pub(super) struct Pump {
    pub(super) shared: Arc<Shared>,
    /// How this subscription's messages are read.
    pub(super) dialect: Dialect,
    pub(super) topic: Arc<str>,
    pub(super) group: Option<Arc<str>>,
    pub(super) in_flight: InFlight,
    pub(super) tx: mpsc::Sender<Result<Delivery>>,
    pub(super) stop: watch::Receiver<bool>,
    /// Set on servers before 2.10 (see `stale_pull`).
    pub(super) pull_end: Option<Arc<PullEnd>>,
}

/// Backoff between attempts to restore a subscription.
fn backoff(attempt: u32) -> Duration {
    let ms = 100u64.saturating_mul(1 << attempt.min(5)).min(3_000);
    Duration::from_millis(ms + fastrand::u64(0..=ms / 4))
}

impl Pump {
    /// Waits for a free in-flight slot; `None` once stopped.
    async fn slot(&mut self) -> Option<Slot> {
        tokio::select! {
            biased;
            _ = self.stop.wait_for(|s| *s) => None,
            slot = self.in_flight.take() => slot,
        }
    }

    /// Sleeps unless stopped first; `false` once stopped.
    async fn pause(&mut self, d: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.stop.wait_for(|s| *s) => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// Hands a delivery to the stream; `false` when the stream is gone or stopped.
    async fn hand_over(&mut self, delivery: Delivery) -> bool {
        let tx = self.tx.clone();
        tokio::select! {
            biased;
            // A delivery dropped here is not acked: it is redelivered.
            _ = self.stop.wait_for(|s| *s) => false,
            sent = tx.send(Ok(delivery)) => sent.is_ok(),
        }
    }

    pub(super) async fn run_pull(
        mut self,
        mut consumer: consumer::Consumer<pull::Config>,
        mut messages: pull::Stream,
        mut advisories: async_nats::Subscriber,
        tracker: Option<Arc<Tracker>>,
        prefetch: usize,
        start: StartFrom,
    ) {
        let group = self.group.clone().unwrap_or_else(|| Arc::from(""));
        let mut failures = 0u32;
        'outer: loop {
            loop {
                let Some(slot) = self.slot().await else {
                    break 'outer;
                };
                let next = tokio::select! {
                    biased;
                    _ = self.stop.wait_for(|s| *s) => break 'outer,
                    Some(advisory) = advisories.next() => Err(advisory),
                    next = messages.next() => Ok(next),
                };
                let next = match next {
                    Ok(next) => next,
                    Err(advisory) => {
                        if let Some(delivery) = self.given_up(advisory, slot, &group).await
                            && !self.hand_over(delivery).await
                        {
                            break 'outer;
                        }
                        continue;
                    }
                };
                match next {
                    Some(Ok(msg)) => {
                        failures = 0;
                        let delivery = self.js_delivery(msg, slot, &group, tracker.as_ref());
                        if !self.hand_over(delivery).await {
                            break 'outer;
                        }
                    }
                    Some(Err(e)) => {
                        warn!(topic = %self.topic, %group, error = %e, "pulling failed; restoring the consumer");
                        break;
                    }
                    None => break,
                }
            }
            // Restore: the consumer may be gone (server restarted without its
            // state) or the pull loop ended; recreate both with backoff.
            loop {
                if !self.pause(backoff(failures)).await {
                    break 'outer;
                }
                failures = failures.saturating_add(1);
                let restored = match ensure_consumer(
                    &self.shared,
                    &self.topic,
                    &group,
                    prefetch,
                    start,
                )
                .await
                {
                    Ok(c) => match pull_messages(&c, prefetch, self.pull_end.is_some()).await {
                        Ok(m) => Some((c, m)),
                        Err(e) => {
                            warn!(topic = %self.topic, error = %e, "restarting the pull failed");
                            None
                        }
                    },
                    Err(e) => {
                        warn!(topic = %self.topic, error = %e, "restoring the consumer failed");
                        None
                    }
                };
                if let Some((c, m)) = restored {
                    consumer = c;
                    messages = m;
                    // The old stream's requests may still wait on the server.
                    if let Some(end) = &self.pull_end {
                        end.dropped(false);
                    }
                    break;
                }
            }
        }
        let _ = &consumer;
        // Messages the client already received but nobody took: handed back
        // now rather than after ack_wait — once the stream is gone (handed
        // back while it runs, they would come to it again), and on old
        // servers once its requests expired.
        let mut unread = Vec::new();
        while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
            unread.extend(msg.message.reply.clone());
        }
        drop(messages);
        if let Some(end) = &self.pull_end {
            end.dropped(true);
            if !unread.is_empty() {
                end.wait().await;
            }
        }
        for reply in unread {
            let _ = self
                .shared
                .client
                .publish(reply, Bytes::from(AckKind::Nak(None)))
                .await;
        }
        let _ = self.shared.client.flush().await;
    }

    /// The delivery of a message the server gave up on (see [`given_up`]):
    /// rejected, so the runtime dead-letters it without running the handler.
    async fn given_up(
        &self,
        advisory: async_nats::Message,
        slot: Slot,
        group: &Arc<str>,
    ) -> Option<Delivery> {
        let advisory: given_up::Advisory = match serde_json::from_slice(&advisory.payload) {
            Ok(a) => a,
            Err(e) => {
                warn!(topic = %self.topic, error = %e, "an unreadable max-deliveries advisory");
                return None;
            }
        };
        let fetched = given_up::fetch(&self.shared, &advisory).await;
        let given_up = match fetched {
            Ok(g) => g,
            Err(e) => {
                warn!(topic = %self.topic, stream = %advisory.stream, seq = advisory.stream_seq, error = %e,
                    "the server gave up on a message that could not be fetched to dead-letter it");
                return None;
            }
        };
        warn!(topic = %self.topic, %group, id = %given_up.message.id, error = %given_up.why,
            "the server gave up on a message; dead-lettering it");
        let message = Arc::new(given_up.message);
        let acker = JsAcker {
            shared: self.shared.clone(),
            reply: None,
            message: message.clone(),
            topic: self.topic.clone(),
            group: group.clone(),
            settled: false,
            tracked: None,
            pull_end: None,
            _slot: slot,
        };
        let attempt = u32::try_from(advisory.deliveries).unwrap_or(u32::MAX);
        let delivery = Delivery::new(
            message,
            self.topic.clone(),
            Some(group.clone()),
            attempt,
            Box::new(acker),
        )
        .with_position(stream_position(&advisory.stream, advisory.stream_seq));
        Some(if given_up.unreadable {
            delivery.rejected(given_up.why)
        } else {
            delivery.given_up(given_up.why)
        })
    }

    /// A JetStream message in this subscription's dialect, its id falling
    /// back on its stream position; with its reply subject (for acks).
    fn decode_js(
        &self,
        message: async_nats::Message,
        position: Option<&Receipt>,
    ) -> (Message, Option<Undecodable>, Option<Subject>) {
        let async_nats::Message {
            reply,
            payload,
            headers,
            subject,
            ..
        } = message;
        let (message, undecodable) = headers::decode(
            &self.dialect,
            headers.as_ref(),
            payload,
            || sequence_id(position),
            Some(subject.as_str()),
        );
        (message, undecodable, reply)
    }

    fn js_delivery(
        &self,
        msg: async_nats::jetstream::Message,
        slot: Slot,
        group: &Arc<str>,
        tracker: Option<&Arc<Tracker>>,
    ) -> Delivery {
        let (attempt, position) = match msg.info() {
            Ok(info) => (
                u32::try_from(info.delivered).unwrap_or(1),
                Some(stream_position(info.stream, info.stream_sequence)),
            ),
            Err(_) => (1, None),
        };
        let (message, undecodable, reply) = self.decode_js(msg.message, position.as_ref());
        let message = Arc::new(message);
        let tracked = match (&reply, tracker) {
            (Some(reply), Some(t)) => Some(t.track(reply.clone())),
            _ => None,
        };
        let acker = JsAcker {
            shared: self.shared.clone(),
            reply,
            message: message.clone(),
            topic: self.topic.clone(),
            group: group.clone(),
            settled: false,
            tracked,
            pull_end: self.pull_end.clone(),
            _slot: slot,
        };
        let delivery = Delivery::new(
            message,
            self.topic.clone(),
            Some(group.clone()),
            attempt,
            Box::new(acker),
        );
        let delivery = match position {
            Some(position) => delivery.with_position(position),
            None => delivery,
        };
        reject_if(delivery, undecodable)
    }

    pub(super) async fn run_ordered(
        mut self,
        stream: String,
        subject: String,
        mut messages: pull::Ordered,
    ) {
        let mut last_sequence = 0u64;
        let mut failures = 0u32;
        'outer: loop {
            loop {
                let Some(slot) = self.slot().await else {
                    break 'outer;
                };
                let next = tokio::select! {
                    biased;
                    _ = self.stop.wait_for(|s| *s) => break 'outer,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(msg)) => {
                        failures = 0;
                        let (sequence, position) = match msg.info() {
                            Ok(info) => (
                                info.stream_sequence,
                                Some(stream_position(info.stream, info.stream_sequence)),
                            ),
                            Err(_) => (last_sequence, None),
                        };
                        last_sequence = sequence;
                        let (message, undecodable, _) =
                            self.decode_js(msg.message, position.as_ref());
                        let delivery = Delivery::new(
                            Arc::new(message),
                            self.topic.clone(),
                            None,
                            1,
                            Box::new(NoAcker {
                                what: "a private JetStream subscription (an ordered consumer without acks)",
                                _slot: slot,
                            }),
                        );
                        let delivery = match position {
                            Some(position) => delivery.with_position(position),
                            None => delivery,
                        };
                        if !self.hand_over(reject_if(delivery, undecodable)).await {
                            break 'outer;
                        }
                    }
                    Some(Err(e)) => {
                        // The ordered consumer recreates itself on gaps and
                        // missed heartbeats; keep reading.
                        debug!(topic = %self.topic, error = %e, "ordered consumer error");
                    }
                    None => break,
                }
            }
            loop {
                if !self.pause(backoff(failures)).await {
                    break 'outer;
                }
                failures = failures.saturating_add(1);
                let from = DeliverPolicy::ByStartSequence {
                    start_sequence: last_sequence + 1,
                };
                match ordered_messages(&self.shared, &stream, &subject, from).await {
                    Ok(m) => {
                        messages = m;
                        break;
                    }
                    Err(e) => {
                        warn!(topic = %self.topic, error = %e, "restoring the ordered consumer failed")
                    }
                }
            }
        }
    }

    pub(super) async fn run_core(mut self, mut sub: async_nats::Subscriber) {
        loop {
            let Some(slot) = self.slot().await else {
                break;
            };
            let next = tokio::select! {
                biased;
                _ = self.stop.wait_for(|s| *s) => break,
                next = sub.next() => next,
            };
            let Some(msg) = next else { break };
            let (message, undecodable) = headers::decode(
                &self.dialect,
                msg.headers.as_ref(),
                msg.payload,
                || None,
                Some(msg.subject.as_str()),
            );
            let message = Arc::new(message);
            let delivery = Delivery::new(
                message.clone(),
                self.topic.clone(),
                self.group.clone(),
                1,
                Box::new(CoreAcker {
                    shared: self.shared.clone(),
                    message,
                    topic: self.topic.clone(),
                    group: self.group.clone(),
                    _slot: slot,
                }),
            );
            if !self.hand_over(reject_if(delivery, undecodable)).await {
                break;
            }
        }
        if let Err(e) = sub.unsubscribe().await {
            debug!(error = %e, "unsubscribing failed");
        }
        let _ = self.shared.client.flush().await;
    }
}

/// The stream of deliveries of one subscription.
pub(super) struct NatsStream {
    pub(super) rx: mpsc::Receiver<Result<Delivery>>,
    pub(super) stop: watch::Sender<bool>,
    pub(super) task: Option<JoinHandle<()>>,
    /// On servers before 2.10: told the subscription is closing before
    /// anything is handed back (see `stale_pull`).
    pub(super) pull_end: Option<Arc<PullEnd>>,
}

impl Stream for NatsStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl DeliveryStream for NatsStream {
    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if let Some(end) = &self.pull_end {
                end.closing();
            }
            self.stop.send_replace(true);
            self.rx.close();
            // Deliveries queued but not taken are dropped unsettled: handed back.
            while self.rx.try_recv().is_ok() {}
            if let Some(task) = self.task.take()
                && tokio::time::timeout(Duration::from_secs(10), task)
                    .await
                    .is_err()
            {
                warn!("closing the subscription took longer than 10 s");
            }
            Ok(())
        })
    }
}

impl Drop for NatsStream {
    fn drop(&mut self) {
        if let Some(end) = &self.pull_end {
            end.closing();
        }
        self.stop.send_replace(true);
    }
}

/// The delivery, rejected when its body could not be read in the dialect.
fn reject_if(delivery: Delivery, undecodable: Option<Undecodable>) -> Delivery {
    match undecodable {
        Some(why) => delivery.rejected(why),
        None => delivery,
    }
}

/// The id of a JetStream message that carries none (no `ce_id`, no
/// `Nats-Msg-Id`): its stream and stream sequence, the same on every
/// redelivery. Made only for such a message.
fn sequence_id(position: Option<&Receipt>) -> Option<MessageId> {
    match position? {
        Receipt::Sequence {
            stream, sequence, ..
        } => Some(MessageId::from_fmt(format_args!("{stream}:{sequence}"))),
        _ => None,
    }
}

/// A JetStream delivery's position: its stream and stream sequence.
fn stream_position(stream: &str, sequence: u64) -> Receipt {
    Receipt::Sequence {
        stream: stream.to_owned(),
        sequence,
        duplicate: false,
    }
}
