//! Typed events with schema versions, and an upcaster from v1 to v2.
//!
//! `customer.registered` v1 carried one `name`; v2 splits it into first and
//! last name. Old producers still publish v1. The handler only knows v2: a
//! custom extractor reads the schema version from the metadata and upcasts
//! v1 payloads on the way in. Run with `cargo run --example schema_upcast`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::{Delivery, FromDelivery, Json};

/// Version 1 of the event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CustomerRegisteredV1 {
    /// Full name.
    pub name: String,
}

/// Version 2: the current one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerRegisteredV2 {
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
}

impl From<CustomerRegisteredV1> for CustomerRegisteredV2 {
    fn from(v1: CustomerRegisteredV1) -> Self {
        let (first, last) = v1.name.split_once(' ').unwrap_or((&v1.name, ""));
        CustomerRegisteredV2 {
            first_name: first.into(),
            last_name: last.into(),
        }
    }
}

/// A v2 event, whatever version was published. Handlers take this instead of
/// `Event<CustomerRegisteredV2>`.
pub struct Upcasted(pub Event<CustomerRegisteredV2>);

impl FromDelivery for Upcasted {
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError> {
        match delivery.message().metadata.schema_version.as_deref() {
            Some("1") => {
                let v1 = Event::<CustomerRegisteredV1, Json>::from_delivery(delivery)?;
                Ok(Upcasted(v1.map(CustomerRegisteredV2::from)))
            }
            Some("2") | None => Ok(Upcasted(Event::from_delivery(delivery)?)),
            Some(other) => Err(HandlerError::permanent(format!(
                "unknown schema version {other}"
            ))),
        }
    }
}

/// Publishes one v1 and one v2 event and returns what the v2-only handler saw.
pub async fn demo(bus: &Bus, ns: &str) -> tidings::Result<Vec<CustomerRegisteredV2>> {
    let topic = format!("{ns}customer.registered");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = bus
        .consumer(format!("{ns}crm"))
        .handle(&topic, move |Upcasted(e): Upcasted| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e.data);
                Ok(())
            }
        })
        .start()
        .await?;
    let v1 = Event::new(CustomerRegisteredV1 {
        name: "Ada Lovelace".into(),
    })
    .with_schema_version("1");
    let v2 = Event::new(CustomerRegisteredV2 {
        first_name: "Grace".into(),
        last_name: "Hopper".into(),
    })
    .with_schema_version("2");
    bus.publish_event(&topic, v1).await?;
    bus.publish_event(&topic, v2).await?;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(event)) => seen.push(event),
            _ => {
                return Err(tidings::Error::Timeout {
                    operation: "the upcast events",
                    after: Duration::from_secs(30),
                });
            }
        }
    }
    consumer.shutdown(Duration::from_secs(5)).await;
    seen.sort_by(|a, b| a.first_name.cmp(&b.first_name));
    Ok(seen)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> tidings::Result<()> {
    let bus = tidings::connect(std::env::var("TIDINGS_URL").unwrap_or_else(|_| "memory://".into()))
        .await?;
    for customer in demo(&bus, "").await? {
        println!("{customer:?}");
    }
    Ok(())
}
