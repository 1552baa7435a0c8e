//! RabbitMQ cases: Tidings and bare lapin, the same work in the same run
//! (same exchange and queue type, persistent mandatory publishes with
//! confirms, confirm window, prefetch).
//!
//! - `publish`: one at a time, awaiting each confirm (window 1), on a tenth of
//!   `--count` messages (a quorum queue confirms a few hundred to two thousand
//!   a second one by one).
//! - `publish-batch`: 1,000 confirms outstanding.
//! - `e2e`: batches of 1,000 published while a consumer handles and acks
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
                let elapsed = tidings_publish(&clock, count, args.payload, batch).await;
                report(
                    "tidings",
                    "amqp",
                    case,
                    count,
                    elapsed,
                    &detail(args, window),
                );
                let elapsed = lapin_publish(&clock, count, args.payload, window).await;
                report("lapin", "amqp", case, count, elapsed, &detail(args, window));
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

async fn raw_publish_all(
    ch: &lapin::Channel,
    clock: &Clock,
    t: &str,
    count: u64,
    size: usize,
    window: usize,
) {
    let mut pending = VecDeque::with_capacity(window);
    for i in 0..count {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("m-{i}").into());
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
                props,
            )
            .await
            .expect("publish");
        pending.push_back(confirm);
        if pending.len() >= window
            && let Some(c) = pending.pop_front()
        {
            assert!(c.await.expect("confirm").is_ack());
        }
    }
    for c in pending {
        assert!(c.await.expect("confirm").is_ack());
    }
}

async fn lapin_publish(clock: &Clock, count: u64, size: usize, window: usize) -> Duration {
    let t = topic("rawpub");
    let queue = format!("raw.{t}");
    let (_conn, ch) = raw_setup(&t, &queue).await;
    let start = Instant::now();
    raw_publish_all(&ch, clock, &t, count, size, window).await;
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
    raw_publish_all(&ch, clock, &t, args.count, args.payload, WINDOW).await;
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
