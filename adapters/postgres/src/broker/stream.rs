//! A subscription: a reader task that claims rows of the group's queue
//! within the in-flight bound, a heartbeat that keeps the claims of running
//! handlers, and the acker that settles one row.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::Row;
use sqlx::postgres::PgRow;
use tidings_core::delivery::header;
use tidings_core::in_flight::{InFlight, Slot};
use tidings_core::{
    Acker, DeadLetter, Delivery, DeliveryStream, Message, Result, StartFrom, Subscription,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::warn;

use super::{DEAD_LETTER_GROUP, Inner, broker_error, declare, write};
use crate::row;

/// The rows this subscription claimed and has not settled, with their claim
/// tokens: their claims are extended while their handlers run.
type Held = Arc<Mutex<HashMap<i64, i64>>>;

fn lock(held: &Held) -> std::sync::MutexGuard<'_, HashMap<i64, i64>> {
    // Every operation is one insert or remove: a poisoned set is consistent.
    held.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where one subscription reads.
struct Queue {
    inner: Arc<Inner>,
    topic: Arc<str>,
    group: Arc<str>,
    /// The group as deliveries report it; `None` for a private subscription.
    reported: Option<Arc<str>>,
}

pub(super) async fn subscribe(
    inner: Arc<Inner>,
    subscription: Subscription,
) -> Result<Box<dyn DeliveryStream>> {
    let private = subscription.group.is_none();
    let group = subscription
        .group
        .clone()
        .unwrap_or_else(|| format!("$private-{}", tidings_core::message::new_id()));
    let start = if private && subscription.start == StartFrom::Latest {
        StartFrom::Latest
    } else {
        subscription.start
    };
    declare(&inner, &subscription.topic, &group, start).await?;
    let queue = Arc::new(Queue {
        inner,
        topic: subscription.topic.as_str().into(),
        group: group.as_str().into(),
        reported: subscription.group.as_deref().map(Into::into),
    });
    let held: Held = Arc::default();
    let in_flight = InFlight::new(subscription.prefetch);
    let (deliveries, rx) = mpsc::channel(subscription.prefetch.max(1));
    let (stop, stopped) = watch::channel(false);
    let reader = tokio::spawn(read(
        queue.clone(),
        held.clone(),
        in_flight,
        deliveries,
        stopped.clone(),
    ));
    tokio::spawn(heartbeat(queue.clone(), Arc::downgrade(&held)));
    Ok(Box::new(PgStream {
        rx,
        stop,
        reader: Some(reader),
        private: private.then_some(queue),
    }))
}

/// Claims up to `n` visible rows, oldest first, skipping rows other members
/// hold, and returns them with their messages.
async fn claim(queue: &Queue, n: usize) -> std::result::Result<Vec<PgRow>, sqlx::Error> {
    sqlx::query(&format!(
        "WITH c AS (
             SELECT id FROM tidings_queue
             WHERE topic = $1 AND group_name = $2 AND visible_at <= clock_timestamp()
             ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED),
         u AS (
             UPDATE tidings_queue q SET visible_at = clock_timestamp() + make_interval(secs => $4),
                 -- Still claimed: its member died holding it. That counts
                 -- as an attempt, so a message that kills its handler's
                 -- process is dead-lettered in the end, not retried forever.
                 attempt = q.attempt + CASE WHEN q.claimed THEN 1 ELSE 0 END,
                 claimed = true,
                 -- Each claim a token of its own: a member whose claim
                 -- lapsed and was taken over settles nothing of the new one.
                 claim = q.claim + 1
             FROM c WHERE q.id = c.id
             RETURNING q.id, q.claim, q.position, q.attempt, q.first_failure)
         SELECT u.id, u.claim, u.attempt, u.first_failure, {cols}
         FROM u JOIN tidings_messages m ON m.position = u.position
         ORDER BY u.id",
        cols = row::COLUMNS
    ))
    .bind(&*queue.topic)
    .bind(&*queue.group)
    .bind(n as i64)
    .bind(queue.inner.config.visibility.as_secs_f64())
    .fetch_all(&queue.inner.pool)
    .await
}

/// How long until the next row of the group becomes visible, if any.
async fn next_due(queue: &Queue) -> Option<Duration> {
    let secs: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(visible_at) - clock_timestamp())::float8
         FROM tidings_queue WHERE topic = $1 AND group_name = $2",
    )
    .bind(&*queue.topic)
    .bind(&*queue.group)
    .fetch_one(&queue.inner.pool)
    .await
    .ok()
    .flatten();
    secs.map(|s| Duration::from_secs_f64(s.max(0.0)))
}

