//! NATS adapter for Tidings: JetStream and core NATS, on async-nats.
//!
//! # Guarantees
//! - **JetStream** (the default): at least once. Every topic is a subject
//!   captured by a stream (one stream per topic, created on first use, or one
//!   shared stream; see [`StreamLayout`]). `publish` returns once the server
//!   stored the message (PubAck); the message id is sent as `Nats-Msg-Id`, so
//!   a retried publish inside the duplicate window is stored once
//!   ([`Receipt::Sequence`](tidings_core::Receipt) says `duplicate`). A group
//!   is a durable pull consumer with explicit acks; nack is a NAK with delay;
//!   the attempt number is the server's delivery count; dead letters are
//!   published to `<topic>.<group>.dlq` (a topic of its own) with the reason
//!   in headers before the original is acked. Deliveries still being handled
//!   are reported in progress every [`NatsConfig::progress_interval`], so a
//!   handler may run longer than `ack_wait` without its message being
//!   redelivered. A subscription without a group is an ordered consumer
//!   (no acks, replay from the start or a time).
//! - **Core NATS** (`?jetstream=false`): at most once. Plain subjects, queue
//!   groups for the members of a group, nothing stored: a message published
//!   while nobody is subscribed is gone, and a failed handler is retried in
//!   process only.
//!
//! Both modes carry metadata as CloudEvents headers (`ce_id`, `ce_type`, ...)
//! and trace context as `traceparent`/`tracestate`; the client reconnects on
//! its own (unlimited attempts with backoff) and subscriptions resume.
//!
//! # Example
//! ```no_run
//! use tidings_core::{Consumer, Event, HandlerError, PublisherExt};
//! use tidings_nats::{NatsBus, NatsConfig};
//! # async fn f() -> tidings_core::Result<()> {
//! let bus = NatsBus::connect(NatsConfig::from_url("nats://127.0.0.1:4222")?).await?;
//! let consumer = Consumer::group(bus.subscriber(), "mailer")
//!     .handle("user.registered", |e: Event<String>| async move {
//!         println!("welcome {}", e.data);
//!         Ok::<_, HandlerError>(())
//!     })
//!     .start()
//!     .await?;
//! bus.publisher().publish_event("user.registered", Event::new("ada".to_owned())).await?;
//! consumer.shutdown(std::time::Duration::from_secs(10)).await;
//! bus.close().await?;
//! # Ok(()) }
//! ```

mod config;
mod given_up;
mod groups;
pub mod headers;
mod publisher;
mod stale_pull;
mod subscriber;
mod topology;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::future::BoxFuture;
use tidings_core::health::{self, Health, HealthCheck};
use tidings_core::{Error, Message, Publisher, Receipt, Result, Subscriber};

pub use config::{Mode, NatsConfig, Retention, Storage, StreamLayout};
pub use publisher::NatsPublisher;
pub use subscriber::NatsSubscriber;

use topology::Topology;

/// The adapter's name, as `messaging.system` and in errors.
pub const NAME: &str = "nats";

/// A connection to NATS: hands out a [`Publisher`] and a [`Subscriber`]
/// sharing it. Clones share the connection.
#[derive(Clone)]
pub struct NatsBus {
    shared: Arc<Shared>,
}

/// How often one publish is sent again after reconnections while it waits.
const MAX_RESENDS: u32 = 5;

/// A stream known to exist.
#[derive(Clone)]
struct KnownStream {
    /// The stream that actually captures the subject (a user's own, maybe).
    name: String,
    /// The subjects it captures (wildcards allowed).
    subjects: Vec<String>,
}

/// What the publisher, the subscriber and the ackers share.
pub(crate) struct Shared {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) config: NatsConfig,
    pub(crate) topology: Topology,
    /// Streams known to exist (created or checked), by the name the
    /// topology gives them.
    streams: Mutex<HashMap<String, KnownStream>>,
    /// Counts the client's reconnections, so a request in flight when the
    /// connection dropped can be sent again at once rather than time out.
    pub(crate) reconnects: tokio::sync::watch::Receiver<u64>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("config", &self.shared.config)
            .finish()
    }
}

pub(crate) fn connection_error(e: impl Into<tidings_core::BoxError>) -> Error {
    Error::Connection {
        broker: NAME,
        source: e.into(),
    }
}

pub(crate) fn broker_error(e: impl Into<tidings_core::BoxError>) -> Error {
    Error::Broker {
        broker: NAME,
        source: e.into(),
    }
}

