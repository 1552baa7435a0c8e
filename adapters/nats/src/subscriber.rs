//! Subscribing: durable pull consumers (JetStream groups), ordered consumers
//! (JetStream private subscriptions), queue groups and plain subscriptions
//! (core NATS).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use async_nats::Subject;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, pull};
use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use tidings_core::{
    Acker, Capabilities, DeadLetter, Delivery, DeliveryStream, Error, Message, Receipt, Result,
    StartFrom, Subscriber, Subscription,
};

use crate::config::Mode;
use crate::stale_pull::{self, PullEnd};
use crate::{NAME, Shared, broker_error, given_up, headers};
use tidings_core::dialect::Undecodable;
use tidings_core::in_flight::{InFlight, Slot};
use tidings_core::{Dialect, MessageId};

/// Subscribes to NATS. Made by [`NatsBus::subscriber`](crate::NatsBus::subscriber).
pub struct NatsSubscriber {
    shared: Arc<Shared>,
}

/// The prefetch a declared group's consumer gets until a subscription sets its own.
const DECLARED_PREFETCH: usize = 64;

impl NatsSubscriber {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        NatsSubscriber { shared }
    }
}

/// Returns once the server has processed everything this connection sent
/// before the call. `Client::flush` only empties the socket buffer, so a
/// SUB sent just before may still be unread by the server when a message
/// from another connection arrives. The server handles one connection's
/// commands in order, so a message to a fresh inbox of ours coming back
/// proves every earlier command was processed.
async fn round_trip(
    client: &async_nats::Client,
    timeout: Duration,
) -> std::result::Result<(), tidings_core::BoxError> {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await?;
    client.publish(inbox, Bytes::new()).await?;
    client.flush().await?;
    let back = tokio::time::timeout(timeout, echo.next()).await;
    let _ = echo.unsubscribe().await;
    match back {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("the connection closed before the subscription was confirmed".into()),
        Err(_) => {
            Err(format!("the server did not confirm the subscription within {timeout:?}").into())
        }
    }
}

fn subscribe_error(topic: &str, e: impl Into<tidings_core::BoxError>) -> Error {
    Error::Subscribe {
        topic: topic.to_owned(),
        source: e.into(),
    }
}

fn settle_error(id: &str, e: impl Into<tidings_core::BoxError>) -> Error {
    Error::Settle {
        id: id.into(),
        source: e.into(),
    }
}

