//! A service built on the host: three consumer groups, a background task
//! that publishes, probes and metrics over HTTP, one signal, one phased
//! shutdown, one report.
//!
//! ```sh
//! cargo run --features prometheus --example service          # the in-process bus
//! TIDINGS_URL=redis://127.0.0.1:6379 cargo run --features prometheus,redis --example service
//! curl -i http://127.0.0.1:9464/readyz                       # 200, or 503 and why
//! curl http://127.0.0.1:9464/metrics                         # Prometheus text
//! ```
//! Stop it with Ctrl-C (or SIGTERM): intake stops everywhere, in-flight
//! handlers finish, the bus closes (drained), and the report is printed.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::App;
use tidings::prelude::*;

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: u64,
    total_cents: u64,
}

#[tokio::main]
async fn main() -> tidings::Result<()> {
    // An example may fall back to the in-process bus; a service should not
    // (Config::load and Config::from_env refuse a configuration without a URL).
    let url = std::env::var("TIDINGS_URL").unwrap_or_else(|_| "memory://".into());
    // A service keeps this in tidings.toml and calls Config::load.
    let mut config = tidings::Config::from_toml(
        r#"
        url = "memory://"
        [breaker]
        failures = 5
        [telemetry]
        prometheus = true       # /metrics on the [http] address
        [http]
        address = "127.0.0.1:9464"
        "#,
    )?;
    config.url = url;
    let bus = tidings::connect(config).await?;

    let billing =
        bus.consumer("billing")
            .handle("order.placed", |e: Event<OrderPlaced>| async move {
                println!(
                    "billing: invoice for order {} ({} cents)",
                    e.data.order_id, e.data.total_cents
                );
                Ok(())
            });
    let shipping = bus.consumer("shipping").concurrency(4).handle(
        "order.placed",
        |e: Event<OrderPlaced>| async move {
            tokio::time::sleep(Duration::from_millis(200)).await; // a slow courier API
            println!("shipping: label for order {}", e.data.order_id);
            Ok(())
        },
    );
    let analytics = bus
        .consumer("analytics")
        .handle("order.placed", |_: Event<OrderPlaced>| async { Ok(()) });

    let orders = bus.publisher().clone();
    let report = App::new()
        .consumer("billing", billing)
        .consumer("shipping", shipping)
        .consumer("analytics", analytics)
        .task("storefront", async move {
            // Stands in for the part of the service that takes orders.
            for order_id in 1.. {
                let event = Event::new(OrderPlaced {
                    order_id,
                    total_cents: 1999,
                });
                orders.publish_event("order.placed", event).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(())
        })
        .bus(&bus) // the connection on /readyz, the metrics on /metrics; closed last
        .deadline(Duration::from_secs(10))
        .run()
        .await?;
    println!("{report}");
    Ok(())
}
