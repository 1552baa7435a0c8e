//! Retry, dead letters, a circuit breaker and idempotency around one handler,
//! on the in-process bus. Run with `cargo run --example resilient_consumer`.
//!
//! A payment handler calls a flaky API: the first call for each payment fails
//! (retried in process), a duplicate delivery is skipped, and one payment is
//! poison: it fails for good, lands in the dead-letter destination, and is
//! replayed once "fixed".

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::Backoff;
use tidings::layers::prelude::*;
use tidings::prelude::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PaymentRequested {
    payment_id: String,
    cents: u64,
}

/// A stand-in for a payment API that fails every first call.
#[derive(Default)]
struct FlakyApi {
    seen: Mutex<HashSet<String>>,
    charged: Mutex<Vec<String>>,
    poison_fixed: std::sync::atomic::AtomicBool,
}

impl FlakyApi {
    fn charge(&self, p: &PaymentRequested) -> Result<(), HandlerError> {
        if p.cents == 0 && !self.poison_fixed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(HandlerError::permanent("amount must be positive"));
        }
        let first_call = self.lock_seen().insert(p.payment_id.clone());
        if first_call {
            return Err(HandlerError::retryable(
                "payment API: 503 Service Unavailable",
            ));
        }
        self.charged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p.payment_id.clone());
        Ok(())
    }
    fn lock_seen(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[tokio::main]
async fn main() -> tidings::Result<()> {
    let bus = tidings::connect("memory://").await?;
    let api = Arc::new(FlakyApi::default());
    let breaker = CircuitBreaker::new(Threshold::Consecutive(5)).open_for(Duration::from_secs(5));
    let mut breaker_states = breaker.watch();
    tokio::spawn(async move {
        while breaker_states.changed().await.is_ok() {
            println!("breaker: {:?}", *breaker_states.borrow());
        }
    });

    let handler_api = api.clone();
    let consumer = bus
        .consumer("payments")
        .retry(RetryPolicy::new(3).with_backoff(Backoff::fixed(Duration::from_millis(20))))
        // Outermost first: cheap refusals, then dedup, then retries, then the
        // breaker and the time limit around each single call.
        .layer(MaxChainDepth(8))
        .layer(Idempotency::in_memory(Duration::from_secs(3600)))
        .layer(
            Retry::exponential(Duration::from_millis(20))
                .max_attempts(3)
                .mode(RetryMode::InProcess),
        )
        .layer(breaker.clone())
        .layer(Timeout(Duration::from_secs(2)))
        .handle("payment.requested", move |e: Event<PaymentRequested>| {
            let api = handler_api.clone();
            async move {
                let result = api.charge(&e.data);
                println!(
                    "attempt {} for {}: {}",
                    e.attempt(),
                    e.data.payment_id,
                    match &result {
                        Ok(()) => "charged".to_owned(),
                        Err(err) => format!("failed ({err})"),
                    }
                );
                result
            }
        })
        .start()
        .await?;

    let dlq = bus
        .subscriber()
        .dead_letter_topic("payment.requested", "payments");
    let mut inbox =
        DeadLetterInbox::open(&**bus.subscriber(), bus.publisher().clone(), &dlq, 100).await?;

    let ok = Event::new(PaymentRequested {
        payment_id: "pay-1".into(),
        cents: 1999,
    });
    let duplicate = ok.message().clone(); // the same id again, as after a redelivery
    bus.publish_event("payment.requested", ok).await?;
    bus.publish_event(
        "payment.requested",
        Event::new(PaymentRequested {
            payment_id: "pay-2".into(),
            cents: 0,
        }),
    )
    .await?;

    let letters = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = inbox.fetch(Duration::from_millis(100)).await;
            if n > 0 {
                return n;
            }
        }
    })
    .await
    .map_err(|_| tidings::Error::Timeout {
        operation: "waiting for the dead letter",
        after: Duration::from_secs(10),
    })?;
    for (message, letter) in inbox.list() {
        println!(
            "dead letter {} from {}: {} ({})",
            message.id, letter.topic, letter.reason, letter.error
        );
    }
    bus.publish(
        "payment.requested",
        duplicate.with_header("note", "redelivered copy"),
    )
    .await?;

    println!("fixing the validation rule and replaying {letters} dead letter(s)");
    api.poison_fixed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    inbox.replay_all(&Filter::default()).await?;

    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        while api.charged.lock().unwrap_or_else(|e| e.into_inner()).len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    consumer.shutdown(Duration::from_secs(5)).await;
    inbox.close().await?;
    let charged = api
        .charged
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    println!("charged: {charged:?} (each once)");
    if settled.is_err() || charged.len() != 2 {
        std::process::exit(1);
    }
    Ok(())
}
