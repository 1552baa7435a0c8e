//! The inbox against the real PostgreSQL: two replicas of a group, messages
//! redelivered after their effect committed (an ack lost) and published
//! twice (a producer's retry): each message's effect happens exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tidings_core::middleware::from_fn;
use tidings_core::testkit::{unique, within};
use tidings_core::{Consumer, Event, HandlerError, Publisher, RetryPolicy};
use tidings_memory::{MemoryBus, MemoryConfig};
use tidings_postgres::inbox::{Tx, exactly_once};

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const MESSAGES: u64 = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_effect_happens_once_across_redeliveries_and_replicas() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(URL)
        .await
        .unwrap_or_else(|e| panic!("{URL}: {e}; scripts/brokers.sh starts PostgreSQL"));
    tidings_postgres::create_tables(&pool)
        .await
        .expect("tables");
    let effects = unique("effects").replace('-', "_");
    sqlx::query(&format!(
        "CREATE TABLE {effects} (message_id text NOT NULL)"
    ))
    .execute(&pool)
    .await
    .expect("effects table");
    let group = unique("ledger");
    let bus = MemoryBus::with_config(MemoryConfig {
        group_capacity: 4096,
        ..MemoryConfig::default()
    });
    let handled = Arc::new(AtomicU64::new(0));
    let replicas = futures::future::join_all((0..2).map(|_| {
        let (pool, effects, handled) = (pool.clone(), effects.clone(), handled.clone());
        Consumer::group(bus.subscriber(), group.as_str())
            .concurrency(8)
            .retry(RetryPolicy::new(5))
            // Every 10th message fails after its effect committed, on its
            // first attempt: the ack is lost, the broker redelivers it.
            .layer(from_fn(|delivery, next| {
                Box::pin(async move {
                    let result = next.run(delivery).await;
                    let n: u64 = delivery
                        .message()
                        .key
                        .as_deref()
                        .and_then(|k| k.parse().ok())
                        .unwrap_or(0);
                    if result.is_ok() && n.is_multiple_of(10) && delivery.attempt() == 1 {
                        return Err(HandlerError::retryable("the ack was lost"));
                    }
                    result
                })
            }))
            .handle(
                "payments",
                exactly_once(pool.clone(), move |e: Event<u64>, tx: Tx| {
                    let (effects, handled) = (effects.clone(), handled.clone());
                    async move {
                        sqlx::query(&format!("INSERT INTO {effects} (message_id) VALUES ($1)"))
                            .bind(e.id())
                            .execute(&mut *tx.conn().await)
                            .await
                            .map_err(HandlerError::retryable)?;
                        handled.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                }),
            )
            .start()
    }))
    .await
    .into_iter()
    .map(|c| c.expect("a replica"))
    .collect::<Vec<_>>();

    let publisher = bus.publisher();
    for n in 0..MESSAGES {
        let message = Event::new(n)
            .with_id(format!("payment-{n}"))
            .with_key(n.to_string())
            .into_message()
            .expect("json");
        // Every 20th is published twice: the producer retried.
        if n % 20 == 7 {
            publisher
                .publish("payments", message.clone())
                .await
                .expect("published");
        }
        publisher
            .publish("payments", message)
            .await
            .expect("published");
    }
    within(300, "every effect", async {
        loop {
            let count = rows(&pool, &effects).await;
            if count as u64 >= MESSAGES && bus.queued("payments", &group) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    for replica in replicas {
        let report = replica.shutdown(Duration::from_secs(30)).await;
        assert!(report.is_clean(), "{report:?}");
    }
    let (count, distinct): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT message_id) FROM {effects}"
    ))
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(distinct as u64, MESSAGES, "every message had its effect");
    assert_eq!(count, distinct, "and no message had it twice");
    assert_eq!(
        handled.load(Ordering::Relaxed),
        MESSAGES,
        "the handler ran once per message"
    );
    sqlx::query(&format!("DROP TABLE {effects}"))
        .execute(&pool)
        .await
        .expect("dropped");
}

/// On the PostgreSQL broker, in the same database, the ack commits with the
/// effect: an ack lost afterwards brings nothing back — each message is
/// delivered, and has its effect, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_postgres_broker_the_ack_commits_with_the_effect() {
    const N: u64 = 200;
    let broker = tidings_postgres::PostgresBroker::connect(&format!("{URL}?poll=100ms"))
        .await
        .unwrap_or_else(|e| panic!("{URL}: {e}; scripts/brokers.sh starts PostgreSQL"));
    let pool = broker.pool().clone();
    let effects = unique("effects").replace('-', "_");
    sqlx::query(&format!(
        "CREATE TABLE {effects} (message_id text NOT NULL)"
    ))
    .execute(&pool)
    .await
    .expect("effects table");
    let topic = unique("payments");
    let deliveries = Arc::new(AtomicU64::new(0));
    let counted = deliveries.clone();
    let table = effects.clone();
    let consumer = Consumer::group(broker.subscriber(), "ledger")
        .concurrency(4)
        // Every delivery's ack is "lost" after the handler committed.
        .layer(from_fn(move |delivery, next| {
            let counted = counted.clone();
            Box::pin(async move {
                counted.fetch_add(1, Ordering::Relaxed);
                let result = next.run(delivery).await;
                if result.is_ok() && delivery.attempt() == 1 {
                    return Err(HandlerError::retryable("the ack was lost"));
                }
                result
            })
        }))
        .handle(
            &topic,
            exactly_once(pool.clone(), move |e: Event<u64>, tx: Tx| {
                let table = table.clone();
                async move {
                    sqlx::query(&format!("INSERT INTO {table} (message_id) VALUES ($1)"))
                        .bind(e.id())
                        .execute(&mut *tx.conn().await)
                        .await
                        .map_err(HandlerError::retryable)?;
                    Ok(())
                }
            }),
        )
        .start()
        .await
        .expect("started");
    let publisher = broker.publisher();
    for n in 0..N {
        publisher
            .publish(&topic, Event::new(n).into_message().expect("json"))
            .await
            .expect("published");
    }
    within(60, "every effect", async {
        loop {
            let count = rows(&pool, &effects).await;
            if count as u64 >= N {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Nothing can come back: the queue rows left with the effects.
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM tidings_queue WHERE topic = $1")
        .bind(&topic)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(left, 0, "no row left to redeliver");
    consumer.shutdown(Duration::from_secs(10)).await;
    let (count, distinct): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT message_id) FROM {effects}"
    ))
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!((count as u64, distinct as u64), (N, N));
    assert_eq!(deliveries.load(Ordering::Relaxed), N, "each delivered once");
    sqlx::query(&format!("DROP TABLE {effects}"))
        .execute(&pool)
        .await
        .expect("dropped");
}

/// How many rows `table` holds.
async fn rows(pool: &sqlx::PgPool, table: &str) -> i64 {
    let (count,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .expect("count");
    count
}
