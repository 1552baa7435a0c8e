//! RabbitMQ cases of the benchmark: Tidings and bare lapin, the same work in
//! the same run (same exchange and queue type, confirm window, prefetch).
//!
//! ```text
//! cargo run --release -p tidings-amqp --example bench -- 20000 100
//! ```
//! Arguments: message count (default 20000), payload bytes (default 100).
//! Prints `RESULT <library> amqp <case> <rate> msg/s` lines.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
use tidings_amqp::{AmqpBus, AmqpConfig};
use tidings_core::{Consumer, Event, Message, Publisher, Raw};
use tokio::sync::Notify;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const EXCHANGE: &str = "tidings-bench";
const WINDOW: usize = 1000;
const PREFETCH: usize = 1000;

fn report(library: &str, case: &str, count: u64, elapsed: Duration, payload: usize) {
    let rate = count as f64 / elapsed.as_secs_f64();
    println!("RESULT {library} amqp {case} {rate:.0} msg/s");
    println!(
        "  {count} msgs of {payload} B in {:.3} s",
        elapsed.as_secs_f64()
    );
}

fn topic(name: &str) -> String {
    format!("bench.{name}.{:08x}", fastrand_u32())
}

fn fastrand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7)
}

struct Done {
    n: AtomicU64,
    target: u64,
    notify: Notify,
}

impl Done {
    fn new(target: u64) -> Arc<Self> {
        Arc::new(Done {
            n: AtomicU64::new(0),
            target,
            notify: Notify::new(),
        })
    }
    fn hit(&self) {
        if self.n.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.notify.notify_one();
        }
    }
    async fn wait(&self) {
        while self.n.load(Ordering::Relaxed) < self.target {
            let notified = self.notify.notified();
            if self.n.load(Ordering::Relaxed) >= self.target {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }
}

async fn tidings_bus() -> AmqpBus {
    let config = AmqpConfig::from_url(URL)
        .expect("config")
        .with_exchange(EXCHANGE);
    AmqpBus::connect(config).await.expect("connect to RabbitMQ")
}

async fn tidings_publish(count: u64, payload: &Bytes, batch: bool) -> Duration {
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
            let msgs = (0..n).map(|_| Message::new(payload.clone())).collect();
            for r in p.publish_batch(&t, msgs).await {
                r.expect("publish");
            }
            left -= n;
        }
    } else {
        for _ in 0..count {
            p.publish(&t, Message::new(payload.clone()))
                .await
                .expect("publish");
        }
    }
    let elapsed = start.elapsed();
    delete(&[format!("sink.{t}"), format!("sink.{t}.dlq")]).await;
    bus.close().await;
    elapsed
}

async fn tidings_e2e(count: u64, payload: &Bytes, handlers: usize) -> Duration {
    let bus = tidings_bus().await;
    let t = topic("e2e");
    let done = Done::new(count);
    let d = done.clone();
    let consumer = Consumer::group(bus.subscriber(), "sink")
        .concurrency(handlers)
        .prefetch(PREFETCH)
        .handle(&t, move |_e: Event<Bytes, Raw>| {
            d.hit();
            std::future::ready(Ok(()))
        })
        .start()
        .await
        .expect("start");
    let p = bus.publisher();
    let start = Instant::now();
    let mut left = count;
    while left > 0 {
        let n = left.min(WINDOW as u64);
        let msgs = (0..n).map(|_| Message::new(payload.clone())).collect();
        for r in p.publish_batch(&t, msgs).await {
            r.expect("publish");
        }
        left -= n;
    }
    done.wait().await;
    let elapsed = start.elapsed();
    consumer.shutdown(Duration::from_secs(10)).await;
    delete(&[format!("sink.{t}"), format!("sink.{t}.dlq")]).await;
    bus.close().await;
    elapsed
}

async fn raw_setup(t: &str, queue: &str) -> (Connection, lapin::Channel) {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("connect");
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

async fn raw_publish_all(ch: &lapin::Channel, t: &str, count: u64, payload: &Bytes, window: usize) {
    let mut pending = std::collections::VecDeque::with_capacity(window);
    for i in 0..count {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("m-{i}").into());
        let confirm = ch
            .basic_publish(
                EXCHANGE.into(),
                t.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                payload,
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

async fn lapin_publish(count: u64, payload: &Bytes, window: usize) -> Duration {
    let t = topic("rawpub");
    let queue = format!("raw.{t}");
    let (_conn, ch) = raw_setup(&t, &queue).await;
    let start = Instant::now();
    raw_publish_all(&ch, &t, count, payload, window).await;
    let elapsed = start.elapsed();
    delete(&[queue]).await;
    elapsed
}

async fn lapin_e2e(count: u64, payload: &Bytes) -> Duration {
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
    let done = Done::new(count);
    let d = done.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let _body = Bytes::from(delivery.data);
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            d.hit();
            if d.n.load(Ordering::Relaxed) >= d.target {
                break;
            }
        }
    });
    let start = Instant::now();
    raw_publish_all(&ch, &t, count, payload, WINDOW).await;
    done.wait().await;
    let elapsed = start.elapsed();
    let _ = task.await;
    delete(&[queue]).await;
    elapsed
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

fn main() {
    let mut args = std::env::args().skip(1);
    let count: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let payload = Bytes::from(vec![b'x'; size]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // Window 1: one confirm round trip per message.
        let single = (count / 10).max(1);
        report(
            "tidings",
            "publish",
            single,
            tidings_publish(single, &payload, false).await,
            size,
        );
        report(
            "lapin",
            "publish",
            single,
            lapin_publish(single, &payload, 1).await,
            size,
        );
        report(
            "tidings",
            "publish-batch",
            count,
            tidings_publish(count, &payload, true).await,
            size,
        );
        report(
            "lapin",
            "publish-batch",
            count,
            lapin_publish(count, &payload, WINDOW).await,
            size,
        );
        report(
            "tidings",
            "e2e/h1",
            count,
            tidings_e2e(count, &payload, 1).await,
            size,
        );
        report(
            "tidings",
            "e2e/h8",
            count,
            tidings_e2e(count, &payload, 8).await,
            size,
        );
        report(
            "lapin",
            "e2e",
            count,
            lapin_e2e(count, &payload).await,
            size,
        );
    });
}
