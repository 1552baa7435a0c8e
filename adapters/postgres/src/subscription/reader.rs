//! The task behind one subscription: it reads the store past the
//! checkpoint, hands events out within the prefetch, and moves the
//! checkpoint over the settled prefix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::PgListener;
use tidings_core::{Delivery, Message, Result};
use tokio::sync::{mpsc, watch};

use crate::event_store::{EventStore, RecordedEvent};
use crate::position::GlobalPosition;

use super::stream::StoreAcker;
use super::{
    ALL, CHANNEL, MEMBER_LOCKS, Put, STREAM_HEADER, VERSION_HEADER, db, position, put_checkpoint,
};

/// How often a moving checkpoint is saved.
pub(super) const SAVE_EVERY: Duration = Duration::from_millis(100);

/// How long a stopping reader waits for the deliveries it handed out.
pub(super) const DRAIN: Duration = Duration::from_secs(8);

/// What woke the reader.
pub(super) enum Wake {
    Stop,
    Settled(Settle),
    /// A notification (`false`: the listener failed).
    Notified(bool),
    Poll,
}

/// What ackers tell the reader.
pub(super) enum Settle {
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
pub(super) struct Reader {
    pub(super) store: EventStore,
    pub(super) poll_interval: Duration,
    pub(super) topic: Arc<str>,
    pub(super) group: Option<Arc<str>>,
    pub(super) dead_letters: String,
    pub(super) prefetch: usize,
    pub(super) tx: mpsc::Sender<Result<Delivery>>,
    pub(super) settle_tx: mpsc::UnboundedSender<Settle>,
    pub(super) stop: watch::Receiver<bool>,
}

impl Reader {
    pub(super) async fn run(
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
pub(super) enum Held {
    /// With a handler.
    Out,
    /// Settled: the checkpoint may pass it.
    Done,
    /// Handed back while stopping: the checkpoint stops before it, and the
    /// drain does not wait for it.
    Abandoned,
}

/// Moves the checkpoint over the settled prefix; whether it moved.
pub(super) fn advance(
    checkpoint: &mut GlobalPosition,
    pending: &mut BTreeMap<GlobalPosition, Held>,
) -> bool {
    let before = *checkpoint;
    while let Some((&at, Held::Done)) = pending.first_key_value() {
        pending.remove(&at);
        *checkpoint = at;
    }
    *checkpoint != before
}

pub(super) async fn recv(
    listener: &mut Option<PgListener>,
) -> std::result::Result<(), sqlx::Error> {
    match listener {
        Some(l) => l.recv().await.map(|_| ()),
        None => std::future::pending().await,
    }
}
