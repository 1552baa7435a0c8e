//! The adapters [`connect`](crate::connect) knows, by URL scheme.
//!
//! The built-in adapters register themselves by cargo feature
//! ([`Registry::builtin`]); a third-party adapter implements [`Adapter`] and
//! is registered with [`Registry::register`], after which
//! [`connect_with`](crate::connect_with) gives it the configured middleware,
//! telemetry and health like any other, and the configuration checks (the
//! scheme, which schemes take `[tls]`) know it. Nothing else in the facade
//! lists adapters.
//!
//! ```
//! use std::sync::Arc;
//! use futures::future::BoxFuture;
//! use tidings::registry::{Adapter, Parts, Registry};
//!
//! /// The in-process bus under a scheme of its own.
//! struct Loopback;
//!
//! impl Adapter for Loopback {
//!     fn schemes(&self) -> &'static [&'static str] {
//!         &["loopback"]
//!     }
//!     fn connect<'a>(&'a self, _url: &'a str) -> BoxFuture<'a, tidings::Result<Parts>> {
//!         Box::pin(async {
//!             let bus = tidings::memory::MemoryBus::new();
//!             Ok(Parts::new(bus.publisher(), bus.subscriber(), Arc::new(bus)))
//!         })
//!     }
//! }
//!
//! # #[tokio::main] async fn main() -> tidings::Result<()> {
//! let registry = Registry::builtin().register(Loopback);
//! let bus = tidings::connect_with(&registry, "loopback://").await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

use futures::future::BoxFuture;

use tidings_core::{Dialect, Error, HealthCheck, Publisher, Result, Subscriber};

use crate::Config;

/// Closes an adapter's connection the way its own bus's `close` does
/// (RabbitMQ waits for outstanding confirms, NATS drains).
pub type Closer = Arc<dyn Fn() -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// Makes an adapter's publisher in another dialect.
pub type DialectPublisher = Arc<dyn Fn(Dialect) -> Arc<dyn Publisher> + Send + Sync>;

/// What a connected adapter hands the facade to make a [`Bus`](crate::Bus) of.
pub struct Parts {
    pub(crate) publisher: Arc<dyn Publisher>,
    pub(crate) subscriber: Arc<dyn Subscriber>,
    pub(crate) health: Arc<dyn HealthCheck>,
    pub(crate) close: Option<Closer>,
    pub(crate) publisher_in: Option<DialectPublisher>,
}

impl Parts {
    /// A publisher, a subscriber and the connection's health check.
    pub fn new(
        publisher: Arc<dyn Publisher>,
        subscriber: Arc<dyn Subscriber>,
        health: Arc<dyn HealthCheck>,
    ) -> Self {
        Parts {
            publisher,
            subscriber,
            health,
            close: None,
            publisher_in: None,
        }
    }

    /// How to close the connection after the publisher (its drain included).
    pub fn with_close(mut self, close: Closer) -> Self {
        self.close = Some(close);
        self
    }

    /// How to make a publisher in another dialect
    /// ([`Bus::publisher_in`](crate::Bus::publisher_in)).
    pub fn with_dialects(mut self, publisher_in: DialectPublisher) -> Self {
        self.publisher_in = Some(publisher_in);
        self
    }
}

/// A broker adapter as [`connect_with`](crate::connect_with) sees it.
pub trait Adapter: Send + Sync {
    /// The URL schemes it answers, without `://` (`redis`, `rediss`).
    fn schemes(&self) -> &'static [&'static str];

    /// The schemes that take the `[tls]` options (none by default).
    fn tls_schemes(&self) -> &'static [&'static str] {
        &[]
    }

    /// Connects to the URL (the configuration's URL with its options and
    /// TLS options as query parameters).
    fn connect<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Result<Parts>>;
}

/// The adapters by scheme; see the [module docs](self).
#[derive(Clone)]
pub struct Registry {
    adapters: Vec<Arc<dyn Adapter>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("schemes", &self.schemes())
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::builtin()
    }
}

impl Registry {
    /// No adapters.
    pub fn empty() -> Self {
        Registry {
            adapters: Vec::new(),
        }
    }

