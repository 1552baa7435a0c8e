//! The store's events as a Tidings [`Subscriber`] ([`EventStoreSubscriber`]).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use futures::future::BoxFuture;
use sqlx::Connection;
use sqlx::postgres::PgListener;
use tidings_core::{
    Acker, Capabilities, DeadLetter, Delivery, DeliveryStream, Error, Message, Result, StartFrom,
    Subscriber, Subscription,
};
use tokio::sync::{mpsc, watch};

use crate::event_store::{EventStore, ExpectedVersion, RecordedEvent};
use crate::position::GlobalPosition;
use crate::row::micros;

/// The topic of every event of the store (but the store's own, such as
/// dead letters: their categories start with `$`).
pub const ALL: &str = "$all";

/// The first character of the store's own categories.
pub(crate) const RESERVED: char = '$';

/// A header on every delivered event: its stream (not stored; added when
/// the event is handed out).
pub const STREAM_HEADER: &str = "tidings-stream";

/// A header on every delivered event: its version in its stream.
pub const VERSION_HEADER: &str = "tidings-stream-version";

/// The channel appends notify on.
pub(crate) const CHANNEL: &str = "tidings_events";

/// The namespace of group membership locks (the first key of the two-key
/// advisory lock form).
const MEMBER_LOCKS: i32 = 0x7464_6d62; // "tdmb"

/// Subscriptions to an [`EventStore`]'s events as a Tidings [`Subscriber`]:
/// a projection is an ordinary consumer — the same runtime, retries, dead
/// letters, idempotency and telemetry as on a broker.
///
/// - **Topics** are categories (`account` reads every `account-*` stream)
///   or [`ALL`] for every event, read in [`GlobalPosition`] order with the
///   store's never-skip guarantee.
/// - **Groups** keep their checkpoint in `tidings_checkpoints`: the
///   position before which every event was settled. It advances over a
///   contiguous settled prefix only, so an event still being handled (or
///   waiting for a retry) is never passed. It is saved at most every
///   100 ms while it moves and once more when the subscription stops; after
///   a crash the group resumes from the last save (events settled after it
///   are delivered again: at least once, as on every broker).
/// - **Members** of a group take turns rather than share: one holds the
///   group's advisory lock and reads, the others wait as hot standbys and
///   take over from the checkpoint within a poll interval of the lock's
///   release (its connection closing, whether cleanly or by a crash). A
///   projection's events stay in order; the price is one reader per group.
/// - **Wake-up** by `LISTEN`/`NOTIFY`, with a poll every `poll_interval` as
///   the fallback: an append in its own transaction is notified by its
///   store right after the commit (one `NOTIFY` for however many committed
///   meanwhile; a process that dies in between leaves it to the poll), an
///   append in a caller's transaction at that transaction's commit.
/// - **Nack** hands the event out again (after the delay) with the attempt
///   one higher, from the subscriber's memory; the checkpoint waits for it.
/// - **Dead letters** are appended to the store, in the category
///   [`dead_letter_topic`](Subscriber::dead_letter_topic) names
///   (`$dlq_<topic>_<group>_dlq`, one stream per letter), where
///   `read_category` and the dead-letter inbox read them; `$`-categories
///   are the store's own and not part of [`ALL`].
/// - Each delivered event carries its stream and version as the headers
///   [`STREAM_HEADER`] and [`VERSION_HEADER`].
#[derive(Clone, Debug)]
pub struct EventStoreSubscriber {
    store: EventStore,
    poll_interval: Duration,
}

impl EventStoreSubscriber {
    /// Subscriptions to `store`, polling every 500 ms besides `NOTIFY`.
    pub fn new(store: EventStore) -> Self {
        EventStoreSubscriber {
            store,
            poll_interval: Duration::from_millis(500),
        }
    }