/// Creates (or checks and updates) the durable pull consumer of `group` on `topic`.
async fn ensure_consumer(
    shared: &Shared,
    topic: &str,
    group: &str,
    prefetch: usize,
    start: StartFrom,
) -> Result<consumer::Consumer<pull::Config>> {
    let stream = shared.ensure_stream(topic).await?;
    let subject = shared.topology.subject(topic)?;
    let durable = shared.topology.durable(topic, group);
    let c = &shared.config;
    let max_ack_pending = c.max_ack_pending.unwrap_or(prefetch as i64).max(1);
    let max_deliver = c.max_deliver.unwrap_or(-1);
    let js = &shared.js;
    match js
        .get_consumer_from_stream::<pull::Config, _, _>(&durable, &stream)
        .await
    {
        Ok(mut existing) => {
            let have = existing.cached_info().config.clone();
            if have.max_ack_pending != max_ack_pending
                || have.ack_wait != c.ack_wait
                || have.max_deliver != max_deliver
            {
                let wanted = <pull::Config as consumer::FromConsumer>::try_from_consumer_config(
                    have,
                )
                .map(|mut wanted| {
                    wanted.max_ack_pending = max_ack_pending;
                    wanted.ack_wait = c.ack_wait;
                    wanted.max_deliver = max_deliver;
                    wanted
                });
                // Creating an existing durable with changed limits updates it.
                let updated = match wanted {
                    Ok(wanted) => js
                        .create_consumer_on_stream(wanted, &stream)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match updated {
                    Ok(updated) => existing = updated,
                    Err(e) => {
                        warn!(%durable, %stream, error = %e, "updating the consumer's limits failed; keeping its settings")
                    }
                }
            }
            Ok(existing)
        }
        Err(_) => {
            let config = pull::Config {
                durable_name: Some(durable.clone()),
                description: Some(format!("tidings group `{group}` on `{topic}`")),
                filter_subject: subject,
                ack_policy: AckPolicy::Explicit,
                ack_wait: c.ack_wait,
                max_deliver,
                max_ack_pending,
                deliver_policy: deliver_policy(start, DeliverPolicy::New)?,
                ..Default::default()
            };
            match js.create_consumer_on_stream(config, &stream).await {
                Ok(created) => Ok(created),
                Err(create) => js
                    .get_consumer_from_stream::<pull::Config, _, _>(&durable, &stream)
                    .await
                    .map_err(|_| subscribe_error(topic, create)),
            }
        }
    }
}

fn deliver_policy(start: StartFrom, latest: DeliverPolicy) -> Result<DeliverPolicy> {
    Ok(match start {
        StartFrom::Latest => latest,
        StartFrom::Earliest => DeliverPolicy::All,
        StartFrom::Time(t) => {
            let nanos = t
                .duration_since(UNIX_EPOCH)
                .map_err(|_| Error::Config {
                    key: "start".into(),
                    message: "a start time before 1970".into(),
                })?
                .as_nanos();
            DeliverPolicy::ByStartTime {
                start_time: async_nats::datetime::from_nanos(nanos as i128).map_err(|e| {
                    Error::Config {
                        key: "start".into(),
                        message: e.to_string(),
                    }
                })?,
            }
        }
    })
}

#[async_trait]
impl Subscriber for NatsSubscriber {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        match self.shared.config.mode {
            Mode::JetStream => Capabilities::at_least_once(),
            Mode::Core => Capabilities::at_most_once(),
        }
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        subscription.check(self.name(), self.capabilities())?;
        let shared = self.shared.clone();
        let topic = subscription.topic.clone();
        let subject = shared.topology.subject(&topic)?;
        let prefetch = subscription.prefetch.max(1);
        let group = subscription.group.clone();
        if let Some(g) = &group
            && g.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::Config {
                key: "group".into(),
                message: format!("`{g}` holds whitespace, which NATS names cannot"),
            });
        }
        let (tx, rx) = mpsc::channel(prefetch.min(1024));
        let (stop_tx, stop) = watch::channel(false);
        let pump = Pump {
            dialect: subscription
                .dialect
                .clone()
                .unwrap_or_else(|| shared.config.dialect.clone()),
            shared: shared.clone(),
            topic: topic.as_str().into(),
            group: group.as_deref().map(Arc::from),
            in_flight: InFlight::new(prefetch),
            tx,
            stop,
            pull_end: stale_pull::needs_waiting(&shared.client.server_info().version)
                .then(Arc::default),
        };
        let pull_end = pump.pull_end.clone();
        let task = match (shared.config.mode, &group) {
            (Mode::JetStream, Some(g)) => {
                let consumer =
                    ensure_consumer(&shared, &topic, g, prefetch, subscription.start).await?;
                // Listening before pulling: no advisory is missed.
                let info = consumer.cached_info();
                // A queue subscription: one member of the group takes each advisory.
                let advisories = shared
                    .client
                    .queue_subscribe(
                        given_up::advisory_subject(&info.stream_name, &info.name),
                        info.name.clone(),
                    )
                    .await
                    .map_err(|e| subscribe_error(&topic, e))?;
                let messages = pull_messages(&consumer, prefetch, pump.pull_end.is_some())
                    .await
                    .map_err(|e| subscribe_error(&topic, e))?;
                let tracker = Tracker::start(&shared);
                tokio::spawn(pump.run_pull(
                    consumer,
                    messages,
                    advisories,
                    tracker,
                    prefetch,
                    subscription.start,
                ))
            }
            (Mode::JetStream, None) => {
                let stream = shared.ensure_stream(&topic).await?;
                let start = deliver_policy(subscription.start, DeliverPolicy::New)?;
                let messages = ordered_messages(&shared, &stream, &subject, start)
                    .await
                    .map_err(|e| subscribe_error(&topic, e))?;
                tokio::spawn(pump.run_ordered(stream, subject, messages))
            }
            (Mode::Core, group) => {
                let client = &shared.client;
                let sub = match group {
                    Some(g) => client.queue_subscribe(subject, g.clone()).await,
                    None => client.subscribe(subject).await,
                }
                .map_err(|e| subscribe_error(&topic, e))?;
                // The subscription is in place once the server has processed it.
                round_trip(client, shared.config.request_timeout)
                    .await
                    .map_err(|e| subscribe_error(&topic, e))?;
                tokio::spawn(pump.run_core(sub))
            }
        };
        Ok(Box::new(NatsStream {
            rx,
            stop: stop_tx,
            task: Some(task),
            pull_end,
        }))
    }

    async fn declare_group(&self, topic: &str, group: &str) -> Result<()> {
        match self.shared.config.mode {
            Mode::JetStream => {
                ensure_consumer(
                    &self.shared,
                    topic,
                    group,
                    DECLARED_PREFETCH,
                    StartFrom::Latest,
                )
                .await?;
                Ok(())
            }
            Mode::Core => Ok(()),
        }
    }

    fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        self.shared.topology.dead_letter_topic(topic, group)
    }

    async fn groups(&self, topic: &str, named: &[String]) -> Result<Vec<tidings_core::GroupStats>> {
        match self.shared.config.mode {
            Mode::JetStream => crate::groups::report(&self.shared, topic, named).await,
            Mode::Core => Err(Error::Unsupported {
                adapter: NAME,
                what: "groups on core NATS (queue groups keep no state)".into(),
            }),
        }
    }
}

/// The pull stream of a group; `old_server`: a server before 2.10, where
/// requests must expire soon (see `stale_pull`).
async fn pull_messages(
    consumer: &consumer::Consumer<pull::Config>,
    prefetch: usize,
    old_server: bool,
) -> std::result::Result<pull::Stream, async_nats::jetstream::consumer::StreamError> {
    let (expires, heartbeat) = if old_server {
        (stale_pull::EXPIRES_ON_OLD_SERVERS, Duration::from_secs(1))
    } else {
        (Duration::from_secs(30), Duration::from_secs(5))
    };
    consumer
        .stream()
        .max_messages_per_batch(prefetch.min(10_000))
        .expires(expires)
        .heartbeat(heartbeat)
        .messages()
        .await
}

