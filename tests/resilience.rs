//! The middleware on real brokers: a circuit breaker opens under repeated
//! failures, stops intake (no handler call while open), and closes after
//! its probe succeeds — with every message handled in the end.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tidings::Backoff;
use tidings::layers::prelude::*;
use tidings::prelude::*;
use tidings_tests::namespace;

async fn breaker_on(url: &str) {
    let bus = tidings::connect(url).await.unwrap_or_else(|e| {
        panic!("cannot connect to {url}: {e}; start the brokers with scripts/brokers.sh")
    });
    let ns = namespace("breaker");
    let topic = format!("{ns}payments");
    let healthy = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let handled = Arc::new(AtomicU32::new(0));
    let breaker =
        CircuitBreaker::new(Threshold::Consecutive(3)).open_for(Duration::from_millis(500));
    let mut states = breaker.watch();
    // Calls that found the breaker open: there must be none.
    let calls_while_open = Arc::new(AtomicU32::new(0));
    let (h, c, d, o, b) = (
        healthy.clone(),
        calls.clone(),
        handled.clone(),
        calls_while_open.clone(),
        breaker.clone(),
    );
    let consumer = bus
        .consumer(format!("{ns}billing"))
        .concurrency(1)
        .prefetch(1)
        .retry(RetryPolicy::new(1000).with_backoff(Backoff::fixed(Duration::from_millis(10))))
        .layer(breaker.clone())
        .handle(&topic, move |_: Event<u32>| {
            let (h, c, d, o) = (h.clone(), c.clone(), d.clone(), o.clone());
            let state = b.state();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if state == BreakerState::Open {
                    o.fetch_add(1, Ordering::SeqCst);
                }
                if !h.load(Ordering::SeqCst) {
                    return Err(HandlerError::retryable("payment API down"));
                }
                d.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    for n in 0..10u32 {
        bus.publish_event(&topic, Event::new(n)).await.unwrap();
    }
    tokio::time::timeout(
        Duration::from_secs(60),
        states.wait_for(|s| *s == BreakerState::Open),
    )
    .await
    .expect("the breaker opened")
    .unwrap();
    healthy.store(true, Ordering::SeqCst);
    tokio::time::timeout(
        Duration::from_secs(60),
        states.wait_for(|s| *s == BreakerState::Closed),
    )
    .await
    .expect("the breaker closed")
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        while handled.load(Ordering::SeqCst) < 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every message handled after the breaker closed");
    consumer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        calls_while_open.load(Ordering::SeqCst),
        0,
        "no handler call while open on {url}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        13,
        "3 failures, then each of the 10 once, on {url}"
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        10,
        "none lost, none burnt into the dead-letter destination on {url}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_pauses_intake_on_rabbitmq() {
    breaker_on("amqp://guest:guest@127.0.0.1:5672/%2f?queue_expires=5m").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_pauses_intake_on_nats() {
    breaker_on("nats://127.0.0.1:4222").await;
}
