//! RabbitMQ cases: Tidings and bare lapin, the same work in the same run
//! (same exchange and queue type, persistent mandatory publishes with
//! confirms, confirm window, prefetch).
//!
//! - `publish`: one at a time, awaiting each confirm (window 1), on a tenth of
//!   `--count` messages (a quorum queue confirms a few hundred to two thousand
//!   a second one by one).
//! - `publish-batch`: after an untimed warm-up of 2,000 messages per side,
//!   three interleaved rounds per side (median reported),
//!   each `publish_batch` calls of 1,000 messages (1,000 confirms
//!   outstanding, all awaited before the next call); lapin does the same
//!   batches, and once more with one sliding window over the whole run
//!   (`lapin-sliding`, for reference: what no batch boundary costs).
//!   The bare side sends the same metadata as Tidings (`bare_properties`).
//! - `e2e`: batches of 1,000 published (both sides) while a consumer handles and acks
//!   (Tidings: the consumer runtime with `--handlers` handlers; lapin: a
//!   `basic_consume` loop acking each delivery). Prefetch 1,000 on both.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use tidings::amqp::{AmqpBus, AmqpConfig};
use tidings::{Consumer, Event, Message, Publisher, Raw};

use crate::Args;
use crate::common::{Clock, Sink, report, rss_mb, wait_done};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const EXCHANGE: &str = "tidings-bench";
const WINDOW: usize = 1000;
const PREFETCH: usize = 1000;

/// Runs the selected cases on RabbitMQ.
pub async fn run(args: &Args) {
    let clock = Arc::new(Clock(Instant::now()));
    for case in &args.case {
        match case.as_str() {
            "publish" | "publish-batch" => {
                let batch = case == "publish-batch";
                let count = if batch {
                    args.count
                } else {
                    (args.count / 10).max(1)
                };
                let window = if batch { WINDOW } else { 1 };
                // Pipelined publishing swings by ±30 % from run to run: batches
                // get a warm-up and ROUNDS interleaved rounds (alternating
                // which side goes first) and report each side's median.
                let rounds = if batch { ROUNDS } else { 1 };
                if batch {
                    // Warm-up, not timed: the first pipelined run of a process
                    // (whichever side) ran 10-40 % slower than the rest.
                    let warm = count.min(2_000);
                    tidings_publish(&clock, warm, args.payload, true).await;
                    lapin_publish(&clock, warm, args.payload, window, Shape::Batches).await;
                }
                let (mut ours, mut bare) = (Vec::new(), Vec::new());
                for round in 0..rounds {
                    if round % 2 == 1 {
                        bare.push(
                            lapin_publish(&clock, count, args.payload, window, Shape::Batches)
                                .await,
                        );
                    }
                    ours.push(tidings_publish(&clock, count, args.payload, batch).await);
                    if round % 2 == 0 {
                        bare.push(
                            lapin_publish(&clock, count, args.payload, window, Shape::Batches)
                                .await,
                        );
                    }
                }
                let (ours, ours_detail) = median(&ours, count);
                let (bare, bare_detail) = median(&bare, count);
                report(
                    "tidings",
                    "amqp",
                    case,
                    count,
                    ours,
                    &format!("{}{ours_detail}", detail(args, window)),
                );
                report(
                    "lapin",
                    "amqp",
                    case,
                    count,
                    bare,
                    &format!("{}{bare_detail}", detail(args, window)),
                );
                if batch {
                    let elapsed =
                        lapin_publish(&clock, count, args.payload, window, Shape::Sliding).await;
                    let detail = format!(
                        "{} B payloads, one sliding window of {window} over the run (reference)",
                        args.payload
                    );
                    report("lapin-sliding", "amqp", case, count, elapsed, &detail);
                }
            }
            "e2e" => {
                for &handlers in &args.handlers {
                    tidings_e2e(args, &clock, handlers).await;
                }
                lapin_e2e(args, &clock).await;
            }
            other => eprintln!("unknown case `{other}`"),
        }
    }
}

/// Rounds of `publish-batch` per side.
const ROUNDS: usize = 3;

