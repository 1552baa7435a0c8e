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
//! - `otel`: OpenTelemetry tracing and metrics layers, `tidings::otel` (see `docs/observability.md`).
//! - `http`: the HTTP endpoint [`App`] serves for probes, `/healthz` and `/readyz` (axum).
//! - `prometheus`: `/metrics` on that endpoint, fed by the OpenTelemetry
//!   metrics (`[telemetry] prometheus = true`; implies `http` and `otel`).
//! - `testkit`: the conformance suite, `RecordingPublisher`
//!   and `FaultProxy`.

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
#[cfg(feature = "otel")]
pub use tidings_otel as otel;
#[cfg(feature = "postgres")]
pub use tidings_postgres as postgres;
#[cfg(feature = "redis")]
pub use tidings_redis as redis;

/// The names most services use.
pub mod prelude {
    pub use crate::{Bus, Config};
    pub use tidings_core::{
        Consumer, Delivery, Event, EventType, HandlerError, HandlerResult, Message, Publisher,
        PublisherExt, ResultExt, RetryPolicy, State, Subscriber, TypedTopic, Unhandled,
    };
}

pub mod app;
pub mod config;
#[cfg(feature = "prometheus")]
pub mod metrics;
pub mod registry;

#[doc = include_str!("../docs/guide.md")]
pub mod guide {}

#[doc = include_str!("../docs/middleware.md")]
pub mod middleware_guide {}

pub use app::{App, AppReport, Restart, ServiceHealth, ShutdownHandle, StopCause};
pub use config::Config;
pub use registry::Registry;
use registry::{Closer, DialectPublisher};

/// A connected broker: a publisher and a subscriber, chosen at run time,
/// and the middleware its configuration describes.
///
/// `Bus` is itself a [`Publisher`], so [`PublisherExt::publish_event`] works on it.
#[derive(Clone)]
pub struct Bus {
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    retry: RetryPolicy,
    layers: Vec<Arc<dyn Middleware>>,
    observers: Vec<SettleObserver>,
    closer: Option<Closer>,
    health: Arc<dyn HealthCheck>,
    http_address: Option<std::net::SocketAddr>,
    #[cfg(feature = "prometheus")]
    metrics: Option<metrics::Metrics>,
    in_dialect: Option<DialectPublisher>,
    publish_layers: Vec<Arc<dyn middleware::PublishMiddleware>>,
}

/// A settlement observer the configuration installs on every consumer.
type SettleObserver = Arc<dyn Fn(&tidings_core::Settlement<'_>) + Send + Sync>;

impl Bus {
    /// A bus from a publisher and a subscriber (of the same broker, usually),
    /// with the default retry policy and no layers. Its health check says
    /// `connected` until one is given with [`with_health`](Bus::with_health).
    pub fn new(publisher: Arc<dyn Publisher>, subscriber: Arc<dyn Subscriber>) -> Self {
        Bus {
            publisher,
            subscriber,
            retry: RetryPolicy::default(),
            layers: Vec::new(),
            observers: Vec::new(),
            closer: None,
            health: Arc::new(health::Always(health::State::Connected)),
            http_address: None,
            #[cfg(feature = "prometheus")]
            metrics: None,
            in_dialect: None,
            publish_layers: Vec::new(),
        }
    }

    /// A publisher writing in `dialect` instead of the configured one (one
    /// service can write CloudEvents on one topic and another team's
    /// envelope on the next; see `docs/joining.md`), with the configured
    /// publish layers. The in-process bus does not encode messages: there
    /// it is the bus's own publisher.
    pub fn publisher_in(&self, dialect: Dialect) -> Arc<dyn Publisher> {
        match &self.in_dialect {
            Some(make) => layered(make(dialect), &self.publish_layers),
            None => self.publisher.clone(),
        }
    }

    /// The bus with `check` as its connection's health check (the
    /// adapter's bus, usually).
    pub fn with_health(mut self, check: Arc<dyn HealthCheck>) -> Self {
        self.health = check;
        self
    }

    /// The `[http]` address of the configuration it was connected with,
    /// which [`App::bus`] serves.
    pub fn http_address(&self) -> Option<std::net::SocketAddr> {
        self.http_address
    }

    /// The Prometheus metrics (`[telemetry] prometheus = true`) the bus's
    /// telemetry records into, which [`App::bus`] serves on `/metrics`;
    /// add the service's own instruments with [`metrics::Metrics::meter`].
    #[cfg(feature = "prometheus")]
    pub fn metrics(&self) -> Option<&metrics::Metrics> {
        self.metrics.as_ref()
    }

    /// Starts building a consumer for `group`, with the configured retry
    /// policy, layers and settlement observers already in place (add more
    /// with `.layer(..)`: they go inside the configured ones).
    pub fn consumer(&self, group: impl Into<String>) -> ConsumerBuilder {
        let mut builder = Consumer::group(self.subscriber.clone(), group)
            .retry(self.retry)
            .state(tidings_core::request::Replies::new(self.publisher.clone()));
        for layer in &self.layers {
            builder = builder.layer(layer.clone());
        }
        for observer in &self.observers {
            let observer = observer.clone();
            builder = builder.on_settle(move |s| observer(s));
        }
        builder
    }

    /// A [`Requester`](tidings_core::request::Requester) reading replies on
    /// `reply_topic` (unique to this process, e.g. the service's name and
    /// an instance id), publishing requests through this bus's publisher.
    pub async fn requester(
        &self,
        reply_topic: impl Into<String>,
    ) -> Result<tidings_core::request::Requester> {
        tidings_core::request::Requester::start(
            self.publisher.clone(),
            self.subscriber.clone(),
            reply_topic,
        )
        .await
    }

    /// The publisher (with the configured publish layers).
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
            .field("retry", &self.retry)
            .field("layers", &self.layers.len())
            .field("settle_observers", &self.observers.len())
            .finish()
    }
}

