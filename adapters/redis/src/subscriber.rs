//! Subscribing: consumer groups and private reads on streams; the stream of
//! deliveries and the per-delivery ackers shared with Pub/Sub mode.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, UNIX_EPOCH};

use async_trait::async_trait;
use futures::future::BoxFuture;
use redis::{RedisResult, Value};
use tidings_core::in_flight::{InFlight, Slot};
use tidings_core::{
    Acker, Capabilities, DeadLetter, Delivery, DeliveryStream, Error, GroupStats, Message, Receipt,
    Result, StartFrom, Subscriber, Subscription,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use crate::config::{RedisConfig, RedisMode};
use crate::headers;
use crate::publisher::{publish_cmd, write, xadd};
use crate::{Conn, Connector, NAME, broker_error, pubsub};

/// Most entries asked for by one read.
const MAX_BATCH: usize = 1000;

/// How long a read waits for more free in-flight slots under load.
const GATHER: Duration = Duration::from_millis(2);

/// Subscribes to Redis streams (consumer groups or private reads) or channels.
pub struct RedisSubscriber {
    connector: Connector,
    control: Conn,
    /// The publisher's connection, for dead letters: with `wait_replicas`
    /// a write blocks its connection until replicas confirm it (`WAIT`), so
    /// it must not hold up the acks and heartbeats on `control`.
    writes: Conn,
    config: Arc<RedisConfig>,
    consumer_base: String,
    counter: AtomicU64,
}

impl std::fmt::Debug for RedisSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSubscriber")
            .field("mode", &self.config.mode)
            .field("consumer", &self.consumer_base)
            .finish()
    }
}

impl RedisSubscriber {
    pub(crate) fn new(
        connector: Connector,
        control: Conn,
        writes: Conn,
        config: Arc<RedisConfig>,
    ) -> Self {
        let consumer_base = config
            .consumer_name
            .clone()
            .unwrap_or_else(|| format!("tidings-{}-{:08x}", std::process::id(), fastrand::u32(..)));
        RedisSubscriber {
            connector,
            control,
            writes,
            config,
            consumer_base,
            counter: AtomicU64::new(0),
        }
    }

    fn shared(&self, subscription: &Subscription, consumer: String) -> Arc<Shared> {
        let held: Held = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let group: Option<Arc<str>> = subscription.group.as_deref().map(Arc::from);
        let dead_letters = self.dead_letter_topic(
            &subscription.topic,
            subscription.group.as_deref().unwrap_or(""),
        );
        Arc::new(Shared {
            topic: Arc::from(subscription.topic.as_str()),
            group,
            consumer,
            dead_letters,
            control: self.control.clone(),
            writes: self.writes.clone(),
            config: self.config.clone(),
            in_flight: InFlight::new(subscription.prefetch),
            prefetch: subscription.prefetch.max(1),
            closed: watch::channel(false).0,
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
            acks: match (&subscription.group, self.config.mode) {
                (Some(group), RedisMode::Streams) => Some(spawn_acker(
                    self.control.clone(),
                    subscription.topic.clone(),
                    group.clone(),
                    self.config.clone(),
                    held.clone(),
                )),
                _ => None,
            },
            held,
            layout: match &subscription.dialect {
                Some(dialect) => headers::Layout {
                    dialect: dialect.clone(),
                    ..self.config.layout.clone()
                },
                None => self.config.layout.clone(),
            },
        })
    }

