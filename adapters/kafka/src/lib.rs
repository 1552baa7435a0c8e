//! Kafka adapter for Tidings, on rdkafka (librdkafka).
//!
//! - Publishing: an idempotent producer with `acks=all` by default; the
//!   message key picks the partition; metadata travels as CloudEvents headers
//!   (`ce_id`, `ce_type`, ..., `content-type`). `publish` returns after the
//!   delivery report with [`Receipt::Offset`](tidings_core::Receipt::Offset);
//!   `publish_batch` keeps every message of the batch in flight at once.
//! - Consuming: a consumer group per Tidings group with manual offsets. The
//!   committed offset of a partition is the lowest offset not settled yet:
//!   never past an unsettled message, whatever order handlers finish in.
//!   Partitions run concurrently; inside one, a record is handed out only
//!   once the previous one is settled ([`PartitionOrder::Partition`], the
//!   default), or once the previous one with the same key is
//!   ([`PartitionOrder::Key`], `ordering=key`), or at once (`ordering=none`).
//!   Partitions revoked in a rebalance stop yielding, their in-flight
//!   deliveries get `revoke_timeout` to settle, then their offsets are
//!   committed and they are released.
//! - Kafka has no per-message redelivery: a nack republishes the message to
//!   the group's retry topic `<topic>.retry.<group>` (which the same
//!   subscription consumes) with the attempt number and a not-before time in
//!   headers; the original offset counts as settled. Dead letters go to
//!   `<topic>.<group>.dlq` with the reason in headers.
//! - Private subscriptions (no group) read from the end, or from the
//!   beginning or a point in time (replay).
//!
//! Delivery is at least once: after a crash or a rebalance past the revoke
//! timeout, messages that were not settled are delivered again.
//!
//! ```no_run
//! use tidings_core::{Consumer, Event, HandlerError, PublisherExt};
//! use tidings_kafka::{KafkaBus, KafkaConfig};
//! # async fn f() -> tidings_core::Result<()> {
//! let bus = KafkaBus::connect(KafkaConfig::from_url("kafka://127.0.0.1:9092")?).await?;
//! bus.admin().create_group_topics("user.registered", "mailer").await?;
//! let consumer = Consumer::group(bus.subscriber(), "mailer")
//!     .handle("user.registered", |e: Event<String>| async move {
//!         println!("welcome {}", e.data);
//!         Ok::<_, HandlerError>(())
//!     })
//!     .start()
//!     .await?;
//! bus.publisher().publish_event("user.registered", Event::new("ada".to_owned())).await?;
//! consumer.shutdown(std::time::Duration::from_secs(10)).await;
//! # Ok(()) }
//! ```

mod admin;
mod config;
pub mod headers;
mod publisher;
mod subscriber;

use std::sync::Arc;

use futures::future::BoxFuture;
use rdkafka::producer::FutureProducer;
use tidings_core::health::{self, Health, HealthCheck};
use tidings_core::{Error, Publisher, Result, Subscriber};

pub use admin::{KafkaAdmin, Position};
pub use config::{Acks, KafkaConfig, PartitionOrder};
pub use publisher::KafkaPublisher;
pub use subscriber::{CAPABILITIES, KafkaSubscriber, dead_letter_topic, retry_topic};

/// A connection to a Kafka cluster: one producer shared by the publisher and
/// by the subscriptions (retry copies, dead letters), and a consumer per subscription.
#[derive(Clone)]
pub struct KafkaBus {
    config: Arc<KafkaConfig>,
    publisher: KafkaPublisher,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Creates the producer and checks that the cluster answers (within the
    /// configured `operation_timeout`).
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        // librdkafka reads the files itself; a missing one is named here.
        config.tls.check_files()?;
        let config = Arc::new(config);
        let producer: FutureProducer =
            config.producer().create().map_err(|e| Error::Connection {
                broker: "kafka",
                source: Box::new(e),
            })?;
        let probe = producer.clone();
        let timeout = config.operation_timeout;
        subscriber::run_blocking("connecting", timeout + timeout / 2, move || {
            use rdkafka::producer::Producer;
            probe
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| Error::Connection {
                    broker: "kafka",
                    source: Box::new(e),
                })
        })
        .await?;
        let publisher =
            KafkaPublisher::new(producer, config.publish_timeout, config.dialect.clone());
        Ok(KafkaBus { config, publisher })
    }

    /// The publisher (clones share the producer; closing one closes them all).
    pub fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.publisher.clone())
    }

    /// A publisher on the same producer writing in `dialect`.
    pub fn publisher_in(&self, dialect: tidings_core::Dialect) -> Arc<dyn Publisher> {
        Arc::new(self.publisher.in_dialect(dialect))
    }

    /// The subscriber.
    pub fn subscriber(&self) -> Arc<dyn Subscriber> {
        Arc::new(KafkaSubscriber::new(
            self.config.clone(),
            self.publisher.clone(),
        ))
    }

    /// The admin helper: topics and committed offsets.
    pub fn admin(&self) -> KafkaAdmin {
        KafkaAdmin::new(self.config.clone())
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }
}

/// The cluster's health: a metadata request answered within a second is
/// `connected`; an error or silence is `reconnecting` (librdkafka
/// reconnects on its own).
impl HealthCheck for KafkaBus {
    fn check(&self) -> BoxFuture<'_, Health> {
        let producer = self.publisher.producer().clone();
        Box::pin(health::round_trip(subscriber::run_blocking(
            "checking the connection",
            health::CHECK_TIMEOUT * 2,
            move || {
                use rdkafka::producer::Producer;
                producer
                    .client()
                    .fetch_metadata(None, health::CHECK_TIMEOUT)
                    .map(|_| ())
                    .map_err(|e| Error::Connection {
                        broker: "kafka",
                        source: Box::new(e),
                    })
            },
        )))
    }
}
