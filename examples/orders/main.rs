//! An order service and its neighbours, on any broker: change only `TIDINGS_URL`.
//!
//! ```sh
//! cargo run --example orders                                              # in-process bus
//! TIDINGS_URL=redis://127.0.0.1:6379 cargo run --example orders --features redis
//! TIDINGS_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example orders --features amqp
//! TIDINGS_URL=nats://127.0.0.1:4222 cargo run --example orders --features nats
//! ```
//!
//! The order service publishes `order.placed`; inventory, email and analytics
//! react in their own groups; billing publishes `invoice.created` caused by the
//! order, which a PDF handler consumes. Email fails once per order and is
//! retried; an order with quantity 0 is poison for inventory, lands in the
//! dead-letter destination and is replayed after the rule is fixed. The lines
//! beginning with `summary:` are the same on every broker.

mod flow;

#[tokio::main]
async fn main() -> tidings::Result<()> {
    let url = std::env::var("TIDINGS_URL").unwrap_or_else(|_| "memory://".into());
    let bus = tidings::connect(url.as_str()).await?;
    // A fresh namespace per run, so that earlier runs on a persistent broker do not interfere.
    let ns = format!("demo{:x}.", std::process::id());
    for line in flow::run(&bus, &ns).await? {
        println!("{line}");
    }
    Ok(())
}
