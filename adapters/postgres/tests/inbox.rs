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
            let (count,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {effects}"))
                .fetch_one(&pool)
                .await
                .expect("count");
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
