//! Redis adapter for Tidings: Redis Streams with consumer groups
//! (at-least-once, the default) and Redis Pub/Sub (at-most-once).
//!
//! # Streams mode (default)
//! - A topic is a stream key. `publish` is `XADD` (payload and headers as
//!   binary-safe fields, see [`headers`]); it returns the entry id once Redis
//!   replied. `publish_batch` pipelines. An approximate `MAXLEN ~` can be set
//!   for all or single topics.
//! - A group is a consumer group, created on demand (`XGROUP CREATE ... MKSTREAM`)
//!   at the stream's end (or where [`StartFrom`](tidings_core::StartFrom)
//!   says); [`declare_group`](tidings_core::Subscriber::declare_group) creates
//!   it ahead of the first consumer. Consumers read with `XREADGROUP` with a
//!   `COUNT` that never exceeds the free prefetch slots, and `BLOCK`.
//! - Ack is `XACK`. A nack claims the entry back to the same consumer after
//!   the delay (`XCLAIM`), with the attempt one higher. An entry whose
//!   consumer crashed stays pending and is reclaimed by another member with
//!   `XAUTOCLAIM` once it was idle for the visibility timeout; the attempt is
//!   the entry's delivery count.
//! - Dead letters are added to the stream `<topic>:<group>:dlq` with the
//!   reason as fields; then the original is acked.
//! - A subscription without a group reads with `XREAD` from the end of the
//!   stream, or from the beginning or a time (replay).
//! - Guarantee: at-least-once. Redis keeps streams in memory; they survive a
//!   restart only with RDB/AOF persistence configured on the server.
//!
//! # Pub/Sub mode (`?mode=pubsub`)
//! `PUBLISH`/`SUBSCRIBE` (a topic with `*`, `?` or `[` is a pattern:
//! `PSUBSCRIBE`). **At most once**: a message published while nobody
//! listens, or while a connection is down, is lost; a failed handler is
//! retried in process only. Groups are emulated: every member receives every
//! message and one member takes it with a `SET NX` claim key.
//!
//! # Redis Cluster
//! A URL listing several nodes (`redis://n1:7000,n2:7000,n3:7000`), or one
//! node with `cluster=true`, connects through the redis crate's cluster
//! client: commands are routed by hash slot and follow the cluster as it
//! fails over. Every command names one key (the topic's stream holds its
//! groups), so no key layout is needed for multi-key commands; Pub/Sub
//! subscribes through one seed node at a time (classic `PUBLISH` reaches
//! every node).
//!
//! # Redis Sentinel
//! `sentinel=<master>` makes the URL's nodes sentinels: connections go to
//! the master they name and follow it to the replica they promote.
//! `wait_replicas=n` makes every write wait for `n` replicas (`WAIT`): a
//! failover to a replica that confirmed it loses nothing confirmed (with
//! more replicas than `n`, Sentinel may promote one that did not: `WAIT` is
//! not strong consistency).
//!
//! # Recovery
//! Connections reconnect with backoff; subscriptions resume (a group that
//! vanished with a restarted server is created again). A server that
//! answers `READONLY` (a master demoted behind the address the URL names,
//! as managed services fail over) is connected to again by its URL, at most
//! once a second, to reach the promoted one.
//!
//! ```no_run
//! use tidings_core::{Consumer, Event, HandlerError, PublisherExt};
//! use tidings_redis::{RedisBus, RedisConfig};
//! # #[tokio::main] async fn main() -> tidings_core::Result<()> {
//! let bus = RedisBus::connect(RedisConfig::from_url("redis://127.0.0.1:6379")?).await?;
//! let consumer = Consumer::group(bus.subscriber(), "greeter")
//!     .handle("user.registered", |e: Event<String>| async move {
//!         println!("hello {}", e.data);
//!         Ok::<_, HandlerError>(())
//!     })
//!     .start()
//!     .await?;
//! bus.publisher().publish_event("user.registered", Event::new("ada".to_owned())).await?;
//! consumer.shutdown(std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```

mod config;
mod conn;
mod follow;
mod groups;
pub mod headers;
mod publisher;
mod pubsub;
mod sentinel;
mod subscriber;

use std::sync::Arc;

use futures::future::BoxFuture;
use redis::{Client, RedisError};
use tidings_core::health::{self, Health, HealthCheck};
use tidings_core::{Error, Publisher, Result, Subscriber};

pub use config::{RedisConfig, RedisMode};
pub(crate) use conn::{Conn, Connector};
pub use headers::ForeignEntry;
pub use publisher::RedisPublisher;
pub use subscriber::RedisSubscriber;

/// The adapter's name in errors and telemetry.
pub const NAME: &str = "redis";

/// A connected Redis bus: a publisher and a subscriber on their own connections.
#[derive(Clone)]
pub struct RedisBus {
    publisher: Arc<RedisPublisher>,
    publish: Conn,
    /// Short commands only (never a `WAIT`): health checks, acks, claims.
    control: Conn,
    config: Arc<RedisConfig>,
    subscriber: Arc<RedisSubscriber>,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus").finish_non_exhaustive()
    }
}