impl NatsBus {
    /// Connects to the servers of `config`. Fails if none can be reached
    /// within the connect timeout; after that the client reconnects on its
    /// own for as long as it lives. In JetStream mode with a shared stream,
    /// the stream is created or checked here.
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        config.validate()?;
        let (reconnected, reconnects) = tokio::sync::watch::channel(0u64);
        let mut options = async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Connected) {
                    reconnected.send_modify(|n| *n += 1);
                }
                std::future::ready(())
            })
            .connection_timeout(config.connect_timeout)
            .request_timeout(Some(config.request_timeout))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| {
                // 0, 50 ms, 100 ms, ... up to 2 s, with a little jitter.
                let base = (attempt as u64).saturating_mul(50).min(2_000);
                Duration::from_millis(base + fastrand::u64(0..=base / 4 + 1))
            });
        if let Some(name) = &config.connection_name {
            options = options.name(name);
        }
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.user_and_password(user.clone(), password.clone());
        } else if let Some(token) = &config.token {
            options = options.token(token.clone());
        } else if let Some(path) = &config.nkey_seed_file {
            let seed = std::fs::read_to_string(path).map_err(|e| Error::Config {
                key: "nkey_seed_file".into(),
                message: format!("{}: {e}", path.display()),
            })?;
            options = options.nkey(seed.trim().to_owned());
        } else if let Some(path) = &config.creds_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| Error::Config {
                    key: "creds_file".into(),
                    message: format!("{}: {e}", path.display()),
                })?;
        }
        options = tls_options(&config, options)?;
        let client = options
            .connect(config.servers.as_slice())
            .await
            .map_err(|e| {
                if config.tls_required || e.kind() == async_nats::ConnectErrorKind::Tls {
                    connection_error(format!("{e} (TLS: {})", config.tls.describe()))
                } else {
                    connection_error(e)
                }
            })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client.clone());
        let shared = Arc::new(Shared {
            client,
            js,
            topology: Topology::new(&config),
            config,
            streams: Mutex::default(),
            reconnects,
        });
        if shared.config.mode == Mode::JetStream && shared.topology.is_shared() {
            shared.known_stream("_").await?;
        }
        Ok(NatsBus { shared })
    }

    /// The publisher of this connection.
    pub fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher_in(self.shared.config.dialect.clone())
    }

    /// A publisher on this connection writing in `dialect`.
    pub fn publisher_in(&self, dialect: tidings_core::Dialect) -> Arc<dyn Publisher> {
        Arc::new(NatsPublisher::new(self.shared.clone(), dialect))
    }

    /// The subscriber of this connection.
    pub fn subscriber(&self) -> Arc<dyn Subscriber> {
        Arc::new(NatsSubscriber::new(self.shared.clone()))
    }

    /// The configuration in use.
    pub fn config(&self) -> &NatsConfig {
        &self.shared.config
    }

    /// The underlying async-nats client, for what the adapter does not cover.
    pub fn client(&self) -> &async_nats::Client {
        &self.shared.client
    }

    /// Drains the connection: subscriptions stop taking messages, what is
    /// pending (acks, publishes) is flushed, then the connection closes.
    /// Shut consumers down first.
    pub async fn close(&self) -> Result<()> {
        self.shared.client.drain().await.map_err(connection_error)
    }
}

/// The connection's health, as the client tracks it: `connected`, or
/// `reconnecting` while the client is between servers.
impl HealthCheck for NatsBus {
    fn check(&self) -> BoxFuture<'_, Health> {
        use async_nats::connection::State as Conn;
        let health = match self.shared.client.connection_state() {
            Conn::Connected => Health::new(health::State::Connected),
            Conn::Disconnected => Health::because(health::State::Reconnecting, "disconnected"),
            Conn::Pending => Health::because(health::State::Reconnecting, "connecting"),
        };
        Box::pin(async move { health })
    }
}

impl Shared {
    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<String, KnownStream>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes sure a stream captures `topic` (JetStream); returns its name.
    pub(crate) async fn ensure_stream(&self, topic: &str) -> Result<String> {
        let stream = self.known_stream(topic).await?;
        // A stream that exists already may list its subjects its own way
        // (`orders.*`, several prefixes): what matters is that it captures
        // this topic's subject.
        let subject = self.topology.subject(topic)?;
        if !topology::captures(&stream.subjects, &subject) {
            return Err(Error::Config {
                key: "stream".into(),
                message: format!(
                    "stream `{}` exists but does not capture `{subject}` (it captures {:?}); \
                     add the subject to it, or choose a topic or a `dead_letters` template it captures",
                    stream.name, stream.subjects
                ),
            });
        }
        Ok(stream.name)
    }

