//! The in-process bus, and a bare `tokio::sync::mpsc` hand-off as its baseline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidings::memory::{MemoryBus, MemoryConfig};
use tidings::{Consumer, Event, Message, Publisher, Raw, Subscriber};

use crate::Args;
use crate::common::{Clock, Sink, report, rss_mb, wait_done};

/// Runs the selected cases on the in-process bus.
pub async fn run(args: &Args) {
    let clock = Arc::new(Clock(Instant::now()));
    for case in &args.case {
        match case.as_str() {
            "publish" | "publish-batch" => memory_publish(args, &clock, case).await,
            "e2e" => {
                for &handlers in &args.handlers {
                    memory_e2e(args, &clock, handlers).await;
                    mpsc_e2e(args, &clock, handlers).await;
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
    // A bounded group queue, so the publisher waits for the handlers as in steady state.
    let bus = MemoryBus::with_config(MemoryConfig {
        group_capacity: 1024,
        ..MemoryConfig::default()
    });
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
    for _ in 0..args.count {
        bus.publish("bench", Message::new(clock.payload(args.payload)))
            .await
            .expect("publish");
    }
    wait_done(&sink, 600).await;
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
    for i in 0..args.count as usize {
        lanes[i % handlers]
            .send(clock.payload(args.payload))
            .await
            .expect("send");
    }
    wait_done(&sink, 600).await;
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
