//! The event store against the PostgreSQL on this machine
//! (`scripts/brokers.sh` starts it): appends with expected versions,
//! idempotent retries, reads, and global reads that never skip an event
//! whatever order concurrent writers commit in.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tidings_core::Message;
use tidings_core::testkit::unique;
use tidings_postgres::{
    Direction, EventStore, ExpectedVersion, GlobalPosition, RecordedEvent, StoreError,
};

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn store() -> EventStore {
    EventStore::connect(URL).await.unwrap_or_else(|e| {
        panic!("{URL}: {e}; scripts/brokers.sh starts PostgreSQL (or: pg_ctlcluster 15 main start)")
    })
}

/// A category of its own for each test: `unique` ids contain `-`, which
/// would end the category, so they are joined with `_`.
fn category(name: &str) -> String {
    unique(name).replace('-', "_")
}

fn event(n: usize) -> Message {
    Message::new(format!(r#"{{"n":{n},"who":"Zoë ✓"}}"#))
        .with_type("account.deposited")
        .with_key("k")
        .with_correlation_id("corr-1")
        .with_header("x-tenant", "eu")
}

#[tokio::test]
async fn events_come_back_as_appended_forward_and_backward() {
    let store = store().await;
    let stream = format!("{}-1", category("account"));
    let events: Vec<Message> = (0..3).map(event).collect();
    let appended = store
        .append(&stream, ExpectedVersion::NoStream, events.clone())
        .await
        .expect("appended");
    assert_eq!((appended.first_version, appended.version), (1, 3));
    assert_eq!(store.version(&stream).await.expect("version"), 3);

    let forward = store
        .read_stream(&stream, 1, Direction::Forward, 100)
        .await
        .expect("read");
    let versions: Vec<u64> = forward.iter().map(|e| e.version).collect();
    assert_eq!(versions, [1, 2, 3]);
    for (read, sent) in forward.iter().zip(&events) {
        let mut sent = sent.clone();
        // Stored to the microsecond.
        sent.metadata.time = sent.metadata.time.map(|t| {
            let us = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_micros();
            SystemTime::UNIX_EPOCH + Duration::from_micros(us as u64)
        });
        assert_eq!(read.message, sent, "every field intact");
        assert_eq!(read.stream, stream);
    }
    let backward = store
        .read_stream(&stream, u64::MAX, Direction::Backward, 2)
        .await
        .expect("read");
    let versions: Vec<u64> = backward.iter().map(|e| e.version).collect();
    assert_eq!(versions, [3, 2]);
    let from_two = store
        .read_stream(&stream, 2, Direction::Forward, 1)
        .await
        .expect("read");
    assert_eq!(from_two[0].version, 2);
}

#[tokio::test]
async fn a_stale_expected_version_is_a_conflict_with_the_actual_version() {
    let store = store().await;
    let stream = format!("{}-7", category("account"));
    let conflict = |r: Result<_, StoreError>| match r {
        Err(StoreError::WrongExpectedVersion { actual, .. }) => actual,
        other => panic!("expected a conflict, got {other:?}"),
    };
    assert_eq!(
        conflict(
            store
                .append(&stream, ExpectedVersion::StreamExists, vec![event(0)])
                .await
        ),
        0
    );
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event(1), event(2)])
        .await
        .expect("first");
    store
        .append(&stream, ExpectedVersion::Exact(2), vec![event(3)])
        .await
        .expect("second");
    assert_eq!(
        conflict(
            store
                .append(&stream, ExpectedVersion::Exact(2), vec![event(4)])
                .await
        ),
        3
    );
    assert_eq!(
        conflict(
            store
                .append(&stream, ExpectedVersion::NoStream, vec![event(5)])
                .await
        ),
        3
    );
    assert_eq!(store.version(&stream).await.expect("version"), 3);
}

