//! Redis cases: Tidings (Streams mode) and the bare `redis` crate, same work, same run.
//!
//! - `publish`: one `XADD` at a time, each awaited.
//! - `publish-batch`: 1,000 `XADD`s pipelined per round trip.
//! - `e2e`: batches of 1,000 published; a consumer group reads them
//!   (`XREADGROUP` with `COUNT` = prefetch), handles each and acks (`XACK`).
//!
//! The bare client writes the same fields Tidings writes (payload, `ce_id`,
//! `ce_specversion`, `ce_source`, `ce_time`). Redis at `TIDINGS_REDIS_URL`
//! (default `redis://127.0.0.1:6379`); every case uses a fresh stream and deletes it afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tidings::redis::{RedisBus, RedisConfig};
use tidings::{Consumer, Event, Message, Publisher, Raw};

use crate::Args;
use crate::common::{Clock, Sink, report, rss_mb, wait_done};

const BATCH: u64 = 1000;

/// Runs the selected cases on Redis.
pub async fn run(args: &Args) {
    let url =
        std::env::var("TIDINGS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let clock = Arc::new(Clock(Instant::now()));
    warm_up(args, &url, &clock).await;
    for case in &args.case {
        match case.as_str() {
            "publish" | "publish-batch" => {
                let batch = case == "publish-batch";
                tidings_publish(args, &url, &clock, batch).await;
                bare_publish(args, &url, &clock, batch).await;
            }
            "e2e" => {
                for &handlers in &args.handlers {
                    tidings_e2e(args, &url, &clock, handlers).await;
                    bare_e2e(args, &url, &clock, handlers).await;
                }
            }
            other => eprintln!("unknown case `{other}`"),
        }
    }
}

/// Whichever client runs first on a cold Redis (allocator, connection,
/// CPU clocks) is measurably slower; so both get a warm server.
async fn warm_up(args: &Args, url: &str, clock: &Arc<Clock>) {
    let mut conn = bare(url).await;
    let stream = stream_name("warm-up");
    let time = now_rfc3339();
    for round in 0..20u64 {
        let mut pipe = redis::pipe();
        for i in 0..BATCH {
            pipe.add_command(bare_xadd(
                &stream,
                round * BATCH + i,
                &time,
                &clock.payload(args.payload),
            ));
        }
        let _: Vec<Value> = pipe.query_async(&mut conn).await.expect("XADD pipeline");
    }
    delete(&mut conn, &stream).await;
}

fn stream_name(case: &str) -> String {
    format!(
        "bench-{case}-{:08x}",
        std::process::id() ^ (Instant::now().elapsed().subsec_nanos())
    )
}

async fn bus(url: &str) -> RedisBus {
    let config = RedisConfig::from_url(url).expect("Redis URL");
    RedisBus::connect(config)
        .await
        .expect("connecting to Redis (start it: redis-server --daemonize yes --port 6379)")
}

async fn bare(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).expect("Redis URL");
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connecting to Redis")
}

async fn delete(conn: &mut MultiplexedConnection, stream: &str) {
    let _: redis::RedisResult<Value> = redis::cmd("DEL").arg(stream).query_async(conn).await;
}

/// The bare client's XADD: the same fields Tidings writes for a plain
/// message, with values of the same length (a UUID-shaped unique id).
fn bare_xadd(stream: &str, n: u64, time: &str, payload: &[u8]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream)
        .arg("*")
        .arg("payload")
        .arg(payload)
        .arg("ce_id")
        .arg(format!("00000000-0000-7000-8000-{n:012}"))
        .arg("ce_specversion")
        .arg("1.0")
        .arg("ce_source")
        .arg("/bare-rs")
        .arg("ce_time")
        .arg(time);
    cmd
}

fn now_rfc3339() -> String {
    "2026-01-01T00:00:00.000000Z".to_owned()
}

async fn tidings_publish(args: &Args, url: &str, clock: &Arc<Clock>, batch: bool) {
    let bus = bus(url).await;
    let p = bus.publisher();
    let stream = stream_name("t-pub");
    let start = Instant::now();
    if batch {
        let mut left = args.count;
        while left > 0 {
            let n = left.min(BATCH);
            let messages = (0..n)
                .map(|_| Message::new(clock.payload(args.payload)))
                .collect();
            for r in p.publish_batch(&stream, messages).await {
                r.expect("publish");
            }
            left -= n;
        }
    } else {
        for _ in 0..args.count {
            p.publish(&stream, Message::new(clock.payload(args.payload)))
                .await
                .expect("publish");
        }
    }
    let elapsed = start.elapsed();
    let case = if batch { "publish-batch" } else { "publish" };
    report(
        "tidings",
        "redis",
        case,
        args.count,
        elapsed,
        &format!("{} B payloads", args.payload),
    );
    delete(&mut bare(url).await, &stream).await;
}

async fn bare_publish(args: &Args, url: &str, clock: &Arc<Clock>, batch: bool) {
    let mut conn = bare(url).await;
    let stream = stream_name("b-pub");
    let time = now_rfc3339();
    let start = Instant::now();
    if batch {
        let mut sent = 0;
        while sent < args.count {
            let n = (args.count - sent).min(BATCH);
            let mut pipe = redis::pipe();
            for i in 0..n {
                pipe.add_command(bare_xadd(
                    &stream,
                    sent + i,
                    &time,
                    &clock.payload(args.payload),
                ));
            }
            let _: Vec<Value> = pipe.query_async(&mut conn).await.expect("XADD pipeline");
            sent += n;
        }
    } else {
        for n in 0..args.count {
            let _: Value = bare_xadd(&stream, n, &time, &clock.payload(args.payload))
                .query_async(&mut conn)
                .await
                .expect("XADD");
        }
    }
    let elapsed = start.elapsed();
    let case = if batch { "publish-batch" } else { "publish" };
    report(
        "redis-rs",
        "redis",
        case,
        args.count,
        elapsed,
        &format!("{} B payloads", args.payload),
    );
    delete(&mut conn, &stream).await;
}

