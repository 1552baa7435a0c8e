//! RabbitMQ (AMQP 0-9-1) adapter for Tidings, on lapin.
//!
//! # Topology
//! - One durable **topic exchange** (`tidings` by default): the topic is the routing key.
//! - Each **group** is a durable queue `<group>.<topic pattern>` (quorum by
//!   default, or classic) bound to the exchange with the subscribed pattern;
//!   wildcards work (`order.*`, `user.#`, `#`). Members of a group compete for
//!   its queue; every group gets every message.
//! - A **private** subscription (no group) is a server-named exclusive,
//!   auto-delete queue: it lives as long as its connection.
//! - **Dead letters** go to a second topic exchange (`<exchange>.dlx`) with the
//!   routing key `dlq.<group>.<pattern>` ([`Subscriber::dead_letter_topic`](tidings_core::Subscriber));
//!   each group has a durable dead-letter queue `<group>.<pattern>.dlq` bound to it,
//!   and subscribing to a `dlq.` topic reads from the dead-letter exchange.
//! - **Delayed redelivery** goes through retry queues `<group queue>.retry.<ms>`
//!   whose message TTL dead-letters the copy through the default exchange back
//!   to the group's own queue only.
//!
//! # Guarantees
//! At least once. `publish` returns after the publisher confirm; messages are
//! persistent and mandatory, so a topic without any bound queue is an
//! [`Error::Unroutable`](tidings_core::Error::Unroutable) rather than a silent
//! drop. Consumers have a prefetch (basic.qos) equal to the subscription's
//! in-flight bound. Attempts are counted by the quorum queue's
//! `x-delivery-count` plus the `tidings-attempt` header the adapter writes on
//! copies it republishes (classic queues). Connections and subscriptions
//! recover on their own with backoff; a publish whose confirm was lost fails
//! with an error.
//!
//! ```no_run
//! use tidings_amqp::{AmqpBus, AmqpConfig};
//! use tidings_core::{Consumer, Event, PublisherExt};
//! # #[tokio::main] async fn main() -> tidings_core::Result<()> {
//! let bus = AmqpBus::connect(AmqpConfig::from_url("amqp://guest:guest@127.0.0.1:5672/%2f")?).await?;
//! let consumer = Consumer::group(bus.subscriber(), "mailer")
//!     .handle("user.*", |e: Event<String>| async move {
//!         println!("welcome {}", e.data);
//!         Ok(())
//!     })
//!     .start()
//!     .await?;
//! bus.publisher().publish_event("user.registered", Event::new("ada".to_owned())).await?;
//! consumer.shutdown(std::time::Duration::from_secs(5)).await;
//! bus.close().await;
//! # Ok(()) }
//! ```

mod config;
mod conn;
mod groups;
pub mod headers;
mod publisher;
mod subscriber;

use std::sync::Arc;

pub use config::{AmqpConfig, DeadLetterTarget, QueueType};
pub use publisher::AmqpPublisher;
pub use subscriber::AmqpSubscriber;

use futures::future::BoxFuture;
use tidings_core::health::{self, Health, HealthCheck};
use tidings_core::{Publisher, Result, Subscriber};

/// A connection to RabbitMQ, handing out publishers and subscribers that share it.
///
/// Clones share the connection. It reconnects on its own when the
/// connection drops.
#[derive(Clone)]
pub struct AmqpBus {
    connector: Arc<conn::Connector>,
}

impl std::fmt::Debug for AmqpBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBus")
            .field("config", &self.connector.config)
            .finish_non_exhaustive()
    }
}

impl AmqpBus {
    /// Connects and declares the exchanges (or checks them, when `passive`).
    pub async fn connect(config: AmqpConfig) -> Result<Self> {
        config.validate()?;
        let connector = Arc::new(conn::Connector::new(config));
        connector.connection().await?;
        Ok(AmqpBus { connector })
    }

    /// A publisher on this connection, writing in the configured dialect.
    pub fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher_in(self.connector.config.dialect.clone())
    }

    /// A publisher on this connection writing in `dialect` (an envelope for
    /// the services on one exchange, CloudEvents for the rest).
    pub fn publisher_in(&self, dialect: tidings_core::Dialect) -> Arc<dyn Publisher> {
        Arc::new(AmqpPublisher::new(self.connector.clone(), dialect))
    }

    /// A subscriber on this connection.
    pub fn subscriber(&self) -> Arc<dyn Subscriber> {
        Arc::new(AmqpSubscriber::new(self.connector.clone()))
    }

    /// The configuration.
    pub fn config(&self) -> &AmqpConfig {
        &self.connector.config
    }

    /// Waits for outstanding publisher confirms, then closes the connection.
    /// Stop consumers first (their shutdown settles what they hold).
    pub async fn close(&self) {
        self.connector.close().await;
    }
}

/// The connection's health: `connected` when the connection is open (or
/// could be opened again within the check's second), `reconnecting` with
/// the error otherwise, `stopped` once closed.
impl HealthCheck for AmqpBus {
    fn check(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            if self.connector.is_closed() {
                return Health::new(health::State::Stopped);
            }
            health::round_trip(self.connector.connection()).await
        })
    }
}