    /// How often members look for events when no notification came, and
    /// standbys try to take over.
    #[must_use]
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every.max(Duration::from_millis(10));
        self
    }

    /// The group's checkpoint on `topic`: every event up to it was settled.
    /// `None` for a group that never subscribed.
    pub async fn checkpoint(&self, topic: &str, group: &str) -> Result<Option<GlobalPosition>> {
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT transaction_id::text, sequence FROM tidings_checkpoints \
             WHERE topic = $1 AND group_name = $2",
        )
        .bind(topic)
        .bind(group)
        .fetch_optional(self.store.pool())
        .await
        .map_err(db)?;
        Ok(row.map(|(t, s)| position(&t, s)))
    }

    /// Moves the group's checkpoint, to reprocess from an earlier position
    /// (a rebuilt read model: [`GlobalPosition::START`]) or to skip ahead.
    /// Takes effect when the group's reader next starts.
    pub async fn set_checkpoint(&self, topic: &str, group: &str, at: GlobalPosition) -> Result<()> {
        put_checkpoint(self.store.pool(), topic, group, at, Put::Replace).await
    }

    /// Where a new reader starts: the start, the end of what is settled
    /// now, or the last settled event before a time.
    async fn start_position(&self, topic: &str, start: StartFrom) -> Result<GlobalPosition> {
        let before = match start {
            StartFrom::Earliest => return Ok(GlobalPosition::START),
            StartFrom::Latest => i64::MAX,
            StartFrom::Time(t) => micros(t),
        };
        let row: Option<(String, i64)> = sqlx::query_as(
            // Ordered by the xid8 column, not by its text (an output
            // column named like it would win in ORDER BY).
            "SELECT e.transaction_id::text AS transaction_text, e.sequence FROM tidings_events e \
             WHERE ($1 = '$all' OR e.category = $1) AND coalesce(e.time_us, 0) < $2 \
             AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY e.transaction_id DESC, e.sequence DESC LIMIT 1",
        )
        .bind(topic)
        .bind(before)
        .fetch_optional(self.store.pool())
        .await
        .map_err(db)?;
        Ok(row.map_or(GlobalPosition::START, |(t, s)| position(&t, s)))
    }
}

impl EventStore {
    /// Subscriptions to this store's events.
    pub fn subscriber(&self) -> EventStoreSubscriber {
        EventStoreSubscriber::new(self.clone())
    }
}

#[async_trait]
impl Subscriber for EventStoreSubscriber {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn capabilities(&self) -> Capabilities {
        // Events are not held back per key: a group's single reader hands
        // them out in order, and `concurrency(1)` handles them in order.
        Capabilities {
            order_per_key: false,
            ..Capabilities::at_least_once()
        }
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        subscription.check(self.name(), self.capabilities())?;
        let topic = subscription.topic.clone();
        let start = match &subscription.group {
            Some(group) => {
                self.declare_at(&topic, group, subscription.start).await?;
                None
            }
            None => Some(self.start_position(&topic, subscription.start).await?),
        };
        let (tx, rx) = mpsc::channel(subscription.prefetch.max(1));
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let reader = Reader {
            store: self.store.clone(),
            poll_interval: self.poll_interval,
            topic: topic.clone().into(),
            group: subscription.group.clone().map(Into::into),
            dead_letters: self
                .dead_letter_topic(&topic, subscription.group.as_deref().unwrap_or("")),
            prefetch: subscription.prefetch.max(1),
            tx,
            settle_tx,
            stop: stop_rx,
        };
        let task = tokio::spawn(reader.run(start, settle_rx));
        Ok(Box::new(StoreStream {
            rx,
            stop: stop_tx,
            task: Some(task),
        }))
    }

    async fn declare_group(&self, topic: &str, group: &str) -> Result<()> {
        self.declare_at(topic, group, StartFrom::Latest).await
    }

    fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        let base = if group.is_empty() {
            format!("{topic}_dlq")
        } else {
            format!("{topic}_{group}_dlq")
        };
        // A category ends at the first `-` of a stream id; categories that
        // start with `$` are the store's own, left out of `$all`.
        format!("{RESERVED}dlq_{}", base.replace(['-', '$'], "_"))
    }
}

impl EventStoreSubscriber {
    /// Creates the group's checkpoint where it has none.
    async fn declare_at(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        if self.checkpoint(topic, group).await?.is_some() {
            return Ok(());
        }
        let at = self.start_position(topic, start).await?;
        put_checkpoint(self.store.pool(), topic, group, at, Put::IfMissing).await
    }
}