fn prefetch(handlers: usize) -> usize {
    256.max(handlers * 4)
}

async fn tidings_e2e(args: &Args, url: &str, clock: &Arc<Clock>, handlers: usize) {
    let stream = stream_name("t-e2e");
    let sink = Sink::new(args.count, clock.clone());
    let s = sink.clone();
    let consumer_bus = bus(url).await;
    let consumer = Consumer::group(consumer_bus.subscriber(), "bench")
        .concurrency(handlers)
        .prefetch(prefetch(handlers))
        .handle(&stream, move |e: Event<Bytes, Raw>| {
            s.record(&e.data);
            std::future::ready(Ok(()))
        })
        .start()
        .await
        .expect("start");
    let p = bus(url).await.publisher();
    let rss_before = rss_mb();
    let start = Instant::now();
    let mut left = args.count;
    while left > 0 {
        let n = left.min(BATCH);
        let messages = (0..n)
            .map(|_| Message::new(clock.payload(args.payload)))
            .collect();
        for r in p.publish_batch(&stream, messages).await {
            r.expect("publish");
        }
        left -= n;
    }
    wait_done(&sink, 300).await;
    let elapsed = start.elapsed();
    consumer.shutdown(Duration::from_secs(10)).await;
    let detail = format!(
        "handlers={handlers} prefetch={} {}; rss {:.1} MB -> {:.1} MB",
        prefetch(handlers),
        sink.summary(),
        rss_before,
        rss_mb()
    );
    report(
        "tidings",
        "redis",
        &format!("e2e/h{handlers}"),
        args.count,
        elapsed,
        &detail,
    );
    delete(&mut bare(url).await, &stream).await;
}

/// The baseline: one reader loop doing `XREADGROUP COUNT <prefetch>` (the
/// same bound Tidings uses), handling each entry and acking the batch with
/// one `XACK`. With a no-op handler, handler concurrency changes nothing here.
async fn bare_e2e(args: &Args, url: &str, clock: &Arc<Clock>, handlers: usize) {
    let stream = stream_name("b-e2e");
    let sink = Sink::new(args.count, clock.clone());
    let mut admin = bare(url).await;
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("bench")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut admin)
        .await
        .expect("XGROUP CREATE");
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let readers = 1;
    let count = prefetch(handlers);
    let mut tasks = Vec::new();
    for r in 0..readers {
        let mut conn = bare(url).await;
        let (stream, sink, stop) = (stream.clone(), sink.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let consumer = format!("bare-{r}");
            while !*stop.borrow() {
                let reply: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("bench")
                    .arg(&consumer)
                    .arg("COUNT")
                    .arg(count)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query_async(&mut conn)
                    .await
                    .expect("XREADGROUP");
                let ids = handle_reply(reply, &sink);
                if !ids.is_empty() {
                    let _: Value = redis::cmd("XACK")
                        .arg(&stream)
                        .arg("bench")
                        .arg(&ids)
                        .query_async(&mut conn)
                        .await
                        .expect("XACK");
                }
            }
        }));
    }
    let mut conn = bare(url).await;
    let time = now_rfc3339();
    let start = Instant::now();
    let mut sent = 0;
    while sent < args.count {
        let n = (args.count - sent).min(BATCH);
        let mut pipe = redis::pipe();
        for i in 0..n {
            pipe.add_command(bare_xadd(
                &stream,
                sent + i,
                &time,
                &clock.payload(args.payload),
            ));
        }
        let _: Vec<Value> = pipe.query_async(&mut conn).await.expect("XADD pipeline");
        sent += n;
    }
    wait_done(&sink, 300).await;
    let elapsed = start.elapsed();
    stop_tx.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }
    report(
        "redis-rs",
        "redis",
        &format!("e2e/h{handlers}"),
        args.count,
        elapsed,
        &format!("readers={readers} count={count} {}", sink.summary()),
    );
    delete(&mut conn, &stream).await;
}

/// Handles every entry of an `XREADGROUP` reply; returns the ids to ack.
fn handle_reply(reply: Value, sink: &Sink) -> Vec<Vec<u8>> {
    let mut ids = Vec::new();
    let streams = match reply {
        Value::Array(streams) => streams,
        Value::Map(map) => map
            .into_iter()
            .map(|(_, v)| Value::Array(vec![Value::Nil, v]))
            .collect(),
        _ => return ids,
    };
    for s in streams {
        let Value::Array(mut kv) = s else { continue };
        let Some(Value::Array(entries)) = kv.pop() else {
            continue;
        };
        for e in entries {
            let Value::Array(mut pair) = e else { continue };
            let (Some(Value::Array(fields)), Some(Value::BulkString(id))) =
                (pair.pop(), pair.pop())
            else {
                continue;
            };
            let mut it = fields.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let (Value::BulkString(k), Value::BulkString(v)) = (k, v)
                    && k == b"payload"
                {
                    let payload = Bytes::from(v);
                    sink.record(&payload);
                }
            }
            ids.push(id);
        }
    }
    ids
}
