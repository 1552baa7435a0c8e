//! Tidings: broker-agnostic messaging for Rust.
//!
//! Publish typed events and run handlers on Redis, RabbitMQ, Kafka, NATS or
//! the in-process bus, chosen by a URL; stack middleware around handlers and
//! publishers. Everything a service needs is one `use tidings::prelude::*` away.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use tidings::prelude::*;
//!
//! #[derive(Serialize, Deserialize)]
//! struct UserRegistered { email: String }
//!
//! # #[tokio::main] async fn main() -> tidings::Result<()> {
//! let bus = tidings::connect("memory://").await?;
//! let consumer = bus
//!     .consumer("email-service")
//!     .handle("user.registered", |e: Event<UserRegistered>| async move {
//!         println!("welcome, {}", e.data.email);
//!         Ok(())
//!     })
//!     .start()
//!     .await?;
//! bus.publish_event("user.registered", Event::new(UserRegistered { email: "ada@example.com".into() }))
//!     .await?;
//! consumer.shutdown(std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```
//!
//! # Cargo features
//! - `memory` (default): the in-process bus, `memory://`.
//! - `redis`: Redis Streams and Pub/Sub, `redis://` (also the Redis idempotency store).
//! - `amqp`: RabbitMQ, `amqp://`.
//! - `kafka`: Kafka, `kafka://` (builds librdkafka from source: needs gcc, g++, make).
//! - `nats`: NATS JetStream and core, `nats://`.
//! - `testkit`: the conformance suite, [`RecordingPublisher`](tidings_core::testkit::RecordingPublisher)
//!   and [`FaultProxy`](tidings_core::testkit::FaultProxy).

use std::sync::Arc;

use async_trait::async_trait;

#[cfg(feature = "amqp")]
pub use tidings_amqp as amqp;
pub use tidings_core::*;
#[cfg(feature = "kafka")]
pub use tidings_kafka as kafka;
#[cfg(feature = "memory")]
pub use tidings_memory as memory;
pub use tidings_middleware as layers;
#[cfg(feature = "nats")]
pub use tidings_nats as nats;

/// The names most services use.
pub mod prelude {
    pub use crate::Bus;
    pub use tidings_core::{
        Consumer, Delivery, Event, HandlerError, HandlerResult, Message, Publisher, PublisherExt,
        ResultExt, RetryPolicy, Subscriber,
    };
}

/// A connected broker: a publisher and a subscriber, chosen at run time.
///
/// `Bus` is itself a [`Publisher`], so [`PublisherExt::publish_event`] works on it.
#[derive(Clone)]
pub struct Bus {
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
}

impl Bus {
    /// A bus from a publisher and a subscriber (of the same broker, usually).
    pub fn new(publisher: Arc<dyn Publisher>, subscriber: Arc<dyn Subscriber>) -> Self {
        Bus {
            publisher,
            subscriber,
        }
    }

    /// Starts building a consumer for `group`.
    pub fn consumer(&self, group: impl Into<String>) -> ConsumerBuilder {
        Consumer::group(self.subscriber.clone(), group)
    }

    /// The publisher.
    pub fn publisher(&self) -> &Arc<dyn Publisher> {
        &self.publisher
    }

    /// The subscriber.
    pub fn subscriber(&self) -> &Arc<dyn Subscriber> {
        &self.subscriber
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("broker", &self.subscriber.name())
            .finish()
    }
}

#[async_trait]
impl Publisher for Bus {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        self.publisher.publish(topic, message).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<Receipt>> {
        self.publisher.publish_batch(topic, messages).await
    }

    async fn close(&self) -> Result<()> {
        self.publisher.close().await
    }
}

/// Connects to the broker a URL names.
///
/// | URL | broker | cargo feature |
/// |---|---|---|
/// | `memory://` | the in-process bus | `memory` (default) |
/// | `redis://host:6379?mode=streams` (or `mode=pubsub`), `rediss://` | Redis | `redis` |
/// | `amqp://user:pass@host:5672/%2f?exchange=events`, `amqps://` | RabbitMQ | `amqp` |
/// | `kafka://host:9092,host2:9092` | Kafka | `kafka` |
/// | `nats://host:4222?jetstream=true` (or `false` for core NATS) | NATS | `nats` |
///
/// Adapter options are query parameters; each adapter's page in `docs/`
/// lists them. An unknown scheme, or one whose feature is off, is an
/// [`Error::Config`] naming the allowed values. Credentials in the URL never
/// appear in errors or logs.
pub async fn connect(url: &str) -> Result<Bus> {
    let parsed = url::Url::parse(url).map_err(|e| Error::Config {
        key: "url".into(),
        message: format!("`{}` is not a URL: {e}", redact(url)),
    })?;
    match parsed.scheme() {
        #[cfg(feature = "memory")]
        "memory" => {
            let bus = tidings_memory::MemoryBus::new();
            Ok(Bus::new(bus.publisher(), bus.subscriber()))
        }
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => {
            let bus =
                tidings_amqp::AmqpBus::connect(tidings_amqp::AmqpConfig::from_url(url)?).await?;
            Ok(Bus::new(bus.publisher(), bus.subscriber()))
        }
        #[cfg(feature = "kafka")]
        "kafka" => {
            let bus = tidings_kafka::KafkaBus::connect(tidings_kafka::KafkaConfig::from_url(url)?)
                .await?;
            Ok(Bus::new(bus.publisher(), bus.subscriber()))
        }
        #[cfg(feature = "nats")]
        "nats" => {
            let bus =
                tidings_nats::NatsBus::connect(tidings_nats::NatsConfig::from_url(url)?).await?;
            Ok(Bus::new(bus.publisher(), bus.subscriber()))
        }
        scheme => Err(Error::Config {
            key: "url".into(),
            message: format!(
                "unknown or disabled scheme `{scheme}`; this build supports: {}",
                SCHEMES.join(", ")
            ),
        }),
    }
}

const SCHEMES: &[&str] = &[
    #[cfg(feature = "memory")]
    "memory://",
    #[cfg(feature = "amqp")]
    "amqp://",
    #[cfg(feature = "kafka")]
    "kafka://",
    #[cfg(feature = "nats")]
    "nats://",
];

/// The URL with any password replaced, for errors and logs.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparsable url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_scheme_names_the_allowed_ones() {
        let err = connect("carrier-pigeon://coop").await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("carrier-pigeon") && text.contains("memory://"),
            "{text}"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@host/"),
            "amqp://guest:***@host/"
        );
    }
}
