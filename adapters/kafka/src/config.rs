//! Configuration of the Kafka adapter.

use std::fmt;
use std::time::Duration;

use tidings_core::tls::TlsOptions;
use tidings_core::{Error, Result};

/// How many replicas must have a message before a publish counts as accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// Every in-sync replica (`acks=all`), the default; required by the idempotent producer.
    #[default]
    All,
    /// The partition leader only (`acks=1`).
    Leader,
    /// No acknowledgement (`acks=0`): publish returns once the message was sent.
    None,
}

impl Acks {
    fn as_str(self) -> &'static str {
        match self {
            Acks::All => "all",
            Acks::Leader => "1",
            Acks::None => "0",
        }
    }
}

/// How a subscription orders the records of one partition.
///
/// Kafka keeps order per partition. Records of different partitions are
/// always handed out concurrently; this chooses what may run concurrently
/// inside one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PartitionOrder {
    /// At most one unsettled record per partition (`ordering=partition`,
    /// the default): a partition's next record is handed out only once the
    /// previous one was settled (acked, nacked or dead-lettered) or dropped.
    #[default]
    Partition,
    /// At most one unsettled record per key and partition (`ordering=key`):
    /// records with different keys run concurrently, each key in order.
    /// Records without a key are not held back.
    Key,
    /// No hold-back (`ordering=none`): records are handed out as fetched, up
    /// to the prefetch, and may be handled in any order.
    None,
}

impl PartitionOrder {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "partition" => Some(PartitionOrder::Partition),
            "key" => Some(PartitionOrder::Key),
            "none" => Some(PartitionOrder::None),
            _ => None,
        }
    }
}

/// Settings of the Kafka adapter.
///
/// Build it with [`KafkaConfig::new`] (brokers, defaults for the rest) or
/// [`KafkaConfig::from_url`]:
///
/// ```
/// use tidings_kafka::KafkaConfig;
/// let config = KafkaConfig::from_url("kafka://127.0.0.1:9092?linger_ms=10&auto_create_topics=true")?;
/// assert!(config.auto_create_topics);
/// # Ok::<_, tidings_core::Error>(())
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma separated (`host:port,host:port`).
    pub brokers: String,
    /// How messages map to record headers and values (`dialect`, with
    /// `envelope.<field>=<path>`); per subscription and per publisher it can
    /// be overridden. Default: CloudEvents binary.
    pub dialect: tidings_core::Dialect,
    /// The `client.id` sent to the brokers.
    pub client_id: String,
    /// Producer acknowledgements (default [`Acks::All`]).
    pub acks: Acks,
    /// Idempotent producer (default on; needs `acks=all`).
    pub idempotent: bool,
    /// How long the producer waits to fill a batch (`linger.ms`, default 5 ms).
    pub linger: Duration,
    /// Most bytes in one producer batch (`batch.size`, default 1 MB).
    pub batch_size: usize,
    /// Largest message the producer accepts (`message.max.bytes`, default 4 MiB);
    /// the broker's own limit (`message.max.bytes`, 1 MB by default on Kafka) applies too.
    pub max_message_bytes: usize,
    /// How long a publish may take, retries and broker outages included
    /// (`message.timeout.ms`, default 30 s). After it the publish fails.
    pub publish_timeout: Duration,
    /// Whether topics (including retry and dead-letter topics) may be created
    /// on first use (default off: create them with [`KafkaAdmin`](crate::KafkaAdmin)).
    /// A subscription asks for the topic's metadata, which creates it where
    /// the broker creates topics on request; where it does not, the
    /// subscription creates it through the Admin API with the broker's
    /// default partitions and replication. A publish relies on the broker
    /// alone: publishing first to a topic nobody subscribed to needs a
    /// broker that creates topics on request, or the topic created beforehand.
    pub auto_create_topics: bool,
    /// Consumer group session timeout (`session.timeout.ms`, default 10 s).
    pub session_timeout: Duration,
    /// Consumer group heartbeat interval (`heartbeat.interval.ms`, default 1 s).
    pub heartbeat_interval: Duration,
    /// How long a revoke waits for in-flight handlers of the revoked
    /// partitions before it commits and releases them (default 10 s).
    pub revoke_timeout: Duration,
    /// How long a closed subscription waits for deliveries still held
    /// before it commits and leaves the group (default 30 s).
    pub close_timeout: Duration,
    /// How often settled offsets are committed (default 100 ms).
    pub commit_interval: Duration,
    /// What may run concurrently inside one partition (default
    /// [`PartitionOrder::Partition`]: one record at a time per partition).
    pub ordering: PartitionOrder,
    /// Time limit of metadata, offset and admin calls (default 10 s).
    pub operation_timeout: Duration,
    /// Partitions of topics created by the adapter (auto-creation, admin helper); default 3.
    pub partitions: i32,
    /// Replication factor of topics created by the adapter; default 1.
    pub replication: i32,
    /// Further librdkafka properties (SASL, TLS, ...), applied last.
    pub properties: Vec<(String, String)>,
    /// TLS files (`tls_ca_file`, `tls_cert_file`, `tls_key_file`), handed to
    /// librdkafka as `ssl.ca.location`, `ssl.certificate.location` and
    /// `ssl.key.location`; any of them turns on `security.protocol=ssl`
    /// (unless `rdkafka.security.protocol` says otherwise, e.g. `sasl_ssl`).
    /// `tls_server_name` is not supported: librdkafka checks each broker's
    /// certificate against the host name that broker advertises.
    pub tls: TlsOptions,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig::new("127.0.0.1:9092")
    }
}

