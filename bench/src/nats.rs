//! NATS cases: Tidings and the bare client, same work, same run.
//!
//! JetStream (`nats-js`): publish awaiting each PubAck, batches of 1,000 with
//! their PubAcks pipelined, and end to end (batched publish → durable pull
//! consumer → handler → ack). Core NATS (`nats-core`): publish + flush per
//! message, batches of 1,000 with one flush, and end to end through a queue
//! group. Both sides send the message id as `Nats-Msg-Id` on JetStream;
//! Tidings also writes its CloudEvents headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use tidings::nats::{NatsBus, NatsConfig};
use tidings::{Consumer, Event, Message, Publisher, Raw};

use crate::Args;
use crate::common::{Clock, Sink, report, rss_mb, wait_arrived};

const URL: &str = "nats://127.0.0.1:4222";

/// Runs the selected cases on NATS.
pub async fn run(args: &Args) {
    let clock = Arc::new(Clock(Instant::now()));
    let bare = async_nats::connect("127.0.0.1:4222")
        .await
        .expect("nats-server on 127.0.0.1:4222 (nats-server -a 127.0.0.1 -p 4222 -js -sd DIR)");
    let js = jetstream::new(bare.clone());
    for case in &args.case {
        for core in [false, true] {
            match case.as_str() {
                "publish" | "publish-batch" => {
                    tidings_publish(args, &clock, case, core).await;
                    bare_publish(args, &clock, &bare, &js, case, core).await;
                }
                "e2e" => {
                    for &handlers in &args.handlers {
                        tidings_e2e(args, &clock, handlers, core).await;
                        bare_e2e(args, &clock, &bare, &js, handlers, core).await;
                    }
                }
                other => eprintln!("unknown case `{other}`"),
            }
        }
    }
    // The per-topic streams of this run.
    let mut names = js.stream_names();
    let mut ours = Vec::new();
    while let Some(Ok(name)) = names.next().await {
        if name.starts_with("BENCH_") || name.starts_with("TIDINGS_bench-") {
            ours.push(name);
        }
    }
    for name in ours {
        let _ = js.delete_stream(&name).await;
    }
}

fn label(core: bool) -> &'static str {
    if core { "nats-core" } else { "nats-js" }
}

fn topic(what: &str) -> String {
    format!("bench-{what}-{:08x}", fastrand_u32())
}

fn fastrand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

async fn bus(core: bool) -> NatsBus {
    let mut config = NatsConfig::from_url(&format!("{URL}?max_age=10m")).expect("config");
    if core {
        config = config.core();
    }
    NatsBus::connect(config).await.expect("connect")
}

async fn tidings_publish(args: &Args, clock: &Arc<Clock>, case: &str, core: bool) {
    let bus = bus(core).await;
    let p = bus.publisher();
    let topic = topic("pub");
    // Create the stream outside the timing.
    p.publish(&topic, Message::new("warm-up"))
        .await
        .expect("warm-up");
    let start = Instant::now();
    if case == "publish" {
        for _ in 0..args.count {
            p.publish(&topic, Message::new(clock.payload(args.payload)))
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
            for r in p.publish_batch(&topic, batch).await {
                r.expect("publish");
            }
            left -= n;
        }
    }
    let elapsed = start.elapsed();
    report(
        "tidings",
        label(core),
        case,
        args.count,
        elapsed,
        &format!("{} B payloads", args.payload),
    );
}

async fn bare_stream(js: &jetstream::Context, subject: &str) {
    js.create_stream(jetstream::stream::Config {
        name: format!("BENCH_{}", subject.replace('.', "_")),
        subjects: vec![subject.to_owned()],
        max_age: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .expect("create stream");
}

fn msg_id() -> String {
    tidings::Message::new(Bytes::new()).id.into()
}

/// The metadata a hand-written service would send too (an id, a source, a
/// time), under the same names and of the same length as Tidings writes, so
/// both sides move the same bytes.
fn bare_headers() -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("ce_id", msg_id().as_str());
    h.insert("ce_specversion", "1.0");
    h.insert("ce_source", "/tidings");
    h.insert(
        "ce_time",
        humantime::format_rfc3339_micros(std::time::SystemTime::now())
            .to_string()
            .as_str(),
    );
    h
}

async fn bare_publish(
    args: &Args,
    clock: &Arc<Clock>,
    client: &async_nats::Client,
    js: &jetstream::Context,
    case: &str,
    core: bool,
) {
    let subject = topic("bare-pub");
    if !core {
        bare_stream(js, &subject).await;
    }
    let publish = |payload: Bytes| {
        jetstream::message::PublishMessage::build()
            .payload(payload)
            .headers(bare_headers())
            .message_id(msg_id())
    };
    let start = Instant::now();
    if case == "publish" {
        for _ in 0..args.count {
            let payload = clock.payload(args.payload);
            if core {
                client
                    .publish_with_headers(subject.clone(), bare_headers(), payload)
                    .await
                    .expect("publish");
                client.flush().await.expect("flush");
            } else {
                js.send_publish(subject.clone(), publish(payload))
                    .await
                    .expect("publish")
                    .await
                    .expect("ack");
            }
        }
    } else {
        let mut left = args.count;
        while left > 0 {
            let n = left.min(1000);
            if core {
                for _ in 0..n {
                    client
                        .publish_with_headers(
                            subject.clone(),
                            bare_headers(),
                            clock.payload(args.payload),
                        )
                        .await
                        .expect("publish");
                }
                client.flush().await.expect("flush");
            } else {
                let mut acks = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    acks.push(
                        js.send_publish(subject.clone(), publish(clock.payload(args.payload)))
                            .await
                            .expect("publish")
                            .into_future(),
                    );
                }
                for r in join_all(acks).await {
                    r.expect("ack");
                }
            }
            left -= n;
        }
    }
    let elapsed = start.elapsed();
    report(
        "async-nats",
        label(core),
        case,
        args.count,
        elapsed,
        &format!("{} B payloads", args.payload),
    );
}