    async fn subscribe_streams(
        &self,
        subscription: Subscription,
    ) -> Result<Box<dyn DeliveryStream>> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let consumer = format!("{}-{n}", self.consumer_base);
        let shared = self.shared(&subscription, consumer);
        let subscribe_error = |e: redis::RedisError| Error::Subscribe {
            topic: subscription.topic.clone(),
            source: Box::new(e),
        };
        // Blocking reads need their own connection, with a reply timeout above BLOCK.
        let read_timeout = self.config.block + self.config.response_timeout;
        let mut conn = self.connector.connect(&self.config, read_timeout).await?;
        let position = match &subscription.group {
            Some(group) => {
                create_group(
                    &mut conn,
                    &subscription.topic,
                    group,
                    &start_id(subscription.start, "$"),
                )
                .await
                .map_err(subscribe_error)?;
                None
            }
            None => Some(match subscription.start {
                StartFrom::Latest => last_entry_id(&mut conn, &subscription.topic)
                    .await
                    .map_err(subscribe_error)?,
                other => start_id(other, "0-0"),
            }),
        };
        let stream = RedisStream::new(shared.clone());
        if shared.group.is_some() && self.config.heartbeat {
            tokio::spawn(heartbeat(Arc::downgrade(&shared)));
        }
        tokio::spawn(read_loop(shared, conn, position));
        Ok(Box::new(stream))
    }
}

#[async_trait]
impl Subscriber for RedisSubscriber {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        match self.config.mode {
            RedisMode::Streams => Capabilities::at_least_once(),
            RedisMode::PubSub => Capabilities::at_most_once(),
        }
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        subscription.check(self.name(), self.capabilities())?;
        match self.config.mode {
            RedisMode::Streams => self.subscribe_streams(subscription).await,
            RedisMode::PubSub => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                let shared = self.shared(&subscription, format!("{}-{n}", self.consumer_base));
                pubsub::subscribe(self.connector.clone(), shared).await
            }
        }
    }

    async fn declare_group(&self, topic: &str, group: &str) -> Result<()> {
        if self.config.mode == RedisMode::PubSub {
            return Ok(());
        }
        create_group(&mut self.control.clone(), topic, group, "$")
            .await
            .map_err(|e| Error::Subscribe {
                topic: topic.to_owned(),
                source: Box::new(e),
            })
    }

    fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        if group.is_empty() {
            format!("{topic}:dlq")
        } else {
            format!("{topic}:{group}:dlq")
        }
    }

    async fn groups(&self, topic: &str, named: &[String]) -> Result<Vec<GroupStats>> {
        if self.config.mode == RedisMode::PubSub {
            return Err(Error::Unsupported {
                adapter: NAME,
                what: "groups in Pub/Sub mode (channels keep no group state)".into(),
            });
        }
        crate::groups::report(&mut self.control.clone(), topic, named, |group| {
            self.dead_letter_topic(topic, group)
        })
        .await
        .map_err(broker_error)
    }
}

/// The id a group or a private read starts after.
fn start_id(start: StartFrom, latest: &str) -> String {
    match start {
        StartFrom::Latest => latest.to_owned(),
        StartFrom::Earliest => "0-0".to_owned(),
        StartFrom::Time(t) => {
            let ms = t
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            if ms == 0 {
                "0-0".to_owned()
            } else {
                format!("{}-{}", ms - 1, u64::MAX)
            }
        }
    }
}