#[async_trait]
impl Publisher for Bus {
    // `publish` and `publish_batch` hand on the publisher's own future: with
    // `async fn` here, every publish through a `Bus` would box a second one.
    fn publish<'life0, 'life1, 'async_trait>(
        &'life0 self,
        topic: &'life1 str,
        message: Message,
    ) -> futures::future::BoxFuture<'async_trait, Result<Receipt>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.publisher.publish(topic, message)
    }

    fn publish_batch<'life0, 'life1, 'async_trait>(
        &'life0 self,
        topic: &'life1 str,
        messages: Vec<Message>,
    ) -> futures::future::BoxFuture<'async_trait, Vec<Result<Receipt>>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.publisher.publish_batch(topic, messages)
    }

    /// Closes the publisher, then the adapter's connection as the adapter's
    /// own `close` does (RabbitMQ waits for outstanding confirms, NATS
    /// drains). Shut consumers down first.
    async fn close(&self) -> Result<()> {
        // The connection closes even when the publisher's close failed.
        let published = self.publisher.close().await;
        let closed = match &self.closer {
            Some(close) => close().await,
            None => Ok(()),
        };
        published.and(closed)
    }
}

/// The broker connection's health, as its adapter checks it (a round trip
/// to the broker, or the client's own connection state).
impl HealthCheck for Bus {
    fn check(&self) -> futures::future::BoxFuture<'_, Health> {
        self.health.check()
    }
}

/// What [`connect`] accepts: a URL (`&str`, `String`) or a [`Config`].
pub trait IntoConfig {
    /// The configuration, checked.
    fn into_config(self) -> Result<Config>;
}

impl IntoConfig for &str {
    fn into_config(self) -> Result<Config> {
        let config = Config::from_url(self);
        config.check()?;
        Ok(config)
    }
}

impl IntoConfig for String {
    fn into_config(self) -> Result<Config> {
        self.as_str().into_config()
    }
}

impl IntoConfig for Config {
    fn into_config(self) -> Result<Config> {
        self.check()?;
        Ok(self)
    }
}

impl IntoConfig for &Config {
    fn into_config(self) -> Result<Config> {
        self.clone().into_config()
    }
}

/// Connects to the broker a URL or a [`Config`] names, and sets up the
/// middleware the configuration describes.
///
/// | URL | broker | cargo feature |
/// |---|---|---|
/// | `memory://` (`?history=N` keeps N messages per topic for replay) | the in-process bus | `memory` (default) |
/// | `redis://host:6379?mode=streams` (or `mode=pubsub`), `rediss://` | Redis | `redis` |
/// | `amqp://user:pass@host:5672/%2f?exchange=events`, `amqps://` | RabbitMQ | `amqp` |
/// | `kafka://host:9092,host2:9092` | Kafka | `kafka` |
/// | `nats://host:4222?jetstream=true` (or `false` for core NATS), `tls://` | NATS | `nats` |
///
/// TLS files and a server name are the `tls_*` parameters (or the `[tls]`
/// table): see [`TlsConfig`](config::TlsConfig).
///
/// Adapter options are query parameters (or the `[options]` table of the
/// configuration); each adapter's page in `docs/` lists them. An unknown
/// scheme, or one whose feature is off, is an [`Error::Config`] naming the
/// allowed values. Credentials never appear in errors or logs.
pub async fn connect(config: impl IntoConfig) -> Result<Bus> {
    connect_with(&Registry::builtin(), config).await
}

