//! The connection, its recovery, the confirmed publishing channel and the
//! topology the adapter declares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::{AMQPUriTcpExt, RustlsConnector};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};
use tidings_core::{Error, Receipt, Result};
use tracing::{debug, info};

use crate::config::{AmqpConfig, QueueType};
use crate::headers::short;

pub(crate) const NAME: &str = "amqp";

pub(crate) fn connection_error(e: impl Into<tidings_core::BoxError>) -> Error {
    Error::Connection {
        broker: NAME,
        source: e.into(),
    }
}

pub(crate) fn publish_error(topic: &str, e: impl Into<tidings_core::BoxError>) -> Error {
    Error::Publish {
        topic: topic.to_owned(),
        source: e.into(),
        transient: true,
    }
}

/// Opens a connection. With TLS options, `amqps://` goes through our own TLS
/// setup rather than lapin's, so the CA file, client certificate and server
/// name of [`TlsOptions`](tidings_core::tls::TlsOptions) apply, with the
/// same rustls configuration every adapter uses. Without them, lapin's own
/// (the platform's certificate verifier) serves.
async fn connect(config: &AmqpConfig, url: &str) -> Result<Connection> {
    let options = ConnectionProperties::default();
    let uri: AMQPUri = url
        .parse()
        .map_err(|e: String| tidings_core::params::invalid("url", e))?;
    if !config.tls.is_set() {
        return Connection::connect_uri(uri, options)
            .await
            .map_err(connection_error);
    }
    let tls = RustlsConnector::from(config.tls.client_config()?);
    let server_name = config.tls.server_name_for(&uri.authority.host).to_owned();
    let runtime = lapin::runtime::default_runtime().map_err(connection_error)?;
    // Called again by lapin on each reconnect of its own.
    let open = async move |mut uri: AMQPUri, runtime| {
        uri.scheme = AMQPScheme::AMQP; // the TCP part; TLS is added below
        let tcp = uri.connect_async(&runtime).await?;
        Ok(tcp.into_rustls(&tls, &server_name).await?)
    };
    Connection::connector(uri, runtime, open, options)
        .await
        .map_err(|e| connection_error(format!("{e} (TLS: {})", config.tls.describe())))
}

/// Owns the connection: hands out the live one, or connects again.
pub(crate) struct Connector {
    pub(crate) config: AmqpConfig,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// The node of `config.node_urls()` to try first: the one after the
    /// node last connected to, once that one is lost.
    next_node: std::sync::atomic::AtomicUsize,
    confirm: Mutex<Option<Channel>>,
    confirm_open: tokio::sync::Mutex<()>,
    closed: AtomicBool,
}

impl Connector {
    pub(crate) fn new(config: AmqpConfig) -> Self {
        Connector {
            config,
            conn: tokio::sync::Mutex::new(None),
            next_node: std::sync::atomic::AtomicUsize::new(0),
            confirm: Mutex::new(None),
            confirm_open: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
        }
    }

