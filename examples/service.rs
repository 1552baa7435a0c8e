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

/// The type on the wire, declared once with the Rust type.
impl EventType for OrderPlaced {
    const TYPE: &'static str = "order.placed";
}

/// The shipping service's dependency, shared by its handlers as state.
#[derive(Clone)]
struct Courier {
    name: &'static str,
}

async fn ship(e: Event<OrderPlaced>, State(courier): State<Courier>) -> HandlerResult {
    tokio::time::sleep(Duration::from_millis(200)).await; // a slow courier API
    println!(
        "shipping: {} label for order {}",
        courier.name, e.data.order_id
    );
    Ok(())
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

    let billing = bus.consumer("billing").on::<OrderPlaced, _, _>(
        "orders",
        |e: Event<OrderPlaced>| async move {
            println!(
                "billing: invoice for order {} ({} cents)",
                e.data.order_id, e.data.total_cents
            );
            Ok(())
        },
    );
    let shipping = bus
        .consumer("shipping")
        .concurrency(4)
        .state(Courier { name: "ParcelCo" })
        .on::<OrderPlaced, _, _>("orders", ship);
    let analytics = bus
        .consumer("analytics")
        .handle("orders", |_: Event<OrderPlaced>| async { Ok(()) });

    // The topic's name and its event type in one place.
    let orders = bus.publisher().topic::<OrderPlaced>("orders");
    let app = App::new()
        .consumer("billing", billing)
        .consumer("shipping", shipping)
        .consumer("analytics", analytics)
        .task("storefront", async move {
            // Stands in for the part of the service that takes orders.
            for order_id in 1.. {
                orders
                    .publish(OrderPlaced {
                        order_id,
                        total_cents: 1999,
                    })
                    .await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(())
        })
        .bus(&bus) // the connection on /readyz, the metrics on /metrics; closed last
        .deadline(Duration::from_secs(10));
    // What the service reads and writes, as an AsyncAPI 3.0 document.
    let asyncapi = app
        .asyncapi("orders service", "1.0.0")
        .publishes::<OrderPlaced>("orders")
        .to_json();
    println!(
        "{} operations documented",
        asyncapi["operations"].as_object().map_or(0, |o| o.len())
    );
    let report = app.run().await?;
    println!("{report}");
    Ok(())
}
