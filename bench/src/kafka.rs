//! Kafka cases: Tidings and bare rdkafka (`FutureProducer`, `StreamConsumer`),
//! the same work in the same run, against librdkafka's in-process mock
//! cluster (three brokers, topics of three partitions, replication 1).
//!
//! - `publish`: `acks=all`, one at a time, awaiting each delivery report, on
//!   1/25 of `--count` messages (each waits for `linger.ms`).
//! - `publish-batch`: 1,000 in flight, then await every delivery report.
//! - `e2e`: batched publish → consumer group → handler (Tidings: the consumer
//!   runtime with `--handlers` handlers, offsets committed by the adapter;
//!   rdkafka: one `StreamConsumer::recv` loop storing each offset, auto-commit).
//!
//! Both producers use the adapter's defaults: idempotent, `acks=all`,
//! `linger.ms=5`, `batch.size=1000000`. No keys. Both sides send the same
//! metadata headers: Tidings writes `ce_id`, `ce_specversion`, `ce_source`
//! and `ce_time` for a plain message, and the bare producer sends the same
//! four (`bare_headers`).
//!
//! Each new consumer group waits about 3 s for the mock's initial rebalance
//! delay. The clock starts after the group is assigned: one warm-up message
//! is published and handled before the timed publishing starts.
//!
//! The mock keeps at most 5 MiB per partition and evicts older data, so in
//! `e2e` the publisher never runs more than about 4 MiB ahead of the handlers
//! (same bound on both sides).
//!
//! For experiments: `TIDINGS_BENCH_KAFKA_OPTIONS` (URL query options for the
//! Tidings side), `TIDINGS_BENCH_KAFKA_PREFETCH` (Tidings consumer prefetch),
//! `TIDINGS_BENCH_KAFKA_AHEAD` (e2e ahead bound, messages) and
//! `TIDINGS_BENCH_TRACE` (prints the e2e timeline).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tidings::kafka::{KafkaBus, KafkaConfig, dead_letter_topic, retry_topic};
use tidings::{Consumer, Event, Message, Publisher, Raw};
use tokio::sync::Notify;

use crate::Args;
use crate::common::{Clock, Sink, report, rss_mb, wait_done};

const PARTITIONS: i32 = 3;
const BATCH: u64 = 1000;
const PREFETCH: usize = 1000;
/// What e2e may publish ahead of the handlers, in bytes (under the mock's
/// 5 MiB a partition even if every message lands in one partition).
const AHEAD_BYTES: u64 = 4 * 1024 * 1024;
/// Per-message overhead counted against `AHEAD_BYTES` (record and headers).
const OVERHEAD: u64 = 512;
const WARMUP: &[u8] = b"warmup";

/// Runs the selected cases on Kafka (the in-process mock cluster).
pub async fn run(args: &Args) {
    let mock = Mock::start();
    let clock = Arc::new(Clock(Instant::now()));
    // Extra adapter options for experiments, e.g. `rdkafka.fetch.queue.backoff.ms=0`
    // (URL query form; they apply to the Tidings side only).
    let extra = std::env::var("TIDINGS_BENCH_KAFKA_OPTIONS").unwrap_or_default();
    let url = format!("kafka://{}?{extra}", mock.bootstrap);
    let config = KafkaConfig::from_url(&url).expect("config (TIDINGS_BENCH_KAFKA_OPTIONS)");
    for case in &args.case {
        match case.as_str() {
            "publish" | "publish-batch" => {
                tidings_publish(args, &clock, &mock, &config, case).await;
                bare_publish(args, &clock, &mock, &config, case).await;
            }
            "e2e" => {
                for &handlers in &args.handlers {
                    tidings_e2e(args, &clock, &mock, &config, handlers).await;
                }
                bare_e2e(args, &clock, &mock, &config).await;
            }
            other => eprintln!("unknown case `{other}`"),
        }
    }
}

/// A topic to create on the mock cluster, and where to send the outcome.
type CreateTopic = (String, std_mpsc::Sender<Result<(), String>>);

/// librdkafka's mock cluster on its own thread (the handle is neither `Send`
/// nor `Sync`); it lives until the process ends.
struct Mock {
    tx: Mutex<std_mpsc::Sender<CreateTopic>>,
    bootstrap: String,
    next: AtomicU32,
}

