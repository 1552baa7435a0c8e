//! What every broker's cases share: the clock in the payload, the sink that
//! counts handled messages, the report line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use tokio::sync::Notify;

/// Nanoseconds since the run's epoch, written into payloads for latency.
pub struct Clock(pub Instant);

impl Clock {
    pub fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
    pub fn payload(&self, size: usize) -> Bytes {
        let mut b = BytesMut::with_capacity(size.max(8));
        b.put_u64(self.now());
        b.resize(size.max(8), b'x');
        b.freeze()
    }
    pub fn latency_us(&self, payload: &[u8]) -> u64 {
        let sent = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
        self.now().saturating_sub(sent) / 1_000
    }
}

/// Counts handled messages, samples latencies, and wakes the waiter at the end.
pub struct Sink {
    pub target: u64,
    pub handled: AtomicU64,
    pub done: Notify,
    latencies: Mutex<Histogram<u64>>,
    clock: Arc<Clock>,
}

impl Sink {
    pub fn new(target: u64, clock: Arc<Clock>) -> Arc<Sink> {
        Arc::new(Sink {
            target,
            handled: AtomicU64::new(0),
            done: Notify::new(),
            latencies: Mutex::new(Histogram::new(3).expect("histogram")),
            clock,
        })
    }
    pub fn record(&self, payload: &[u8]) {
        let n = self.handled.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(16) {
            let us = self.clock.latency_us(payload);
            let _ = self.latencies.lock().expect("lock").record(us);
        }
        if n == self.target {
            self.done.notify_one();
        }
    }
    pub fn summary(&self) -> String {
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

pub fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |pages| pages * 4096.0 / 1_048_576.0)
}

pub fn report(
    library: &str,
    broker: &str,
    case: &str,
    count: u64,
    elapsed: Duration,
    detail: &str,
) {
    let rate = count as f64 / elapsed.as_secs_f64();
    println!("RESULT {library} {broker} {case} {rate:.0} msg/s");
    println!("  {count} msgs in {:.3} s; {detail}", elapsed.as_secs_f64());
}

/// The in-process bus runs on one core, brokers on a two-thread runtime;
/// `workers` asks for a multi-thread runtime of that many for all.
pub fn runtime(broker: &str, workers: Option<usize>) -> tokio::runtime::Runtime {
    let mut builder = match workers {
        None if broker == "memory" => tokio::runtime::Builder::new_current_thread(),
        _ => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(workers.unwrap_or(2).max(1));
            b
        }
    };
    builder.enable_all().build().expect("runtime")
}

/// Waits until the sink saw its target, failing after `secs` seconds.
pub async fn wait_done(sink: &Sink, secs: u64) {
    wait_arrived(sink, secs, false).await;
}

/// How long an at-most-once run (core NATS) may see no message before the
/// rest count as lost.
pub const STALL: Duration = Duration::from_secs(5);

/// What an at-most-once run delivered: every message, or those that came
/// before none came for [`STALL`].
pub struct Arrived {
    /// Messages handled.
    pub count: u64,
    /// When the last of them was (the run's end, for its rate).
    pub at: Instant,
}

impl Arrived {
    /// The report's detail line for what was lost, if anything.
    pub fn lost(&self, target: u64) -> String {
        match target - self.count.min(target) {
            0 => String::new(),
            lost => format!(
                "; LOST {lost} of {target} (core NATS is at most once: the client dropped them as a slow consumer)"
            ),
        }
    }
}

/// Waits until the sink saw its target, or, when the broker is at most
/// once (`lossy`), until no message came for [`STALL`]: core NATS drops
/// what a slow subscriber cannot take (bare client and Tidings alike), and
/// a run that waited for those would never end. A broker that loses
/// nothing is waited for (a redelivery may take a while). Fails after
/// `secs` seconds.
pub async fn wait_arrived(sink: &Sink, secs: u64, lossy: bool) -> Arrived {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = (sink.handled.load(Ordering::Relaxed), Instant::now());
    loop {
        let notified = sink.done.notified();
        let handled = sink.handled.load(Ordering::Relaxed);
        if handled >= sink.target {
            return Arrived {
                count: handled,
                at: Instant::now(),
            };
        }
        if handled != last.0 {
            last = (handled, Instant::now());
        } else if lossy && last.1.elapsed() >= STALL {
            return Arrived {
                count: handled,
                at: last.1,
            };
        }
        assert!(
            Instant::now() < deadline,
            "only {handled} of {} messages arrived within {secs} s",
            sink.target
        );
        // Looks again every 100 ms for the stall; the last message wakes it.
        let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
    }
}
