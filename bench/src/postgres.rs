//! The event store (`tidings-postgres`) beside the same work done with bare
//! sqlx on the same database: appends of 1 event per transaction and of
//! batches of 100 (8 writers, each on its own stream), stream reads in
//! pages of 100, and a projection catching up over `--count` events.
//!
//! The bare side of the appends is the same inserts with the same driver:
//! the same rows (every column of the message, the stream, category and
//! version) into a table made `LIKE tidings_events` (the same columns and
//! indexes), without the store's lock, version and idempotency checks,
//! stream row and wake-up — what the store adds to the writes themselves.
//! A second bare line, `sqlx-plain`, writes only id, type, headers and
//! payload to a table with two indexes: what an application writing its
//! own events table would do at the least. Reads and catch-up read the
//! plain table.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sqlx::PgPool;
use tidings::{Consumer, Event, Message, Raw, StartFrom, Subscriber};
use tidings_postgres::{Direction, EventStore, ExpectedVersion};

use crate::Args;
use crate::common::report;

/// The bench's own database, made afresh by each run: both sides start on
/// empty tables (the store's tables in a shared database grow with every
/// run, and a bigger table is a slower one).
pub const URL: &str = "postgres://postgres@127.0.0.1:5432/tidings_bench";
/// Where the bench's database is dropped and created.
const SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Drops and creates the bench's database.
async fn fresh_database() {
    let pool = PgPool::connect(SERVER)
        .await
        .unwrap_or_else(|e| panic!("{SERVER}: {e}; scripts/brokers.sh starts PostgreSQL"));
    for ddl in [
        "DROP DATABASE IF EXISTS tidings_bench WITH (FORCE)",
        "CREATE DATABASE tidings_bench",
    ] {
        sqlx::query(ddl).execute(&pool).await.expect(ddl);
    }
    pool.close().await;
}
const WRITERS: u64 = 8;

/// A row of the bare table as read: position or version, id, type, headers, payload.
type BareRow = (i64, String, Option<String>, serde_json::Value, Vec<u8>);

/// A row of the table like the store's, with every column the store reads.
type SameRow = (
    String,
    i64,
    String,
    i64,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    serde_json::Value,
    Vec<u8>,
);

pub async fn run(args: &Args) {
    fresh_database().await;
    let store = EventStore::connect(URL)
        .await
        .unwrap_or_else(|e| panic!("{URL}: {e}; scripts/brokers.sh starts PostgreSQL"));
    let pool = store.pool().clone();
    bare_table(&pool).await;
    let run = format!("bench{}", std::process::id());
    for case in &args.case {
        match case.as_str() {
            "append" => appends(&store, &pool, &run, args.count, 1, args.payload).await,
            "append-batch" => appends(&store, &pool, &run, args.count, 100, args.payload).await,
            "read" => reads(&store, &pool, &run, args.count, args.payload).await,
            "catch-up" => catch_up(&store, &pool, &run, args.count, args.payload).await,
            "broker-e2e" => crate::pg_broker::broker_e2e(&pool, args).await,
            "outbox" => crate::pg_broker::outbox(&pool, args).await,
            other => eprintln!(
                "unknown case `{other}` for postgres; known: append, append-batch, read, catch-up, broker-e2e, outbox"
            ),
        }
    }
}

async fn bare_table(pool: &PgPool) {
    for ddl in [
        "DROP TABLE IF EXISTS bench_same_events",
        "CREATE TABLE bench_same_events (LIKE tidings_events INCLUDING ALL)",
        "DROP TABLE IF EXISTS bench_bare_events",
        "CREATE TABLE bench_bare_events (
            sequence bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            stream_id text NOT NULL, version bigint NOT NULL, event_id text NOT NULL,
            event_type text, headers jsonb NOT NULL, payload bytea NOT NULL,
            UNIQUE (stream_id, version))",
    ] {
        sqlx::query(ddl).execute(pool).await.expect("bare table");
    }
}

/// Fresh statistics for both tables, so neither side reads with a plan
/// made for an empty table.
async fn analyze(pool: &PgPool) {
    for table in ["bench_bare_events", "bench_same_events", "tidings_events"] {
        sqlx::query(&format!("ANALYZE {table}"))
            .execute(pool)
            .await
            .expect("analyze");
    }
}

fn events(n: usize, payload: usize) -> Vec<Message> {
    (0..n)
        .map(|_| Message::new(vec![b'x'; payload]).with_type("bench.happened"))
        .collect()
}