/// The median of the rounds' times, and the rounds' rates for the report.
fn median(times: &[Duration], count: u64) -> (Duration, String) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let mid = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    if times.len() < 2 {
        return (mid, String::new());
    }
    let rates: Vec<String> = times
        .iter()
        .map(|t| format!("{:.0}", count as f64 / t.as_secs_f64()))
        .collect();
    (
        mid,
        format!("; median of rounds {} msg/s", rates.join(", ")),
    )
}

fn detail(args: &Args, window: usize) -> String {
    format!("{} B payloads, confirm window {window}", args.payload)
}

fn topic(name: &str) -> String {
    format!("bench.{name}.{:08x}", fastrand_u32())
}

fn fastrand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    nanos ^ std::process::id().rotate_left(16)
}

async fn tidings_bus() -> AmqpBus {
    let config = AmqpConfig::from_url(URL)
        .expect("config")
        .with_exchange(EXCHANGE);
    AmqpBus::connect(config)
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest); start it with `rabbitmq-server`")
}

async fn tidings_publish(clock: &Clock, count: u64, size: usize, batch: bool) -> Duration {
    let bus = tidings_bus().await;
    let t = topic("pub");
    bus.subscriber()
        .declare_group(&t, "sink")
        .await
        .expect("declare");
    let p = bus.publisher();
    let start = Instant::now();
    if batch {
        let mut left = count;
        while left > 0 {
            let n = left.min(WINDOW as u64);
            let msgs = (0..n).map(|_| Message::new(clock.payload(size))).collect();
            for r in p.publish_batch(&t, msgs).await {
                r.expect("publish");
            }
            left -= n;
        }
    } else {
        for _ in 0..count {
            p.publish(&t, Message::new(clock.payload(size)))
                .await
                .expect("publish");
        }
    }
    let elapsed = start.elapsed();
    delete(&[format!("sink.{t}"), format!("sink.{t}.dlq")]).await;
    bus.close().await;
    elapsed
}

async fn tidings_e2e(args: &Args, clock: &Arc<Clock>, handlers: usize) {
    let bus = tidings_bus().await;
    let t = topic("e2e");
    let sink = Sink::new(args.count, clock.clone());
    let s = sink.clone();
    let consumer = Consumer::group(bus.subscriber(), "sink")
        .concurrency(handlers)
        .prefetch(PREFETCH)
        .handle(&t, move |e: Event<Bytes, Raw>| {
            s.record(&e.data);
            std::future::ready(Ok(()))
        })
        .start()
        .await
        .expect("start");
    let p = bus.publisher();
    let rss_before = rss_mb();
    let start = Instant::now();
    let mut left = args.count;
    while left > 0 {
        let n = left.min(WINDOW as u64);
        let msgs = (0..n)
            .map(|_| Message::new(clock.payload(args.payload)))
            .collect();
        for r in p.publish_batch(&t, msgs).await {
            r.expect("publish");
        }
        left -= n;
    }
    wait_done(&sink, 600).await;
    let elapsed = start.elapsed();
    consumer.shutdown(Duration::from_secs(10)).await;
    delete(&[format!("sink.{t}"), format!("sink.{t}.dlq")]).await;
    bus.close().await;
    let detail = format!(
        "{} B payloads, handlers={handlers}, prefetch {PREFETCH}; {}; rss {:.1} MB -> {:.1} MB",
        args.payload,
        sink.summary(),
        rss_before,
        rss_mb()
    );
    report(
        "tidings",
        "amqp",
        &format!("e2e/h{handlers}"),
        args.count,
        elapsed,
        &detail,
    );
}

async fn raw_setup(t: &str, queue: &str) -> (Connection, lapin::Channel) {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest)");
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        EXCHANGE.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("queue");
    ch.queue_bind(
        queue.into(),
        EXCHANGE.into(),
        t.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (conn, ch)
}