async fn ordered_messages(
    shared: &Shared,
    stream: &str,
    subject: &str,
    deliver_policy: DeliverPolicy,
) -> Result<pull::Ordered> {
    let stream = shared.js.get_stream(stream).await.map_err(broker_error)?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(broker_error)?;
    consumer.messages().await.map_err(broker_error)
}

/// Deliveries still being handled, reported in progress (`+WPI`) on a timer.
struct Tracker {
    next: AtomicU64,
    inflight: Mutex<HashMap<u64, Subject>>,
}

impl Tracker {
    /// A tracker whose timer runs while the tracker lives; `None` when progress reports are off.
    fn start(shared: &Arc<Shared>) -> Option<Arc<Tracker>> {
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

    fn track(self: &Arc<Self>, reply: Subject) -> (Arc<Tracker>, u64) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, reply);
        (self.clone(), id)
    }
}

/// Moves messages from the client into the delivery channel, one slot each.
struct Pump {
    shared: Arc<Shared>,
    /// How this subscription's messages are read.
    dialect: Dialect,
    topic: Arc<str>,
    group: Option<Arc<str>>,
    in_flight: InFlight,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: watch::Receiver<bool>,
    /// Set on servers before 2.10 (see `stale_pull`).
    pull_end: Option<Arc<PullEnd>>,
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

    async fn run_pull(
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

    fn js_delivery(
        &self,
        msg: async_nats::jetstream::Message,
        slot: Slot,
        group: &Arc<str>,
        tracker: Option<&Arc<Tracker>>,
    ) -> Delivery {
        let (attempt, fallback, position) = match msg.info() {
            Ok(info) => (
                u32::try_from(info.delivered).unwrap_or(1),
                Some(MessageId::from_fmt(format_args!(
                    "{}:{}",
                    info.stream, info.stream_sequence
                ))),
                Some(stream_position(info.stream, info.stream_sequence)),
            ),
            Err(_) => (1, None, None),
        };
        let async_nats::Message {
            reply,
            payload,
            headers,
            subject,
            ..
        } = msg.message;
        let (message, undecodable) = headers::decode(
            &self.dialect,
            headers.as_ref(),
            payload,
            fallback,
            Some(subject.as_str()),
        );
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

    async fn run_ordered(mut self, stream: String, subject: String, mut messages: pull::Ordered) {
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
                        let (fallback, sequence, position) = match msg.info() {
                            Ok(info) => (
                                Some(MessageId::from_fmt(format_args!(
                                    "{}:{}",
                                    info.stream, info.stream_sequence
                                ))),
                                info.stream_sequence,
                                Some(stream_position(info.stream, info.stream_sequence)),
                            ),
                            Err(_) => (None, last_sequence, None),
                        };
                        last_sequence = sequence;
                        let async_nats::Message {
                            payload,
                            headers,
                            subject,
                            ..
                        } = msg.message;
                        let (message, undecodable) = headers::decode(
                            &self.dialect,
                            headers.as_ref(),
                            payload,
                            fallback,
                            Some(subject.as_str()),
                        );
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

    async fn run_core(mut self, mut sub: async_nats::Subscriber) {
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
                None,
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
struct NatsStream {
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    /// On servers before 2.10: told the subscription is closing before
    /// anything is handed back (see `stale_pull`).
    pull_end: Option<Arc<PullEnd>>,
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

/// Settles one JetStream delivery of a durable consumer.
struct JsAcker {
    shared: Arc<Shared>,
    /// `None` for a message the server gave up on: nothing to ack.
    reply: Option<Subject>,
    message: Arc<Message>,
    topic: Arc<str>,
    group: Arc<str>,
    settled: bool,
    tracked: Option<(Arc<Tracker>, u64)>,
    /// The subscription's pull stream's end, on servers before 2.10: naks
    /// wait for its requests to expire (see `stale_pull`).
    pull_end: Option<Arc<PullEnd>>,
    _slot: Slot,
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
struct CoreAcker {
    shared: Arc<Shared>,
    message: Arc<Message>,
    topic: Arc<str>,
    group: Option<Arc<str>>,
    _slot: Slot,
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
struct NoAcker {
    what: &'static str,
    _slot: Slot,
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

/// A JetStream delivery's position: its stream and stream sequence.
/// How often the dead letter of a message the server gave up on is tried.
const GIVEN_UP_TRIES: u32 = 8;

/// The delivery, rejected when its body could not be read in the dialect.
fn reject_if(delivery: Delivery, undecodable: Option<Undecodable>) -> Delivery {
    match undecodable {
        Some(why) => delivery.rejected(why),
        None => delivery,
    }
}

fn stream_position(stream: &str, sequence: u64) -> Receipt {
    Receipt::Sequence {
        stream: stream.to_owned(),
        sequence,
        duplicate: false,
    }
}