/// `XGROUP CREATE topic group id MKSTREAM`; an existing group is kept as it is.
async fn create_group(conn: &mut Conn, topic: &str, group: &str, id: &str) -> RedisResult<()> {
    let created: RedisResult<Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(topic)
        .arg(group)
        .arg(id)
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

/// The id of the newest entry, or `0-0` for an empty or missing stream.
async fn last_entry_id(conn: &mut Conn, topic: &str) -> RedisResult<String> {
    let reply: Value = redis::cmd("XREVRANGE")
        .arg(topic)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(entries(reply)
        .into_iter()
        .next()
        .map_or_else(|| "0-0".to_owned(), |(id, _)| id))
}

/// What one subscription's reader, its stream and its ackers share.
pub(crate) struct Shared {
    pub(crate) topic: Arc<str>,
    pub(crate) group: Option<Arc<str>>,
    pub(crate) consumer: String,
    pub(crate) dead_letters: String,
    pub(crate) control: Conn,
    /// Where dead letters are written (see [`RedisSubscriber`]'s `writes`).
    writes: Conn,
    pub(crate) config: Arc<RedisConfig>,
    /// Free in-flight slots (prefetch); a delivery holds one until settled.
    pub(crate) in_flight: InFlight,
    /// The subscription's prefetch.
    prefetch: usize,
    pub(crate) closed: watch::Sender<bool>,
    pub(crate) tx: mpsc::UnboundedSender<Result<Delivery>>,
    rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Result<Delivery>>>>,
    /// The ack batcher of a consumer group subscription.
    acks: Option<mpsc::UnboundedSender<AckRequest>>,
    /// How this subscription's messages are read.
    pub(crate) layout: headers::Layout,
    /// Entries handed out and not yet settled (consumer groups): kept
    /// from being reclaimed by the heartbeat while a handler runs.
    held: Held,
}

/// Entries handed out and not yet acked for sure, kept alive by the heartbeat.
type Held = Arc<std::sync::Mutex<HashSet<String>>>;

/// One entry to `XACK` (none: a flush, answered once every ack queued
/// before it went out), and where to report the result if the caller waits.
struct AckRequest {
    entry_id: Option<String>,
    done: Option<oneshot::Sender<RedisResult<()>>>,
}

/// Starts the task that acks entries in batches: every ack queued while the
/// previous `XACK` was in flight goes out in the next one. It ends when the
/// subscription and all its deliveries are gone.
fn spawn_acker(
    mut conn: Conn,
    topic: String,
    group: String,
    config: Arc<RedisConfig>,
    held: Held,
) -> mpsc::UnboundedSender<AckRequest> {
    let (tx, mut rx) = mpsc::unbounded_channel::<AckRequest>();
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let ids: Vec<&str> = batch.iter().filter_map(|r| r.entry_id.as_deref()).collect();
            if ids.is_empty() {
                // Only flushes: everything before them went out already.
                for request in batch.drain(..) {
                    if let Some(done) = request.done {
                        let _ = done.send(Ok(()));
                    }
                }
                continue;
            }
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&topic).arg(&group).arg(&ids);
            // An ack lost to a connection fault is sent again once the
            // connection is back, rather than leaving handled entries to be
            // reclaimed and handled again after the visibility timeout.
            let mut backoff = Duration::from_millis(20);
            let started = Instant::now();
            let result = loop {
                let result: RedisResult<Value> = cmd.query_async(&mut conn).await;
                match result {
                    Err(e)
                        if crate::is_connection_error(&e)
                            && started.elapsed() < config.visibility_timeout =>
                    {
                        debug!(error = %e, topic, group, "XACK failed; sending it again");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(config.max_backoff);
                    }
                    other => break other,
                }
            };
            if let Err(error) = &result {
                warn!(%error, topic, group, entries = batch.len(), "XACK failed; the entries are reclaimed after the visibility timeout");
            }
            // Kept alive until the XACK went through (or was given up): an
            // ack waiting out a connection fault must not let another member
            // reclaim an entry that was handled.
            {
                let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
                for request in &batch {
                    if let Some(id) = &request.entry_id {
                        held.remove(id);
                    }
                }
            }
            for request in batch.drain(..) {
                if let Some(done) = request.done {
                    let _ = done.send(match &result {
                        Ok(_) => Ok(()),
                        Err(e) => Err(e.clone()),
                    });
                }
            }
        }
    });
    tx
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves once the subscription is closed.
    pub(crate) async fn wait_closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    fn close(&self) {
        self.closed.send_replace(true);
        self.in_flight.close();
    }

    /// One in-flight slot, or `None` once closed.
    pub(crate) async fn slot(&self) -> Option<Slot> {
        tokio::select! {
            biased;
            _ = self.wait_closed() => None,
            slot = self.in_flight.take() => slot,
        }
    }

    /// Sleeps, returning `false` if the subscription closed meanwhile.
    pub(crate) async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.wait_closed() => false,
            _ = tokio::time::sleep(d) => !self.is_closed(),
        }
    }

    pub(crate) fn report(&self, error: Error) {
        let _ = self.tx.send(Err(error));
    }

    pub(crate) fn send(&self, delivery: Delivery) {
        // If the stream is gone the delivery is dropped here, and its acker
        // leaves the entry to be reclaimed.
        let _ = self.tx.send(Ok(delivery));
    }

    fn held_lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn group_name(&self) -> &str {
        self.group.as_deref().unwrap_or_default()
    }

    fn millis(d: Duration) -> u64 {
        d.as_millis().min(u64::MAX as u128) as u64
    }

    /// Makes a pending entry available to every member at once: idle for the
    /// full visibility timeout, delivery count set to `count`.
    async fn release(&self, entry_id: &str, count: u32) {
        let result: RedisResult<Value> = redis::cmd("XCLAIM")
            .arg(&*self.topic)
            .arg(self.group_name())
            .arg(&self.consumer)
            .arg(0)
            .arg(entry_id)
            .arg("IDLE")
            .arg(Self::millis(self.config.visibility_timeout))
            .arg("RETRYCOUNT")
            .arg(count)
            .arg("JUSTID")
            .query_async(&mut self.control.clone())
            .await;
        if let Err(error) = result {
            debug!(%error, entry_id, "releasing a pending entry failed; it is reclaimed after the visibility timeout");
        }
    }

    /// Resets the idle time of a pending entry we hold, so nobody reclaims it.
    async fn touch(&self, entry_id: &str) {
        let _: RedisResult<Value> = redis::cmd("XCLAIM")
            .arg(&*self.topic)
            .arg(self.group_name())
            .arg(&self.consumer)
            .arg(0)
            .arg(entry_id)
            .arg("JUSTID")
            .query_async(&mut self.control.clone())
            .await;
    }
}