impl Mock {
    fn start() -> Mock {
        let (tx, rx) = std_mpsc::channel::<CreateTopic>();
        let (boot_tx, boot_rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            let cluster = MockCluster::new(3).expect("start the mock cluster");
            let _ = boot_tx.send(cluster.bootstrap_servers());
            while let Ok((topic, reply)) = rx.recv() {
                let _ = reply.send(
                    cluster
                        .create_topic(&topic, PARTITIONS, 1)
                        .map_err(|e| e.to_string()),
                );
            }
            loop {
                std::thread::park();
            }
        });
        let bootstrap = boot_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("mock cluster start");
        Mock {
            tx: Mutex::new(tx),
            bootstrap,
            next: AtomicU32::new(0),
        }
    }

    fn create(&self, topic: &str) {
        let (tx, rx) = std_mpsc::channel();
        self.tx
            .lock()
            .expect("lock")
            .send((topic.to_owned(), tx))
            .expect("mock thread");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("mock reply")
            .expect("create topic");
    }

    /// A new topic of `PARTITIONS` partitions.
    fn topic(&self, what: &str) -> String {
        let t = format!("bench-{what}-{}", self.next.fetch_add(1, Ordering::Relaxed));
        self.create(&t);
        t
    }
}

fn single_count(args: &Args) -> u64 {
    (args.count / 25).max(1)
}

fn count_for(args: &Args, case: &str) -> u64 {
    if case == "publish" {
        single_count(args)
    } else {
        args.count
    }
}

/// How many messages e2e may publish ahead of the handlers, and its batch size.
fn ahead(args: &Args) -> (u64, u64) {
    let ahead = std::env::var("TIDINGS_BENCH_KAFKA_AHEAD")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(AHEAD_BYTES / (args.payload as u64 + OVERHEAD))
        .max(2);
    (ahead, BATCH.min(ahead / 2))
}

/// Waits until at most `ahead - batch` published messages are unhandled.
async fn pace(sink: &Sink, published: u64, ahead: u64, batch: u64) -> u32 {
    let mut waits = 0;
    while published.saturating_sub(sink.handled.load(Ordering::Relaxed)) + batch > ahead {
        tokio::time::sleep(Duration::from_millis(1)).await;
        waits += 1;
    }
    waits
}

/// The Tidings consumer's prefetch (`TIDINGS_BENCH_KAFKA_PREFETCH` overrides it).
fn prefetch() -> usize {
    std::env::var("TIDINGS_BENCH_KAFKA_PREFETCH")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(PREFETCH)
}

/// With `TIDINGS_BENCH_TRACE` set: prints the handled count every 50 ms.
fn timeline(sink: &Arc<Sink>) -> Option<tokio::task::JoinHandle<()>> {
    std::env::var_os("TIDINGS_BENCH_TRACE")?;
    let sink = sink.clone();
    let start = Instant::now();
    Some(tokio::spawn(async move {
        while sink.handled.load(Ordering::Relaxed) < sink.target {
            eprintln!(
                "  {:>5} ms handled {}",
                start.elapsed().as_millis(),
                sink.handled.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }))
}

/// The metadata a hand-written service would send too (an id, a spec
/// version, a source, a time), under the names and of the lengths Tidings
/// writes for a plain message, so both sides move the same bytes.
fn bare_headers() -> OwnedHeaders {
    let id = Message::new(Bytes::new()).id;
    let time = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    let header = |h: OwnedHeaders, key: &str, value: &str| {
        h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        })
    };
    let h = header(OwnedHeaders::new_with_capacity(4), "ce_id", &id);
    let h = header(h, "ce_specversion", "1.0");
    let h = header(h, "ce_source", "/tidings");
    header(h, "ce_time", &time)
}

/// The bare producer: the adapter's producer settings.
fn bare_producer(config: &KafkaConfig) -> FutureProducer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("client.id", "bare")
        .set("allow.auto.create.topics", "false")
        .set("log_level", "3")
        .set("acks", "all")
        .set("enable.idempotence", config.idempotent.to_string())
        .set("linger.ms", config.linger.as_millis().to_string())
        .set("batch.size", config.batch_size.to_string())
        .set("message.max.bytes", config.max_message_bytes.to_string())
        .set(
            "message.timeout.ms",
            config.publish_timeout.as_millis().to_string(),
        );
    c.create().expect("producer")
}

/// The bare consumer: the adapter's consumer settings, except that offsets
/// are stored per handled message and committed by librdkafka's auto-commit
/// at the adapter's commit interval.
fn bare_consumer(config: &KafkaConfig, group: &str) -> StreamConsumer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("client.id", "bare")
        .set("group.id", group)
        .set("allow.auto.create.topics", "false")
        .set("log_level", "3")
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            config.commit_interval.as_millis().to_string(),
        )
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            config.heartbeat_interval.as_millis().to_string(),
        )
        .set("partition.assignment.strategy", "range,roundrobin")
        .set("fetch.wait.max.ms", "100");
    c.create().expect("consumer")
}