/// Bare: one transaction inserting `events` after `version`.
async fn bare_append(pool: &PgPool, stream: &str, version: u64, events: &[Message]) {
    let mut tx = pool.begin().await.expect("begin");
    let versions: Vec<i64> = (0..events.len())
        .map(|i| (version + 1 + i as u64) as i64)
        .collect();
    let ids: Vec<&str> = events.iter().map(|m| m.id.as_str()).collect();
    let types: Vec<Option<&str>> = events
        .iter()
        .map(|m| m.metadata.event_type.as_deref())
        .collect();
    let headers: Vec<serde_json::Value> = events
        .iter()
        .map(|m| serde_json::to_value(&m.headers).unwrap_or_default())
        .collect();
    let payloads: Vec<&[u8]> = events.iter().map(|m| m.payload.as_ref()).collect();
    sqlx::query(
        "INSERT INTO bench_bare_events (stream_id, version, event_id, event_type, headers, payload) \
         SELECT $1, * FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::jsonb[], $6::bytea[])",
    )
    .bind(stream)
    .bind(&versions)
    .bind(&ids)
    .bind(&types)
    .bind(&headers)
    .bind(&payloads)
    .execute(&mut *tx)
    .await
    .expect("bare insert");
    tx.commit().await.expect("commit");
}

/// Bare, the same inserts as the store: one transaction inserting every
/// column of `events` after `version` into the table like the store's.
async fn same_append(pool: &PgPool, stream: &str, version: u64, events: &[Message]) {
    fn column<'a, T>(events: &'a [Message], f: impl Fn(&'a Message) -> T) -> Vec<T> {
        events.iter().map(f).collect()
    }
    let mut tx = pool.begin().await.expect("begin");
    let versions: Vec<i64> = (0..events.len())
        .map(|i| (version + 1 + i as u64) as i64)
        .collect();
    let m = |f: fn(&tidings::Metadata) -> &Option<String>| {
        column(events, move |e| f(&e.metadata).as_deref())
    };
    sqlx::query(
        "INSERT INTO bench_same_events (stream_id, category, version, event_id, event_type, \
         source, time_us, schema_version, correlation_id, causation_id, content_type, \
         message_key, headers, payload) \
         SELECT $1, $2, * FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::text[], \
         $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], \
         $13::jsonb[], $14::bytea[])",
    )
    .bind(stream)
    .bind(stream.split_once('-').map_or(stream, |(c, _)| c))
    .bind(&versions)
    .bind(column(events, |e| e.id.as_str()))
    .bind(m(|m| &m.event_type))
    .bind(m(|m| &m.source))
    .bind(column(events, |e| {
        e.metadata.time.map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64)
        })
    }))
    .bind(m(|m| &m.schema_version))
    .bind(m(|m| &m.correlation_id))
    .bind(m(|m| &m.causation_id))
    .bind(m(|m| &m.content_type))
    .bind(column(events, |e| e.key.as_deref()))
    .bind(column(events, |e| sqlx::types::Json(&e.headers)))
    .bind(column(events, |e| e.payload.as_ref()))
    .execute(&mut *tx)
    .await
    .expect("same insert");
    tx.commit().await.expect("commit");
}