    /// Whether [`close`](Connector::close) was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The live connection, connecting (once) if there is none.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("connection"));
        }
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref()
            && c.status().connected()
        {
            return Ok(c.clone());
        }
        let conn = self.connect_to_a_node(slot.is_some()).await?;
        let ch = conn.create_channel().await.map_err(connection_error)?;
        declare_exchanges(&ch, &self.config).await?;
        let _ = ch.close(200, "OK".into()).await;
        let conn = Arc::new(conn);
        if slot.is_some() {
            info!("reconnected to RabbitMQ");
        }
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Connects to the cluster's nodes in turn (one node: that one),
    /// starting after the node that was lost when `lost` says one was.
    async fn connect_to_a_node(&self, lost: bool) -> Result<Connection> {
        let nodes = self.config.node_urls();
        let n = nodes.len();
        if lost {
            self.next_node.fetch_add(1, Ordering::Relaxed);
        }
        let first = self.next_node.load(Ordering::Relaxed) % n;
        let after = self.config.connect_timeout;
        let mut last = None;
        for i in 0..n {
            let node = (first + i) % n;
            let attempt = tokio::time::timeout(after, connect(&self.config, &nodes[node])).await;
            match attempt {
                Ok(Ok(conn)) => {
                    self.next_node.store(node, Ordering::Relaxed);
                    if n > 1 {
                        info!(node, "connected to RabbitMQ node {}", node + 1);
                    }
                    return Ok(conn);
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(Error::Timeout {
                        operation: "connecting to RabbitMQ",
                        after,
                    })
                }
            }
            if n > 1 {
                debug!(
                    node,
                    "RabbitMQ node {} unreachable; trying the next",
                    node + 1
                );
            }
        }
        Err(last.unwrap_or(Error::Closed("connection")))
    }

    /// The shared channel in confirm mode used for publishing.
    async fn confirm_channel(&self) -> Result<Channel> {
        if let Some(ch) = self.confirm_slot().as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let _opening = self.confirm_open.lock().await;
        if let Some(ch) = self.confirm_slot().as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let conn = self.connection().await?;
        let ch = conn.create_channel().await.map_err(connection_error)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(connection_error)?;
        debug!(channel = ch.id(), "opened the publishing channel");
        *self.confirm_slot() = Some(ch.clone());
        Ok(ch)
    }

    fn confirm_slot(&self) -> std::sync::MutexGuard<'_, Option<Channel>> {
        self.confirm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one mandatory, persistent publish; the returned future is its confirm.
    pub(crate) async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm> {
        let (ex, key) = route(exchange, routing_key)?;
        let ch = self.confirm_channel().await?;
        publish_on(&ch, ex, key, routing_key, payload, properties).await
    }

    /// Like [`Connector::send`] on a channel the caller keeps between
    /// publishes (`slot`), which saves taking the shared channel (a lock and
    /// a clone of the channel's handles) per message. A closed channel in the
    /// slot is replaced by the live one (reconnecting if needed).
    pub(crate) async fn send_kept(
        &self,
        slot: &mut Option<Channel>,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm> {
        let (ex, key) = route(exchange, routing_key)?;
        let ch = match slot {
            Some(ch) if ch.status().connected() => ch,
            _ => slot.insert(self.confirm_channel().await?),
        };
        publish_on(ch, ex, key, routing_key, payload, properties).await
    }

    /// Waits for a confirm: `Ok` on ack, [`Error::Unroutable`] when the broker
    /// returned the message, a transient [`Error::Publish`] on nack or when the
    /// channel closed before the confirm came.
    pub(crate) async fn confirm(&self, confirm: PublisherConfirm, topic: &str) -> Result<Receipt> {
        let after = self.config.publish_timeout;
        let mut confirm = std::pin::pin!(confirm);
        // In a batch most confirms have already arrived (the broker acks many
        // at once) by the time they are awaited: take those without setting
        // up a timer (a clock read and a runtime lookup per message).
        let outcome = match futures::poll!(confirm.as_mut()) {
            std::task::Poll::Ready(outcome) => Ok(outcome),
            std::task::Poll::Pending => tokio::time::timeout(after, confirm).await,
        };
        match outcome {
            Err(_) => Err(Error::Timeout {
                operation: "waiting for a publisher confirm",
                after,
            }),
            Ok(Err(e)) => Err(publish_error(topic, e)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(Receipt::Accepted),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(Error::Unroutable {
                topic: topic.to_owned(),
            }),
            Ok(Ok(Confirmation::Nack(_))) => Err(publish_error(
                topic,
                "the broker refused the message (nack)",
            )),
            Ok(Ok(Confirmation::NotRequested)) => Err(publish_error(
                topic,
                "the channel is not in confirm mode (publisher confirms were lost)",
            )),
        }
    }

    /// Publishes and waits for the confirm.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<Receipt> {
        let confirm = self
            .send(exchange, routing_key, payload, properties)
            .await?;
        self.confirm(confirm, routing_key).await
    }

    /// Waits for outstanding confirms, then closes the connection.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let ch = self.confirm_slot().take();
        if let Some(ch) = ch {
            let _ = tokio::time::timeout(self.config.publish_timeout, ch.wait_for_confirms()).await;
            let _ = ch.close(200, "OK".into()).await;
        }
        if let Some(conn) = self.conn.lock().await.take() {
            let _ = conn.close(200, "OK".into()).await;
        }
    }
}

/// The exchange and routing key as AMQP short strings.
fn route(exchange: &str, routing_key: &str) -> Result<(ShortString, ShortString)> {
    match (short(exchange), short(routing_key)) {
        (Ok(ex), Ok(key)) => Ok((ex, key)),
        (Err(e), _) | (_, Err(e)) => Err(Error::Publish {
            topic: routing_key.to_owned(),
            source: e.into(),
            transient: false,
        }),
    }
}