impl RedisBus {
    /// Connects to Redis. Fails if Redis cannot be reached.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        let connector = Connector::new(&config, |url| client(&config, url))?;
        let config = Arc::new(config);
        let publish = connector.connect(&config, config.response_timeout).await?;
        let control = connector.connect(&config, config.response_timeout).await?;
        Ok(RedisBus {
            publisher: Arc::new(RedisPublisher::new(
                publish.clone(),
                config.clone(),
                config.layout.clone(),
            )),
            publish: publish.clone(),
            control: control.clone(),
            config: config.clone(),
            subscriber: Arc::new(RedisSubscriber::new(connector, control, publish, config)),
        })
    }

    /// The publisher, shared, writing in the configured layout.
    pub fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }

    /// A publisher on the same connection writing in `dialect` (with the
    /// configured body field and field names).
    pub fn publisher_in(&self, dialect: tidings_core::Dialect) -> Arc<dyn Publisher> {
        let layout = headers::Layout {
            dialect,
            ..self.config.layout.clone()
        };
        Arc::new(RedisPublisher::new(
            self.publish.clone(),
            self.config.clone(),
            layout,
        ))
    }

    /// The subscriber, shared.
    pub fn subscriber(&self) -> Arc<dyn Subscriber> {
        self.subscriber.clone()
    }

    /// The bus's connection for short commands (acks, health checks), for
    /// other uses of the same deployment such as the idempotency layer's
    /// `RedisStore`: it reaches a cluster's nodes or the master behind
    /// Sentinel, and follows failovers, as the bus does. Shared with the
    /// bus's acks: send only short commands that leave the connection as
    /// it was (no `SELECT`, `MULTI`, `CLIENT REPLY`, blocking reads, `WAIT`
    /// or `SUBSCRIBE`); [`RedisConnection::connect`] makes one of your own.
    pub fn connection(&self) -> RedisConnection {
        RedisConnection(self.control.clone())
    }
}

/// A reconnecting, multiplexed connection to what a [`RedisConfig`]
/// names: one server, a cluster (commands routed by their key) or the
/// master behind Sentinel, followed across failovers. It implements the
/// redis crate's [`ConnectionLike`](redis::aio::ConnectionLike), so the
/// crate's commands run on it; clones share it.
#[derive(Clone)]
pub struct RedisConnection(Conn);

impl RedisConnection {
    /// Connects to what `config` names. Fails if it cannot be reached.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        let connector = Connector::new(&config, |url| client(&config, url))?;
        let conn = connector.connect(&config, config.response_timeout).await?;
        Ok(RedisConnection(conn))
    }
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection").finish_non_exhaustive()
    }
}

impl redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.0.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

/// The client for one node's URL, with the TLS files when there are any.
fn client(config: &RedisConfig, url: &str) -> Result<Client> {
    if url.starts_with("rediss://") {
        // The redis crate builds its rustls configuration from the process's
        // default crypto provider.
        tidings_core::tls::install_default_provider();
    }
    let opened = match tls_certificates(config)? {
        None => Client::open(url),
        Some(certificates) => Client::build_with_tls(url, certificates),
    };
    opened.map_err(|e| tidings_core::params::invalid("url", e.to_string()))
}

/// The TLS files of a `rediss://` configuration, read; `None` without any.
pub(crate) fn tls_certificates(config: &RedisConfig) -> Result<Option<redis::TlsCertificates>> {
    if !config.url.starts_with("rediss://") || !config.tls.is_set() {
        return Ok(None);
    }
    config.tls.check_files()?;
    let read = |key: &str, path: &Option<std::path::PathBuf>| -> Result<Option<Vec<u8>>> {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| tidings_core::params::invalid(key, e.to_string()))
            })
            .transpose()
    };
    let client_tls = match (
        read("tls_cert_file", &config.tls.cert_file)?,
        read("tls_key_file", &config.tls.key_file)?,
    ) {
        (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
            client_cert,
            client_key,
        }),
        _ => None,
    };
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert: read("tls_ca_file", &config.tls.ca_file)?,
    }))
}

/// Whether the error means the connection (not the command) failed.
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        // A server that is loading its data (`LOADING` after a restart), a
        // failing-over master, a master demoted to a replica (`READONLY`:
        // the sentinels are promoting another), a cluster in flux: the same
        // call succeeds a little later, so publish retries must not give up.
        || matches!(e.retry_method(), redis::RetryMethod::WaitAndRetry)
        || e.kind() == redis::ServerErrorKind::ReadOnly.into()
        // `min-replicas-to-write` refusing writes until replicas are back.
        || e.code() == Some("NOREPLICAS")
}

pub(crate) fn connection_error(e: RedisError) -> Error {
    Error::Connection {
        broker: NAME,
        source: Box::new(e),
    }
}

/// Maps a client error: connection trouble or another broker error.
pub(crate) fn broker_error(e: RedisError) -> Error {
    if is_connection_error(&e) {
        connection_error(e)
    } else {
        Error::Broker {
            broker: NAME,
            source: Box::new(e),
        }
    }
}

/// The connection's health: a `PING` answered within a second is
/// `connected`; an error or silence is `reconnecting` (the connection
/// manager reconnects on its own).
impl HealthCheck for RedisBus {
    fn check(&self) -> BoxFuture<'_, Health> {
        let mut conn = self.control.clone();
        Box::pin(async move {
            health::round_trip(redis::cmd("PING").query_async::<String>(&mut conn)).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loading_server_is_a_transient_error() {
        let loading = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading),
            "LOADING Redis is loading the dataset in memory",
        ));
        assert!(is_connection_error(&loading));
        let wrong_type = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        assert!(!is_connection_error(&wrong_type));
        let demoted = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY You can't write against a read only replica.",
        ));
        assert!(is_connection_error(&demoted));
        // As the server's reply is read.
        let redis::Value::ServerError(reply) =
            redis::parse_redis_value(b"-NOREPLICAS Not enough good replicas to write.\r\n")
                .expect("a reply")
        else {
            panic!("an error reply");
        };
        let no_replicas = redis::RedisError::from(reply);
        assert_eq!(no_replicas.code(), Some("NOREPLICAS"), "{no_replicas:?}");
        assert!(is_connection_error(&no_replicas));
    }
}