/// `count` events by 8 writers in transactions of `per_tx`, through the
/// store and bare.
async fn appends(
    store: &EventStore,
    pool: &PgPool,
    run: &str,
    count: u64,
    per_tx: usize,
    payload: usize,
) {
    let case = if per_tx == 1 {
        "append"
    } else {
        "append-batch"
    };
    let per_writer = count / WRITERS / per_tx as u64;
    for side in ["tidings", "sqlx", "sqlx-plain"] {
        let started = Instant::now();
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (store, pool) = (store.clone(), pool.clone());
                let stream = format!("{run}{case}{side}-{w}");
                tokio::spawn(async move {
                    let mut version = 0;
                    for _ in 0..per_writer {
                        let batch = events(per_tx, payload);
                        match side {
                            "tidings" => {
                                store
                                    .append(&stream, ExpectedVersion::Exact(version), batch)
                                    .await
                                    .expect("append");
                            }
                            "sqlx" => same_append(&pool, &stream, version, &batch).await,
                            _ => bare_append(&pool, &stream, version, &batch).await,
                        }
                        version += per_tx as u64;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("writer");
        }
        let n = per_writer * WRITERS * per_tx as u64;
        report(
            side,
            "postgres",
            case,
            n,
            started.elapsed(),
            &format!("{WRITERS} writers, {per_tx} event(s) per transaction"),
        );
    }
}

/// One stream of `count` events read front to back in pages of 100.
async fn reads(store: &EventStore, pool: &PgPool, run: &str, count: u64, payload: usize) {
    let stream = format!("{run}read-0");
    let mut version = 0;
    while version < count {
        let n = (count - version).min(100) as usize;
        store
            .append(&stream, ExpectedVersion::Exact(version), events(n, payload))
            .await
            .expect("append");
        bare_append(pool, &stream, version, &events(n, payload)).await;
        same_append(pool, &stream, version, &events(n, payload)).await;
        version += n as u64;
    }
    analyze(pool).await;
    // Each side reads its table once untimed first, so neither is timed
    // on a cold cache (or beside the autovacuum the appends started).
    for timed in [false, true] {
        let started = Instant::now();
        let mut from = 1;
        while from <= count {
            let page = store
                .read_stream(&stream, from, Direction::Forward, 100)
                .await
                .expect("read");
            from += page.len().max(1) as u64;
        }
        if timed {
            let detail = "pages of 100";
            report(
                "tidings",
                "postgres",
                "read",
                count,
                started.elapsed(),
                detail,
            );
        }
    }
    for timed in [false, true] {
        let started = Instant::now();
        let mut from = 1i64;
        while from <= count as i64 {
            let rows: Vec<SameRow> = sqlx::query_as(
                "SELECT transaction_id::text, sequence, stream_id, version, event_id, event_type, \
                 source, time_us, schema_version, correlation_id, causation_id, content_type, \
                 message_key, headers, payload FROM bench_same_events \
                 WHERE stream_id = $1 AND version >= $2 ORDER BY version LIMIT 100",
            )
            .bind(&stream)
            .bind(from)
            .fetch_all(pool)
            .await
            .expect("same read");
            from += rows.len().max(1) as i64;
        }
        if timed {
            let detail = "pages of 100, the same columns";
            report("sqlx", "postgres", "read", count, started.elapsed(), detail);
        }
    }
    for timed in [false, true] {
        let started = Instant::now();
        let mut from = 1i64;
        while from <= count as i64 {
            let rows: Vec<BareRow> = sqlx::query_as(
                "SELECT version, event_id, event_type, headers, payload FROM bench_bare_events \
                 WHERE stream_id = $1 AND version >= $2 ORDER BY version LIMIT 100",
            )
            .bind(&stream)
            .bind(from)
            .fetch_all(pool)
            .await
            .expect("bare read");
            from += rows.len().max(1) as i64;
        }
        if timed {
            let detail = "pages of 100, id, type, headers and payload";
            report(
                "sqlx-plain",
                "postgres",
                "read",
                count,
                started.elapsed(),
                detail,
            );
        }
    }
}

/// A projection (a Tidings consumer on the store's subscriber) catching up
/// over `count` events of one category, beside bare paging over the same
/// number of rows by sequence.
async fn catch_up(store: &EventStore, pool: &PgPool, run: &str, count: u64, payload: usize) {
    let category = format!("{run}catchup");
    let mut written = 0;
    let mut n = 0;
    while written < count {
        let k = (count - written).min(1000) as usize;
        let batch = events(k, payload);
        store
            .append(
                &format!("{category}-{}", n % 16),
                ExpectedVersion::Any,
                batch.clone(),
            )
            .await
            .expect("append");
        bare_append(pool, &format!("{category}-{n}"), 0, &batch).await;
        written += k as u64;
        n += 1;
    }
    analyze(pool).await;
    let handled = Arc::new(AtomicU64::new(0));
    let counter = handled.clone();
    let subscriber: Arc<dyn Subscriber> =
        Arc::new(store.subscriber().poll_interval(Duration::from_millis(20)));
    let started = Instant::now();
    let consumer = Consumer::group(subscriber, format!("{run}-projection"))
        .start_from(StartFrom::Earliest)
        .concurrency(1)
        .prefetch(1000)
        .handle(category.clone(), move |_: Event<Bytes, Raw>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .start()
        .await
        .expect("projection");
    while handled.load(Ordering::Relaxed) < count {
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "catch-up took over 10 minutes"
        );
    }
    let elapsed = started.elapsed();
    consumer.shutdown(Duration::from_secs(10)).await;
    report(
        "tidings",
        "postgres",
        "catch-up",
        count,
        elapsed,
        "one projection, concurrency 1, prefetch 1000",
    );

    let started = Instant::now();
    let (mut after, mut seen) = (0i64, 0u64);
    while seen < count {
        let rows: Vec<BareRow> = sqlx::query_as(
            "SELECT sequence, event_id, event_type, headers, payload FROM bench_bare_events \
             WHERE sequence > $1 ORDER BY sequence LIMIT 1000",
        )
        .bind(after)
        .fetch_all(pool)
        .await
        .expect("bare read");
        let Some(last) = rows.last() else { break };
        after = last.0;
        seen += rows.len() as u64;
    }
    report(
        "sqlx",
        "postgres",
        "catch-up",
        seen,
        started.elapsed(),
        "pages of 1,000 by sequence",
    );
}
