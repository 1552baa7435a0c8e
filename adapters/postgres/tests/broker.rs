//! PostgreSQL as a broker, beyond the conformance suite: a member that dies
//! holding messages gives them back after the visibility timeout (counted as
//! an attempt), and the log keeps handled messages only for the retention.

use std::time::Duration;

use futures::StreamExt;
use tidings_core::testkit::{unique, within};
use tidings_core::{Message, Publisher, Subscriber, Subscription};
use tidings_postgres::PostgresBroker;

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn broker(options: &str) -> PostgresBroker {
    PostgresBroker::connect(&format!("{URL}?{options}"))
        .await
        .unwrap_or_else(|e| panic!("{URL}: {e}; scripts/brokers.sh starts PostgreSQL"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_members_claims_come_back_after_the_visibility_timeout() {
    let topic = unique("claims");
    let survivor = broker("visibility=1s&poll=100ms").await;
    survivor
        .declare_group(&topic, "workers")
        .await
        .expect("declared");
    survivor
        .publish(&topic, Message::new("job").with_id("job-1"))
        .await
        .expect("published");

    // A member takes the job, then its process dies: no settlement, no
    // release, its connections gone (its heartbeat can no longer extend
    // the claim).
    let doomed = broker("visibility=1s&poll=100ms").await;
    let mut stream = doomed
        .subscribe(Subscription::group(&topic, "workers"))
        .await
        .expect("subscribed");
    let taken = within(10, "the first delivery", stream.next())
        .await
        .expect("a delivery")
        .expect("ok");
    assert_eq!(taken.attempt(), 1);
    std::mem::forget(taken);
    doomed.pool().close().await;

    let mut other = survivor
        .subscribe(Subscription::group(&topic, "workers"))
        .await
        .expect("subscribed");
    let started = std::time::Instant::now();
    let mut back = within(10, "the job back", other.next())
        .await
        .expect("a delivery")
        .expect("ok");
    assert_eq!(back.message().id, "job-1");
    assert_eq!(back.attempt(), 2, "the dead member's attempt counts");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before the visibility timeout"
    );
    back.ack().await.expect("acked");
    other.close().await.expect("closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_keeps_handled_messages_for_the_retention_only() {
    let topic = unique("retention");
    let broker = broker("retention=0s&poll=100ms").await;
    broker
        .declare_group(&topic, "readers")
        .await
        .expect("declared");
    broker
        .publish(&topic, Message::new("handled"))
        .await
        .expect("published");
    broker
        .publish(&topic, Message::new("waiting"))
        .await
        .expect("published");
    let mut stream = broker
        .subscribe(Subscription::group(&topic, "readers").with_prefetch(1))
        .await
        .expect("subscribed");
    let mut first = within(10, "a delivery", stream.next())
        .await
        .expect("a delivery")
        .expect("ok");
    first.ack().await.expect("acked");
    let logged = |broker: &PostgresBroker| {
        let (pool, topic) = (broker.pool().clone(), topic.clone());
        async move {
            let (n,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM tidings_messages WHERE topic = $1")
                    .bind(topic)
                    .fetch_one(&pool)
                    .await
                    .expect("count");
            n
        }
    };
    assert_eq!(logged(&broker).await, 2);
    broker.clean_up().await.expect("cleaned");
    assert_eq!(
        logged(&broker).await,
        1,
        "the handled one is gone, the one a group still needs is kept"
    );
    stream.close().await.expect("closed");
}