/// [`connect`] with the adapters of `registry` (a third-party adapter's
/// scheme, say; see [`registry`]).
pub async fn connect_with(registry: &Registry, config: impl IntoConfig) -> Result<Bus> {
    let config = config.into_config()?;
    let adapter = registry.adapter_for(&config)?;
    let registry::Parts {
        publisher,
        subscriber,
        health: check,
        close: closer,
        publisher_in: in_dialect,
    } = adapter.connect(&config.full_url()).await?;
    let mut bus = Bus::new(publisher, subscriber).with_health(check);
    bus.closer = closer;
    bus.in_dialect = in_dialect;
    bus.http_address = config.http.as_ref().map(|h| h.address);
    #[cfg(feature = "prometheus")]
    if config.prometheus_enabled() {
        bus.metrics = Some(metrics::Metrics::new()?);
    }
    bus.retry = config.retry_policy();
    bus.layers = layers(&config).await?;
    let mut publish_layers: Vec<Arc<dyn middleware::PublishMiddleware>> = Vec::new();
    #[cfg(feature = "otel")]
    if let Some(t) = config.telemetry.as_ref().filter(|t| t.enabled) {
        // Outermost on both paths, so the spans and durations cover the
        // other layers; the marker goes innermost, so duplicates skipped by
        // idempotency are counted as such.
        let system = bus.subscriber.name();
        let telemetry = otel::Telemetry::builder().max_attempts(bus.retry.max_attempts);
        // Into the bus's own Prometheus registry when it has one; the
        // global meter provider otherwise.
        #[cfg(feature = "prometheus")]
        let telemetry = match &bus.metrics {
            Some(m) => telemetry.meter(m.meter("tidings")),
            None => telemetry,
        };
        let telemetry = telemetry
            .parent_mode(match t.parent {
                config::ParentConfig::Parent => otel::ParentMode::Parent,
                config::ParentConfig::Link => otel::ParentMode::Link,
            })
            .build();
        publish_layers.push(Arc::new(telemetry.publish_layer(system)));
        bus.layers
            .insert(0, Arc::new(telemetry.process_layer(system)));
        bus.layers.push(Arc::new(telemetry.handler_reached()));
        bus.observers
            .push(Arc::new(telemetry.settle_observer(system)));
    }
    if let Some(p) = &config.publish_retry {
        let retry = tidings_middleware::PublishRetry::exponential(p.initial_backoff)
            .max_attempts(p.max_attempts);
        publish_layers.push(Arc::new(retry));
    }
    bus.publisher = layered(bus.publisher, &publish_layers);
    bus.publish_layers = publish_layers;
    Ok(bus)
}

/// `publisher` inside the publish layers (outermost first).
fn layered(
    publisher: Arc<dyn Publisher>,
    layers: &[Arc<dyn middleware::PublishMiddleware>],
) -> Arc<dyn Publisher> {
    if layers.is_empty() {
        return publisher;
    }
    let mut layered = middleware::LayeredPublisher::new(publisher);
    for layer in layers {
        layered = layered.layer(layer.clone());
    }
    Arc::new(layered)
}