/// The properties a hand-written service would publish with too: persistent,
/// a message id and a timestamp, and the metadata as CloudEvents AMQP headers
/// (`cloudEvents:id`, `cloudEvents:specversion`, `cloudEvents:source`,
/// `cloudEvents:time`), of the same length as Tidings writes, so both sides
/// move the same bytes and build the same field table.
fn bare_properties() -> BasicProperties {
    let id = Message::new(Bytes::new()).id;
    let now = std::time::SystemTime::now();
    let long = |s: &str| AMQPValue::LongString(s.into());
    let mut headers = FieldTable::default();
    headers.insert("cloudEvents:id".into(), long(&id));
    headers.insert("cloudEvents:specversion".into(), long("1.0"));
    headers.insert("cloudEvents:source".into(), long("/tidings"));
    headers.insert(
        "cloudEvents:time".into(),
        long(&humantime::format_rfc3339_micros(now).to_string()),
    );
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers)
        .with_message_id(id.as_str().into())
        .with_timestamp(secs)
}

/// How the bare side keeps confirms outstanding.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// Like `publish_batch` calls of `window` messages: send them all, then
    /// wait for all their confirms before the next batch.
    Batches,
    /// One sliding window over the whole run (what `publish_batch` cannot do
    /// between calls): for reference only.
    Sliding,
}

async fn raw_publish_all(
    ch: &lapin::Channel,
    clock: &Clock,
    t: &str,
    count: u64,
    size: usize,
    window: usize,
    shape: Shape,
) {
    let mut pending = VecDeque::with_capacity(window);
    for _ in 0..count {
        let payload = clock.payload(size);
        let confirm = ch
            .basic_publish(
                EXCHANGE.into(),
                t.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &payload,
                bare_properties(),
            )
            .await
            .expect("publish");
        pending.push_back(confirm);
        if pending.len() >= window {
            match shape {
                Shape::Sliding => {
                    if let Some(c) = pending.pop_front() {
                        assert!(c.await.expect("confirm").is_ack());
                    }
                }
                Shape::Batches => {
                    for c in pending.drain(..) {
                        assert!(c.await.expect("confirm").is_ack());
                    }
                }
            }
        }
    }
    for c in pending {
        assert!(c.await.expect("confirm").is_ack());
    }
}

async fn lapin_publish(
    clock: &Clock,
    count: u64,
    size: usize,
    window: usize,
    shape: Shape,
) -> Duration {
    let t = topic("rawpub");
    let queue = format!("raw.{t}");
    let (_conn, ch) = raw_setup(&t, &queue).await;
    let start = Instant::now();
    raw_publish_all(&ch, clock, &t, count, size, window, shape).await;
    let elapsed = start.elapsed();
    delete(&[queue]).await;
    elapsed
}

async fn lapin_e2e(args: &Args, clock: &Arc<Clock>) {
    let t = topic("rawe2e");
    let queue = format!("raw.{t}");
    let (_conn, ch) = raw_setup(&t, &queue).await;
    let consume_conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("connect");
    let cch = consume_conn.create_channel().await.expect("channel");
    cch.basic_qos(PREFETCH as u16, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = cch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let sink = Sink::new(args.count, clock.clone());
    let s = sink.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let body = Bytes::from(delivery.data);
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            s.record(&body);
            if s.handled.load(std::sync::atomic::Ordering::Relaxed) >= s.target {
                break;
            }
        }
    });
    let rss_before = rss_mb();
    let start = Instant::now();
    raw_publish_all(
        &ch,
        clock,
        &t,
        args.count,
        args.payload,
        WINDOW,
        Shape::Batches,
    )
    .await;
    wait_done(&sink, 600).await;
    let elapsed = start.elapsed();
    let _ = task.await;
    delete(&[queue]).await;
    let detail = format!(
        "{} B payloads, one basic_consume loop, prefetch {PREFETCH}; {}; rss {:.1} MB -> {:.1} MB",
        args.payload,
        sink.summary(),
        rss_before,
        rss_mb()
    );
    report("lapin", "amqp", "e2e", args.count, elapsed, &detail);
}

async fn delete(queues: &[String]) {
    if let Ok(conn) = Connection::connect(URL, ConnectionProperties::default()).await
        && let Ok(ch) = conn.create_channel().await
    {
        for q in queues {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
}
