//! Configuration of the RabbitMQ adapter.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tidings_core::Result;
use tidings_core::tls::TlsOptions;

/// The type of the queues the adapter declares for groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Quorum queues: replicated, durable, and the broker counts deliveries
    /// (`x-delivery-count`). RabbitMQ's recommended durable queue type.
    #[default]
    Quorum,
    /// Classic queues. The adapter counts attempts in a header itself.
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// Where a group's dead letters go when not to its own dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterTarget {
    /// Nowhere: the message is logged and acked.
    Nowhere,
    /// An existing queue, through the default exchange.
    Queue(String),
}

/// Settings of the RabbitMQ adapter.
///
/// Build it with [`AmqpConfig::from_url`] or start from [`AmqpConfig::default`]
/// (`amqp://guest:guest@127.0.0.1:5672/%2f`) and set fields. The password
/// in the URL never appears in `Debug` output.
#[derive(Clone)]
pub struct AmqpConfig {
    /// The broker's URL, `amqp://user:password@host:port/vhost`, without the
    /// adapter's own query parameters (lapin's, such as `heartbeat`, may stay).
    pub url: String,
    /// The nodes of a cluster, `host:port` each, from a URL that lists
    /// several (`amqp://u:p@node1:5672,node2:5672,node3:5672/vhost`): tried
    /// in turn when connecting and on every reconnect, starting with the one
    /// after the node that was lost. Empty: the URL's own host.
    pub hosts: Vec<String>,
    /// The durable topic exchange every topic is published to (`exchange`).
    pub exchange: String,
    /// The durable topic exchange dead letters are published to (`dead_letter_exchange`).
    /// Defaults to `<exchange>.dlx`.
    pub dead_letter_exchange: String,
    /// Prefix of dead-letter topics (`dead_letter_prefix`): a subscription to a topic that
    /// starts with it reads from the dead-letter exchange instead of the main one.
    pub dead_letter_prefix: String,
    /// The type of the group queues (`queue_type`: `quorum` or `classic`).
    pub queue_type: QueueType,
    /// How messages map to AMQP properties and bodies (`dialect`, with
    /// `envelope.<field>=<path>` for envelope paths); per subscription and
    /// per publisher it can be overridden. Default: CloudEvents binary.
    pub dialect: tidings_core::Dialect,
    /// Queues that exist already, declared by other services, by group
    /// (`queue.<group>=<name>`): the group consumes that queue as it is
    /// (checked, never declared with Tidings' arguments, never bound), so a
    /// Tidings service can share the load of a queue a Node.js service
    /// declared. Its dead letters go to Tidings' own dead-letter queue of
    /// the group unless [`dead_letters`](Self::dead_letters) says otherwise.
    pub existing_queues: HashMap<String, String>,
    /// Where a group's dead letters go instead of its own dead-letter queue
    /// (`dead_letters.<group>=none|<queue>`).
    pub dead_letters: HashMap<String, DeadLetterTarget>,
    /// Only check that exchanges and queues exist, never create them (`passive`).
    /// For brokers where the topology is created by an administrator.
    pub passive: bool,
    /// Declare group queues with `x-single-active-consumer` (`single_active_consumer`):
    /// one member of a group receives at a time, which keeps publish order per queue.
    pub single_active_consumer: bool,
    /// Delete group, dead-letter and retry queues after they went unused this long
    /// (`queue_expires`, RabbitMQ's `x-expires`; none by default). Unused means no
    /// consumer and no redeclaration: their messages are deleted with them.
    pub queue_expires: Option<Duration>,
    /// Most publisher confirms outstanding at once in [`publish_batch`](tidings_core::Publisher::publish_batch)
    /// (`confirm_window`).
    pub confirm_window: usize,
    /// How long a publish waits for its confirm before it fails (`publish_timeout`).
    pub publish_timeout: Duration,
    /// How long connecting may take before it fails (`connect_timeout`).
    pub connect_timeout: Duration,
    /// First wait between reconnect attempts (`reconnect_min`); doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest wait between reconnect attempts (`reconnect_max`).
    pub reconnect_max: Duration,
    /// TLS settings of an `amqps://` connection (`tls_ca_file`,
    /// `tls_cert_file`, `tls_key_file`, `tls_server_name`).
    pub tls: TlsOptions,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            hosts: Vec::new(),
            exchange: "tidings".into(),
            dead_letter_exchange: "tidings.dlx".into(),
            dead_letter_prefix: "dlq.".into(),
            dialect: tidings_core::Dialect::default(),
            existing_queues: HashMap::new(),
            dead_letters: HashMap::new(),
            queue_type: QueueType::Quorum,
            passive: false,
            single_active_consumer: false,
            queue_expires: None,
            confirm_window: 1000,
            publish_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(1),
            tls: TlsOptions::default(),
        }
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact(&self.url))
            .field("exchange", &self.exchange)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("dead_letter_prefix", &self.dead_letter_prefix)
            .field("dialect", &self.dialect)
            .field("existing_queues", &self.existing_queues)
            .field("dead_letters", &self.dead_letters)
            .field("queue_type", &self.queue_type)
            .field("passive", &self.passive)
            .field("single_active_consumer", &self.single_active_consumer)
            .field("queue_expires", &self.queue_expires)
            .field("confirm_window", &self.confirm_window)
            .field("publish_timeout", &self.publish_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("tls", &self.tls)
            .finish()
    }
}

