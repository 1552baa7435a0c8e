//! The benchmark harness: throughput and latency of Tidings against the bare
//! client of each broker, in the same run.
//!
//! ```text
//! cargo run --release --example bench -- --broker memory --case e2e --count 1000000 --handlers 1,8
//! ```
//!
//! Prints one line per case for scripts, `RESULT <library> <broker> <case> <msgs_per_s> msg/s`,
//! followed by details (latency percentiles from publish to handler, resident memory).
//! Cases: `publish` (one at a time, awaiting each), `publish-batch` (batches of 1,000),
//! `e2e` (publish → runtime → handler → ack). The in-process bus runs on a
//! single-threaded runtime: one core.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use tidings::memory::{MemoryBus, MemoryConfig};
use tidings::{Consumer, Event, Message, Publisher, Raw, Subscriber};
use tokio::sync::Notify;

#[derive(Parser, Debug)]
struct Args {
    /// Brokers to run: memory.
    #[arg(long, value_delimiter = ',', default_value = "memory")]
    broker: Vec<String>,
    /// Cases to run: publish, publish-batch, e2e.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "publish,publish-batch,e2e"
    )]
    case: Vec<String>,
    /// Messages per case.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Payload size in bytes (at least 8: the first 8 carry the send time).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Handler concurrency for e2e, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    handlers: Vec<usize>,
}

/// Nanoseconds since the run's epoch, written into payloads for latency.
struct Clock(Instant);

impl Clock {
    fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
    fn payload(&self, size: usize) -> Bytes {
        let mut b = BytesMut::with_capacity(size.max(8));
        b.put_u64(self.now());
        b.resize(size.max(8), b'x');
        b.freeze()
    }
    fn latency_us(&self, payload: &[u8]) -> u64 {
        let sent = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
        self.now().saturating_sub(sent) / 1_000
    }
}

/// Counts handled messages, samples latencies, and wakes the waiter at the end.
struct Sink {
    target: u64,
    handled: AtomicU64,
    done: Notify,
    latencies: Mutex<Histogram<u64>>,
    clock: Arc<Clock>,
}

impl Sink {
    fn new(target: u64, clock: Arc<Clock>) -> Arc<Sink> {
        Arc::new(Sink {
            target,
            handled: AtomicU64::new(0),
            done: Notify::new(),
            latencies: Mutex::new(Histogram::new(3).expect("histogram")),
            clock,
        })
    }
    fn record(&self, payload: &[u8]) {
        let n = self.handled.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(16) {
            let us = self.clock.latency_us(payload);
            let _ = self.latencies.lock().expect("lock").record(us);
        }
        if n == self.target {
            self.done.notify_one();
        }
    }
    fn summary(&self) -> String {
        let h = self.latencies.lock().expect("lock");
        format!(
            "latency p50={}us p99={}us p99.9={}us max={}us",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        )
    }
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |pages| pages * 4096.0 / 1_048_576.0)
}

fn report(library: &str, broker: &str, case: &str, count: u64, elapsed: Duration, detail: &str) {
    let rate = count as f64 / elapsed.as_secs_f64();
    println!("RESULT {library} {broker} {case} {rate:.0} msg/s");
    println!("  {count} msgs in {:.3} s; {detail}", elapsed.as_secs_f64());
}

fn main() {
    let args = Args::parse();
    for broker in &args.broker {
        match broker.as_str() {
            "memory" => memory_cases(&args),
            other => eprintln!("unknown broker `{other}`; known: memory"),
        }
    }
}

fn one_core() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn memory_cases(args: &Args) {
    let clock = Arc::new(Clock(Instant::now()));
    let rt = one_core();
    for case in &args.case {
        match case.as_str() {
            "publish" | "publish-batch" => rt.block_on(memory_publish(args, &clock, case)),
            "e2e" => {
                for &handlers in &args.handlers {
                    rt.block_on(memory_e2e(args, &clock, handlers));
                    rt.block_on(mpsc_e2e(args, &clock, handlers));
                }
            }
            other => eprintln!("unknown case `{other}`"),
        }
    }
}

fn bus(count: u64) -> MemoryBus {
    MemoryBus::with_config(MemoryConfig {
        group_capacity: count as usize + 1,
        ..MemoryConfig::default()
    })
}

async fn memory_publish(args: &Args, clock: &Arc<Clock>, case: &str) {
    let bus = bus(args.count);
    bus.declare_group("bench", "sink").await.expect("declare");
    let start = Instant::now();
    if case == "publish" {
        for _ in 0..args.count {
            bus.publish("bench", Message::new(clock.payload(args.payload)))
                .await
                .expect("publish");
        }
    } else {
        let mut left = args.count;
        while left > 0 {
            let n = left.min(1000);
            let batch = (0..n)
                .map(|_| Message::new(clock.payload(args.payload)))
                .collect();
            for r in bus.publish_batch("bench", batch).await {
                r.expect("publish");
            }
            left -= n;
        }
    }
    let elapsed = start.elapsed();
    report(
        "tidings",
        "memory",
        case,
        args.count,
        elapsed,
        &format!("{} B payloads", args.payload),
    );
}

async fn memory_e2e(args: &Args, clock: &Arc<Clock>, handlers: usize) {
    let bus = bus(args.count);
    let sink = Sink::new(args.count, clock.clone());
    let s = sink.clone();
    let consumer = Consumer::group(bus.subscriber(), "bench")
        .concurrency(handlers)
        .prefetch(256.max(handlers * 4))
        .handle("bench", move |e: Event<Bytes, Raw>| {
            s.record(&e.data);
            std::future::ready(Ok(()))
        })
        .start()
        .await
        .expect("start");
    let rss_before = rss_mb();
    let start = Instant::now();
    let done = sink.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    for _ in 0..args.count {
        bus.publish("bench", Message::new(clock.payload(args.payload)))
            .await
            .expect("publish");
    }
    done.await;
    let elapsed = start.elapsed();
    consumer.shutdown(Duration::from_secs(10)).await;
    let detail = format!(
        "handlers={handlers} {}; rss {:.1} MB -> {:.1} MB",
        sink.summary(),
        rss_before,
        rss_mb()
    );
    report(
        "tidings",
        "memory",
        &format!("e2e/h{handlers}"),
        args.count,
        elapsed,
        &detail,
    );
}

/// The baseline: the same hand-off through a bare `tokio::sync::mpsc` channel
/// to `handlers` worker tasks, no runtime, no acks.
async fn mpsc_e2e(args: &Args, clock: &Arc<Clock>, handlers: usize) {
    let sink = Sink::new(args.count, clock.clone());
    let mut lanes = Vec::new();
    for _ in 0..handlers {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(256);
        let s = sink.clone();
        tokio::spawn(async move {
            while let Some(payload) = rx.recv().await {
                s.record(&payload);
            }
        });
        lanes.push(tx);
    }
    let start = Instant::now();
    let done = sink.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    for i in 0..args.count as usize {
        lanes[i % handlers]
            .send(clock.payload(args.payload))
            .await
            .expect("send");
    }
    done.await;
    let elapsed = start.elapsed();
    let detail = format!("handlers={handlers} {}", sink.summary());
    report(
        "tokio-mpsc",
        "memory",
        &format!("e2e/h{handlers}"),
        args.count,
        elapsed,
        &detail,
    );
}
