//! The order flow of the `orders` example, shared with its cross-broker test.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::layers::prelude::*;
use tidings::prelude::*;
use tidings::{Backoff, Consumer};

/// An order was placed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
    pub sku: String,
    pub quantity: u32,
}

/// Billing invoiced an order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvoiceCreated {
    pub invoice_id: String,
    pub order_id: String,
    pub cents: u64,
}

/// What each handler did, keyed by handler, for the summary.
#[derive(Default)]
struct Outcomes {
    done: BTreeMap<&'static str, Vec<String>>,
}

type Shared = Arc<Mutex<Outcomes>>;

fn record(outcomes: &Shared, handler: &'static str, what: String) {
    outcomes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .done
        .entry(handler)
        .or_default()
        .push(what);
}

fn count(outcomes: &Shared, handler: &str) -> usize {
    outcomes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .done
        .get(handler)
        .map_or(0, Vec::len)
}

/// Runs the flow on `bus`, with topic names prefixed by `ns`, and returns the
/// summary lines (the same on every broker).
pub async fn run(bus: &Bus, ns: &str) -> tidings::Result<Vec<String>> {
    let placed = format!("{ns}order.placed");
    let invoiced = format!("{ns}invoice.created");
    let outcomes = Shared::default();
    let quantity_rule_fixed = Arc::new(AtomicBool::new(false));
    let retry = RetryPolicy::new(3).with_backoff(Backoff::fixed(Duration::from_millis(50)));
    // Replays reach every group of the topic; idempotency lets the groups
    // that already handled a replayed order skip it.
    let dedup = || Idempotency::in_memory(Duration::from_secs(3600));
    let mut consumers: Vec<Consumer> = Vec::new();

    let (o, fixed) = (outcomes.clone(), quantity_rule_fixed.clone());
    consumers.push(
        bus.consumer(format!("{ns}inventory"))
            .retry(retry)
            .layer(dedup())
            .handle(&placed, move |e: Event<OrderPlaced>| {
                let (o, fixed) = (o.clone(), fixed.clone());
                async move {
                    if e.data.quantity == 0 && !fixed.load(Ordering::SeqCst) {
                        return Err(HandlerError::permanent("invalid quantity 0"));
                    }
                    record(
                        &o,
                        "inventory",
                        format!("reserved {} x{}", e.data.order_id, e.data.quantity),
                    );
                    Ok(())
                }
            })
            .start()
            .await?,
    );

    let o = outcomes.clone();
    consumers.push(
        bus.consumer(format!("{ns}email"))
            .retry(retry)
            .layer(dedup())
            .handle(&placed, move |e: Event<OrderPlaced>| {
                let o = o.clone();
                async move {
                    if e.attempt() == 1 {
                        return Err(HandlerError::retryable("mail server busy"));
                    }
                    record(
                        &o,
                        "email",
                        format!("confirmed {} on attempt {}", e.data.order_id, e.attempt()),
                    );
                    Ok(())
                }
            })
            .start()
            .await?,
    );

    let o = outcomes.clone();
    consumers.push(
        bus.consumer(format!("{ns}analytics"))
            .retry(retry)
            .layer(dedup())
            .handle(&placed, move |e: Event<OrderPlaced>| {
                let o = o.clone();
                async move {
                    record(&o, "analytics", format!("counted {}", e.data.order_id));
                    Ok(())
                }
            })
            .start()
            .await?,
    );

    let (o, publisher, topic) = (outcomes.clone(), bus.clone(), invoiced.clone());
    consumers.push(
        bus.consumer(format!("{ns}billing"))
            .retry(retry)
            .layer(dedup())
            .handle(&placed, move |e: Event<OrderPlaced>| {
                let (o, publisher, topic) = (o.clone(), publisher.clone(), topic.clone());
                async move {
                    let invoice = InvoiceCreated {
                        invoice_id: format!("inv-{}", e.data.order_id),
                        order_id: e.data.order_id.clone(),
                        cents: 1250 * u64::from(e.data.quantity.max(1)),
                    };
                    // Event chaining: the invoice names the order as its cause.
                    publisher
                        .publish_event(
                            &topic,
                            Event::new(invoice)
                                .caused_by(&e)
                                .with_key(e.data.order_id.clone()),
                        )
                        .await?;
                    record(&o, "billing", format!("invoiced {}", e.data.order_id));
                    Ok(())
                }
            })
            .start()
            .await?,
    );

    let o = outcomes.clone();
    consumers.push(
        bus.consumer(format!("{ns}pdf"))
            .retry(retry)
            .layer(dedup())
            .handle(&invoiced, move |e: Event<InvoiceCreated>| {
                let o = o.clone();
                async move {
                    let chained = e.metadata().causation_id.is_some()
                        && e.metadata().correlation_id.is_some();
                    record(
                        &o,
                        "pdf",
                        format!("rendered {} (chained: {chained})", e.data.invoice_id),
                    );
                    Ok(())
                }
            })
            .start()
            .await?,
    );

    let dlq = bus
        .subscriber()
        .dead_letter_topic(&placed, &format!("{ns}inventory"));
    let mut inbox =
        DeadLetterInbox::open(&**bus.subscriber(), bus.publisher().clone(), &dlq, 100).await?;

    let orders = [
        ("o-1", "sku-red", 2),
        ("o-2", "sku-blue", 1),
        ("o-3", "sku-green", 0),
    ];
    for (id, sku, quantity) in orders {
        let order = OrderPlaced {
            order_id: id.into(),
            sku: sku.into(),
            quantity,
        };
        bus.publish_event(
            &placed,
            Event::new(order).with_key(id).with_source("/orders"),
        )
        .await?;
    }

    let mut summary = Vec::new();
    let wait = |what: &'static str, done: Box<dyn Fn() -> bool + Send>| async move {
        tokio::time::timeout(Duration::from_secs(60), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .map_err(|_| tidings::Error::Timeout {
            operation: what,
            after: Duration::from_secs(60),
        })
    };
    let o = outcomes.clone();
    wait(
        "the first pass of every handler",
        Box::new(move || {
            count(&o, "email") == 3
                && count(&o, "analytics") == 3
                && count(&o, "billing") == 3
                && count(&o, "pdf") == 3
                && count(&o, "inventory") == 2
        }),
    )
    .await?;
    let letters = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if inbox.fetch(Duration::from_millis(100)).await > 0 {
                break;
            }
        }
    })
    .await;
    if letters.is_err() {
        return Err(tidings::Error::Timeout {
            operation: "the dead letter",
            after: Duration::from_secs(60),
        });
    }
    let mut letter_ids = Vec::new();
    for (message, letter) in inbox.list() {
        let order: Option<OrderPlaced> = serde_json::from_slice(&message.payload).ok();
        let id = order.map_or_else(|| message.id.to_string(), |o| o.order_id);
        summary.push(format!(
            "summary: dead-lettered {id} ({}: {})",
            letter.reason, letter.error
        ));
        letter_ids.push(message.id.clone());
    }
    quantity_rule_fixed.store(true, Ordering::SeqCst);
    for id in &letter_ids {
        inbox.replay(id).await?;
    }
    summary.push(format!(
        "summary: replayed {} dead letter(s) after the fix",
        letter_ids.len()
    ));
    let o = outcomes.clone();
    wait(
        "the replayed order",
        Box::new(move || count(&o, "inventory") == 3),
    )
    .await?;

    for consumer in consumers {
        consumer.shutdown(Duration::from_secs(10)).await;
    }
    inbox.close().await?;
    let outcomes = outcomes.lock().unwrap_or_else(|e| e.into_inner());
    for (handler, done) in &outcomes.done {
        let mut done = done.clone();
        done.sort();
        summary.push(format!("summary: {handler}: {}", done.join(", ")));
    }
    summary.sort();
    Ok(summary)
}