#[tokio::test]
async fn of_writers_racing_on_one_version_exactly_one_wins() {
    let store = Arc::new(store().await);
    let stream = format!("{}-1", category("race"));
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event(0)])
        .await
        .expect("created");
    let tasks: Vec<_> = (0..8)
        .map(|n| {
            let (store, stream) = (store.clone(), stream.clone());
            tokio::spawn(async move {
                store
                    .append(&stream, ExpectedVersion::Exact(1), vec![event(n)])
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        match task.await.expect("joined") {
            Ok(_) => won += 1,
            Err(StoreError::WrongExpectedVersion { actual: 2, .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(store.version(&stream).await.expect("version"), 2);
}

#[tokio::test]
async fn a_retried_append_writes_nothing_twice() {
    let store = store().await;
    let stream = format!("{}-1", category("retry"));
    let events = vec![event(0), event(1)];
    store
        .append(&stream, ExpectedVersion::NoStream, events.clone())
        .await
        .expect("first");
    // The reply was lost; the caller tries again with the same events.
    let again = store
        .append(&stream, ExpectedVersion::NoStream, events.clone())
        .await
        .expect("the retry answers as the first did");
    assert!(again.already_stored);
    assert_eq!((again.first_version, again.version), (1, 2));
    assert_eq!(store.version(&stream).await.expect("version"), 2);
    // One of them again, with a new one: not the same append.
    let mixed = store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![events[1].clone(), event(2)],
        )
        .await;
    assert!(
        matches!(mixed, Err(StoreError::DuplicateEvent { ref id, .. }) if *id == events[1].id),
        "{mixed:?}"
    );
}

#[tokio::test]
async fn a_global_read_waits_for_a_transaction_that_can_still_commit_behind_it() {
    let store = store().await;
    let category = category("horizon");
    let (slow, fast) = (format!("{category}-slow"), format!("{category}-fast"));
    // The slow writer takes its transaction id (and sequence) first …
    let mut tx = store.pool().begin().await.expect("begin");
    EventStore::append_in(&mut tx, &slow, ExpectedVersion::NoStream, &[event(0)])
        .await
        .expect("appended in the open transaction");
    // … a fast writer commits after it.
    store
        .append(&fast, ExpectedVersion::NoStream, vec![event(1)])
        .await
        .expect("fast");
    let read = store
        .read_category(&category, GlobalPosition::START, 100)
        .await
        .expect("read");
    assert!(
        read.is_empty(),
        "the fast event must wait while the slow one can still commit before it: {read:?}"
    );
    tx.commit().await.expect("commit");
    // Other tests' transactions may hold the horizon a moment longer.
    let read = tidings_core::testkit::within(30, "both events", async {
        loop {
            let read = store
                .read_category(&category, GlobalPosition::START, 100)
                .await
                .expect("read");
            if read.len() >= 2 {
                return read;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let streams: Vec<&str> = read.iter().map(|e| e.stream.as_str()).collect();
    assert_eq!(
        streams,
        [slow.as_str(), fast.as_str()],
        "in commit-safe order"
    );
}

/// Many writers append concurrently, some in transactions held open a
/// while and some rolled back, while a reader follows the category from
/// its last position: it sees every committed event exactly once, no
/// rolled-back one, each stream in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_following_concurrent_writers_never_skips_an_event() {
    const WRITERS: usize = 8;
    const APPENDS: usize = 25;
    let store = Arc::new(store().await);
    let category = category("follow");
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, category) = (store.clone(), category.clone());
            tokio::spawn(async move {
                let mut committed = Vec::new();
                for a in 0..APPENDS {
                    let stream = format!("{category}-{}", (w + a) % 5);
                    let events = vec![event(a), event(a)];
                    let ids: Vec<String> = events.iter().map(|m| m.id.to_string()).collect();
                    let mut tx = store.pool().begin().await.expect("begin");
                    EventStore::append_in(&mut tx, &stream, ExpectedVersion::Any, &events)
                        .await
                        .expect("appended");
                    // Some transactions stay open while others commit past
                    // them; some roll back.
                    if a % 3 == 0 {
                        tokio::time::sleep(Duration::from_millis(fastrand(20))).await;
                    }
                    if a % 7 == 3 {
                        tx.rollback().await.expect("rollback");
                    } else {
                        tx.commit().await.expect("commit");
                        committed.extend(ids);
                    }
                }
                committed
            })
        })
        .collect();

    let reader = {
        let (store, category) = (store.clone(), category.clone());
        tokio::spawn(async move {
            let mut seen: Vec<RecordedEvent> = Vec::new();
            let mut after = GlobalPosition::START;
            let mut quiet = 0;
            // Bounded: until nothing new came for a while after the writers.
            for _ in 0..20_000 {
                let batch = store
                    .read_category(&category, after, 50)
                    .await
                    .expect("read");
                if let Some(last) = batch.last() {
                    after = last.position;
                    seen.extend(batch);
                    quiet = 0;
                } else {
                    quiet += 1;
                    if quiet > 200 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            seen
        })
    };
    let mut committed = HashSet::new();
    for w in writers {
        committed.extend(w.await.expect("writer"));
    }
    let seen = reader.await.expect("reader");

    let ids: Vec<&str> = seen.iter().map(|e| e.message.id.as_str()).collect();
    let unique_ids: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique_ids.len(), "each event once");
    let expected: HashSet<&str> = committed.iter().map(String::as_str).collect();
    assert_eq!(
        unique_ids, expected,
        "every committed event, no rolled-back one"
    );
    assert!(
        seen.windows(2).all(|w| w[0].position < w[1].position),
        "in position order"
    );
    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in &seen {
        versions.entry(&e.stream).or_default().push(e.version);
    }
    for (stream, v) in versions {
        let expected: Vec<u64> = (1..=v.len() as u64).collect();
        assert_eq!(v, expected, "{stream} in version order, without gaps");
    }
}

/// A few milliseconds, different per call.
fn fastrand(max_ms: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    nanos % max_ms
}

/// A transaction that appended to one stream (taking its transaction id)
/// and then to a second stream, which another transaction appended to
/// meanwhile, must not store its event before that one in global order:
/// it is refused with a serialization failure.
#[tokio::test]
async fn an_append_that_would_land_out_of_order_is_refused() {
    let store = store().await;
    let category = category("order");
    let (a, b) = (format!("{category}-a"), format!("{category}-b"));
    let mut first = store.pool().begin().await.expect("begin");
    EventStore::append_in(&mut first, &a, ExpectedVersion::Any, &[event(0)])
        .await
        .expect("a, taking the older transaction id");
    // A younger transaction appends to b and commits.
    store
        .append(&b, ExpectedVersion::Any, vec![event(1)])
        .await
        .expect("b from the younger transaction");
    let refused = EventStore::append_in(&mut first, &b, ExpectedVersion::Any, &[event(2)]).await;
    match refused {
        Err(StoreError::Database(e)) => assert_eq!(
            e.as_database_error().and_then(|d| d.code()).as_deref(),
            Some("40001"),
            "{e}"
        ),
        other => panic!("expected a serialization failure, got {other:?}"),
    }
    drop(first);
    assert_eq!(store.version(&b).await.expect("version"), 1);
}