async fn publish_on(
    ch: &Channel,
    exchange: ShortString,
    key: ShortString,
    topic: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<PublisherConfirm> {
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    ch.basic_publish(exchange, key, options, payload, properties)
        .await
        .map_err(|e| publish_error(topic, e))
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn declare_exchanges(ch: &Channel, config: &AmqpConfig) -> Result<()> {
    let options = ExchangeDeclareOptions {
        passive: config.passive,
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for name in [&config.exchange, &config.dead_letter_exchange] {
        ch.exchange_declare(
            short(name).map_err(|e| Error::Config {
                key: "exchange".into(),
                message: e.to_string(),
            })?,
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await
        .map_err(|e| Error::Broker {
            broker: NAME,
            source: format!("declaring the exchange `{name}`: {e}").into(),
        })?;
    }
    Ok(())
}

/// The names a group subscription uses on the broker.
#[derive(Debug, Clone)]
pub(crate) struct GroupNames {
    /// The exchange the group queue is bound to (main, or the dead-letter exchange
    /// for dead-letter topics).
    pub exchange: String,
    /// The topic pattern, the binding key.
    pub pattern: String,
    /// `<group>.<pattern>`, or the existing queue the configuration names.
    pub queue: String,
    /// Whether `queue` exists already (declared by another service): it is
    /// checked, never declared with our arguments or bound.
    pub existing: bool,
    /// `<group>.<pattern>.dlq`, bound to the dead-letter exchange.
    pub dlq_queue: String,
    /// The dead-letter topic: `<prefix><group>.<pattern>`.
    pub dlq_topic: String,
}

impl GroupNames {
    pub(crate) fn new(config: &AmqpConfig, pattern: &str, group: &str) -> Self {
        let exchange = if pattern.starts_with(&config.dead_letter_prefix)
            && !config.dead_letter_prefix.is_empty()
        {
            config.dead_letter_exchange.clone()
        } else {
            config.exchange.clone()
        };
        let own = format!("{group}.{pattern}");
        let existing = config
            .existing_queues
            .get(group)
            .cloned()
            .or_else(|| kept_dead_letters(config, pattern, group));
        GroupNames {
            exchange,
            pattern: pattern.to_owned(),
            dlq_queue: format!("{own}.dlq"),
            existing: existing.is_some(),
            queue: existing.unwrap_or(own),
            dlq_topic: dead_letter_topic(config, pattern, group),
        }
    }
}

/// For the dead-letter tooling's group on a dead-letter topic
/// (`dlq.<group>.<pattern>`): the queue that keeps that group's dead letters
/// — its own `<group>.<pattern>.dlq`, or the queue `dead_letters.<group>`
/// names. The inbox reads it rather than a queue of its own, so it sees the
/// letters written before it opened, and a letter it replays or purges
/// leaves that queue.
fn kept_dead_letters(config: &AmqpConfig, pattern: &str, group: &str) -> Option<String> {
    if group != tidings_core::delivery::DEAD_LETTER_GROUP || config.dead_letter_prefix.is_empty() {
        return None;
    }
    let failed = pattern.strip_prefix(&config.dead_letter_prefix)?;
    let named = config
        .dead_letters
        .iter()
        .find_map(|(g, target)| match target {
            crate::config::DeadLetterTarget::Queue(queue)
                if failed.starts_with(&format!("{g}.")) =>
            {
                Some(queue.clone())
            }
            _ => None,
        });
    Some(named.unwrap_or_else(|| format!("{failed}.dlq")))
}

pub(crate) fn dead_letter_topic(config: &AmqpConfig, pattern: &str, group: &str) -> String {
    format!("{}{group}.{pattern}", config.dead_letter_prefix)
}

fn declare_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Broker {
        broker: NAME,
        source: format!("{what}: {e}").into(),
    }
}

fn queue_args(config: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long(config.queue_type.as_str()));
    expires(&mut args, config, 0);
    args
}

fn expires(args: &mut FieldTable, config: &AmqpConfig, extra_ms: i64) {
    if let Some(after) = config.queue_expires {
        let ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX).max(1);
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(ms.saturating_add(extra_ms)),
        );
    }
}