async fn read(
    queue: Arc<Queue>,
    held: Held,
    in_flight: InFlight,
    deliveries: mpsc::Sender<Result<Delivery>>,
    mut stop: watch::Receiver<bool>,
) {
    let config = &queue.inner.config;
    let wake = queue.inner.wakeups.of(&queue.topic);
    let mut failures = 0u32;
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            slot = in_flight.take() => match slot {
                Some(slot) => slot,
                None => return,
            },
        };
        let mut slots = vec![first];
        while slots.len() < config.claim_batch {
            match in_flight.try_take() {
                Some(slot) => slots.push(slot),
                None => break,
            }
        }
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match claim(&queue, slots.len()).await {
            Ok(rows) if rows.is_empty() => {
                drop(slots);
                failures = 0;
                let wait = next_due(&queue)
                    .await
                    .map_or(config.poll, |due| due.min(config.poll));
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = notified => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Ok(rows) => {
                failures = 0;
                let mut rows = rows.into_iter().zip(slots);
                while let Some((row, slot)) = rows.next() {
                    let delivery = match delivery(&queue, &held, &row, slot) {
                        Ok(delivery) => Ok(delivery),
                        Err(error) => Err(broker_error(error)),
                    };
                    if deliveries.send(delivery).await.is_err() {
                        // Closed: what was claimed and not handed out goes
                        // back at once (the refused one's acker does it).
                        let rest: Vec<i64> = rows
                            .filter_map(|(r, _)| r.try_get::<i64, _>("id").ok())
                            .collect();
                        let _ = sqlx::query(
                            "UPDATE tidings_queue SET visible_at = clock_timestamp(), claimed = false
                             WHERE id = ANY($1)",
                        )
                        .bind(&rest)
                        .execute(&queue.inner.pool)
                        .await;
                        return;
                    }
                }
            }
            Err(error) => {
                drop(slots);
                failures = failures.saturating_add(1);
                warn!(%error, topic = &*queue.topic, "postgres broker: claiming failed; retrying");
                let backoff = Duration::from_millis(100 * u64::from(failures.min(20)));
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}

fn delivery(
    queue: &Arc<Queue>,
    held: &Held,
    row: &PgRow,
    slot: Slot,
) -> std::result::Result<Delivery, crate::StoreError> {
    let id: i64 = row.try_get("id")?;
    let claim: i64 = row.try_get("claim")?;
    let attempt: i32 = row.try_get("attempt")?;
    let first_failure: Option<String> = row.try_get("first_failure")?;
    let mut message = row::message(row)?;
    if let Some(at) = first_failure {
        message.headers.insert(header::FIRST_FAILURE.to_owned(), at);
    }
    let message = Arc::new(message);
    lock(held).insert(id, claim);
    let acker = PgAcker {
        queue: queue.clone(),
        held: held.clone(),
        id,
        claim,
        message: message.clone(),
        settled: false,
        _slot: slot,
    };
    Ok(Delivery::new(
        message,
        queue.topic.clone(),
        queue.reported.clone(),
        attempt.max(1) as u32,
        Box::new(acker),
    )
    .with_position(tidings_core::Receipt::Sequence {
        stream: queue.inner.identity.clone(),
        sequence: id as u64,
        duplicate: false,
    }))
}

/// Extends the claims of held rows every third of the visibility timeout,
/// and cleans the log now and then; ends once the subscription and all its
/// deliveries are gone.
async fn heartbeat(queue: Arc<Queue>, held: Weak<Mutex<HashMap<i64, i64>>>) {
    let every = queue.inner.config.visibility / 3;
    let mut rounds = 0u64;
    loop {
        tokio::time::sleep(every).await;
        let Some(held) = held.upgrade() else { return };
        let (ids, claims): (Vec<i64>, Vec<i64>) = lock(&held).iter().map(|(i, c)| (*i, *c)).unzip();
        drop(held);
        // Rows locked elsewhere (an inbox transaction deleting one) are
        // skipped rather than waited for; their claims are settled soon.
        if !ids.is_empty()
            && let Err(error) = sqlx::query(
                "UPDATE tidings_queue q
                 SET visible_at = clock_timestamp() + make_interval(secs => $3)
                 FROM (SELECT t.id FROM tidings_queue t
                       JOIN unnest($1::int8[], $2::int8[]) AS h(id, claim)
                         ON t.id = h.id AND t.claim = h.claim
                       FOR UPDATE OF t SKIP LOCKED) mine
                 WHERE q.id = mine.id",
            )
            .bind(&ids)
            .bind(&claims)
            .bind(queue.inner.config.visibility.as_secs_f64())
            .execute(&queue.inner.pool)
            .await
        {
            warn!(%error, "postgres broker: extending claims failed");
        }
        rounds += 1;
        if rounds.is_multiple_of(60) {
            let _ = super::clean_up(&queue.inner).await;
        }
    }
}

struct PgStream {
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: watch::Sender<bool>,
    reader: Option<JoinHandle<()>>,
    /// A private subscription's queue, removed when it closes.
    private: Option<Arc<Queue>>,
}

impl futures::Stream for PgStream {
    type Item = Result<Delivery>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl DeliveryStream for PgStream {
    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        self.stop.send_replace(true);
        // Claimed but not handed out: back to the group now, awaited, so a
        // process that exits after its shutdown leaves nothing claimed.
        self.rx.close();
        let mut waiting = Vec::new();
        while let Ok(delivery) = self.rx.try_recv() {
            waiting.extend(delivery.ok());
        }
        let private = self.private.take();
        Box::pin(async move {
            for mut delivery in waiting {
                let _ = delivery.release().await;
            }
            if let Some(queue) = private {
                remove(&queue).await?;
            }
            Ok(())
        })
    }

    fn closed(&mut self) -> BoxFuture<'_, ()> {
        let reader = self.reader.take();
        Box::pin(async move {
            if let Some(reader) = reader {
                let _ = reader.await;
            }
        })
    }
}

impl Drop for PgStream {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let (Some(queue), Ok(runtime)) =
            (self.private.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                let _ = remove(&queue).await;
            });
        }
    }
}