/// Keeps the entries this subscription holds from being reclaimed while
/// their handlers run: every third of the visibility timeout, one `XCLAIM
/// ... JUSTID` of all of them resets their idle time (without counting a
/// delivery). So the visibility timeout only has to outlast a dead member,
/// not the longest handler. Runs on while a closed subscription drains (its
/// deliveries keep the shared state alive) and ends when all are gone.
async fn heartbeat(shared: std::sync::Weak<Shared>) {
    let Some(every) = shared.upgrade().map(|s| s.config.visibility_timeout / 3) else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let held: Vec<String> = shared.held_lock().iter().cloned().collect();
        if held.is_empty() {
            continue;
        }
        // In chunks, one command each: a single XCLAIM of every held entry
        // (tens of thousands for a dead-letter inbox) would hold Redis, and
        // every client of it, for the whole command.
        for chunk in held.chunks(HEARTBEAT_CHUNK) {
            let mut cmd = redis::cmd("XCLAIM");
            // Only entries idle for a while: one another member reclaimed a
            // moment ago (after a stall of ours) is not taken back.
            cmd.arg(&*shared.topic)
                .arg(shared.group_name())
                .arg(&shared.consumer)
                .arg(Shared::millis(every / 2));
            for id in chunk {
                cmd.arg(id);
            }
            cmd.arg("JUSTID");
            let result: RedisResult<Value> = cmd.query_async(&mut shared.control.clone()).await;
            if let Err(error) = result {
                debug!(%error, topic = %shared.topic, "heartbeat of held entries failed");
                break;
            }
        }
    }
}

/// Entries per heartbeat command.
const HEARTBEAT_CHUNK: usize = 1000;

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

async fn redeliver(
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

/// The stream of deliveries handed to the caller.
pub(crate) struct RedisStream {
    shared: Arc<Shared>,
    rx: Option<mpsc::UnboundedReceiver<Result<Delivery>>>,
}

impl RedisStream {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let rx = shared.rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        RedisStream { shared, rx }
    }

    fn shut(&mut self) {
        self.shared.close();
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            // Deliveries never handed out: their ackers release them.
            while rx.try_recv().is_ok() {}
        }
    }
}

