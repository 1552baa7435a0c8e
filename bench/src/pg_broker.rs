//! PostgreSQL as a broker and the transactional outbox, beside bare sqlx
//! doing the same work on the same database.
//!
//! `broker-e2e`: `--count` messages published in batches of 100, handled by
//! a group of `--handlers` concurrent handlers, each acked. The bare side is
//! the same claim-and-delete loop written with the driver: one table, rows
//! inserted in batches of 100, `--handlers` workers that claim up to 64 rows
//! with `UPDATE … FOR UPDATE SKIP LOCKED … RETURNING` (the claim survives a
//! crash: at least once, like the broker) and delete each after handling it.
//!
//! `outbox`: the relay's throughput (rows written in transactions of 100,
//! relayed into the in-process bus), and what writing one message to the
//! outbox adds to a transaction that inserts one business row.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sqlx::PgPool;
use tidings::memory::MemoryBus;
use tidings::{Consumer, Event, Message, Raw};
use tidings_postgres::{Outbox, PostgresBroker};

use crate::Args;
use crate::common::report;

use crate::postgres::URL;

pub async fn broker_e2e(pool: &PgPool, args: &Args) {
    for &handlers in &args.handlers {
        tidings_e2e(args, handlers).await;
        bare_e2e(pool, args, handlers).await;
    }
}

fn payloads(count: u64, size: usize) -> impl Iterator<Item = Bytes> {
    (0..count).map(move |_| Bytes::from(vec![b'x'; size]))
}

async fn tidings_e2e(args: &Args, handlers: usize) {
    let broker = PostgresBroker::connect(&format!("{URL}?poll=50ms&max_connections=16"))
        .await
        .unwrap_or_else(|e| panic!("{URL}: {e}; scripts/brokers.sh starts PostgreSQL"));
    let topic = format!("bench-{}-{handlers}", std::process::id());
    let handled = Arc::new(AtomicU64::new(0));
    let count = handled.clone();
    let consumer = Consumer::group(broker.subscriber(), "bench")
        .concurrency(handlers)
        .prefetch(128)
        .handle(&topic, move |_: Event<Bytes, Raw>| {
            count.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Ok(()))
        })
        .start()
        .await
        .expect("start");
    let publisher = broker.publisher();
    let start = Instant::now();
    let mut all = payloads(args.count, args.payload).peekable();
    while all.peek().is_some() {
        let batch: Vec<Message> = all.by_ref().take(100).map(Message::new).collect();
        for r in publisher.publish_batch(&topic, batch).await {
            r.expect("published");
        }
    }
    wait(&handled, args.count).await;
    let elapsed = start.elapsed();
    consumer.shutdown(Duration::from_secs(10)).await;
    report(
        "tidings",
        "postgres",
        &format!("broker-e2e/h{handlers}"),
        args.count,
        elapsed,
        &format!("{} B payloads, batches of 100", args.payload),
    );
}

