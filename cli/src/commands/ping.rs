//! `tidings ping`: the connection's health, then one message round-tripped
//! through a private subscription, with the latency.

use std::time::Instant;

use bytes::Bytes;
use tidings::{Bus, Consumer, Event, HandlerError, HealthCheck, Message, Publisher, Raw};

use super::{bounded, failed};
use crate::{Cli, Failure};

/// The topic pings travel on: one fixed topic, so that brokers that keep
/// topics (a Redis stream, a JetStream stream) keep one, not one per ping.
const TOPIC: &str = "tidings.ping";

pub(crate) async fn run(cli: &Cli, bus: &Bus, shown: &str) -> Result<(), Failure> {
    let broker = bus.subscriber().name();
    let health = bounded(cli.timeout, "checking the connection", bus.check()).await?;
    if !health.is_ready() {
        return Err(Failure::Broker(format!(
            "{broker} at {shown} is {}{}",
            health.state,
            health.detail.map(|d| format!(": {d}")).unwrap_or_default()
        )));
    }
    let (seen, mut arrived) = tokio::sync::mpsc::channel::<String>(16);
    let consumer =
        Consumer::private(bus.subscriber().clone()).handle(TOPIC, move |e: Event<Bytes, Raw>| {
            let seen = seen.clone();
            async move {
                let _ = seen.try_send(e.id().to_owned());
                Ok::<_, HandlerError>(())
            }
        });
    let consumer = bounded(cli.timeout, "subscribing", consumer.start())
        .await?
        .map_err(|e| failed("subscribing failed", e))?;
    let ping = Message::new("ping").with_type("tidings.ping");
    let id = ping.id.clone();
    let sent = Instant::now();
    let round_trip = async {
        bus.publish(TOPIC, ping)
            .await
            .map_err(|e| failed("publishing the ping failed", e))?;
        // Other pings on the same topic (another prober) are skipped.
        while let Some(seen) = arrived.recv().await {
            if seen == id {
                return Ok(sent.elapsed());
            }
        }
        Err(Failure::Broker("the subscription ended".into()))
    };
    let result = bounded(cli.timeout, "waiting for the ping to come back", round_trip).await;
    let _ = bounded(cli.timeout, "unsubscribing", consumer.shutdown(cli.timeout)).await;
    let elapsed = result??;
    let ms = elapsed.as_secs_f64() * 1000.0;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"ok": true, "broker": broker, "url": shown, "round_trip_ms": ms})
        );
    } else {
        println!("ok: {broker} at {shown}, a message round trip in {ms:.2} ms");
    }
    Ok(())
}
