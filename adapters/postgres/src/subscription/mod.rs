//! The store's events as a Tidings [`Subscriber`] ([`EventStoreSubscriber`]).

use std::time::Duration;

use async_trait::async_trait;
use tidings_core::{
    Capabilities, DeliveryStream, Error, Result, StartFrom, Subscriber, Subscription,
};
use tokio::sync::{mpsc, watch};

use crate::event_store::EventStore;
use crate::position::GlobalPosition;
use crate::row::micros;

mod reader;
mod stream;

use reader::Reader;
use stream::StoreStream;

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

fn position(transaction: &str, sequence: i64) -> GlobalPosition {
    GlobalPosition {
        transaction: transaction.parse().unwrap_or_default(),
        sequence: sequence.max(0) as u64,
    }
}

fn db(e: sqlx::Error) -> Error {
    crate::StoreError::Database(e).into()
}
