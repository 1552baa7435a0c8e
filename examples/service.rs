//! A service built on the host: three consumer groups, a background task
//! that publishes, one signal, one phased shutdown, one report.
//!
//! ```sh
//! cargo run --example service                        # the in-process bus
//! TIDINGS_URL=redis://127.0.0.1:6379 cargo run --features redis --example service
//! ```
//! Stop it with Ctrl-C (or SIGTERM): intake stops everywhere, in-flight
//! handlers finish, the publisher closes, and the report is printed.

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
    let bus = tidings::connect(url.as_str()).await?;

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
        .publisher(bus.publisher().clone())
        .deadline(Duration::from_secs(10))
        .run()
        .await?;
    println!("{report}");
    Ok(())
}
