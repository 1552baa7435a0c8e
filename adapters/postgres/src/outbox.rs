//! The transactional outbox: publish from inside the caller's database
//! transaction, relay to any broker afterwards.
//!
//! A service that commits its change and then publishes loses the event if
//! it crashes in between, and publishes a phantom if its transaction rolls
//! back after the publish. [`Outbox::publish_in`] instead writes the message
//! to `tidings_outbox` in the caller's own transaction: it exists exactly
//! when the change does. A [`Relay`] then forwards the table to any Tidings
//! publisher, oldest first, and deletes what the broker accepted.
//!
//! - **At least once**, with the message id kept: a relay that dies between
//!   the broker's receipt and the delete sends the message again after a
//!   restart, with the same id, so broker-side deduplication (JetStream's
//!   `Nats-Msg-Id`) and the idempotency layer recognise it.
//! - **In order**: one relay of a database sends at a time (a session
//!   advisory lock elects it; replicas wait and take over when its session
//!   ends), in the order rows were written, waiting for each batch's
//!   receipts before the next — so messages of one key keep their order.
//!   Rows whose transactions commit late are not skipped: sent rows are
//!   deleted, so a relay never moves past a row it has not sent.
//! - **Prompt**: the insert notifies (`pg_notify`, delivered on commit), so
//!   the relay wakes at once; it also polls, in case a notification is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use sqlx::{Acquire, PgConnection, Postgres, Row, Transaction};
use tidings_core::{Message, Publisher};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::error::StoreError;
use crate::row;

/// The channel the outbox notifies on commit (the payload is the outbox's name).
const CHANNEL: &str = "tidings_outbox";

/// One outbox of a database; see the [module docs](self). Outboxes are
/// named, so that services (or tests) sharing a database each relay their
/// own; most services use [`DEFAULT`].
#[derive(Clone, Debug)]
pub struct Outbox {
    pool: PgPool,
    name: Arc<str>,
}

/// The name of the outbox [`Outbox::connect`] and [`Outbox::with_pool`] use.
pub const DEFAULT: &str = "default";