    /// The adapters this build has, by cargo feature.
    pub fn builtin() -> Self {
        #[allow(unused_mut)]
        let mut registry = Registry::empty();
        #[cfg(feature = "memory")]
        {
            registry = registry.register(builtin::Memory);
        }
        #[cfg(feature = "redis")]
        {
            registry = registry.register(builtin::Redis);
        }
        #[cfg(feature = "amqp")]
        {
            registry = registry.register(builtin::Amqp);
        }
        #[cfg(feature = "kafka")]
        {
            registry = registry.register(builtin::Kafka);
        }
        #[cfg(feature = "nats")]
        {
            registry = registry.register(builtin::Nats);
        }
        #[cfg(feature = "postgres")]
        {
            registry = registry.register(builtin::Postgres);
        }
        registry
    }

    /// Adds an adapter; for a scheme another adapter answers too, the one
    /// registered last wins.
    pub fn register(mut self, adapter: impl Adapter + 'static) -> Self {
        self.adapters.insert(0, Arc::new(adapter));
        self
    }

    /// Every scheme, as `scheme://`, in the order registered.
    pub fn schemes(&self) -> Vec<String> {
        let mut schemes: Vec<String> = Vec::new();
        for adapter in self.adapters.iter().rev() {
            for s in adapter.schemes() {
                let s = format!("{s}://");
                if !schemes.contains(&s) {
                    schemes.push(s);
                }
            }
        }
        schemes
    }

    fn find(&self, scheme: &str) -> Option<&Arc<dyn Adapter>> {
        self.adapters.iter().find(|a| a.schemes().contains(&scheme))
    }

    /// The adapter for the configuration's URL, after checking what only
    /// the adapters know: the scheme, and whether it takes `[tls]`.
    pub(crate) fn adapter_for(&self, config: &Config) -> Result<&Arc<dyn Adapter>> {
        let bad = |key: &str, message: String| Error::Config {
            key: key.into(),
            message,
        };
        let shown = tidings_core::params::redact_url(&config.url);
        let scheme = match config.url.split_once("://") {
            Some((scheme, _)) if !scheme.is_empty() => scheme,
            _ => {
                return Err(bad(
                    "url",
                    format!(
                        "`{shown}` has no scheme; expected one of {}",
                        self.schemes().join(", ")
                    ),
                ));
            }
        };
        let adapter = self.find(scheme).ok_or_else(|| {
            bad(
                "url",
                format!(
                    "unknown or disabled scheme `{scheme}`; this build supports: {}",
                    self.schemes().join(", ")
                ),
            )
        })?;
        if config.tls.is_some() && !adapter.tls_schemes().contains(&scheme) {
            let tls: Vec<String> = self
                .adapters
                .iter()
                .flat_map(|a| a.tls_schemes())
                .map(|s| format!("{s}://"))
                .collect();
            return Err(bad(
                "tls",
                format!(
                    "TLS options need {}, not {scheme}://",
                    if tls.is_empty() {
                        "an adapter that takes them".to_owned()
                    } else {
                        tls.join(", ")
                    }
                ),
            ));
        }
        Ok(adapter)
    }
}

/// The built-in adapters, one per cargo feature.
mod builtin {
    #[allow(unused_imports)]
    use std::sync::Arc;

    #[allow(unused_imports)]
    use futures::future::BoxFuture;

    #[allow(unused_imports)]
    use super::{Adapter, Parts};
    #[allow(unused_imports)]
    use tidings_core::Result;

    #[cfg(feature = "memory")]
    pub(super) struct Memory;