async fn bare_e2e(pool: &PgPool, args: &Args, handlers: usize) {
    for ddl in [
        "DROP TABLE IF EXISTS bench_bare_queue",
        "CREATE TABLE bench_bare_queue (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            visible_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            payload bytea NOT NULL)",
    ] {
        sqlx::query(ddl).execute(pool).await.expect("bare queue");
    }
    let handled = Arc::new(AtomicU64::new(0));
    let target = args.count;
    let workers: Vec<_> = (0..handlers)
        .map(|_| {
            let (pool, handled) = (pool.clone(), handled.clone());
            tokio::spawn(async move {
                while handled.load(Ordering::Relaxed) < target {
                    let claimed: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                        "UPDATE bench_bare_queue q
                         SET visible_at = clock_timestamp() + interval '30 seconds'
                         FROM (SELECT id FROM bench_bare_queue WHERE visible_at <= clock_timestamp()
                               ORDER BY id LIMIT 64 FOR UPDATE SKIP LOCKED) c
                         WHERE q.id = c.id RETURNING q.id, q.payload",
                    )
                    .fetch_all(&pool)
                    .await
                    .expect("claim");
                    if claimed.is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    for (id, _payload) in claimed {
                        sqlx::query("DELETE FROM bench_bare_queue WHERE id = $1")
                            .bind(id)
                            .execute(&pool)
                            .await
                            .expect("delete");
                        handled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    let mut all = payloads(args.count, args.payload).peekable();
    while all.peek().is_some() {
        let batch: Vec<Vec<u8>> = all.by_ref().take(100).map(|b| b.to_vec()).collect();
        sqlx::query("INSERT INTO bench_bare_queue (payload) SELECT * FROM unnest($1::bytea[])")
            .bind(&batch)
            .execute(pool)
            .await
            .expect("insert");
    }
    wait(&handled, args.count).await;
    let elapsed = start.elapsed();
    for worker in workers {
        let _ = worker.await;
    }
    report(
        "sqlx",
        "postgres",
        &format!("broker-e2e/h{handlers}"),
        args.count,
        elapsed,
        "the same claim-and-delete loop, bare",
    );
}

async fn wait(handled: &AtomicU64, target: u64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while handled.load(Ordering::Relaxed) < target {
        assert!(
            Instant::now() < deadline,
            "not every message was handled in time"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn outbox(pool: &PgPool, args: &Args) {
    let outbox = Outbox::named(pool.clone(), &format!("bench-{}", std::process::id()))
        .await
        .expect("outbox");
    // Throughput: written first, then relayed.
    let mut all = payloads(args.count, args.payload).peekable();
    while all.peek().is_some() {
        let batch: Vec<Message> = all.by_ref().take(100).map(Message::new).collect();
        let mut tx = pool.begin().await.expect("begin");
        outbox
            .publish_all_in(&mut tx, "orders", batch)
            .await
            .expect("written");
        tx.commit().await.expect("commit");
    }
    let bus = MemoryBus::new();
    let handled = Arc::new(AtomicU64::new(0));
    let count = handled.clone();
    let consumer = Consumer::group(bus.subscriber(), "bench")
        .handle("orders", move |_: Event<Bytes, Raw>| {
            count.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Ok(()))
        })
        .start()
        .await
        .expect("start");
    let start = Instant::now();
    let relay = outbox.relay(bus.publisher()).batch(500).start();
    wait(&handled, args.count).await;
    let elapsed = start.elapsed();
    relay.shutdown().await;
    consumer.shutdown(Duration::from_secs(10)).await;
    report(
        "tidings",
        "postgres",
        "outbox-relay",
        args.count,
        elapsed,
        "relayed into the in-process bus, batches of 500",
    );

    // Added latency: one business row per transaction, with and without
    // one outbox message.
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_orders (id bigint GENERATED ALWAYS AS IDENTITY, total bigint)")
        .execute(pool)
        .await
        .expect("orders");
    let rounds = 1000.min(args.count);
    let mut took = Vec::new();
    for with_outbox in [false, true] {
        let start = Instant::now();
        for n in 0..rounds {
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query("INSERT INTO bench_orders (total) VALUES ($1)")
                .bind(n as i64)
                .execute(&mut *tx)
                .await
                .expect("order");
            if with_outbox {
                outbox
                    .publish_in(&mut tx, "orders", Message::new(vec![b'x'; args.payload]))
                    .await
                    .expect("written");
            }
            tx.commit().await.expect("commit");
        }
        took.push(start.elapsed() / rounds as u32);
    }
    println!(
        "  a transaction inserting one row: {:?}; with one outbox message: {:?} (+{:?})",
        took[0],
        took[1],
        took[1].saturating_sub(took[0])
    );
    sqlx::query("DELETE FROM tidings_outbox WHERE outbox = $1")
        .bind(outbox.name())
        .execute(pool)
        .await
        .expect("cleaned up");
}