impl Outbox {
    /// Connects and creates the tables where missing.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::with_pool(PgPool::connect(url).await?).await
    }

    /// Uses an existing pool; creates the tables where missing.
    pub async fn with_pool(pool: PgPool) -> Result<Self, StoreError> {
        Self::named(pool, DEFAULT).await
    }

    /// The outbox `name` of the database behind `pool`.
    pub async fn named(pool: PgPool, name: &str) -> Result<Self, StoreError> {
        crate::schema::create(&pool).await?;
        Ok(Outbox {
            pool,
            name: name.into(),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The advisory lock that elects this outbox's one sending relay.
    fn relay_lock(&self) -> i64 {
        tidings_core::StableHash::default()
            .write(b"tidings-outbox:")
            .write(self.name.as_bytes())
            .finish() as i64
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Writes `message` for `topic` in the caller's transaction `tx`: the
    /// relay sends it once `tx` commits, never if it rolls back.
    pub async fn publish_in(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        topic: &str,
        message: Message,
    ) -> Result<(), StoreError> {
        self.publish_all_in(tx, topic, vec![message]).await
    }

    /// Writes several messages for `topic` in `tx`, in order, in one
    /// statement.
    pub async fn publish_all_in(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        let conn: &mut PgConnection = tx.acquire().await?;
        let columns = row::Columns::of(&messages);
        let sql = format!(
            "INSERT INTO tidings_outbox (outbox, topic, {cols})
             SELECT $13, $1, {cols} FROM {unnest} AS m({cols}, ord)
             ORDER BY ord",
            cols = row::COLUMNS,
            unnest = row::UNNEST,
        );
        let query = sqlx::query(&sql);
        row::bind_columns!(query.bind(topic), columns)
            .bind(&*self.name)
            .execute(&mut *conn)
            .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(&*self.name)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// How many messages wait to be sent, and how long the oldest has.
    pub async fn pending(&self) -> Result<(u64, Option<Duration>), StoreError> {
        let row = sqlx::query(
            "SELECT count(*) AS n,
                    extract(epoch FROM now() - min(created_at))::float8 AS age
             FROM tidings_outbox WHERE outbox = $1",
        )
        .bind(&*self.name)
        .fetch_one(&self.pool)
        .await?;
        let n: i64 = row.try_get("n")?;
        let age: Option<f64> = row.try_get("age")?;
        Ok((n as u64, age.map(|s| Duration::from_secs_f64(s.max(0.0)))))
    }

    /// A relay of this outbox into `publisher`, not yet started.
    pub fn relay(&self, publisher: Arc<dyn Publisher>) -> RelayBuilder {
        RelayBuilder {
            outbox: self.clone(),
            publisher,
            batch: 100,
            poll: Duration::from_secs(1),
        }
    }
}

/// Settings of a [`Relay`].
#[must_use = "a relay does nothing until started"]
pub struct RelayBuilder {
    outbox: Outbox,
    publisher: Arc<dyn Publisher>,
    batch: usize,
    poll: Duration,
}

impl RelayBuilder {
    /// Most rows sent per round (default 100).
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// How often the relay looks without a notification, and how often a
    /// waiting replica tries to become the sender (default 1 s).
    pub fn poll(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    /// Starts relaying in the background.
    pub fn start(self) -> Relay {
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(run(self, stopped, stats.clone()));
        Relay {
            stop,
            task: Some(task),
            stats,
        }
    }
}

/// A running relay; see the [module docs](self).
/// Dropping it stops it (without waiting); [`shutdown`](Relay::shutdown)
/// waits for the round in progress.
pub struct Relay {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    leading: AtomicBool,
    /// Age of the oldest row at the relay's last look, in milliseconds.
    lag_ms: AtomicU64,
}

/// What a relay did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Messages the broker accepted and the relay deleted.
    pub sent: u64,
    /// Whether this relay is the one sending (the others wait).
    pub leading: bool,
    /// How long the oldest unsent message had waited when the relay last
    /// looked: the relay's lag (zero when it found nothing).
    pub lag: Duration,
}

impl Relay {
    /// What it did so far.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            sent: self.stats.sent.load(Ordering::Relaxed),
            leading: self.stats.leading.load(Ordering::Relaxed),
            lag: Duration::from_millis(self.stats.lag_ms.load(Ordering::Relaxed)),
        }
    }

    /// Stops after the round in progress (its deletes done).
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

async fn run(settings: RelayBuilder, mut stop: watch::Receiver<bool>, stats: Arc<Stats>) {
    // One connection for trying the lock and, once elected, for sending:
    // a waiting replica does not open a new one at every try.
    let mut connection = None;
    while !*stop.borrow() {
        match lead(&settings, &mut connection, &mut stop, &stats).await {
            Ok(()) => {}
            Err(error) => {
                warn!(%error, "outbox relay: lost its connection; trying again");
                connection = None;
            }
        }
        stats.leading.store(false, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(settings.poll) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
}

/// Becomes the sender (or returns to wait), then sends until stopped or
/// the connection fails.
async fn lead(
    settings: &RelayBuilder,
    connection: &mut Option<PgConnection>,
    stop: &mut watch::Receiver<bool>,
    stats: &Stats,
) -> Result<(), StoreError> {
    // The lock lives with this connection's session: if the process dies,
    // PostgreSQL ends the session and another relay takes over.
    let outbox = &settings.outbox;
    let leader = match connection {
        Some(connection) => connection,
        None => connection.insert(outbox.pool.acquire().await?.detach()),
    };
    let elected: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(outbox.relay_lock())
        .fetch_one(&mut *leader)
        .await?;
    if !elected {
        return Ok(());
    }
    info!(outbox = %outbox.name, "outbox relay: sending");
    stats.leading.store(true, Ordering::Relaxed);
    let mut listener = PgListener::connect_with(&outbox.pool).await?;
    listener.listen(CHANNEL).await?;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let sent = send_round(settings, leader, stats).await?;
        if sent == settings.batch {
            continue;
        }
        tokio::select! {
            notified = listener.recv() => { notified?; }
            _ = tokio::time::sleep(settings.poll) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// Sends the oldest rows, in order, and deletes those the broker accepted.
/// Returns how many were sent.
async fn send_round(
    settings: &RelayBuilder,
    conn: &mut PgConnection,
    stats: &Stats,
) -> Result<usize, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT position, topic, {cols},
                (extract(epoch FROM clock_timestamp() - created_at) * 1000)::int8 AS age_ms
         FROM tidings_outbox WHERE outbox = $2 ORDER BY position LIMIT $1",
        cols = row::COLUMNS
    ))
    .bind(settings.batch as i64)
    .bind(&*settings.outbox.name)
    .fetch_all(&mut *conn)
    .await?;
    let lag_ms = match rows.first() {
        Some(oldest) => oldest.try_get::<i64, _>("age_ms")?.max(0) as u64,
        None => 0,
    };
    stats.lag_ms.store(lag_ms, Ordering::Relaxed);
    let mut sent = Vec::with_capacity(rows.len());
    // Consecutive rows of one topic go out as one batch, in order; the
    // first refusal ends the round (what follows waits, to keep order).
    let mut i = 0;
    while i < rows.len() {
        let topic: String = rows[i].try_get("topic")?;
        let mut j = i;
        let mut messages = Vec::new();
        let mut positions = Vec::new();
        while j < rows.len() && rows[j].try_get::<String, _>("topic")? == topic {
            messages.push(row::message(&rows[j])?);
            positions.push(rows[j].try_get::<i64, _>("position")?);
            j += 1;
        }
        let results = settings.publisher.publish_batch(&topic, messages).await;
        let accepted = results.iter().take_while(|r| r.is_ok()).count();
        sent.extend_from_slice(&positions[..accepted]);
        if let Some(Err(error)) = results.into_iter().nth(accepted) {
            warn!(%error, topic, "outbox relay: the broker refused a message; retrying after the poll interval");
            delete(conn, &sent).await?;
            stats.sent.fetch_add(sent.len() as u64, Ordering::Relaxed);
            return Ok(0);
        }
        i = j;
    }
    delete(conn, &sent).await?;
    stats.sent.fetch_add(sent.len() as u64, Ordering::Relaxed);
    if !sent.is_empty() {
        debug!(sent = sent.len(), "outbox relay: round sent");
    }
    Ok(sent.len())
}

async fn delete(conn: &mut PgConnection, positions: &[i64]) -> Result<(), StoreError> {
    if positions.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM tidings_outbox WHERE position = ANY($1)")
        .bind(positions)
        .execute(conn)
        .await?;
    Ok(())
}
