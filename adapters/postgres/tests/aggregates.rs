//! Aggregates: loaded by folding, saved with the loaded version, retried
//! on conflict, and loaded from a snapshot plus the events after it.

use serde::{Deserialize, Serialize};
use tidings_core::testkit::unique;
use tidings_postgres::{Aggregate, EventStore, StoreError, retry_on_conflict};

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Default, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Counter {
    total: i64,
    changes: u32,
}

#[derive(Serialize, Deserialize)]
struct Added(i64);

impl Aggregate for Counter {
    type Event = Added;

    fn event_type(_: &Added) -> String {
        "counter.added".into()
    }

    fn apply(&mut self, event: &Added) {
        self.total += event.0;
        self.changes += 1;
    }
}

async fn store() -> EventStore {
    EventStore::connect(URL)
        .await
        .unwrap_or_else(|e| panic!("{URL}: {e}; scripts/brokers.sh starts PostgreSQL"))
}

#[tokio::test]
async fn an_aggregate_folds_its_events_and_saves_at_the_loaded_version() {
    let store = store().await;
    let stream = format!("{}-1", unique("counter").replace('-', "_"));
    let mut counter = store.load::<Counter>(&stream).await.expect("load");
    assert_eq!((counter.version, counter.state.total), (0, 0));
    store
        .save(&mut counter, vec![Added(2), Added(3)])
        .await
        .expect("save");
    assert_eq!((counter.version, counter.state.total), (2, 5));
    // A second writer loaded before the save: its save conflicts.
    let mut stale = counter.clone();
    stale.version = 1;
    assert!(matches!(
        store.save(&mut stale, vec![Added(1)]).await,
        Err(StoreError::WrongExpectedVersion { actual: 2, .. })
    ));
    // retry_on_conflict loads again and decides again.
    let mut tries = 0;
    let version = retry_on_conflict(3, || {
        tries += 1;
        let (store, stream) = (&store, &stream);
        let first = tries == 1;
        async move {
            let mut loaded = store.load::<Counter>(stream).await?;
            if first {
                loaded.version -= 1; // as if another writer got in between
            }
            store.save(&mut loaded, vec![Added(10)]).await?;
            Ok::<_, StoreError>(loaded.version)
        }
    })
    .await
    .expect("saved on the second try");
    assert_eq!((tries, version), (2, 3));
    let loaded = store.load::<Counter>(&stream).await.expect("load");
    assert_eq!(
        loaded.state,
        Counter {
            total: 15,
            changes: 3
        }
    );
}

#[tokio::test]
async fn a_snapshot_spares_the_events_before_it() {
    let store = store().await;
    let stream = format!("{}-1", unique("counter").replace('-', "_"));
    let mut counter = store.load::<Counter>(&stream).await.expect("load");
    store
        .save(&mut counter, (1..=5).map(Added).collect())
        .await
        .expect("save");
    store.save_snapshot(&counter).await.expect("snapshot at 5");
    store
        .save(&mut counter, (6..=8).map(Added).collect())
        .await
        .expect("more");

    let full = store.load::<Counter>(&stream).await.expect("load");
    let fast = store
        .load_from_snapshot::<Counter>(&stream)
        .await
        .expect("from snapshot");
    assert_eq!(fast, full, "the same state either way");
    assert_eq!((fast.version, fast.state.total), (8, 36));

    // Proof that the snapshot was the start: mark it, and only the
    // snapshot load sees the mark.
    sqlx::query("UPDATE tidings_snapshots SET state = jsonb_set(state, '{total}', to_jsonb(1000)) WHERE stream_id = $1")
        .bind(&stream)
        .execute(store.pool())
        .await
        .expect("mark");
    let marked = store
        .load_from_snapshot::<Counter>(&stream)
        .await
        .expect("from snapshot");
    assert_eq!(marked.state.total, 1000 + 6 + 7 + 8);

    // An older snapshot does not replace a newer one.
    let mut older = full.clone();
    older.version = 3;
    store.save_snapshot(&older).await.expect("older");
    let version: i64 =
        sqlx::query_scalar("SELECT version FROM tidings_snapshots WHERE stream_id = $1")
            .bind(&stream)
            .fetch_one(store.pool())
            .await
            .expect("version");
    assert_eq!(version, 5);

    // A snapshot that no longer reads as the aggregate: every event again.
    sqlx::query("UPDATE tidings_snapshots SET state = '\"not a counter\"' WHERE stream_id = $1")
        .bind(&stream)
        .execute(store.pool())
        .await
        .expect("spoil");
    let fallback = store
        .load_from_snapshot::<Counter>(&stream)
        .await
        .expect("folded");
    assert_eq!(fallback, full);
}