use tidings_core::params::{boolean, duration, invalid, redact_url as redact, split_hosts};

impl AmqpConfig {
    /// Checks settings that go together: TLS options need an `amqps://` URL,
    /// a client certificate its key. [`AmqpBus::connect`](crate::AmqpBus::connect)
    /// calls it, so a configuration built in code is checked too.
    pub fn validate(&self) -> Result<()> {
        if self.tls.is_set() && !self.url.starts_with("amqps://") {
            return Err(invalid(
                "url",
                "TLS options need an `amqps://` URL (TLS is chosen by the scheme)",
            ));
        }
        self.tls.validate()
    }

    /// Parses `amqp://user:password@host:port/vhost?option=value&...`
    /// (or `amqps://`). Options: `exchange`, `dead_letter_exchange`,
    /// `dead_letter_prefix`, `queue_type` (`quorum`|`classic`), `passive`,
    /// `single_active_consumer`, `queue_expires`, `confirm_window`, `publish_timeout`,
    /// `connect_timeout`, `reconnect_min`, `reconnect_max`, and with
    /// `amqps://` the TLS options `tls_ca_file`, `tls_cert_file`,
    /// `tls_key_file`, `tls_server_name`. Other query parameters (lapin's
    /// `heartbeat`, `frame_max`, ...) are passed on.
    ///
    /// ```
    /// use tidings_amqp::{AmqpConfig, QueueType};
    /// let c = AmqpConfig::from_url("amqp://guest:guest@127.0.0.1:5672/%2f?exchange=shop&queue_type=classic")?;
    /// assert_eq!(c.exchange, "shop");
    /// assert_eq!(c.dead_letter_exchange, "shop.dlx");
    /// assert_eq!(c.queue_type, QueueType::Classic);
    /// # Ok::<_, tidings_core::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        let default_port = if url.starts_with("amqps://") {
            5671
        } else {
            5672
        };
        let (url, hosts) = split_hosts(url, default_port)?;
        let mut parsed =
            url::Url::parse(&url).map_err(|e| invalid("url", format!("not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "amqp" | "amqps") {
            return Err(invalid("url", "the scheme must be `amqp` or `amqps`"));
        }
        let mut config = AmqpConfig::default();
        let mut dlx = None;
        let mut rest = Vec::new();
        for (key, value) in parsed.query_pairs() {
            let (key, value) = (key.into_owned(), value.into_owned());
            match key.as_str() {
                "exchange" => config.exchange = value,
                "dead_letter_exchange" => dlx = Some(value),
                "dead_letter_prefix" => config.dead_letter_prefix = value,
                "queue_type" => {
                    config.queue_type = match value.as_str() {
                        "quorum" => QueueType::Quorum,
                        "classic" => QueueType::Classic,
                        _ => {
                            return Err(invalid(
                                "queue_type",
                                format!("`{value}`: use `quorum` or `classic`"),
                            ));
                        }
                    }
                }
                "passive" => config.passive = boolean(&key, &value)?,
                "single_active_consumer" => config.single_active_consumer = boolean(&key, &value)?,
                "confirm_window" => {
                    config.confirm_window = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| invalid(&key, format!("`{value}`: use a number ≥ 1")))?;
                }
                "publish_timeout" => config.publish_timeout = duration(&key, &value)?,
                "queue_expires" => config.queue_expires = Some(duration(&key, &value)?),
                "connect_timeout" => config.connect_timeout = duration(&key, &value)?,
                "reconnect_min" => config.reconnect_min = duration(&key, &value)?,
                "reconnect_max" => config.reconnect_max = duration(&key, &value)?,
                _ if config.tls.set(&key, &value)? => {}
                _ if config.dialect.apply_option(&key, &value)? => {}
                k if k.starts_with("queue.") && k.len() > "queue.".len() => {
                    if value.is_empty() {
                        return Err(invalid(&key, "needs the name of an existing queue"));
                    }
                    config
                        .existing_queues
                        .insert(k["queue.".len()..].to_owned(), value);
                }
                k if k.starts_with("dead_letters.") && k.len() > "dead_letters.".len() => {
                    let target = match value.as_str() {
                        "" => return Err(invalid(&key, "use `none` or the name of a queue")),
                        "none" => DeadLetterTarget::Nowhere,
                        queue => DeadLetterTarget::Queue(queue.to_owned()),
                    };
                    config
                        .dead_letters
                        .insert(k["dead_letters.".len()..].to_owned(), target);
                }
                _ => rest.push((key, value)),
            }
        }
        if config.exchange.is_empty() {
            return Err(invalid(
                "exchange",
                "must not be empty (the default exchange cannot route topics)",
            ));
        }
        config.dead_letter_exchange = dlx.unwrap_or_else(|| format!("{}.dlx", config.exchange));
        if config.dead_letter_exchange == config.exchange {
            return Err(invalid(
                "dead_letter_exchange",
                "must differ from `exchange`",
            ));
        }
        if rest.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(rest);
        }
        config.url = parsed.to_string();
        config.hosts = hosts;
        config.validate()?;
        Ok(config)
    }

    /// The URL for each node to try, in order (the URL itself when it names
    /// one node).
    pub(crate) fn node_urls(&self) -> Vec<String> {
        tidings_core::params::node_urls(&self.url, &self.hosts)
    }

    /// Sets the exchange, and the dead-letter exchange to `<exchange>.dlx`.
    #[must_use]
    pub fn with_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self.dead_letter_exchange = format!("{}.dlx", self.exchange);
        self
    }

    /// Sets the queue type.
    #[must_use]
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Sets the broker URL (without adapter options).
    #[must_use]
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self.hosts.clear();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_core::Error;

    #[test]
    fn several_nodes_are_tried_in_turn() {
        let c = AmqpConfig::from_url("amqp://u:p@n1:5672,n2,n3:5673/v?exchange=e").unwrap();
        assert_eq!(c.hosts, ["n1:5672", "n2:5672", "n3:5673"]);
        assert_eq!(
            c.node_urls(),
            [
                "amqp://u:p@n1:5672/v",
                "amqp://u:p@n2:5672/v",
                "amqp://u:p@n3:5673/v"
            ]
        );
        let one = AmqpConfig::from_url("amqp://u:p@n1:5672/v").unwrap();
        assert!(one.hosts.is_empty());
        assert_eq!(one.node_urls(), ["amqp://u:p@n1:5672/v"]);
        assert!(AmqpConfig::from_url("amqp://u:p@n1,,n2/v").is_err());
        let v6 = AmqpConfig::from_url("amqp://u:p@[::1],[::2]:5673/v").unwrap();
        assert_eq!(v6.hosts, ["[::1]:5672", "[::2]:5673"]);
        assert_eq!(v6.node_urls()[1], "amqp://u:p@[::2]:5673/v");
    }

    #[test]
    fn parses_options_and_keeps_lapin_params() {
        let c = AmqpConfig::from_url(
            "amqp://u:secret@h:5673/v?exchange=e&queue_type=classic&passive=true&confirm_window=5&publish_timeout=2s&heartbeat=10",
        )
        .unwrap();
        assert_eq!(c.exchange, "e");
        assert_eq!(c.dead_letter_exchange, "e.dlx");
        assert_eq!(c.queue_type, QueueType::Classic);
        assert!(c.passive);
        assert_eq!(c.confirm_window, 5);
        assert_eq!(c.publish_timeout, Duration::from_secs(2));
        assert_eq!(c.url, "amqp://u:secret@h:5673/v?heartbeat=10");
        let debug = format!("{c:?}");
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn rejects_bad_values_naming_the_key() {
        for (url, key) in [
            ("amqp://h/?queue_type=stream", "queue_type"),
            ("amqp://h/?passive=maybe", "passive"),
            ("amqp://h/?confirm_window=0", "confirm_window"),
            ("amqp://h/?publish_timeout=soon", "publish_timeout"),
            ("redis://h/", "url"),
        ] {
            match AmqpConfig::from_url(url) {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key, "{url}"),
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
