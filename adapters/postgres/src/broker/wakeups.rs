//! One LISTEN connection per broker, waking the members of a topic when a
//! publish to it commits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tracing::warn;

/// The topics' wake-ups; the listener starts with the first subscription
/// and ends when the broker is dropped.
pub(crate) struct Wakeups {
    pool: PgPool,
    shared: Arc<Topics>,
    started: std::sync::Once,
}

#[derive(Default)]
struct Topics(Mutex<HashMap<String, Weak<Notify>>>);

impl Topics {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<Notify>>> {
        // Every operation is one insert, lookup or retain: a poisoned map is consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self, topic: &str) {
        if let Some(notify) = self.lock().get(topic).and_then(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        for notify in self.lock().values().filter_map(Weak::upgrade) {
            notify.notify_waiters();
        }
    }
}

impl Wakeups {
    pub fn new(pool: PgPool) -> Self {
        Wakeups {
            pool,
            shared: Arc::default(),
            started: std::sync::Once::new(),
        }
    }

    /// What wakes `topic`'s members (shared by them while any holds it).
    pub fn of(&self, topic: &str) -> Arc<Notify> {
        self.started.call_once(|| {
            tokio::spawn(listen(self.pool.clone(), Arc::downgrade(&self.shared)));
        });
        let mut topics = self.shared.lock();
        topics.retain(|_, n| n.strong_count() > 0);
        match topics.get(topic).and_then(Weak::upgrade) {
            Some(notify) => notify,
            None => {
                let notify = Arc::new(Notify::new());
                topics.insert(topic.to_owned(), Arc::downgrade(&notify));
                notify
            }
        }
    }
}

async fn listen(pool: PgPool, topics: Weak<Topics>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                warn!(%error, "postgres broker: cannot LISTEN; members poll meanwhile");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if topics.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        if let Err(error) = listener.listen("tidings_queue").await {
            warn!(%error, "postgres broker: LISTEN failed");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Whatever was published while not listening: look now.
        match topics.upgrade() {
            Some(t) => t.wake_all(),
            None => return,
        }
        loop {
            // Bounded, so a dropped broker ends this task.
            let next = tokio::time::timeout(Duration::from_secs(5), listener.try_recv()).await;
            let Some(t) = topics.upgrade() else { return };
            match next {
                Ok(Ok(Some(notification))) => t.wake(notification.payload()),
                // The connection was lost and is re-established by the next
                // `try_recv`: notifications in between are lost, so look.
                Ok(Ok(None)) => t.wake_all(),
                Ok(Err(error)) => {
                    warn!(%error, "postgres broker: the LISTEN connection failed");
                    break;
                }
                Err(_) => {}
            }
        }
    }
}
