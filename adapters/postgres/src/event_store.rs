//! The event store: append with an expected version, read a stream, read
//! everything or a category in global order.

use std::fmt;
use std::time::Duration;

use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tidings_core::Message;

use crate::error::StoreError;
use crate::notifier::Notifier;
use crate::position::GlobalPosition;
use crate::schema;

/// What an append expects of its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Whatever the stream holds (no concurrency check).
    Any,
    /// The stream has no events yet.
    NoStream,
    /// The stream has at least one event.
    StreamExists,
    /// The stream holds exactly this many events (its version).
    Exact(u64),
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("an existing stream"),
            ExpectedVersion::Exact(n) => write!(f, "version {n}"),
        }
    }
}

/// Which way a stream is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the given version up.
    Forward,
    /// From the given version down (`u64::MAX`: from the end).
    Backward,
}

/// What an append wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The version of the first event appended (versions count from 1).
    pub first_version: u64,
    /// The stream's version after the append: what the next append expects.
    pub version: u64,
    /// Whether the events were stored already by an earlier call with the
    /// same event ids (a retry after a lost reply): nothing was written.
    pub already_stored: bool,
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedEvent {
    /// Its stream.
    pub stream: String,
    /// Its version in the stream (1 for the first event).
    pub version: u64,
    /// Where it stands in the store as a whole.
    pub position: GlobalPosition,
    /// The event: id, key, metadata, headers and payload as appended.
    pub message: Message,
}

/// An event store on PostgreSQL; see the [crate docs](crate).
#[derive(Clone, Debug)]
pub struct EventStore {
    pool: PgPool,
    notifier: Notifier,
}

/// The columns every read selects, as [`recorded`] reads them. The
/// transaction id is selected as text under another name: an output
/// column named `transaction_id` would be what `ORDER BY transaction_id`
/// sorts by — as text, where `100` sorts before `99`.
const COLUMNS: &str = "transaction_id::text AS transaction_text, sequence, stream_id, version, \
     event_id, event_type, source, time_us, schema_version, correlation_id, causation_id, \
     content_type, message_key, headers, payload";

/// Only events no transaction in progress can commit behind.
const SETTLED: &str = "transaction_id < pg_snapshot_xmin(pg_current_snapshot())";

impl EventStore {
    /// Connects (a pool of up to 10 connections) and creates the tables
    /// where missing.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        Self::with_pool(pool).await
    }

    /// The store on the caller's pool; creates the tables where missing.
    pub async fn with_pool(pool: PgPool) -> Result<Self, StoreError> {
        schema::create(&pool).await?;
        let notifier = Notifier::start(pool.clone());
        Ok(EventStore { pool, notifier })
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Appends `events` to `stream` if it is at the `expected` version, in
    /// one transaction. Each event's [`Message::id`] is its identity: an
    /// append whose events are all stored already as one earlier append of
    /// this stream writes nothing and answers as that one did
    /// ([`Appended::already_stored`]).
    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<Message>,
    ) -> Result<Appended, StoreError> {
        // One statement: its own transaction, one round trip.
        let appended = crate::append::append(&self.pool, false, stream, expected, &events).await?;
        if !appended.already_stored {
            self.notifier.wake();
        }
        Ok(appended)
    }

    /// As [`append`](Self::append), inside the caller's transaction: the
    /// events are stored if and when that transaction commits, together
    /// with whatever else it wrote. The stream stays locked for other
    /// appends until then, so keep the transaction short.
    ///
    /// Append before the transaction's other writes: PostgreSQL gives a
    /// transaction its id at its first write, and the store orders a
    /// stream's appends by transaction id in global reads. A transaction
    /// that wrote first (another stream's append included) took its id
    /// before waiting for this stream's lock; if an append with a later id
    /// got in meanwhile, this one fails with SQLSTATE 40001
    /// (`serialization_failure`, in [`StoreError::Database`]) rather than
    /// be stored out of order: retry the transaction.
    pub async fn append_in(
        tx: &mut Transaction<'_, Postgres>,
        stream: &str,
        expected: ExpectedVersion,
        events: &[Message],
    ) -> Result<Appended, StoreError> {
        crate::append::append(&mut **tx, true, stream, expected, events).await
    }

    /// The stream's version (how many events it holds; 0 for none).
    pub async fn version(&self, stream: &str) -> Result<u64, StoreError> {
        let version: Option<i64> =
            sqlx::query_scalar("SELECT version FROM tidings_streams WHERE stream_id = $1")
                .bind(stream)
                .fetch_optional(&self.pool)
                .await?;
        Ok(version.unwrap_or(0) as u64)
    }

    /// Up to `limit` events of `stream` from version `from` (inclusive),
    /// forward or backward.
    pub async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let sql = match direction {
            Direction::Forward => format!(
                "SELECT {COLUMNS} FROM tidings_events WHERE stream_id = $1 AND version >= $2 \
                 ORDER BY version LIMIT $3"
            ),
            Direction::Backward => format!(
                "SELECT {COLUMNS} FROM tidings_events WHERE stream_id = $1 AND version <= $2 \
                 ORDER BY version DESC LIMIT $3"
            ),
        };
        let rows = sqlx::query(&sql)
            .bind(stream)
            .bind(from.min(i64::MAX as u64) as i64)
            .bind(limit.min(i64::MAX as usize) as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(recorded).collect()
    }

    /// Up to `limit` events of every stream after `after`, in global order
    /// (but the store's own: categories starting with `$`, such as
    /// projections' dead letters);
    /// only events no transaction in progress can commit behind (see
    /// [`GlobalPosition`]). Pass the last returned position as the next
    /// `after` to follow the store without skipping an event.
    pub async fn read_all(
        &self,
        after: GlobalPosition,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tidings_events \
             WHERE (transaction_id, sequence) > ($1::text::xid8, $2) AND {SETTLED} \
             AND left(category, 1) <> '$' ORDER BY transaction_id, sequence LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(after.transaction.to_string())
            .bind(after.sequence as i64)
            .bind(limit.min(i64::MAX as usize) as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(recorded).collect()
    }

    /// As [`read_all`](Self::read_all), for the streams of one category:
    /// the part of the stream id before its first `-` (`account` for
    /// `account-42`).
    pub async fn read_category(
        &self,
        category: &str,
        after: GlobalPosition,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tidings_events \
             WHERE category = $4 AND (transaction_id, sequence) > ($1::text::xid8, $2) \
             AND {SETTLED} ORDER BY transaction_id, sequence LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(after.transaction.to_string())
            .bind(after.sequence as i64)
            .bind(limit.min(i64::MAX as usize) as i64)
            .bind(category)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(recorded).collect()
    }
}

/// The category of a stream id: before its first `-`.
pub(crate) fn category(stream: &str) -> &str {
    stream.split_once('-').map_or(stream, |(c, _)| c)
}

/// A selected row as an event.
fn recorded(row: &PgRow) -> Result<RecordedEvent, StoreError> {
    let transaction: String = row.try_get("transaction_text")?;
    Ok(RecordedEvent {
        stream: row.try_get("stream_id")?,
        version: row.try_get::<i64, _>("version")? as u64,
        position: GlobalPosition {
            transaction: transaction.parse().unwrap_or_default(),
            sequence: row.try_get::<i64, _>("sequence")? as u64,
        },
        message: crate::row::message(row)?,
    })
}