/// Whether [`put_checkpoint`] replaces a checkpoint that exists.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Put {
    Replace,
    IfMissing,
}

/// Writes the group's checkpoint.
async fn put_checkpoint<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    topic: &str,
    group: &str,
    at: GlobalPosition,
    put: Put,
) -> Result<()> {
    let on_conflict = match put {
        Put::Replace => {
            "DO UPDATE SET transaction_id = EXCLUDED.transaction_id, sequence = EXCLUDED.sequence"
        }
        Put::IfMissing => "DO NOTHING",
    };
    sqlx::query(&format!(
        "INSERT INTO tidings_checkpoints (topic, group_name, transaction_id, sequence) \
         VALUES ($1, $2, $3::text::xid8, $4) ON CONFLICT (topic, group_name) {on_conflict}"
    ))
    .bind(topic)
    .bind(group)
    .bind(at.transaction.to_string())
    .bind(at.sequence as i64)
    .execute(executor)
    .await
    .map_err(db)?;
    Ok(())
}

/// How often a moving checkpoint is saved.
const SAVE_EVERY: Duration = Duration::from_millis(100);

/// How long a stopping reader waits for the deliveries it handed out.
const DRAIN: Duration = Duration::from_secs(8);

/// What woke the reader.
enum Wake {
    Stop,
    Settled(Settle),
    /// A notification (`false`: the listener failed).
    Notified(bool),
    Poll,
}

/// What ackers tell the reader.
enum Settle {
    /// Settled for good (acked, or dead-lettered).
    Done(GlobalPosition),
    /// To be handed out again, after `delay`.
    Again {
        position: GlobalPosition,
        message: Arc<Message>,
        attempt: u32,
        delay: Option<Duration>,
    },
}

/// The task behind one subscription.
struct Reader {
    store: EventStore,
    poll_interval: Duration,
    topic: Arc<str>,
    group: Option<Arc<str>>,
    dead_letters: String,
    prefetch: usize,
    tx: mpsc::Sender<Result<Delivery>>,
    settle_tx: mpsc::UnboundedSender<Settle>,
    stop: watch::Receiver<bool>,
}

