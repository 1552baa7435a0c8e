//! A projector: builds a read model (account balances) from events — the
//! read side of CQRS — and rebuilds it from scratch by replaying the stream
//! from the beginning into a new group, on the brokers that keep history
//! (Redis Streams, Kafka, NATS JetStream).
//!
//! `TIDINGS_URL=nats://127.0.0.1:4222 cargo run --example projector --features nats`

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::StartFrom;
use tidings::prelude::*;

/// Money moved on an account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AmountPosted {
    /// The account.
    pub account: String,
    /// Amount in cents (negative: a debit).
    pub cents: i64,
}

/// The read model: balance per account, and how many events built it.
pub type Balances = Arc<Mutex<(BTreeMap<String, i64>, usize)>>;

async fn project(
    bus: &Bus,
    topic: &str,
    group: &str,
    start: StartFrom,
    model: Balances,
) -> tidings::Result<Consumer> {
    bus.consumer(group)
        .concurrency(1) // one event after another: a projection applies events in order
        .start_from(start)
        .handle(topic, move |e: Event<AmountPosted>| {
            let model = model.clone();
            async move {
                let mut m = model.lock().unwrap_or_else(|p| p.into_inner());
                *m.0.entry(e.data.account.clone()).or_default() += e.data.cents;
                m.1 += 1;
                Ok(())
            }
        })
        .start()
        .await
}

async fn until_applied(model: &Balances, n: usize) -> tidings::Result<BTreeMap<String, i64>> {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            {
                let m = model.lock().unwrap_or_else(|p| p.into_inner());
                if m.1 >= n {
                    return m.0.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| tidings::Error::Timeout {
        operation: "the projection",
        after: Duration::from_secs(60),
    })
}

/// Projects ten postings live; then, where the broker keeps history,
/// rebuilds the model from the beginning. Returns (live, rebuilt).
pub async fn demo(
    bus: &Bus,
    ns: &str,
) -> tidings::Result<(BTreeMap<String, i64>, Option<BTreeMap<String, i64>>)> {
    let topic = format!("{ns}ledger.posted");
    let live_model = Balances::default();
    let live = project(
        bus,
        &topic,
        &format!("{ns}balances-v1"),
        StartFrom::Latest,
        live_model.clone(),
    )
    .await?;
    let postings = [
        ("acc-1", 500),
        ("acc-2", 1200),
        ("acc-1", -200),
        ("acc-3", 50),
        ("acc-2", -700),
    ];
    for (account, cents) in postings.iter().chain(postings.iter()) {
        let event = Event::new(AmountPosted {
            account: (*account).into(),
            cents: *cents,
        })
        .with_key(*account);
        bus.publish_event(&topic, event).await?;
    }
    let balances = until_applied(&live_model, 10).await?;
    live.shutdown(Duration::from_secs(5)).await;

    if !bus.subscriber().capabilities().replay {
        return Ok((balances, None));
    }
    // A new projection version: a new group that starts from the beginning.
    let rebuilt_model = Balances::default();
    let rebuild = project(
        bus,
        &topic,
        &format!("{ns}balances-v2"),
        StartFrom::Earliest,
        rebuilt_model.clone(),
    )
    .await?;
    let rebuilt = until_applied(&rebuilt_model, 10).await?;
    rebuild.shutdown(Duration::from_secs(5)).await;
    Ok((balances, Some(rebuilt)))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> tidings::Result<()> {
    let bus = tidings::connect(std::env::var("TIDINGS_URL").unwrap_or_else(|_| "memory://".into()))
        .await?;
    let ns = format!("projector{:x}.", std::process::id());
    let (live, rebuilt) = demo(&bus, &ns).await?;
    println!("live:    {live:?}");
    match rebuilt {
        Some(rebuilt) => println!("rebuilt: {rebuilt:?} (replayed from the beginning)"),
        None => println!("rebuilt: this broker keeps no history to replay"),
    }
    Ok(())
}
