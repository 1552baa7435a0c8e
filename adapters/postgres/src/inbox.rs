//! The inbox: handlers whose database writes and the record "this group
//! handled this message" commit in one transaction, so a redelivered
//! message (a lost ack, a crash after the commit, a replica that got it
//! too) is recognised and skipped — its effect happens once.
//!
//! Wrap a handler with [`exactly_once`]: it gets a [`Tx`], runs its writes
//! in it, and the wrapper commits them together with the inbox record
//! before the message is acked. If the record is there already, the
//! handler does not run and the message is acked. On every broker the
//! effect is therefore applied once per group; what at-least-once delivery
//! still allows is the handler's code outside the transaction (a mail sent)
//! running again. On the PostgreSQL broker, when `pool` is the broker's
//! database, the message's queue row is deleted in the same transaction
//! too: the effect, the record and the acknowledgement commit together.
//!
//! ```no_run
//! use tidings_core::{Consumer, Event, HandlerError};
//! use tidings_postgres::inbox::{Tx, exactly_once};
//! # async fn f(pool: sqlx::PgPool, subscriber: std::sync::Arc<dyn tidings_core::Subscriber>) -> tidings_core::Result<()> {
//! let consumer = Consumer::group(subscriber, "ledger")
//!     .handle(
//!         "payments",
//!         exactly_once(pool, |e: Event<i64>, tx: Tx| async move {
//!             sqlx::query("UPDATE balances SET cents = cents + $1 WHERE id = 1")
//!                 .bind(e.data)
//!                 .execute(&mut *tx.conn().await)
//!                 .await
//!                 .map_err(HandlerError::retryable)?;
//!             Ok(())
//!         }),
//!     )
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tidings_core::extract::{Group, Meta, Position};
use tidings_core::{Codec, Event, HandlerError, HandlerResult, Receipt};
use tokio::sync::{Mutex, MutexGuard, OnceCell};

use crate::error::StoreError;

/// The handler's transaction: run its writes on [`conn`](Tx::conn). The
/// wrapper commits it (with the inbox record) when the handler returns
/// `Ok`, and rolls it back otherwise.
#[derive(Clone)]
pub struct Tx(Arc<Mutex<Transaction<'static, Postgres>>>);

impl Tx {
    /// The transaction's connection: `.execute(&mut *tx.conn().await)`.
    pub async fn conn(&self) -> tokio::sync::MappedMutexGuard<'_, PgConnection> {
        MutexGuard::map(self.0.lock().await, |tx| &mut **tx)
    }
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tx")
    }
}

/// The future of a wrapped handler.
pub type Handling = std::pin::Pin<Box<dyn Future<Output = HandlerResult> + Send>>;

/// The handler `f` with its writes and the inbox record in one transaction
/// on `pool` (see the [module docs](self)): register the result with
/// `ConsumerBuilder::handle`. Records are per consumer group; a private
/// subscription (no group) is refused: its messages are dead-lettered as
/// permanent failures.
pub fn exactly_once<T, C, F, Fut>(
    pool: PgPool,
    f: F,
) -> impl Fn(Event<T, C>, Meta, Group, Position) -> Handling + Send + Sync + 'static
where
    T: Send + 'static,
    C: Codec<T>,
    F: Fn(Event<T, C>, Tx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let f = Arc::new(f);
    // The pool's database identity, read once.
    let identity: Arc<OnceCell<String>> = Arc::default();
    move |event, meta, group, position| {
        let (pool, f, identity) = (pool.clone(), f.clone(), identity.clone());
        Box::pin(async move {
            // On the PostgreSQL broker, in this database: the queue row goes
            // with the transaction (the ack that follows finds it gone).
            let mut row = None;
            if let Some(Receipt::Sequence {
                stream, sequence, ..
            }) = &position.0
                && stream.starts_with(crate::broker::POSITION_PREFIX)
            {
                let ours = identity
                    .get_or_try_init(|| async {
                        crate::schema::identity(&pool)
                            .await
                            .map(|id| format!("{}{id}", crate::broker::POSITION_PREFIX))
                    })
                    .await
                    .map_err(HandlerError::retryable)?;
                if stream.as_str() == ours.as_str() {
                    row = Some(*sequence as i64);
                }
            }
            let Some(group) = group.0 else {
                // Private subscriptions have no name that outlives them:
                // their records would collide across processes.
                return Err(HandlerError::permanent(
                    "exactly_once needs a consumer group (a private subscription has no stable name to record under)",
                ));
            };
            let mut tx = pool.begin().await.map_err(HandlerError::retryable)?;
            let group = &*group;
            let first = sqlx::query(
                "INSERT INTO tidings_inbox (group_name, message_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
            )
            .bind(group)
            .bind(meta.id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::retryable)?
            .rows_affected()
                == 1;
            if !first {
                tracing::debug!(id = %meta.id, group, "handled before (inbox): skipped");
                return Ok(());
            }
            let shared = Arc::new(Mutex::new(tx));
            f(event, Tx(shared.clone())).await?;
            let mut tx = Arc::try_unwrap(shared)
                .map_err(|_| {
                    HandlerError::retryable(
                        "the handler kept its Tx past its return (a spawned task?): not committed",
                    )
                })?
                .into_inner();
            if let Some(row) = row {
                // Last, so the row's lock is held only for the commit (the
                // broker's heartbeat skips locked rows, but acks wait).
                sqlx::query("DELETE FROM tidings_queue WHERE id = $1")
                    .bind(row)
                    .execute(&mut *tx)
                    .await
                    .map_err(HandlerError::retryable)?;
            }
            tx.commit().await.map_err(HandlerError::retryable)
        })
    }
}

/// Deletes inbox records older than `age` (a redelivery after that long is
/// no longer recognised): run it from a periodic task. Returns how many.
pub async fn purge_older_than(pool: &PgPool, age: Duration) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "DELETE FROM tidings_inbox WHERE handled_at < now() - make_interval(secs => $1)",
    )
    .bind(age.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
