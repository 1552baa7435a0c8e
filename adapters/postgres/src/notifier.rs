//! Wakes the subscriptions after appends that committed in their own
//! transaction, with one `NOTIFY` for however many appends committed
//! meanwhile.
//!
//! Why not `pg_notify` inside the append: PostgreSQL serialises the commits
//! of notifying transactions on one global lock held through the commit's
//! WAL flush, so appends from many writers could no longer share a flush
//! (group commit) — measured, that alone halved one-event appends. Sent
//! after the commit instead, in a transaction of its own that need not be
//! durable (`synchronous_commit = off`: a wake-up lost in a crash costs a
//! poll interval, as the subscriptions poll anyway), the notification
//! holds that lock for microseconds, and appends flush together again.
//!
//! Appends inside a caller's transaction (`append_in`) still notify from
//! the function: only PostgreSQL knows when that transaction commits.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc;

use crate::subscription::CHANNEL;

/// One statement, so one round trip and its own transaction; the setting
/// is local to that transaction, and in force at its commit.
const NOTIFY: &str = "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')";

/// The least time between two notifications: appends committed meanwhile
/// share the next. Measured on 8 writers of one-event appends, a
/// notification per append cost 7% of their throughput.
const SPACING: Duration = Duration::from_millis(2);

/// Hands wake-ups to the task that sends them; dropped with the last clone
/// of the store, which ends the task.
#[derive(Clone, Debug)]
pub(crate) struct Notifier {
    pending: mpsc::Sender<()>,
}

impl Notifier {
    /// Starts the sending task on `pool` (on the current tokio runtime).
    pub fn start(pool: PgPool) -> Self {
        // One slot: a wake-up asked for while one waits is the same wake-up.
        let (pending, mut rx) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                if let Err(error) = sqlx::query(NOTIFY).bind(CHANNEL).execute(&pool).await {
                    // The subscriptions' poll delivers the events all the same.
                    tracing::debug!(%error, "tidings: NOTIFY after an append failed");
                }
                // At most one NOTIFY per SPACING under load (each is a
                // transaction the server commits); the first after a quiet
                // spell goes at once.
                tokio::time::sleep(SPACING).await;
            }
        });
        Notifier { pending }
    }

    /// Asks for a `NOTIFY` after an append committed; never waits.
    pub fn wake(&self) {
        // Full: a NOTIFY is due already and will be sent after this commit.
        let _ = self.pending.try_send(());
    }
}