/// Declares (or, passive, checks) a group's queue, its binding and its dead-letter queue.
pub(crate) async fn declare_group(
    ch: &Channel,
    config: &AmqpConfig,
    names: &GroupNames,
) -> Result<()> {
    let too_long = |e: crate::headers::TooLong| Error::Config {
        key: "group".into(),
        message: format!("queue name: {e}"),
    };
    let queue = short(&names.queue).map_err(too_long)?;
    let dlq = short(&names.dlq_queue).map_err(too_long)?;
    let options = QueueDeclareOptions {
        passive: config.passive,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    if names.existing {
        // Another service's queue, with its own arguments: only checked.
        let check = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(queue.clone(), check, FieldTable::default())
            .await
            .map_err(|e| {
                declare_error(&format!("checking the existing queue `{}`", names.queue), e)
            })?;
    }
    let mut args = queue_args(config);
    args.insert(
        "x-dead-letter-exchange".into(),
        long(&config.dead_letter_exchange),
    );
    args.insert("x-dead-letter-routing-key".into(), long(&names.dlq_topic));
    if config.single_active_consumer {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    if !names.existing {
        ch.queue_declare(
            queue.clone(),
            options,
            if config.passive {
                FieldTable::default()
            } else {
                args
            },
        )
        .await
        .map_err(|e| declare_error(&format!("declaring the queue `{}`", names.queue), e))?;
    }
    ch.queue_declare(
        dlq.clone(),
        options,
        if config.passive {
            FieldTable::default()
        } else {
            queue_args(config)
        },
    )
    .await
    .map_err(|e| declare_error(&format!("declaring the queue `{}`", names.dlq_queue), e))?;
    if !config.passive {
        let bind = |q, ex: &str, key: &str| {
            let (ex, key) = (short(ex), short(key));
            async move {
                ch.queue_bind(
                    q,
                    ex.map_err(too_long)?,
                    key.map_err(too_long)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| declare_error("binding a queue", e))
            }
        };
        if !names.existing {
            bind(queue, &names.exchange, &names.pattern).await?;
        }
        bind(dlq, &config.dead_letter_exchange, &names.dlq_topic).await?;
    }
    Ok(())
}

/// Rounds a delay up to two significant digits in milliseconds, so that
/// backoff with jitter does not create a retry queue per distinct delay.
pub(crate) fn delay_bucket(delay: Duration) -> u64 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut scale = 1;
    while ms / scale >= 100 {
        scale *= 10;
    }
    ms.div_ceil(scale).saturating_mul(scale)
}

/// Declares the retry queue `<queue>.retry.<ms>`: messages wait there for
/// their TTL, then the broker dead-letters them through the default exchange
/// straight back to `queue`, so only the group that nacked sees them again.
pub(crate) async fn declare_retry_queue(
    ch: &Channel,
    config: &AmqpConfig,
    queue: &str,
    ms: u64,
    private: bool,
) -> Result<String> {
    let name = format!("{queue}.retry.{ms}");
    let short_name = short(&name).map_err(|e| Error::Config {
        key: "group".into(),
        message: format!("retry queue name: {e}"),
    })?;
    let mut args = FieldTable::default();
    let ttl = i64::try_from(ms).unwrap_or(i64::MAX);
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    args.insert("x-dead-letter-exchange".into(), long(""));
    args.insert("x-dead-letter-routing-key".into(), long(queue));
    let durable = !private;
    if private {
        // Gone a minute after its last use, like the private queue it serves.
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(ttl.saturating_add(60_000)),
        );
    } else if config.queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), long("quorum"));
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        args.insert("x-overflow".into(), long("reject-publish"));
    } else {
        args.insert("x-queue-type".into(), long("classic"));
    }
    if !private {
        expires(&mut args, config, ttl);
    }
    let options = QueueDeclareOptions {
        passive: config.passive,
        durable,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(
        short_name,
        options,
        if config.passive {
            FieldTable::default()
        } else {
            args
        },
    )
    .await
    .map_err(|e| declare_error(&format!("declaring the retry queue `{name}`"), e))?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_two_digits() {
        assert_eq!(delay_bucket(Duration::ZERO), 1);
        assert_eq!(delay_bucket(Duration::from_millis(20)), 20);
        assert_eq!(delay_bucket(Duration::from_millis(800)), 800);
        assert_eq!(delay_bucket(Duration::from_millis(801)), 810);
        assert_eq!(delay_bucket(Duration::from_millis(1234)), 1300);
        assert_eq!(delay_bucket(Duration::from_secs(60)), 60_000);
    }

    #[test]
    fn names_are_deterministic() {
        let c = AmqpConfig::default();
        let n = GroupNames::new(&c, "order.*", "billing");
        assert_eq!(n.queue, "billing.order.*");
        assert_eq!(n.dlq_queue, "billing.order.*.dlq");
        assert_eq!(n.dlq_topic, "dlq.billing.order.*");
        assert_eq!(n.exchange, "tidings");
        let d = GroupNames::new(&c, &n.dlq_topic, "inspect");
        assert_eq!(d.exchange, "tidings.dlx");
    }
}
