//! Fan-out on the in-process bus: one `user.registered` event, four services.
//!
//! Each service is its own group, so each gets every event. The billing
//! service fails on its first attempt; the runtime redelivers and the second
//! attempt succeeds. Run with `cargo run --example quickstart`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::{Backoff, Consumer};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserRegistered {
    user_id: String,
    email: String,
}

/// What a handler reports back, so `main` knows when everyone is done.
#[derive(Debug)]
struct Outcome {
    service: &'static str,
    attempt: u32,
    ok: bool,
}

#[tokio::main]
async fn main() -> tidings::Result<()> {
    let bus = tidings::connect("memory://").await?;
    let (report, mut outcomes) = mpsc::unbounded_channel::<Outcome>();
    let retry = RetryPolicy::new(3).with_backoff(Backoff::fixed(Duration::from_millis(50)));

    let services: [(&'static str, bool); 4] = [
        ("welcome-email", false),
        ("billing-customer", true), // fails once, then succeeds
        ("analytics", false),
        ("sales-notification", false),
    ];
    let mut consumers: Vec<Consumer> = Vec::new();
    for (service, flaky) in services {
        let report = report.clone();
        let consumer = bus
            .consumer(service)
            .retry(retry)
            .handle("user.registered", move |e: Event<UserRegistered>| {
                let report = report.clone();
                async move {
                    let fail = flaky && e.attempt() == 1;
                    let _ = report.send(Outcome {
                        service,
                        attempt: e.attempt(),
                        ok: !fail,
                    });
                    if fail {
                        return Err(HandlerError::retryable("billing API timed out"));
                    }
                    println!(
                        "{service:>18}: handled {} ({}) on attempt {}",
                        e.data.user_id,
                        e.data.email,
                        e.attempt()
                    );
                    Ok(())
                }
            })
            .start()
            .await?;
        consumers.push(consumer);
    }

    let event = Event::new(UserRegistered {
        user_id: "u-1001".into(),
        email: "ada@example.com".into(),
    })
    .with_source("/signup");
    bus.publish_event("user.registered", event).await?;

    // Wait (bounded) until every service succeeded once.
    let mut succeeded = Vec::new();
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while succeeded.len() < services.len() {
            match outcomes.recv().await {
                Some(Outcome {
                    service, ok: true, ..
                }) => succeeded.push(service),
                Some(Outcome {
                    service,
                    attempt,
                    ok: false,
                }) => {
                    println!("{service:>18}: attempt {attempt} failed, will be redelivered")
                }
                None => break,
            }
        }
    })
    .await;
    for consumer in consumers {
        consumer.shutdown(Duration::from_secs(5)).await;
    }
    if waited.is_err() {
        eprintln!("not every service succeeded: {succeeded:?}");
        std::process::exit(1);
    }
    println!(
        "all {} services handled the event once, successfully",
        succeeded.len()
    );
    Ok(())
}
