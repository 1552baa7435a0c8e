//! Recovery: connections cut through the fault proxy (and, opt-in, a broker
//! restart) in the middle of a stream of confirmed publishes.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tidings_amqp::{AmqpBus, QueueType};
use tidings_core::testkit::{FaultProxy, unique, within};
use tidings_core::{Consumer, Event, Publisher, PublisherExt, Raw};
use tokio::sync::Notify;

const TOTAL: usize = 3000;
const PUBLISHERS: usize = 8;

#[derive(Default)]
struct Seen {
    ids: Mutex<HashSet<String>>,
    /// Handler calls, duplicates included.
    handled: std::sync::atomic::AtomicUsize,
    changed: Notify,
}

/// What a stream with a fault in the middle did.
struct Outcome {
    /// Every publish that was confirmed (ids), before, during and after the fault.
    confirmed: Vec<String>,
    /// How many were confirmed once the fault was over (`disrupt` returned).
    confirmed_after: usize,
    /// Publishes that failed with an error (and were retried).
    failures: usize,
}

/// Publishes at least `TOTAL` messages from `PUBLISHERS` concurrent tasks (so
/// many confirms are outstanding when the fault hits), retrying failed
/// publishes as a caller would, while `disrupt` runs once in the middle. The
/// publishers keep going until `disrupt` has returned and another `TOTAL / 2`
/// messages were sent after it, so the fault always hits a running stream
/// (even when `disrupt` takes seconds to start, like `rabbitmqctl`).
async fn stream_with_fault(bus: &AmqpBus, topic: &str, disrupt: impl AsyncFnOnce()) -> Outcome {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let publisher = bus.publisher();
    let sent = Arc::new(AtomicUsize::new(0));
    let limit = Arc::new(AtomicUsize::new(usize::MAX));
    let confirmed_count = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..PUBLISHERS {
        let (p, topic, sent, limit, confirmed_count, failures) = (
            publisher.clone(),
            topic.to_owned(),
            sent.clone(),
            limit.clone(),
            confirmed_count.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut confirmed = Vec::new();
            while sent.fetch_add(1, Relaxed) < limit.load(Relaxed) {
                let mut tries = 0;
                loop {
                    let event = Event::<Bytes, Raw>::with_codec(Bytes::from_static(b"payload"));
                    let id = event.id().to_owned();
                    match p.publish_event(&topic, event).await {
                        Ok(_) => {
                            confirmed.push(id);
                            confirmed_count.fetch_add(1, Relaxed);
                            break;
                        }
                        Err(e) => {
                            assert!(e.is_transient(), "a fault is a transient error: {e}");
                            failures.fetch_add(1, Relaxed);
                            tries += 1;
                            assert!(tries < 300, "publishing kept failing: {e}");
                            // A caller's retry pause, not synchronisation.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            confirmed
        }));
    }
    within(60, "the first half", async {
        while sent.load(Relaxed) < TOTAL / 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    disrupt().await;
    let confirmed_before_end = confirmed_count.load(Relaxed);
    limit.store(TOTAL.max(sent.load(Relaxed) + TOTAL / 2), Relaxed);
    let mut confirmed = Vec::new();
    for t in tasks {
        confirmed.extend(
            within(180, "the publishers", t)
                .await
                .expect("publisher task"),
        );
    }
    Outcome {
        confirmed_after: confirmed.len() - confirmed_before_end,
        confirmed,
        failures: failures.load(Relaxed),
    }
}

/// Runs the stream with the fault against a consumer group, waits until
/// every confirmed message was handled, and returns what happened.
async fn every_confirmed_message_is_handled(
    bus: AmqpBus,
    topic: String,
    disrupt: impl AsyncFnOnce(),
) -> Outcome {
    let seen = Arc::new(Seen::default());
    let record = seen.clone();
    let consumer = Consumer::group(bus.subscriber(), "faults")
        .concurrency(8)
        .handle(&topic, move |e: Event<Bytes, Raw>| {
            let record = record.clone();
            async move {
                record
                    .ids
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(e.id().to_owned());
                record
                    .handled
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                record.changed.notify_waiters();
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let outcome = stream_with_fault(&bus, &topic, disrupt).await;
    let confirmed = &outcome.confirmed;
    assert!(confirmed.len() >= TOTAL, "confirmed {}", confirmed.len());
    assert!(
        outcome.confirmed_after >= TOTAL / 2,
        "confirmed after the fault: {}",
        outcome.confirmed_after
    );
    within(120, "every confirmed message to be handled", async {
        loop {
            let notified = seen.changed.notified();
            {
                let ids = seen.ids.lock().unwrap_or_else(|e| e.into_inner());
                if confirmed.iter().all(|id| ids.contains(id)) {
                    return;
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    })
    .await;
    let report = consumer.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained);
    bus.close().await;
    let distinct = seen.ids.lock().unwrap_or_else(|e| e.into_inner()).len();
    let handled = seen.handled.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{} confirmed ({} after the fault), {} publishes failed with an error and were retried; \
         {handled} handler calls for {distinct} distinct messages ({} duplicates; \
         {} handled but never confirmed, from failed publishes that reached the queue)",
        confirmed.len(),
        outcome.confirmed_after,
        outcome.failures,
        handled - distinct,
        distinct.saturating_sub(confirmed.len()),
    );
    outcome
}

async fn cut_through_proxy(queue_type: QueueType) {
    let proxy = FaultProxy::start(common::BROKER).await.expect("proxy");
    let bus = common::connect(common::config(&proxy.addr().to_string(), queue_type)).await;
    let topic = unique("cut");
    bus.subscriber()
        .declare_group(&topic, "faults")
        .await
        .expect("declare");
    every_confirmed_message_is_handled(bus, topic, async || {
        proxy.cut();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_stream_quorum() {
    cut_through_proxy(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_stream_classic() {
    cut_through_proxy(QueueType::Classic).await;
}

/// The connection is refused for a while after the cut: publishes fail fast
/// with errors (never hang), and everything recovers once it is allowed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_with_refused_reconnects() {
    let proxy = FaultProxy::start(common::BROKER).await.expect("proxy");
    let bus = common::connect(common::config(&proxy.addr().to_string(), QueueType::Quorum)).await;
    let topic = unique("outage");
    bus.subscriber()
        .declare_group(&topic, "faults")
        .await
        .expect("declare");
    every_confirmed_message_is_handled(bus, topic, async || {
        proxy.refuse(true);
        proxy.cut();
        tokio::time::sleep(Duration::from_secs(2)).await; // the outage being simulated
        proxy.refuse(false);
    })
    .await;
}

/// Restarts the broker itself (`rabbitmqctl stop_app` / `start_app`) in the
/// middle of the stream. Ignored by default: RabbitMQ on these machines is
/// shared by every test running at the same time. Run it alone with
/// `cargo test -p tidings-amqp --test amqp_faults -- --ignored broker_restart`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared RabbitMQ; run alone with --ignored"]
async fn broker_restart_mid_stream() {
    let bus = common::connect(common::config(common::BROKER, QueueType::Quorum)).await;
    let topic = unique("restart");
    bus.subscriber()
        .declare_group(&topic, "faults")
        .await
        .expect("declare");
    let outcome = every_confirmed_message_is_handled(bus, topic, async || {
        for action in ["stop_app", "start_app"] {
            let status = tokio::task::spawn_blocking(move || {
                std::process::Command::new("rabbitmqctl")
                    .arg(action)
                    .status()
            })
            .await
            .expect("join")
            .expect("run rabbitmqctl");
            assert!(status.success(), "rabbitmqctl {action} failed");
        }
    })
    .await;
    assert!(
        outcome.failures > 0,
        "the restart did not hit the stream: no publish failed ({} confirmed)",
        outcome.confirmed.len()
    );
}

/// Publishing never outlives its timeout: with the proxy stalled, a publish
/// fails with a timeout instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_broker_times_out() {
    let proxy = FaultProxy::start(common::BROKER).await.expect("proxy");
    let mut config = common::config(&proxy.addr().to_string(), QueueType::Quorum);
    config.publish_timeout = Duration::from_millis(500);
    let bus = common::connect(config).await;
    let topic = unique("stall");
    bus.subscriber()
        .declare_group(&topic, "faults")
        .await
        .expect("declare");
    let p: Arc<dyn Publisher> = bus.publisher();
    p.publish(&topic, tidings_core::Message::new("ok"))
        .await
        .expect("publish");
    proxy.stall(true);
    let r = within(
        10,
        "the publish to time out",
        p.publish(&topic, tidings_core::Message::new("stuck")),
    )
    .await;
    assert!(
        matches!(r, Err(tidings_core::Error::Timeout { .. })),
        "{r:?}"
    );
    proxy.stall(false);
}