impl Reader {
    async fn run(
        mut self,
        start: Option<GlobalPosition>,
        mut settle_rx: mpsc::UnboundedReceiver<Settle>,
    ) {
        // A group reads only while it holds its membership lock, on a
        // connection of its own: closing it (or the process dying) lets a
        // standby take over.
        let mut member = None;
        let mut checkpoint = match (start, &self.group) {
            (Some(start), _) => start,
            (None, Some(group)) => {
                let group = group.clone();
                let Some((conn, at)) = self.take_turn(&group).await else {
                    return;
                };
                member = Some(conn);
                at
            }
            (None, None) => return,
        };
        // Listening only once reading: a standby would leave notifications
        // unread, and the server's queue of them would grow for everyone.
        let mut listener = self.listen().await;
        let mut next_read = checkpoint;
        let (mut saved, mut last_save) = (checkpoint, std::time::Instant::now());
        // Handed out, by how far each got.
        let mut pending: BTreeMap<GlobalPosition, Held> = BTreeMap::new();
        let mut wake = true;
        // Every way out goes through the drain and the last save below.
        'run: loop {
            if *self.stop.borrow() {
                break;
            }
            let free = self.prefetch.saturating_sub(pending.len());
            // Refill in batches, not one event per settlement.
            let refill = free > 0 && (pending.is_empty() || free >= self.prefetch.div_ceil(4));
            if wake && refill {
                wake = false;
                match self.read(next_read, free).await {
                    Ok(events) => {
                        let full = events.len() == free;
                        for event in events {
                            next_read = event.position;
                            pending.insert(event.position, Held::Out);
                            let mut message = event.message;
                            message
                                .headers
                                .insert(STREAM_HEADER.to_owned(), event.stream);
                            message
                                .headers
                                .insert(VERSION_HEADER.to_owned(), event.version.to_string());
                            let delivery = self.delivery(event.position, Arc::new(message), 1);
                            if self.tx.send(Ok(delivery)).await.is_err() {
                                // The stream is closed: this one stays
                                // pending, so the checkpoint stops before it.
                                break 'run;
                            }
                        }
                        // A full batch: more may be there already.
                        wake = full;
                    }
                    Err(e) => {
                        if self.tx.send(Err(e)).await.is_err() {
                            break 'run;
                        }
                    }
                }
            }
            let event = tokio::select! {
                biased;
                _ = self.stop.changed() => Wake::Stop,
                settled = settle_rx.recv() => match settled {
                    Some(settled) => Wake::Settled(settled),
                    None => Wake::Stop,
                },
                notified = recv(&mut listener), if listener.is_some() => Wake::Notified(notified.is_ok()),
                _ = tokio::time::sleep(self.poll_interval) => Wake::Poll,
            };
            match event {
                Wake::Stop => {}
                Wake::Settled(settled) => {
                    self.settle(settled, &mut pending);
                    while let Ok(more) = settle_rx.try_recv() {
                        self.settle(more, &mut pending);
                    }
                    if advance(&mut checkpoint, &mut pending) {
                        wake = true;
                    }
                }
                Wake::Notified(ok) => {
                    if !ok {
                        // The poll is the fallback.
                        listener = None;
                    }
                    wake = true;
                }
                Wake::Poll => wake = true,
            }
            // Saved at most every SAVE_EVERY: a write per event would bound
            // the projection by the database's round trip. A crash repeats
            // at most that much (at least once); a stop saves it all.
            if checkpoint != saved && last_save.elapsed() >= SAVE_EVERY {
                if !self.save(&mut member, checkpoint).await {
                    // The membership is gone (its connection broke): a
                    // standby may be reading already. Stop handing out.
                    return;
                }
                (saved, last_save) = (checkpoint, std::time::Instant::now());
            }
        }
        // Stopped: the handlers still running settle what they hold (the
        // consumer runtime drains them before `closed`); their progress is
        // saved, within a bound. What is not settled by then comes again
        // to the next reader from the checkpoint.
        let deadline = tokio::time::Instant::now() + DRAIN;
        while pending.values().any(|held| *held == Held::Out) {
            match tokio::time::timeout_at(deadline, settle_rx.recv()).await {
                Ok(Some(settled)) => self.settle(settled, &mut pending),
                _ => break,
            }
        }
        advance(&mut checkpoint, &mut pending);
        if checkpoint != saved {
            self.save(&mut member, checkpoint).await;
        }
    }

    /// `LISTEN`s on a connection of the pool, or `None` (the poll is the
    /// fallback), said in the log.
    async fn listen(&self) -> Option<PgListener> {
        let listening = async {
            let mut listener = PgListener::connect_with(self.store.pool()).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match listening.await {
            Ok(listener) => Some(listener),
            Err(error) => {
                tracing::warn!(%error, topic = %self.topic, "LISTEN failed; polling instead");
                None
            }
        }
    }

    /// Waits for the group's membership lock; returns its connection and
    /// the group's checkpoint. `None` when stopped first.
    async fn take_turn(&mut self, group: &str) -> Option<(sqlx::PgConnection, GlobalPosition)> {
        let key = format!("{}/{group}", self.topic);
        loop {
            if *self.stop.borrow() {
                return None;
            }
            let attempt = async {
                let mut conn = self.store.pool().acquire().await?.detach();
                let locked: bool =
                    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
                        .bind(MEMBER_LOCKS)
                        .bind(&key)
                        .fetch_one(&mut conn)
                        .await?;
                if !locked {
                    let _ = conn.close().await;
                    return Ok::<_, sqlx::Error>(None);
                }
                let at: (String, i64) = sqlx::query_as(
                    "SELECT transaction_id::text, sequence FROM tidings_checkpoints \
                     WHERE topic = $1 AND group_name = $2",
                )
                .bind(&*self.topic)
                .bind(group)
                .fetch_one(&mut conn)
                .await?;
                Ok(Some((conn, position(&at.0, at.1))))
            };
            match attempt.await {
                Ok(Some(turn)) => return Some(turn),
                Ok(None) => {}
                Err(e) => {
                    if self.tx.send(Err(db(e))).await.is_err() {
                        return None;
                    }
                }
            }
            tokio::select! {
                _ = self.stop.changed() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
            }
        }
    }

    async fn read(&self, after: GlobalPosition, limit: usize) -> Result<Vec<RecordedEvent>> {
        let read = if &*self.topic == ALL {
            self.store.read_all(after, limit).await
        } else {
            self.store.read_category(&self.topic, after, limit).await
        };
        read.map_err(Into::into)
    }

    fn delivery(&self, position: GlobalPosition, message: Arc<Message>, attempt: u32) -> Delivery {
        let acker = StoreAcker {
            position,
            message: message.clone(),
            attempt,
            settle: self.settle_tx.clone(),
            store: self.store.clone(),
            dead_letters: self.dead_letters.clone(),
            group: self.group.clone(),
            settled: false,
        };
        Delivery::new(
            message,
            self.topic.clone(),
            self.group.clone(),
            attempt,
            Box::new(acker),
        )
    }

    fn settle(&self, settled: Settle, pending: &mut BTreeMap<GlobalPosition, Held>) {
        match settled {
            Settle::Done(at) => {
                if let Some(held) = pending.get_mut(&at) {
                    *held = Held::Done;
                }
            }
            // Stopping: not handed out again, and not waited for; the
            // checkpoint stops before it, so the next reader gets it.
            Settle::Again { position, .. } if *self.stop.borrow() => {
                if let Some(held) = pending.get_mut(&position) {
                    *held = Held::Abandoned;
                }
            }
            Settle::Again {
                position,
                message,
                attempt,
                delay,
            } => {
                let delivery = self.delivery(position, message, attempt);
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    if let Some(delay) = delay {
                        tokio::time::sleep(delay).await;
                    }
                    let _ = tx.send(Ok(delivery)).await;
                });
            }
        }
    }

    /// Saves the checkpoint over the membership connection (a private
    /// subscription has none to save); `false` when that connection is
    /// gone, and with it the group's lock.
    async fn save(&self, member: &mut Option<sqlx::PgConnection>, at: GlobalPosition) -> bool {
        let (Some(group), Some(conn)) = (&self.group, member.as_mut()) else {
            return true;
        };
        match put_checkpoint(&mut *conn, &self.topic, group, at, Put::Replace).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, %group, topic = %self.topic,
                    "saving the checkpoint failed; this member stops reading (the group's lock went with its connection)");
                *member = None;
                false
            }
        }
    }
}

