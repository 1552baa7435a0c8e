//! Batching publishes: many messages in flight at once (pipelined XADD,
//! outstanding publisher confirms, Kafka in-flight sends, JetStream PubAcks),
//! one result per message, in order. Run with `cargo run --example batching`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidings::prelude::*;

/// A sensor reading.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reading {
    /// Sensor number.
    pub sensor: u32,
    /// The measured value.
    pub value: f64,
}

/// Publishes `n` readings in one batch and waits until a consumer handled
/// them all; returns how many publishes were confirmed.
pub async fn demo(bus: &Bus, ns: &str, n: u32) -> tidings::Result<usize> {
    let topic = format!("{ns}sensor.reading");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = bus
        .consumer(format!("{ns}archive"))
        .handle(&topic, move |e: Event<Reading>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e.data.sensor);
                Ok(())
            }
        })
        .start()
        .await?;
    let batch = (0..n)
        .map(|i| {
            Event::new(Reading {
                sensor: i,
                value: f64::from(i) * 0.5,
            })
            .with_type("sensor.reading")
            .into_message()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let results = bus.publish_batch(&topic, batch).await;
    let confirmed = results.iter().filter(|r| r.is_ok()).count();
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        return Err(e);
    }
    println!("{confirmed} publishes confirmed in {:?}", started.elapsed());
    for _ in 0..n {
        if tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .ok()
            .flatten()
            .is_none()
        {
            return Err(tidings::Error::Timeout {
                operation: "the batch to be handled",
                after: Duration::from_secs(60),
            });
        }
    }
    consumer.shutdown(Duration::from_secs(5)).await;
    Ok(confirmed)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> tidings::Result<()> {
    let bus = tidings::connect(std::env::var("TIDINGS_URL").unwrap_or_else(|_| "memory://".into()))
        .await?;
    let confirmed = demo(&bus, "", 1000).await?;
    println!("all {confirmed} readings handled");
    Ok(())
}