/// The handler layers a configuration describes, outermost first.
async fn layers(config: &Config) -> Result<Vec<Arc<dyn Middleware>>> {
    use tidings_middleware as mw;
    let mut layers: Vec<Arc<dyn Middleware>> = Vec::new();
    if let Some(idem) = &config.idempotency {
        let layer = match idem.store {
            config::IdempotencyStoreConfig::Memory => mw::Idempotency::in_memory(idem.ttl),
            #[cfg(feature = "redis")]
            config::IdempotencyStoreConfig::Redis => {
                // Through the adapter's connection: a cluster, Sentinel
                // and TLS are named in the URL as for a bus.
                let url = idem.redis_url.as_deref().unwrap_or_default();
                let redis =
                    tidings_redis::RedisConfig::from_url(url).map_err(|e| Error::Config {
                        key: "idempotency.redis_url".into(),
                        message: e.to_string(),
                    })?;
                // Boxed: unboxed, `connect`'s future nests deep enough to
                // overflow rustc's query depth in the CLI, which awaits it
                // inside futures of its own.
                let connection = Box::pin(tidings_redis::RedisConnection::connect(redis))
                    .await
                    .map_err(|e| Error::Config {
                        key: "idempotency.redis_url".into(),
                        message: format!("cannot connect to {}: {e}", config::redact(url)),
                    })?;
                mw::Idempotency::new(mw::idempotency::RedisStore::new(connection), idem.ttl)
            }
            #[cfg(not(feature = "redis"))]
            config::IdempotencyStoreConfig::Redis => {
                return Err(Error::Config {
                    key: "idempotency.store".into(),
                    message: "\"redis\" needs the cargo feature `redis`".into(),
                });
            }
        };
        layers.push(Arc::new(layer));
    }
    if config.retry.mode == config::RetryModeConfig::InProcess {
        let retry = mw::Retry::exponential(config.retry.initial_backoff)
            .max_attempts(config.retry.max_attempts)
            .max_delay(config.retry.max_backoff)
            .mode(mw::RetryMode::InProcess);
        layers.push(Arc::new(retry));
    }
    if let Some(b) = &config.breaker {
        let breaker = mw::CircuitBreaker::new(mw::Threshold::Consecutive(b.failures))
            .open_for(b.open_for)
            .probes(b.probes);
        layers.push(Arc::new(breaker));
    }
    Ok(layers)
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

    /// Which schemes take `[tls]` is the adapters' to say (the registry's).
    #[tokio::test]
    async fn tls_needs_a_scheme_that_takes_it() {
        let tls = |url: &str| {
            Config::from_toml(&format!("url = \"{url}\"\n[tls]\nca_file = \"c.pem\""))
                .expect("valid alone")
        };
        let Err(Error::Config { key, message }) = connect(tls("memory://")).await else {
            panic!("memory:// takes no TLS");
        };
        assert_eq!(key, "tls");
        if cfg!(feature = "amqp") {
            assert!(message.contains("amqps://"), "{message}");
            let Err(Error::Config { key, .. }) = connect(tls("amqp://h")).await else {
                panic!("TLS with RabbitMQ is chosen by amqps://");
            };
            assert_eq!(key, "tls");
        }
    }

    /// `idempotency.redis_url` is read as a bus's Redis URL (options and
    /// all), and the store it names keeps a duplicate from running twice.
    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn a_redis_idempotency_store_is_configured_by_a_bus_url() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let config = |url: &str| {
            Config::from_toml(&format!(
                "url = \"memory://\"\n[idempotency]\nstore = \"redis\"\nredis_url = \"{url}\""
            ))
            .expect("valid")
        };
        let Err(Error::Config { key, message }) =
            connect(config("redis://127.0.0.1:6379/?colour=blue")).await
        else {
            panic!("an unknown option of the store's URL is refused");
        };
        assert_eq!(key, "idempotency.redis_url");
        assert!(message.contains("colour"), "{message}");

        use tidings_core::testkit::within;
        let bus = within(
            10,
            "connecting",
            connect(config("redis://127.0.0.1:6379/?response_timeout=5s")),
        )
        .await
        .unwrap_or_else(|e| panic!("{e} (is Redis running? scripts/brokers.sh starts it)"));
        let topic = tidings_core::testkit::unique("idem-config");
        let group = tidings_core::testkit::unique("g");
        let runs = Arc::new(AtomicU32::new(0));
        let (tx, mut settled) = tokio::sync::mpsc::unbounded_channel();
        let r = runs.clone();
        let consumer = bus
            .consumer(group.clone())
            .on_settle(move |_| {
                let _ = tx.send(());
            })
            .handle(&topic, move |_: tidings_core::Event<u32>| {
                r.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            })
            .start()
            .await
            .expect("start");
        let message = tidings_core::Event::new(7u32)
            .into_message()
            .expect("message");
        within(10, "both deliveries settled", async {
            for _ in 0..2 {
                bus.publish(&topic, message.clone()).await.expect("publish");
            }
            for _ in 0..2 {
                settled.recv().await;
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the duplicate was skipped");
        // Recorded in Redis, where the layer's store keeps `<group>:<id>`.
        use tidings_middleware::idempotency::{Claim, IdempotencyStore, RedisStore};
        let store = RedisStore::connect("redis://127.0.0.1:6379")
            .await
            .expect("Redis");
        let key = format!("{group}:{}", message.id);
        let found = store.claim(&key, std::time::Duration::from_secs(1)).await;
        assert_eq!(found.expect("claim"), Claim::Done, "the store is Redis");
        consumer.shutdown(std::time::Duration::from_secs(5)).await;
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            config::redact("amqp://guest:secret@host/"),
            "amqp://guest:***@host/"
        );
    }
}