/// How far an event handed out got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// With a handler.
    Out,
    /// Settled: the checkpoint may pass it.
    Done,
    /// Handed back while stopping: the checkpoint stops before it, and the
    /// drain does not wait for it.
    Abandoned,
}

/// Moves the checkpoint over the settled prefix; whether it moved.
fn advance(checkpoint: &mut GlobalPosition, pending: &mut BTreeMap<GlobalPosition, Held>) -> bool {
    let before = *checkpoint;
    while let Some((&at, Held::Done)) = pending.first_key_value() {
        pending.remove(&at);
        *checkpoint = at;
    }
    *checkpoint != before
}

async fn recv(listener: &mut Option<PgListener>) -> std::result::Result<(), sqlx::Error> {
    match listener {
        Some(l) => l.recv().await.map(|_| ()),
        None => std::future::pending().await,
    }
}

/// Settles one event of a subscription.
struct StoreAcker {
    position: GlobalPosition,
    message: Arc<Message>,
    attempt: u32,
    settle: mpsc::UnboundedSender<Settle>,
    store: EventStore,
    dead_letters: String,
    group: Option<Arc<str>>,
    settled: bool,
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
struct StoreStream {
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
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

fn position(transaction: &str, sequence: i64) -> GlobalPosition {
    GlobalPosition {
        transaction: transaction.parse().unwrap_or_default(),
        sequence: sequence.max(0) as u64,
    }
}

fn db(e: sqlx::Error) -> Error {
    crate::StoreError::Database(e).into()
}