    #[cfg(feature = "memory")]
    impl Adapter for Memory {
        fn schemes(&self) -> &'static [&'static str] {
            &["memory"]
        }
        fn connect<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Result<Parts>> {
            Box::pin(async move {
                let config = tidings_memory::MemoryConfig::from_url(url)?;
                let bus = tidings_memory::MemoryBus::with_config(config);
                Ok(Parts::new(bus.publisher(), bus.subscriber(), Arc::new(bus)))
            })
        }
    }

    #[cfg(feature = "postgres")]
    pub(super) struct Postgres;

    #[cfg(feature = "postgres")]
    impl Adapter for Postgres {
        fn schemes(&self) -> &'static [&'static str] {
            &["postgres", "postgresql"]
        }
        fn connect<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Result<Parts>> {
            Box::pin(async move {
                let broker = tidings_postgres::PostgresBroker::connect(url).await?;
                Ok(Parts::new(
                    broker.publisher(),
                    broker.subscriber(),
                    Arc::new(broker),
                ))
            })
        }
    }

    #[cfg(feature = "redis")]
    pub(super) struct Redis;

    #[cfg(feature = "redis")]
    impl Adapter for Redis {
        fn schemes(&self) -> &'static [&'static str] {
            &["redis", "rediss"]
        }
        fn tls_schemes(&self) -> &'static [&'static str] {
            &["rediss"]
        }
        fn connect<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Result<Parts>> {
            Box::pin(async move {
                let config = tidings_redis::RedisConfig::from_url(url)?;
                let bus = tidings_redis::RedisBus::connect(config).await?;
                let adapter = bus.clone();
                Ok(Parts::new(bus.publisher(), bus.subscriber(), Arc::new(bus))
                    .with_dialects(Arc::new(move |d| adapter.publisher_in(d))))
            })
        }
    }

    #[cfg(feature = "amqp")]
    pub(super) struct Amqp;

    #[cfg(feature = "amqp")]
    impl Adapter for Amqp {
        fn schemes(&self) -> &'static [&'static str] {
            &["amqp", "amqps"]
        }
        fn tls_schemes(&self) -> &'static [&'static str] {
            &["amqps"]
        }
        fn connect<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Result<Parts>> {
            Box::pin(async move {
                let config = tidings_amqp::AmqpConfig::from_url(url)?;
                let bus = tidings_amqp::AmqpBus::connect(config).await?;
                let (closing, dialects) = (bus.clone(), bus.clone());
                Ok(Parts::new(bus.publisher(), bus.subscriber(), Arc::new(bus))
                    .with_close(Arc::new(move || {
                        let adapter = closing.clone();
                        Box::pin(async move {
                            adapter.close().await;
                            Ok(())
                        })
                    }))
                    .with_dialects(Arc::new(move |d| dialects.publisher_in(d))))
            })
        }
    }

    #[cfg(feature = "kafka")]
    pub(super) struct Kafka;

    #[cfg(feature = "kafka")]
    impl Adapter for Kafka {
        fn schemes(&self) -> &'static [&'static str] {
            &["kafka"]
        }
        fn tls_schemes(&self) -> &'static [&'static str] {
            &["kafka"]
        }
        fn connect<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Result<Parts>> {
            Box::pin(async move {
                let config = tidings_kafka::KafkaConfig::from_url(url)?;
                let bus = tidings_kafka::KafkaBus::connect(config).await?;
                let adapter = bus.clone();
                Ok(Parts::new(bus.publisher(), bus.subscriber(), Arc::new(bus))
                    .with_dialects(Arc::new(move |d| adapter.publisher_in(d))))
            })
        }
    }

    #[cfg(feature = "nats")]
    pub(super) struct Nats;

    #[cfg(feature = "nats")]
    impl Adapter for Nats {
        fn schemes(&self) -> &'static [&'static str] {
            &["nats", "tls"]
        }
        fn tls_schemes(&self) -> &'static [&'static str] {
            &["nats", "tls"]
        }
        fn connect<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Result<Parts>> {
            Box::pin(async move {
                let config = tidings_nats::NatsConfig::from_url(url)?;
                let bus = tidings_nats::NatsBus::connect(config).await?;
                let (closing, dialects) = (bus.clone(), bus.clone());
                Ok(Parts::new(bus.publisher(), bus.subscriber(), Arc::new(bus))
                    .with_close(Arc::new(move || {
                        let adapter = closing.clone();
                        Box::pin(async move { adapter.close().await })
                    }))
                    .with_dialects(Arc::new(move |d| dialects.publisher_in(d))))
            })
        }
    }
}
