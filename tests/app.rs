//! The service host: several consumers under one stop, phased shutdown (in
//! the in-process bus and on Redis), the signal path in a child process,
//! and a dead part taking the app down.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tidings::memory::MemoryBus;
use tidings::prelude::*;
use tidings::testkit::{unique, within};
use tidings::{App, ConsumerBuilder, StopCause};

/// A consumer whose handler takes `ms` and counts what it handled.
fn slow_consumer(
    builder: ConsumerBuilder,
    topic: &str,
    ms: u64,
    handled: Arc<AtomicUsize>,
) -> ConsumerBuilder {
    builder.concurrency(4).handle(topic, move |_: Event<u64>| {
        let handled = handled.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            handled.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>(())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_consumers_drain_in_one_phased_shutdown() {
    let bus = MemoryBus::new();
    let topic = unique("app");
    let counts: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let mut app = App::new()
        .without_signals()
        .deadline(Duration::from_secs(10));
    for (i, handled) in counts.iter().enumerate() {
        let group = format!("g{i}");
        app = app.consumer(
            &group,
            slow_consumer(
                tidings::Consumer::group(bus.subscriber(), group.as_str()),
                &topic,
                50,
                handled.clone(),
            ),
        );
    }
    let handle = app.shutdown_handle();
    let health = app.health();
    let running = tokio::spawn(app.run());
    // The groups exist once their consumers started: give them work.
    within(10, "the consumers to start", health.started()).await;
    for n in 0..12u64 {
        bus.publisher()
            .publish_event(&topic, Event::new(n))
            .await
            .expect("published");
    }
    // Stop while handlers are in flight: they finish, then the app returns.
    within(10, "a first handler", async {
        while counts.iter().all(|c| c.load(Ordering::SeqCst) == 0) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    handle.shutdown();
    let report = within(30, "the app to stop", running)
        .await
        .expect("joined")
        .expect("a clean stop");
    assert_eq!(report.cause, StopCause::Requested);
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.consumers.len(), 3);
    for (name, r) in &report.consumers {
        assert!(r.drained, "{name}: {r:?}");
        assert_eq!(
            r.settled, r.received,
            "{name}: everything received was settled"
        );
    }
    // Everything received was handled once; what was not received stays queued.
    for (i, handled) in counts.iter().enumerate() {
        let group = format!("g{i}");
        let received = report.consumers[i].1.received as usize;
        assert_eq!(handled.load(Ordering::SeqCst), received, "{group}");
        assert_eq!(
            bus.queued(&topic, &group),
            12 - received,
            "{group}: nothing acked twice or lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_fails_to_start_stops_the_others() {
    let bus = MemoryBus::new();
    let handled = Arc::new(AtomicUsize::new(0));
    let good = slow_consumer(
        tidings::Consumer::group(bus.subscriber(), "good"),
        &unique("t"),
        1,
        handled,
    );
    // A consumer without handlers cannot start.
    let bad = tidings::Consumer::group(bus.subscriber(), "bad");
    let result = App::new()
        .without_signals()
        .consumer("good", good)
        .consumer("bad", bad)
        .run()
        .await;
    assert!(
        matches!(result, Err(tidings::Error::Config { .. })),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ends_takes_the_app_down_with_a_report() {
    let bus = MemoryBus::new();
    let handled = Arc::new(AtomicUsize::new(0));
    let consumer = slow_consumer(
        tidings::Consumer::group(bus.subscriber(), "g"),
        &unique("t"),
        1,
        handled,
    );
    let result = App::new()
        .without_signals()
        .consumer("g", consumer)
        .task("poller", async {
            Err(tidings::Error::Closed("the upstream feed"))
        })
        .run()
        .await;
    let error = result.expect_err("the app stops with an error");
    assert!(error.to_string().contains("poller"), "{error}");
    assert!(error.to_string().contains("the upstream feed"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phased_shutdown_on_redis() {
    let bus = tidings::connect("redis://127.0.0.1:6379")
        .await
        .unwrap_or_else(|e| {
            panic!("Redis must run on 127.0.0.1:6379 ({e}); scripts/brokers.sh starts it")
        });
    let topic = unique("app-redis");
    let counts: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
    let mut app = App::new()
        .without_signals()
        .deadline(Duration::from_secs(10))
        .publisher(bus.publisher().clone());
    for (i, handled) in counts.iter().enumerate() {
        app = app.consumer(
            format!("g{i}"),
            slow_consumer(bus.consumer(format!("g{i}")), &topic, 50, handled.clone()),
        );
    }
    let handle = app.shutdown_handle();
    let health = app.health();
    let running = tokio::spawn(app.run());
    // Consumer groups are created at start.
    within(10, "both consumers", health.started()).await;
    for n in 0..20u64 {
        bus.publish_event(&topic, Event::new(n))
            .await
            .expect("published");
    }
    within(10, "a first handler", async {
        while counts.iter().all(|c| c.load(Ordering::SeqCst) == 0) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    handle.shutdown();
    let report = within(30, "the app to stop", running)
        .await
        .expect("joined")
        .expect("a clean stop");
    assert!(report.is_clean(), "{report}");
    for (i, (name, r)) in report.consumers.iter().enumerate() {
        assert!(r.drained, "{name}: {r:?}");
        assert_eq!(r.settled, r.received, "{name}");
        assert_eq!(
            counts[i].load(Ordering::SeqCst) as u64,
            r.received,
            "{name}: handled once each"
        );
    }
}

/// The child half of `sigterm_drains_and_exits_zero`: runs only when that
/// test starts this binary again with `TIDINGS_APP_CHILD` set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_child_process() {
    if std::env::var_os("TIDINGS_APP_CHILD").is_none() {
        return;
    }
    // Installs the process's SIGTERM handler before saying ready, so an
    // early signal is never the default action (death).
    let _early = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a handler");
    let bus = MemoryBus::new();
    let handled = Arc::new(AtomicUsize::new(0));
    let topic = unique("child");
    let app = App::new()
        .consumer(
            "g",
            slow_consumer(
                tidings::Consumer::group(bus.subscriber(), "g"),
                &topic,
                200,
                handled.clone(),
            ),
        )
        .task("load", {
            let publisher = bus.publisher();
            let topic = topic.clone();
            async move {
                for n in 0..5u64 {
                    publisher.publish_event(&topic, Event::new(n)).await?;
                }
                println!("ready");
                std::future::pending::<tidings::Result<()>>().await
            }
        });
    let report = app.run().await.expect("a clean stop");
    assert_eq!(report.cause, StopCause::Signal);
    assert!(report.is_clean(), "{report}");
    println!("stopped: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let exe = std::env::current_exe().expect("this test binary");
    let mut child = tidings::testkit::ChildProcess::start(
        &exe,
        &[
            "app_child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ],
        &[("TIDINGS_APP_CHILD", "1")],
    );
    child.wait_for("ready", Duration::from_secs(30)).await;
    // Bounded: a few signals until it stops (the first may come before the
    // app's own handler is in place; the early one keeps it alive).
    let mut ended = None;
    for _ in 0..20 {
        child.signal_term();
        if let Some(status) = child.exited_within(Duration::from_millis(500)).await {
            ended = Some(status);
            break;
        }
    }
    let (lines, ok) = child.finish(Duration::from_secs(30)).await;
    assert!(ended.is_some() || ok, "the child stopped on SIGTERM");
    assert!(ok, "the child exited 0 after draining: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("stopped: ")), "{lines:?}");
}

/// A handler that outlasts the deadline makes the stop unclean: `run`
/// returns an error that says which consumer did not drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_past_its_deadline_is_an_error() {
    let bus = MemoryBus::new();
    let topic = unique("stuck");
    let entered = Arc::new(tokio::sync::Notify::new());
    let consumer = tidings::Consumer::group(bus.subscriber(), "slow").handle(&topic, {
        let entered = entered.clone();
        move |_: Event<u64>| {
            let entered = entered.clone();
            async move {
                entered.notify_one();
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, HandlerError>(())
            }
        }
    });
    let app = App::new()
        .without_signals()
        .deadline(Duration::from_millis(200))
        .consumer("slow", consumer);
    let health = app.health();
    let stop = app.shutdown_handle();
    let running = tokio::spawn(app.run());
    within(10, "the app to start", health.started()).await;
    bus.publisher()
        .publish_event(&topic, Event::new(1u64))
        .await
        .expect("published");
    within(10, "the handler to start", entered.notified()).await;
    stop.shutdown();
    let error = within(10, "the app to stop", running)
        .await
        .expect("joined")
        .expect_err("not drained within 200 ms");
    let text = error.to_string();
    assert!(
        text.contains("not clean") && text.contains("slow"),
        "{text}"
    );
}