impl futures::Stream for RedisStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        }
    }
}

impl DeliveryStream for RedisStream {
    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        self.shut();
        Box::pin(std::future::ready(Ok(())))
    }

    /// Waits until the acks queued so far went out (acks are batched in
    /// the background), within the visibility timeout: a process that
    /// exits next (a command-line tool) must not leave handled entries to
    /// be reclaimed and handled again.
    fn closed(&mut self) -> BoxFuture<'_, ()> {
        let flushed = self.shared.acks.as_ref().and_then(|acks| {
            let (done, flushed) = oneshot::channel();
            acks.send(AckRequest {
                entry_id: None,
                done: Some(done),
            })
            .ok()
            .map(|()| flushed)
        });
        let limit = self.shared.config.visibility_timeout;
        Box::pin(async move {
            if let Some(flushed) = flushed
                && tokio::time::timeout(limit, flushed).await.is_err()
            {
                warn!("acks were still going out when the subscription closed");
            }
        })
    }
}

impl Drop for RedisStream {
    fn drop(&mut self) {
        self.shut();
    }
}

/// `(entry id, fields)` pairs from a reply holding a list of entries
/// (`XRANGE`, `XCLAIM`, one stream of `XREADGROUP`).
pub(crate) fn entries(reply: Value) -> Vec<(String, Vec<Value>)> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let mut pair = pair.into_iter();
            let id = match pair.next()? {
                Value::BulkString(b) => String::from_utf8(b).ok()?,
                Value::SimpleString(s) => s,
                _ => return None,
            };
            match pair.next() {
                Some(Value::Array(fields)) => Some((id, fields)),
                Some(Value::Map(map)) => {
                    Some((id, map.into_iter().flat_map(|(k, v)| [k, v]).collect()))
                }
                _ => None,
            }
        })
        .collect()
}