/// Drops a librdkafka client off the runtime threads (a drop can block).
async fn drop_off_runtime<T: Send + 'static>(client: T) {
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || drop(client)),
    )
    .await;
}

async fn tidings_publish(
    args: &Args,
    clock: &Clock,
    mock: &Mock,
    config: &KafkaConfig,
    case: &str,
) {
    let topic = mock.topic("tidings-pub");
    let bus = KafkaBus::connect(config.clone())
        .await
        .expect("connect to the mock cluster");
    let p = bus.publisher();
    // Producer id and topic metadata outside the timing.
    p.publish(&topic, Message::new(Bytes::from_static(WARMUP)))
        .await
        .expect("warm-up");
    let count = count_for(args, case);
    let start = Instant::now();
    if case == "publish" {
        for _ in 0..count {
            p.publish(&topic, Message::new(clock.payload(args.payload)))
                .await
                .expect("publish");
        }
    } else {
        let mut left = count;
        while left > 0 {
            let n = left.min(BATCH);
            let batch = (0..n)
                .map(|_| Message::new(clock.payload(args.payload)))
                .collect();
            for r in p.publish_batch(&topic, batch).await {
                r.expect("publish");
            }
            left -= n;
        }
    }
    let elapsed = start.elapsed();
    let _ = p.close().await;
    drop(p);
    drop_off_runtime(bus).await;
    report(
        "tidings",
        "kafka",
        case,
        count,
        elapsed,
        &format!("{} B payloads, acks=all, idempotent", args.payload),
    );
}

async fn bare_publish(args: &Args, clock: &Clock, mock: &Mock, config: &KafkaConfig, case: &str) {
    let topic = mock.topic("bare-pub");
    let producer = bare_producer(config);
    producer
        .send(
            FutureRecord::<(), [u8]>::to(&topic).payload(WARMUP),
            Timeout::Never,
        )
        .await
        .map_err(|(e, _)| e)
        .expect("warm-up");
    let count = count_for(args, case);
    let start = Instant::now();
    if case == "publish" {
        for _ in 0..count {
            let payload = clock.payload(args.payload);
            producer
                .send(
                    FutureRecord::<(), [u8]>::to(&topic)
                        .payload(&payload[..])
                        .headers(bare_headers()),
                    Timeout::Never,
                )
                .await
                .map_err(|(e, _)| e)
                .expect("publish");
        }
    } else {
        let mut left = count;
        while left > 0 {
            let n = left.min(BATCH);
            bare_batch(&producer, clock, &topic, n, args.payload).await;
            left -= n;
        }
    }
    let elapsed = start.elapsed();
    drop_off_runtime(producer).await;
    report(
        "rdkafka",
        "kafka",
        case,
        count,
        elapsed,
        &format!("{} B payloads, acks=all, idempotent", args.payload),
    );
}

/// `n` sends in flight at once, then every delivery report awaited.
async fn bare_batch(producer: &FutureProducer, clock: &Clock, topic: &str, n: u64, size: usize) {
    let payloads: Vec<Bytes> = (0..n).map(|_| clock.payload(size)).collect();
    let mut reports = Vec::with_capacity(payloads.len());
    for payload in &payloads {
        let mut record = FutureRecord::<(), [u8]>::to(topic)
            .payload(&payload[..])
            .headers(bare_headers());
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    reports.push(f);
                    break;
                }
                Err((e, r)) => {
                    // Local queue full: wait like `send` does.
                    assert!(
                        matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ),
                        "enqueue: {e}"
                    );
                    record = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    for f in reports {
        f.await
            .expect("producer dropped")
            .map_err(|(e, _)| e)
            .expect("publish");
    }
}