async fn tidings_e2e(args: &Args, clock: &Arc<Clock>, handlers: usize, core: bool) {
    let bus = bus(core).await;
    let topic = topic("e2e");
    let sink = Sink::new(args.count, clock.clone());
    let s = sink.clone();
    let consumer = Consumer::group(bus.subscriber(), "bench")
        .concurrency(handlers)
        .prefetch(256.max(handlers * 4))
        .handle(&topic, move |e: Event<Bytes, Raw>| {
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
        let n = left.min(1000);
        let batch = (0..n)
            .map(|_| Message::new(clock.payload(args.payload)))
            .collect();
        for r in p.publish_batch(&topic, batch).await {
            r.expect("publish");
        }
        left -= n;
    }
    let arrived = wait_arrived(&sink, 600, core).await;
    let elapsed = arrived.at - start;
    consumer.shutdown(Duration::from_secs(10)).await;
    let detail = format!(
        "handlers={handlers} {}; rss {:.1} MB -> {:.1} MB{}",
        sink.summary(),
        rss_before,
        rss_mb(),
        arrived.lost(args.count)
    );
    report(
        "tidings",
        label(core),
        &format!("e2e/h{handlers}"),
        arrived.count,
        elapsed,
        &detail,
    );
}

/// The baseline: a durable pull consumer (or a queue subscription) read by
/// one task that hands messages to `handlers` workers, each acking.
async fn bare_e2e(
    args: &Args,
    clock: &Arc<Clock>,
    client: &async_nats::Client,
    js: &jetstream::Context,
    handlers: usize,
    core: bool,
) {
    let subject = topic("bare-e2e");
    let sink = Sink::new(args.count, clock.clone());
    let (tx, rx) = async_channel_like(handlers);
    let mut workers = Vec::new();
    for rx in rx {
        let s = sink.clone();
        workers.push(tokio::spawn(async move {
            let mut rx = rx;
            while let Some(item) = rx.recv().await {
                match item {
                    Item::Js(m) => {
                        s.record(&m.payload);
                        m.ack().await.expect("ack");
                    }
                    Item::Core(m) => s.record(&m.payload),
                }
            }
        }));
    }
    let intake = if core {
        let mut sub = client
            .queue_subscribe(subject.clone(), "bench".into())
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        tokio::spawn(async move {
            let mut i = 0usize;
            while let Some(m) = sub.next().await {
                if tx[i % tx.len()].send(Item::Core(m)).await.is_err() {
                    break;
                }
                i += 1;
            }
        })
    } else {
        bare_stream(js, &subject).await;
        let stream = js
            .get_stream(format!("BENCH_{}", subject.replace('.', "_")))
            .await
            .expect("stream");
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("bench".into()),
                max_ack_pending: 256.max(handlers as i64 * 4),
                ..Default::default()
            })
            .await
            .expect("consumer");
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(256.max(handlers * 4))
            .messages()
            .await
            .expect("messages");
        tokio::spawn(async move {
            let mut i = 0usize;
            while let Some(Ok(m)) = messages.next().await {
                if tx[i % tx.len()].send(Item::Js(Box::new(m))).await.is_err() {
                    break;
                }
                i += 1;
            }
        })
    };
    let start = Instant::now();
    let mut left = args.count;
    while left > 0 {
        let n = left.min(1000);
        if core {
            for _ in 0..n {
                client
                    .publish_with_headers(
                        subject.clone(),
                        bare_headers(),
                        clock.payload(args.payload),
                    )
                    .await
                    .expect("publish");
            }
            client.flush().await.expect("flush");
        } else {
            let mut acks = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let publish = jetstream::message::PublishMessage::build()
                    .payload(clock.payload(args.payload))
                    .headers(bare_headers())
                    .message_id(msg_id());
                acks.push(
                    js.send_publish(subject.clone(), publish)
                        .await
                        .expect("publish")
                        .into_future(),
                );
            }
            for r in join_all(acks).await {
                r.expect("ack");
            }
        }
        left -= n;
    }
    let arrived = wait_arrived(&sink, 600, core).await;
    let elapsed = arrived.at - start;
    intake.abort();
    for w in workers {
        w.abort();
    }
    report(
        "async-nats",
        label(core),
        &format!("e2e/h{handlers}"),
        arrived.count,
        elapsed,
        &format!(
            "handlers={handlers} {}{}",
            sink.summary(),
            arrived.lost(args.count)
        ),
    );
}

enum Item {
    Js(Box<jetstream::Message>),
    Core(async_nats::Message),
}

type Lanes = (
    Vec<tokio::sync::mpsc::Sender<Item>>,
    Vec<tokio::sync::mpsc::Receiver<Item>>,
);

fn async_channel_like(handlers: usize) -> Lanes {
    (0..handlers.max(1))
        .map(|_| tokio::sync::mpsc::channel(64))
        .unzip()
}