    /// The stream that holds `topic` by the topology, created if missing.
    async fn known_stream(&self, topic: &str) -> Result<KnownStream> {
        let (name, subjects) = self.topology.stream(topic)?;
        if let Some(known) = self.streams().get(&name) {
            return Ok(known.clone());
        }
        let c = &self.config;
        let config = stream::Config {
            name: name.clone(),
            subjects: subjects.clone(),
            retention: match c.retention {
                Retention::Limits => stream::RetentionPolicy::Limits,
                Retention::Interest => stream::RetentionPolicy::Interest,
                Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
            },
            storage: match c.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            max_age: c.max_age.unwrap_or_default(),
            max_bytes: c.max_bytes.unwrap_or(-1),
            duplicate_window: c.duplicate_window,
            num_replicas: c.replicas,
            description: Some("created by tidings-nats".into()),
            ..Default::default()
        };
        let subject_error = |e: &dyn std::fmt::Display| Error::Subscribe {
            topic: topic.to_owned(),
            source: format!("creating or checking stream `{name}` failed: {e}").into(),
        };
        let created = self.js.get_or_create_stream(config).await;
        match created {
            Ok(stream) => {
                let known = KnownStream {
                    name: name.clone(),
                    subjects: stream.cached_info().config.subjects.clone(),
                };
                self.streams().insert(name, known.clone());
                Ok(known)
            }
            Err(e) => {
                // Another stream may already capture the subject (a user's own
                // stream, say): use it.
                let subject = &subjects[0];
                match self.js.stream_by_subject(subject.clone()).await {
                    Ok(other) if !self.topology.is_shared() => {
                        let known = KnownStream {
                            name: other,
                            subjects,
                        };
                        self.streams().insert(name, known.clone());
                        Ok(known)
                    }
                    _ => Err(match e.kind() {
                        jetstream::context::CreateStreamErrorKind::TimedOut => connection_error(e),
                        _ => subject_error(&e),
                    }),
                }
            }
        }
    }

    /// Forgets that `topic`'s stream exists (it was deleted under us).
    pub(crate) fn forget_stream(&self, topic: &str) {
        if let Ok((name, _)) = self.topology.stream(topic) {
            self.streams().remove(&name);
        }
    }

    /// Publishes one message to JetStream and waits for its PubAck.
    /// Publishes to JetStream and waits for the PubAck, sending the message
    /// again (same id) if the connection is re-established meanwhile.
    pub(crate) async fn js_publish(
        &self,
        dialect: &tidings_core::Dialect,
        topic: &str,
        message: &Message,
        msg_id: &str,
    ) -> Result<Receipt> {
        let subject = self.topology.subject(topic)?;
        self.ensure_stream(topic).await?;
        let mut retried = false;
        let mut resent = 0;
        let mut reconnects = self.reconnects.clone();
        reconnects.mark_unchanged();
        loop {
            let (headers, body) = headers::encode(dialect, message, Some(msg_id));
            let publish = jetstream::message::PublishMessage::build()
                .payload(body)
                .headers(headers);
            let send = async {
                match self.js.send_publish(subject.clone(), publish).await {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                }
            };
            let result = tokio::select! {
                result = send => result,
                // Reconnected while waiting for the PubAck: the request may
                // have died with the old connection. Send it again now; the
                // same `Nats-Msg-Id` makes the server store it once.
                Ok(()) = reconnects.changed(), if resent < MAX_RESENDS => {
                    resent += 1;
                    continue;
                }
            };
            match result {
                Ok(ack) => {
                    return Ok(Receipt::Sequence {
                        stream: ack.stream,
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                }
                Err(e)
                    if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound
                        && !retried =>
                {
                    retried = true;
                    self.forget_stream(topic);
                    self.ensure_stream(topic).await?;
                }
                Err(e) => return Err(publish_error(topic, e)),
            }
        }
    }
}

/// Applies the TLS settings. The files are read here, so a missing one is
/// an [`Error::Config`] naming its parameter before any connection attempt.
fn tls_options(
    config: &NatsConfig,
    options: async_nats::ConnectOptions,
) -> Result<async_nats::ConnectOptions> {
    let options = if config.tls.is_set() {
        options.tls_client_config(config.tls.client_config()?)
    } else {
        options
    };
    Ok(options.require_tls(config.tls_required))
}

pub(crate) fn publish_error(topic: &str, e: jetstream::context::PublishError) -> Error {
    use jetstream::context::PublishErrorKind as K;
    let transient = !matches!(
        e.kind(),
        K::MaxPayloadExceeded | K::WrongLastMessageId | K::WrongLastSequence
    );
    Error::Publish {
        topic: topic.to_owned(),
        source: Box::new(e),
        transient,
    }
}