async fn tidings_e2e(
    args: &Args,
    clock: &Arc<Clock>,
    mock: &Mock,
    config: &KafkaConfig,
    handlers: usize,
) {
    let topic = mock.topic("tidings-e2e");
    // A new group per case: each pays only the initial rebalance delay.
    let group = format!("{topic}-group");
    mock.create(&retry_topic(&topic, &group));
    mock.create(&dead_letter_topic(&topic, &group));
    let bus = KafkaBus::connect(config.clone())
        .await
        .expect("connect to the mock cluster");
    let sink = Sink::new(args.count, clock.clone());
    let warm = Arc::new(Notify::new());
    let (s, w) = (sink.clone(), warm.clone());
    let consumer = Consumer::group(bus.subscriber(), group)
        .concurrency(handlers)
        .prefetch(prefetch())
        .handle(&topic, move |e: Event<Bytes, Raw>| {
            if e.data.len() < 8 {
                w.notify_one();
            } else {
                s.record(&e.data);
            }
            std::future::ready(Ok(()))
        })
        .start()
        .await
        .expect("start");
    let p = bus.publisher();
    let joined = Instant::now();
    p.publish(&topic, Message::new(Bytes::from_static(WARMUP)))
        .await
        .expect("warm-up");
    tokio::time::timeout(Duration::from_secs(60), warm.notified())
        .await
        .expect("the warm-up message was not handled within 60 s");
    let joined = joined.elapsed();
    let (ahead, batch) = ahead(args);
    let mut waits = 0;
    let rss_before = rss_mb();
    let start = Instant::now();
    let trace = timeline(&sink);
    let mut published = 0;
    while published < args.count {
        waits += pace(&sink, published, ahead, batch).await;
        if trace.is_some() {
            eprintln!(
                "  {:>5} ms published {published}",
                start.elapsed().as_millis()
            );
        }
        let n = (args.count - published).min(batch);
        let msgs = (0..n)
            .map(|_| Message::new(clock.payload(args.payload)))
            .collect();
        for r in p.publish_batch(&topic, msgs).await {
            r.expect("publish");
        }
        published += n;
    }
    wait_done(&sink, 600).await;
    let elapsed = start.elapsed();
    consumer.shutdown(Duration::from_secs(10)).await;
    let _ = p.close().await;
    drop(p);
    drop_off_runtime(bus).await;
    let detail = format!(
        "{} B payloads, handlers={handlers}, prefetch {}, batches of {batch}, \
         at most {ahead} ahead ({waits} ms paced); group joined in {:.1} s (untimed); {}; \
         rss {:.1} MB -> {:.1} MB",
        args.payload,
        prefetch(),
        joined.as_secs_f64(),
        sink.summary(),
        rss_before,
        rss_mb()
    );
    report(
        "tidings",
        "kafka",
        &format!("e2e/h{handlers}"),
        args.count,
        elapsed,
        &detail,
    );
}

async fn bare_e2e(args: &Args, clock: &Arc<Clock>, mock: &Mock, config: &KafkaConfig) {
    let topic = mock.topic("bare-e2e");
    let producer = bare_producer(config);
    let consumer = Arc::new(bare_consumer(config, &format!("{topic}-group")));
    consumer.subscribe(&[&topic]).expect("subscribe");
    let sink = Sink::new(args.count, clock.clone());
    let warm = Arc::new(Notify::new());
    let (s, w, c) = (sink.clone(), warm.clone(), consumer.clone());
    let task = tokio::spawn(async move {
        while s.handled.load(Ordering::Relaxed) < s.target {
            match c.recv().await {
                Ok(m) => {
                    let payload = m.payload().unwrap_or_default();
                    if payload.len() < 8 {
                        w.notify_one();
                    } else {
                        s.record(payload);
                    }
                    let _ = c.store_offset_from_message(&m);
                }
                Err(e) => eprintln!("bare consumer: {e}"),
            }
        }
    });
    let joined = Instant::now();
    producer
        .send(
            FutureRecord::<(), [u8]>::to(&topic).payload(WARMUP),
            Timeout::Never,
        )
        .await
        .map_err(|(e, _)| e)
        .expect("warm-up");
    tokio::time::timeout(Duration::from_secs(60), warm.notified())
        .await
        .expect("the warm-up message was not handled within 60 s");
    let joined = joined.elapsed();
    let (ahead, batch) = ahead(args);
    let mut waits = 0;
    let rss_before = rss_mb();
    let start = Instant::now();
    let trace = timeline(&sink);
    let mut published = 0;
    while published < args.count {
        waits += pace(&sink, published, ahead, batch).await;
        if trace.is_some() {
            eprintln!(
                "  {:>5} ms published {published}",
                start.elapsed().as_millis()
            );
        }
        let n = (args.count - published).min(batch);
        bare_batch(&producer, clock, &topic, n, args.payload).await;
        published += n;
    }
    wait_done(&sink, 600).await;
    let elapsed = start.elapsed();
    let _ = task.await;
    drop_off_runtime(producer).await;
    drop_off_runtime(consumer).await;
    let detail = format!(
        "{} B payloads, one recv loop storing offsets (auto-commit), batches of {batch}, \
         at most {ahead} ahead ({waits} ms paced); group joined in {:.1} s (untimed); {}; \
         rss {:.1} MB -> {:.1} MB",
        args.payload,
        joined.as_secs_f64(),
        sink.summary(),
        rss_before,
        rss_mb()
    );
    report("rdkafka", "kafka", "e2e", args.count, elapsed, &detail);
}