impl KafkaConfig {
    /// Defaults for the given bootstrap brokers.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            dialect: tidings_core::Dialect::default(),
            client_id: "tidings".into(),
            acks: Acks::All,
            idempotent: true,
            linger: Duration::from_millis(5),
            batch_size: 1_000_000,
            max_message_bytes: 4 * 1024 * 1024,
            publish_timeout: Duration::from_secs(30),
            auto_create_topics: false,
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            revoke_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(30),
            commit_interval: Duration::from_millis(100),
            ordering: PartitionOrder::Partition,
            operation_timeout: Duration::from_secs(10),
            partitions: 3,
            replication: 1,
            properties: Vec::new(),
            tls: TlsOptions::default(),
        }
    }

    /// Parses `kafka://host:port[,host:port...][?option=value&...]`.
    ///
    /// Options: `client_id`, `acks` (`all`, `1`, `0`), `idempotent` (bool),
    /// `linger_ms`, `batch_size`, `max_message_bytes`, `publish_timeout_ms`, `auto_create_topics` (bool),
    /// `session_timeout_ms`, `heartbeat_interval_ms`, `revoke_timeout_ms`,
    /// `close_timeout_ms`, `commit_interval_ms`, `ordering` (`partition`,
    /// `key`, `none`), `operation_timeout_ms`, `partitions`, `replication`,
    /// the TLS files `tls_ca_file`, `tls_cert_file`, `tls_key_file` (PEM; any
    /// of them turns TLS on); any option starting with `rdkafka.` is
    /// passed to librdkafka without the prefix (`rdkafka.security.protocol=ssl`
    /// for TLS with the system's CAs).
    pub fn from_url(url: &str) -> Result<Self> {
        let rest = url.strip_prefix("kafka://").ok_or_else(|| Error::Config {
            key: "url".into(),
            message: "must start with kafka://".into(),
        })?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        if hosts.is_empty() {
            return Err(Error::Config {
                key: "url".into(),
                message: "names no broker (kafka://host:port)".into(),
            });
        }
        let mut config = KafkaConfig::new(hosts);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            config.set(key, value)?;
        }
        config.validate()?;
        Ok(config)
    }

    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = |message: &str| Error::Config {
            key: key.to_owned(),
            message: format!("`{value}`: {message}"),
        };
        let ms = || {
            value
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| bad("expected milliseconds (a whole number)"))
        };
        let boolean = || tidings_core::params::boolean(key, value);
        let int = || value.parse::<i32>().map_err(|_| bad("expected a number"));
        match key {
            "client_id" => self.client_id = value.to_owned(),
            "acks" => {
                self.acks = match value {
                    "all" | "-1" => Acks::All,
                    "1" | "leader" => Acks::Leader,
                    "0" | "none" => Acks::None,
                    _ => return Err(bad("allowed: all, 1, 0")),
                }
            }
            "idempotent" => self.idempotent = boolean()?,
            "linger_ms" => self.linger = ms()?,
            "batch_size" => {
                self.batch_size = value
                    .parse()
                    .map_err(|_| bad("expected a number of bytes"))?
            }
            "max_message_bytes" => {
                self.max_message_bytes = value
                    .parse()
                    .map_err(|_| bad("expected a number of bytes"))?
            }
            "publish_timeout_ms" => self.publish_timeout = ms()?,
            "auto_create_topics" => self.auto_create_topics = boolean()?,
            "session_timeout_ms" => self.session_timeout = ms()?,
            "heartbeat_interval_ms" => self.heartbeat_interval = ms()?,
            "revoke_timeout_ms" => self.revoke_timeout = ms()?,
            "close_timeout_ms" => self.close_timeout = ms()?,
            "commit_interval_ms" => self.commit_interval = ms()?,
            "ordering" => {
                self.ordering = PartitionOrder::parse(value)
                    .ok_or_else(|| bad("allowed: partition, key, none"))?
            }
            "operation_timeout_ms" => self.operation_timeout = ms()?,
            "partitions" => self.partitions = int()?,
            "replication" => self.replication = int()?,
            "tls_server_name" => {
                return Err(Error::Config {
                    key: key.to_owned(),
                    message: "not supported by librdkafka, which checks each broker's \
                              certificate against the host name the broker advertises"
                        .into(),
                });
            }
            _ if self.tls.set(key, value)? => {}
            _ if self.dialect.apply_option(key, value)? => {}
            other => match other.strip_prefix("rdkafka.") {
                Some(prop) if !prop.is_empty() => {
                    self.properties.push((prop.to_owned(), value.to_owned()))
                }
                _ => {
                    return Err(Error::Config {
                        key: key.to_owned(),
                        message: "unknown option; allowed: client_id, acks, idempotent, linger_ms, \
                                  batch_size, max_message_bytes, publish_timeout_ms, auto_create_topics, \
                                  session_timeout_ms, heartbeat_interval_ms, revoke_timeout_ms, \
                                  close_timeout_ms, commit_interval_ms, ordering, operation_timeout_ms, \
                                  partitions, replication, dialect, envelope.<field>, tls_ca_file, \
                                  tls_cert_file, tls_key_file, rdkafka.<property>"
                            .into(),
                    });
                }
            },
        }
        Ok(())
    }

    /// Checks combinations of settings.
    pub fn validate(&self) -> Result<()> {
        if self.tls.server_name.is_some() {
            return Err(Error::Config {
                key: "tls_server_name".into(),
                message: "not supported by librdkafka".into(),
            });
        }
        self.tls.validate()?;
        if self.idempotent && self.acks != Acks::All {
            return Err(Error::Config {
                key: "idempotent".into(),
                message:
                    "the idempotent producer needs acks=all; set idempotent=false for other acks"
                        .into(),
            });
        }
        if self.partitions < 1 {
            return Err(Error::Config {
                key: "partitions".into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    pub(crate) fn client(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            .set(
                "allow.auto.create.topics",
                if self.auto_create_topics {
                    "true"
                } else {
                    "false"
                },
            )
            .set("log_level", "3");
        if self.tls.is_set() {
            c.set("security.protocol", "ssl");
            for (property, file) in [
                ("ssl.ca.location", &self.tls.ca_file),
                ("ssl.certificate.location", &self.tls.cert_file),
                ("ssl.key.location", &self.tls.key_file),
            ] {
                if let Some(file) = file {
                    c.set(property, file.display().to_string());
                }
            }
        }
        c
    }

    pub(crate) fn apply_properties(&self, c: &mut rdkafka::ClientConfig) {
        for (k, v) in &self.properties {
            c.set(k, v);
        }
    }

    pub(crate) fn producer(&self) -> rdkafka::ClientConfig {
        let mut c = self.client();
        c.set("acks", self.acks.as_str())
            .set(
                "enable.idempotence",
                if self.idempotent { "true" } else { "false" },
            )
            .set("linger.ms", self.linger.as_millis().to_string())
            .set("batch.size", self.batch_size.to_string())
            .set("message.max.bytes", self.max_message_bytes.to_string())
            .set(
                "message.timeout.ms",
                self.publish_timeout.as_millis().max(1).to_string(),
            );
        self.apply_properties(&mut c);
        c
    }

    pub(crate) fn consumer(&self, group: Option<&str>) -> rdkafka::ClientConfig {
        let mut c = self.client();
        c.set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "latest")
            .set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                self.heartbeat_interval.as_millis().to_string(),
            )
            .set("partition.assignment.strategy", "range,roundrobin")
            .set("topic.metadata.refresh.interval.ms", "10000")
            .set("fetch.wait.max.ms", "100");
        if let Some(group) = group {
            c.set("group.id", group);
        }
        self.apply_properties(&mut c);
        c
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let secret = ["password", "secret", "token", "key"]
                    .iter()
                    .any(|s| k.contains(s));
                (k.as_str(), if secret { "<redacted>" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("dialect", &self.dialect)
            .field("client_id", &self.client_id)
            .field("acks", &self.acks)
            .field("idempotent", &self.idempotent)
            .field("linger", &self.linger)
            .field("batch_size", &self.batch_size)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("publish_timeout", &self.publish_timeout)
            .field("auto_create_topics", &self.auto_create_topics)
            .field("session_timeout", &self.session_timeout)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("revoke_timeout", &self.revoke_timeout)
            .field("close_timeout", &self.close_timeout)
            .field("commit_interval", &self.commit_interval)
            .field("ordering", &self.ordering)
            .field("operation_timeout", &self.operation_timeout)
            .field("partitions", &self.partitions)
            .field("tls", &self.tls)
            .field("replication", &self.replication)
            .field("properties", &properties)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_parse() {
        let c = KafkaConfig::from_url(
            "kafka://a:1,b:2?linger_ms=7&acks=all&auto_create_topics=true&rdkafka.sasl.password=x",
        )
        .expect("parse");
        assert_eq!(c.brokers, "a:1,b:2");
        assert_eq!(c.linger, Duration::from_millis(7));
        assert!(c.auto_create_topics);
        assert!(!format!("{c:?}").contains("sasl.password\", \"x"));
    }

    #[test]
    fn bad_values_name_the_key() {
        match KafkaConfig::from_url("kafka://a:1?acks=2") {
            Err(Error::Config { key, .. }) => assert_eq!(key, "acks"),
            other => panic!("{other:?}"),
        }
        assert!(KafkaConfig::from_url("kafka://a:1?acks=1").is_err());
        assert!(KafkaConfig::from_url("kafka://a:1?acks=1&idempotent=false").is_ok());
        assert!(KafkaConfig::from_url("kafka://a:1?nope=1").is_err());
        assert!(KafkaConfig::from_url("redis://a").is_err());
        match KafkaConfig::from_url("kafka://a:1?ordering=total") {
            Err(Error::Config { key, .. }) => assert_eq!(key, "ordering"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ordering_defaults_to_partition() {
        let c = KafkaConfig::from_url("kafka://a:1").expect("parse");
        assert_eq!(c.ordering, PartitionOrder::Partition);
        for (v, want) in [
            ("partition", PartitionOrder::Partition),
            ("key", PartitionOrder::Key),
            ("none", PartitionOrder::None),
        ] {
            let c = KafkaConfig::from_url(&format!("kafka://a:1?ordering={v}")).expect("parse");
            assert_eq!(c.ordering, want);
        }
    }
}