/// The entries of the one stream in an `XREAD`/`XREADGROUP` reply (RESP2 or RESP3).
fn read_reply(reply: Value) -> Vec<(String, Vec<Value>)> {
    match reply {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|s| match s {
                Value::Array(kv) => kv.into_iter().nth(1).map(entries).unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.into_iter().flat_map(|(_, v)| entries(v)).collect(),
        _ => Vec::new(),
    }
}

fn bulk_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Hands one entry to the caller; one that is not ours goes as a rejected
/// delivery (what could be salvaged of it), which the consumer runtime
/// dead-letters through its observed settlement.
async fn deliver(
    shared: &Arc<Shared>,
    entry_id: String,
    fields: Vec<Value>,
    attempt: u32,
    slot: Slot,
) {
    let (message, foreign) = headers::read_fields_in(&shared.layout, &entry_id, fields);
    if let Some(foreign) = &foreign {
        warn!(topic = %shared.topic, group = ?shared.group, %foreign, "a stream entry that is not a Tidings message; dead-lettering it");
    }
    let (origin, position) = match shared.group {
        Some(_) => (Origin::Group { entry_id }, None),
        // A private stream read: the entry id is the position, nothing to settle.
        None => (Origin::Local, Some(Receipt::EntryId(entry_id))),
    };
    let mut d = RedisAcker::delivery(shared, origin, message, attempt, slot);
    if let Some(position) = position {
        d = d.with_position(position);
    }
    if let Some(foreign) = foreign {
        d = d.rejected(foreign);
    }
    shared.send(d);
}

/// Reads a stream for one subscription until it is closed: `XREADGROUP`
/// (and reclaims with `XAUTOCLAIM`) for a group, `XREAD` after `position`
/// for a private subscription.
async fn read_loop(shared: Arc<Shared>, mut conn: Conn, mut position: Option<String>) {
    let config = shared.config.clone();
    let reclaim_every = config.effective_reclaim_interval();
    let mut last_reclaim: Option<Instant> = None;
    let mut cursor = "0-0".to_owned();
    let mut backoff = Duration::from_millis(20);
    let mut failing = false;
    loop {
        let Some(first) = shared.slot().await else {
            break;
        };
        let mut slots = gather(&shared, first).await;
        let result = match &mut position {
            None => {
                let due = last_reclaim.is_none_or(|t| t.elapsed() >= reclaim_every);
                let reclaimed = if due {
                    match reclaim(&shared, &mut conn, &mut cursor, &mut slots).await {
                        Ok(done) => {
                            if done {
                                last_reclaim = Some(Instant::now());
                            }
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    Ok(())
                };
                match reclaimed {
                    Ok(()) if slots.is_empty() => Ok(()),
                    Ok(()) => read_group(&shared, &mut conn, &mut slots).await,
                    Err(e) => Err(e),
                }
            }
            Some(last_id) => read_private(&shared, &mut conn, last_id, &mut slots).await,
        };
        drop(slots);
        match result {
            Ok(()) => {
                if failing {
                    debug!(topic = %shared.topic, "subscription recovered");
                }
                failing = false;
                backoff = Duration::from_millis(20);
            }
            Err(e) if e.code() == Some("NOGROUP") => {
                // The stream or group vanished (a restarted server without
                // persistence, a deleted key): create it again from the start.
                let group = shared.group_name().to_owned();
                if let Err(error) = create_group(&mut conn, &shared.topic, &group, "0").await {
                    warn!(%error, topic = %shared.topic, "recreating the consumer group failed");
                    if !shared.sleep(backoff).await {
                        break;
                    }
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, topic = %shared.topic, "reading the stream failed; retrying with backoff");
                    shared.report(broker_error(e));
                }
                failing = true;
                if !shared.sleep(backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(config.max_backoff);
            }
        }
        if shared.is_closed() {
            break;
        }
    }
}

/// The free in-flight slots for one read. Under load slots come back one by
/// one; rather than reading one entry per round trip, wait up to
/// [`GATHER`] for a quarter of the prefetch to be free.
async fn gather(shared: &Shared, first: Slot) -> Vec<Slot> {
    let mut slots = vec![first];
    let target = (shared.prefetch / 4).clamp(1, MAX_BATCH);
    let until = tokio::time::Instant::now() + GATHER;
    loop {
        while slots.len() < MAX_BATCH {
            match shared.in_flight.try_take() {
                Some(slot) => slots.push(slot),
                None => break,
            }
        }
        if slots.len() >= target {
            return slots;
        }
        match tokio::time::timeout_at(until, shared.in_flight.take()).await {
            Ok(Some(slot)) => slots.push(slot),
            _ => return slots,
        }
    }
}

async fn read_group(
    shared: &Arc<Shared>,
    conn: &mut Conn,
    slots: &mut Vec<Slot>,
) -> RedisResult<()> {
    let block = shared
        .config
        .block
        .min(shared.config.effective_reclaim_interval());
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(shared.group_name())
        .arg(&shared.consumer)
        .arg("COUNT")
        .arg(slots.len())
        .arg("BLOCK")
        .arg(Shared::millis(block).max(1))
        .arg("STREAMS")
        .arg(&*shared.topic)
        .arg(">")
        .query_async(conn)
        .await?;
    for (id, fields) in read_reply(reply) {
        if shared.is_closed() {
            // Read after close: not handed out, so not an attempt.
            shared.release(&id, 0).await;
            continue;
        }
        match slots.pop() {
            Some(slot) => deliver(shared, id, fields, 1, slot).await,
            None => shared.release(&id, 0).await,
        }
    }
    Ok(())
}

/// `XAUTOCLAIM` entries idle for the visibility timeout; returns whether
/// the scan of the pending list is complete.
async fn reclaim(
    shared: &Arc<Shared>,
    conn: &mut Conn,
    cursor: &mut String,
    slots: &mut Vec<Slot>,
) -> RedisResult<bool> {
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(&*shared.topic)
        .arg(shared.group_name())
        .arg(&shared.consumer)
        .arg(Shared::millis(shared.config.visibility_timeout))
        .arg(&*cursor)
        .arg("COUNT")
        .arg(slots.len())
        .query_async(conn)
        .await?;
    let Value::Array(mut parts) = reply else {
        return Ok(true);
    };
    if parts.len() < 2 {
        return Ok(true);
    }
    let claimed = entries(parts.swap_remove(1));
    let next = bulk_string(&parts[0]).unwrap_or_else(|| "0-0".to_owned());
    let done = next == "0-0";
    *cursor = next;
    if claimed.is_empty() {
        return Ok(done);
    }
    // The attempt is the entry's delivery count.
    let mut pipe = redis::pipe();
    for (id, _) in &claimed {
        pipe.cmd("XPENDING")
            .arg(&*shared.topic)
            .arg(shared.group_name())
            .arg(id)
            .arg(id)
            .arg(1)
            .arg(&shared.consumer);
    }
    let counts: Vec<Value> = pipe.query_async(conn).await?;
    for ((id, fields), count) in claimed.into_iter().zip(counts) {
        let attempt = delivery_count(count).unwrap_or(2);
        debug!(topic = %shared.topic, entry_id = %id, attempt, "reclaimed an idle pending entry");
        match slots.pop() {
            Some(slot) => deliver(shared, id, fields, attempt, slot).await,
            None => shared.release(&id, attempt.saturating_sub(1)).await,
        }
    }
    Ok(done)
}

/// The delivery count from an `XPENDING key group id id 1 consumer` reply.
fn delivery_count(reply: Value) -> Option<u32> {
    let Value::Array(rows) = reply else {
        return None;
    };
    let Some(Value::Array(row)) = rows.into_iter().next() else {
        return None;
    };
    match row.get(3)? {
        Value::Int(n) => u32::try_from(*n).ok(),
        _ => None,
    }
}

async fn read_private(
    shared: &Arc<Shared>,
    conn: &mut Conn,
    last_id: &mut String,
    slots: &mut Vec<Slot>,
) -> RedisResult<()> {
    let reply: Value = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(slots.len())
        .arg("BLOCK")
        .arg(Shared::millis(shared.config.block).max(1))
        .arg("STREAMS")
        .arg(&*shared.topic)
        .arg(&*last_id)
        .query_async(conn)
        .await?;
    for (id, fields) in read_reply(reply) {
        let Some(slot) = slots.pop() else { break };
        last_id.clone_from(&id);
        if shared.is_closed() {
            break;
        }
        deliver(shared, id, fields, 1, slot).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ids() {
        assert_eq!(start_id(StartFrom::Latest, "$"), "$");
        assert_eq!(start_id(StartFrom::Earliest, "$"), "0-0");
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(
            start_id(StartFrom::Time(t), "$"),
            format!("1700000000122-{}", u64::MAX)
        );
    }

    #[test]
    fn replies_parse_in_resp2_and_resp3_shapes() {
        let entry = |id: &str| {
            Value::Array(vec![
                Value::BulkString(id.as_bytes().to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"payload".to_vec()),
                    Value::BulkString(b"x".to_vec()),
                ]),
            ])
        };
        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"s".to_vec()),
            Value::Array(vec![entry("1-0"), entry("2-0")]),
        ])]);
        let ids: Vec<_> = read_reply(resp2).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["1-0", "2-0"]);
        let resp3 = Value::Map(vec![(
            Value::BulkString(b"s".to_vec()),
            Value::Array(vec![entry("3-0"), Value::Nil]),
        )]);
        let ids: Vec<_> = read_reply(resp3).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["3-0"]);
        assert!(read_reply(Value::Nil).is_empty());
        let pending = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"1-0".to_vec()),
            Value::BulkString(b"c".to_vec()),
            Value::Int(5),
            Value::Int(3),
        ])]);
        assert_eq!(delivery_count(pending), Some(3));
    }
}