/// Removes a private subscription's group and its rows.
async fn remove(queue: &Queue) -> Result<()> {
    let mut tx = queue.inner.pool.begin().await.map_err(broker_error)?;
    for statement in [
        "DELETE FROM tidings_groups WHERE topic = $1 AND group_name = $2",
        "DELETE FROM tidings_queue WHERE topic = $1 AND group_name = $2",
    ] {
        sqlx::query(statement)
            .bind(&*queue.topic)
            .bind(&*queue.group)
            .execute(&mut *tx)
            .await
            .map_err(broker_error)?;
    }
    tx.commit().await.map_err(broker_error)
}

/// Removes a settled row (`$1` the row, `$2` its claim).
const DELETE: &str = "DELETE FROM tidings_queue WHERE id = $1 AND claim = $2";

/// Hands a claimed row back unhandled: visible at once, no attempt counted.
const RELEASE: &str = "UPDATE tidings_queue SET visible_at = clock_timestamp(), claimed = false
     WHERE id = $1 AND claim = $2";

/// Settles one claimed row. Dropped unsettled, it makes the row visible
/// again at once (no attempt counted).
struct PgAcker {
    queue: Arc<Queue>,
    held: Held,
    id: i64,
    /// This claim's token: settling matches it, so a claim that lapsed and
    /// was taken over by another member is left alone.
    claim: i64,
    message: Arc<Message>,
    settled: bool,
    _slot: Slot,
}

impl PgAcker {
    fn settle_error(&self, error: impl Into<tidings_core::BoxError>) -> tidings_core::Error {
        tidings_core::Error::Settle {
            id: self.message.id.clone(),
            source: error.into(),
        }
    }

    /// `sql` bound to this claim: `$1` the row, `$2` the claim token.
    fn on_row<'q>(
        &self,
        sql: &'q str,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(sql).bind(self.id).bind(self.claim)
    }

    /// The settlement's outcome: settled (the row no longer held here) or
    /// the error, after which the row comes back when the claim lapses.
    fn finish<T>(&mut self, done: std::result::Result<T, sqlx::Error>) -> Result<()> {
        done.map_err(|e| self.settle_error(e))?;
        self.settled = true;
        lock(&self.held).remove(&self.id);
        Ok(())
    }
}

#[async_trait]
impl Acker for PgAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        let done = self.on_row(DELETE).execute(&self.queue.inner.pool).await;
        self.finish(done)
    }

    async fn nack(mut self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let done = self
            .on_row(
                "UPDATE tidings_queue SET attempt = attempt + 1, claimed = false,
                     visible_at = clock_timestamp() + make_interval(secs => $3),
                     first_failure = coalesce(first_failure, $4)
                 WHERE id = $1 AND claim = $2",
            )
            .bind(delay.unwrap_or_default().as_secs_f64())
            .bind(tidings_core::time::now_rfc3339())
            .execute(&self.queue.inner.pool)
            .await;
        self.finish(done)
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<()> {
        let group = letter.group.as_deref().unwrap_or(&self.queue.group);
        let dlq = format!("{}.{group}.dlq", self.queue.topic);
        let letter = letter.letter_for(&self.message);
        let done = async {
            let mut tx = self.queue.inner.pool.begin().await?;
            // Letters are kept even before anyone reads them.
            sqlx::query(
                "INSERT INTO tidings_groups (topic, group_name) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
            )
            .bind(&dlq)
            .bind(DEAD_LETTER_GROUP)
            .execute(&mut *tx)
            .await?;
            write(&mut *tx, &dlq, std::slice::from_ref(&letter)).await?;
            let deleted = self.on_row(DELETE).execute(&mut *tx).await?;
            tx.commit().await.map(|()| deleted)
        }
        .await;
        self.finish(done)
    }

    async fn release(mut self: Box<Self>) -> Result<()> {
        let done = self.on_row(RELEASE).execute(&self.queue.inner.pool).await;
        self.finish(done)
    }
}

impl Drop for PgAcker {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        lock(&self.held).remove(&self.id);
        let (queue, id, claim) = (self.queue.clone(), self.id, self.claim);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = sqlx::query(RELEASE)
                    .bind(id)
                    .bind(claim)
                    .execute(&queue.inner.pool)
                    .await;
            });
        }
    }
}
