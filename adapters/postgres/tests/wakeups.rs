//! Appends wake the subscriptions by `NOTIFY`, not by their poll: from
//! the store after an append's own commit, and from the database at the
//! commit of a caller's transaction.
//!
//! Its own test binary on purpose: a subscription reads only events no
//! transaction in progress can overtake, so another test's open
//! transaction could hold an event back past its notification.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::PgListener;
use tidings_core::testkit::{unique, within};
use tidings_core::{Consumer, Event, Message, Raw, StartFrom, Subscriber};
use tidings_postgres::{EventStore, ExpectedVersion};
use tokio::sync::mpsc;

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Appends `payload` to `stream` at version `at` inside a transaction of
/// the caller's, then commits it.
async fn append_and_commit(store: &EventStore, stream: &str, at: u64, payload: &'static str) {
    let mut tx = store.pool().begin().await.expect("begin");
    EventStore::append_in(
        &mut tx,
        stream,
        ExpectedVersion::Exact(at),
        &[Message::new(payload)],
    )
    .await
    .expect("in the caller's transaction");
    tx.commit().await.expect("commit");
}

/// The next event handled, within 10 s.
async fn next(handled: &mut mpsc::UnboundedReceiver<String>, what: &str) -> Option<String> {
    within(10, what, handled.recv()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_wake_a_subscription_that_never_polls() {
    let store = EventStore::connect(URL).await.unwrap_or_else(|e| {
        panic!("{URL}: {e}; scripts/brokers.sh starts PostgreSQL (or: pg_ctlcluster 15 main start)")
    });
    let category = unique("woken").replace('-', "_");
    let stream = format!("{category}-1");

    // The mechanism itself, on a listener of the test's own (nothing else
    // in this binary notifies): an append in its own transaction notifies
    // after its commit, one in a caller's transaction at that commit.
    let mut listener = PgListener::connect_with(store.pool())
        .await
        .expect("listener");
    listener.listen("tidings_events").await.expect("LISTEN");
    let other = format!("{category}x-0");
    store
        .append(&other, ExpectedVersion::NoStream, vec![Message::new("a")])
        .await
        .expect("own transaction");
    within(
        10,
        "the notification of an append in its own transaction",
        listener.recv(),
    )
    .await
    .expect("notified");
    append_and_commit(&store, &other, 1, "b").await;
    within(
        10,
        "the notification at the caller's commit",
        listener.recv(),
    )
    .await
    .expect("notified");
    drop(listener);

    // End to end: a subscription that never polls is woken by both. (Its
    // read after settling the first event could also find the next one;
    // the listener above is what proves the notifications.)
    // Handled once the subscription reads, which it does once listening.
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![Message::new("first")],
        )
        .await
        .expect("first");

    // A poll no test waits out: only a notification can wake it.
    let subscriber: Arc<dyn Subscriber> =
        Arc::new(store.subscriber().poll_interval(Duration::from_secs(3600)));
    let (seen, mut handled) = mpsc::unbounded_channel();
    let consumer = Consumer::group(subscriber, "woken")
        .start_from(StartFrom::Earliest)
        .handle(category.clone(), move |e: Event<Bytes, Raw>| {
            let seen = seen.clone();
            async move {
                let _ = seen.send(String::from_utf8_lossy(&e.data).into_owned());
                Ok(())
            }
        })
        .start()
        .await
        .expect("started");
    assert_eq!(
        next(&mut handled, "the first event").await.as_deref(),
        Some("first")
    );

    store
        .append(
            &stream,
            ExpectedVersion::Exact(1),
            vec![Message::new("own")],
        )
        .await
        .expect("own transaction");
    assert_eq!(
        next(&mut handled, "the append in its own transaction to wake it")
            .await
            .as_deref(),
        Some("own")
    );

    append_and_commit(&store, &stream, 2, "theirs").await;
    assert_eq!(
        next(&mut handled, "the caller's commit to wake it")
            .await
            .as_deref(),
        Some("theirs")
    );
    consumer.shutdown(Duration::from_secs(10)).await;
}
