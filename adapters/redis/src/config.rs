//! Configuration of the Redis adapter.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tidings_core::Result;
use tidings_core::tls::TlsOptions;

/// How topics map to Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RedisMode {
    /// Redis Streams with consumer groups: at-least-once (the default).
    #[default]
    Streams,
    /// Redis Pub/Sub channels: at-most-once, nothing is kept.
    PubSub,
}

/// Settings of the Redis adapter.
///
/// Build it with [`RedisConfig::from_url`] (query parameters for the
/// options) or from [`RedisConfig::default`] and field updates.
/// The URL's password never appears in `Debug` output.
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The Redis URL without the Tidings query parameters,
    /// e.g. `redis://user:secret@127.0.0.1:6379/0`.
    pub url: String,
    /// The seed nodes of a Redis Cluster, `host:port` each, from a URL that
    /// lists several (`redis://:pw@n1:7000,n2:7001,n3:7002`). Empty: the
    /// URL's own host.
    pub nodes: Vec<String>,
    /// Whether the server is a Redis Cluster: commands are routed by hash
    /// slot and follow the cluster as it fails over. On with a node list,
    /// or with one seed node and `cluster=true`. Database 0 only.
    pub cluster: bool,
    /// The name of the master Redis Sentinel watches, when the URL's nodes
    /// are sentinels (`redis://:pw@s1:26379,s2:26379/0?sentinel=orders`):
    /// connections go to the master the sentinels name, and follow it to
    /// the replica they promote. URL: `sentinel=<master name>`. With
    /// `rediss://`, both the sentinels and the master are reached over TLS.
    pub sentinel: Option<String>,
    /// How many replicas must confirm each write (`XADD` of a message or a
    /// dead letter) before it counts as confirmed (`WAIT n`): with `1`, a
    /// master that dies right after confirming loses nothing its promoted
    /// replica does not have. `0` (the default) confirms on the master's
    /// reply. URL: `wait_replicas=1`.
    pub wait_replicas: u32,
    /// How long a write waits for [`wait_replicas`](Self::wait_replicas);
    /// fewer confirmations in time is a transient publish error (the
    /// message may still arrive: retrying may deliver it twice). Default 1 s.
    /// URL: `wait_timeout=1s`.
    pub wait_timeout: Duration,
    /// Streams (default) or Pub/Sub. URL: `mode=streams|pubsub`.
    pub mode: RedisMode,
    /// How long an entry may stay idle pending (delivered, unsettled) with a
    /// consumer before another consumer of the group reclaims it
    /// (`XAUTOCLAIM` min-idle-time). A live subscription keeps the entries
    /// its handlers hold from going idle (a heartbeat every third of it), so
    /// this bounds how long a dead member's entries wait, not how long a
    /// handler may run. Default 4 s. URL: `visibility_timeout=4s`.
    pub visibility_timeout: Duration,
    /// How often a subscription looks for entries to reclaim. Default: a
    /// quarter of the visibility timeout, between 50 ms and 5 s. URL: `reclaim_interval=1s`.
    pub reclaim_interval: Option<Duration>,
    /// How long one blocking read waits for new entries before it checks for
    /// reclaims and shutdown. Default 1 s. URL: `block=1s`.
    pub block: Duration,
    /// Approximate `MAXLEN ~` for every stream published to; `None` keeps
    /// everything (the default). URL: `maxlen=100000`.
    pub max_len: Option<usize>,
    /// Per-topic `MAXLEN ~`, overriding [`max_len`](Self::max_len).
    /// URL: `maxlen.<topic>=1000`.
    pub topic_max_len: HashMap<String, usize>,
    /// Prefix of the consumer names in consumer groups; each subscription adds
    /// a unique suffix. Default `tidings-<pid>-<random>`. URL: `consumer=orders-7`.
    pub consumer_name: Option<String>,
    /// How long a command may wait for its reply. Default 10 s. URL: `response_timeout=10s`.
    pub response_timeout: Duration,
    /// How long connecting may take. Default 5 s. URL: `connect_timeout=5s`.
    pub connect_timeout: Duration,
    /// Pub/Sub mode only: how long the claim key that makes one member of a
    /// group take a message is kept. Default 60 s. URL: `claim_ttl=60s`.
    pub claim_ttl: Duration,
    /// Longest pause between reconnection attempts. Default 2 s. URL: `max_backoff=2s`.
    pub max_backoff: Duration,
    /// Whether [`ack`](tidings_core::Delivery::ack) waits for Redis to confirm
    /// the `XACK`. Default `false`: acks are queued and sent in batches (one
    /// `XACK` per round trip for all acks queued meanwhile), and a lost ack
    /// means the entry is delivered again after the visibility timeout
    /// (at-least-once either way). URL: `confirm_acks=true`.
    pub confirm_acks: bool,
    /// How messages map to entries and bodies: the dialect (`dialect`,
    /// `envelope.<field>`), the body's field (`payload_field`) and renamed
    /// fields (`field.<attribute>=<name>`); see [`Layout`](crate::headers::Layout).
    pub layout: crate::headers::Layout,
    /// Whether a subscription keeps the entries its handlers hold from
    /// going idle (one `XCLAIM ... JUSTID` of all of them every third of the
    /// visibility timeout). Default `true`; with `false` the visibility
    /// timeout must outlast the slowest handler. URL: `heartbeat=false`.
    pub heartbeat: bool,
    /// TLS files of a `rediss://` connection (`tls_ca_file`, `tls_cert_file`,
    /// `tls_key_file`). `server_name` is not supported: the redis client
    /// checks the certificate against the URL's host.
    pub tls: TlsOptions,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            nodes: Vec::new(),
            cluster: false,
            sentinel: None,
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            mode: RedisMode::Streams,
            visibility_timeout: Duration::from_secs(4),
            reclaim_interval: None,
            block: Duration::from_secs(1),
            max_len: None,
            topic_max_len: HashMap::new(),
            consumer_name: None,
            response_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            claim_ttl: Duration::from_secs(60),
            max_backoff: Duration::from_secs(2),
            confirm_acks: false,
            heartbeat: true,
            layout: crate::headers::Layout::default(),
            tls: TlsOptions::default(),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("nodes", &self.nodes)
            .field("cluster", &self.cluster)
            .field("sentinel", &self.sentinel)
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .field("mode", &self.mode)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("reclaim_interval", &self.reclaim_interval)
            .field("block", &self.block)
            .field("max_len", &self.max_len)
            .field("topic_max_len", &self.topic_max_len)
            .field("consumer_name", &self.consumer_name)
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("claim_ttl", &self.claim_ttl)
            .field("max_backoff", &self.max_backoff)
            .field("confirm_acks", &self.confirm_acks)
            .field("heartbeat", &self.heartbeat)
            .field("layout", &self.layout)
            .field("tls", &self.tls)
            .finish()
    }
}

use tidings_core::params::{
    boolean, duration, invalid as config_error, redact_url as redact, split_hosts,
};

/// The port a sentinel listens on when the URL names none.
pub(crate) const SENTINEL_PORT: u16 = 26379;

fn positive(key: &str, value: &str) -> Result<usize> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(config_error(
            key,
            format!("`{value}` is not a positive whole number"),
        )),
    }
}

impl RedisConfig {
    /// Parses `redis://[user:password@]host[:port][/db][?option=value&...]`,
    /// or a cluster's seed nodes: `redis://[user:password@]h1:7000,h2:7001[?...]`.
    ///
    /// Options: `cluster` (`true` for a cluster reached through one seed
    /// node; implied by a node list), `sentinel` (the master's name: the
    /// nodes are sentinels, 26379 where a node names no port),
    /// `wait_replicas` (a number), `wait_timeout`, `heartbeat` (`true` or
    /// `false`), `mode` (`streams` or `pubsub`), `visibility_timeout`,
    /// `reclaim_interval`, `block`, `response_timeout`, `connect_timeout`,
    /// `claim_ttl`, `max_backoff` (durations such as `500ms` or `30s`),
    /// `maxlen` and `maxlen.<topic>` (positive numbers), `consumer` (a name),
    /// `confirm_acks` (`true` or `false`); with `rediss://`, the TLS files
    /// `tls_ca_file`, `tls_cert_file` and `tls_key_file` (PEM).
    /// An unknown option or a bad value is an [`Error::Config`](tidings_core::Error::Config) naming the key.
    ///
    /// ```
    /// use tidings_redis::{RedisConfig, RedisMode};
    /// let c = RedisConfig::from_url("redis://127.0.0.1:6379/0?mode=pubsub&claim_ttl=10s")?;
    /// assert_eq!(c.mode, RedisMode::PubSub);
    /// assert_eq!(c.url, "redis://127.0.0.1:6379/0");
    /// # Ok::<(), tidings_core::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        let url_given = url;
        let (url, nodes) = split_hosts(url, 6379)?;
        let mut parsed =
            url::Url::parse(&url).map_err(|e| config_error("url", format!("not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "redis" | "rediss" | "redis+unix" | "unix") {
            return Err(config_error(
                "url",
                format!(
                    "scheme `{}` is not supported; use `redis://` or `rediss://` (TLS)",
                    parsed.scheme()
                ),
            ));
        }
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        parsed.set_query(None);
        let mut config = RedisConfig {
            url: parsed.to_string(),
            cluster: false,
            nodes,
            ..RedisConfig::default()
        };
        let mut cluster_said_false = false;
        for (key, value) in pairs {
            match key.as_str() {
                "mode" => {
                    config.mode = match value.as_str() {
                        "streams" | "stream" => RedisMode::Streams,
                        "pubsub" => RedisMode::PubSub,
                        _ => {
                            return Err(config_error(
                                "mode",
                                format!("`{value}` is not a mode; use `streams` or `pubsub`"),
                            ));
                        }
                    }
                }
                "visibility_timeout" => {
                    config.visibility_timeout = duration(&key, &value)?;
                }
                "reclaim_interval" => config.reclaim_interval = Some(duration(&key, &value)?),
                "block" => config.block = duration(&key, &value)?,
                "response_timeout" => config.response_timeout = duration(&key, &value)?,
                "connect_timeout" => config.connect_timeout = duration(&key, &value)?,
                "claim_ttl" => config.claim_ttl = duration(&key, &value)?,
                "max_backoff" => config.max_backoff = duration(&key, &value)?,
                "maxlen" => config.max_len = Some(positive(&key, &value)?),
                "confirm_acks" => config.confirm_acks = boolean(&key, &value)?,
                "cluster" => {
                    config.cluster = boolean(&key, &value)?;
                    cluster_said_false = !config.cluster;
                }
                "sentinel" if value.is_empty() => {
                    return Err(config_error("sentinel", "must name the master"));
                }
                "sentinel" => config.sentinel = Some(value),
                "wait_replicas" => {
                    config.wait_replicas = tidings_core::params::number(&key, &value)?
                }
                "wait_timeout" => config.wait_timeout = duration(&key, &value)?,
                "heartbeat" => config.heartbeat = boolean(&key, &value)?,
                "consumer" if value.is_empty() => {
                    return Err(config_error("consumer", "must not be empty"));
                }
                "consumer" => config.consumer_name = Some(value),
                "tls_server_name" => {
                    return Err(config_error(
                        &key,
                        "not supported by the Redis client, which checks the server's \
                         certificate against the URL's host: use a host name the certificate \
                         carries in the URL (an /etc/hosts entry if need be)",
                    ));
                }
                _ if config.tls.set(&key, &value)? => {}
                _ if config.layout.dialect.apply_option(&key, &value)? => {}
                _ if config.layout.apply_option(&key, &value)? => {}
                "payload_field" if value.is_empty() => {
                    return Err(config_error("payload_field", "must not be empty"));
                }
                "payload_field" => config.layout.payload_field = value,
                k if k.starts_with("maxlen.") && k.len() > "maxlen.".len() => {
                    let n = positive(&key, &value)?;
                    config
                        .topic_max_len
                        .insert(k["maxlen.".len()..].to_owned(), n);
                }
                _ => {
                    return Err(config_error(
                        &key,
                        "unknown option; known: cluster, sentinel, wait_replicas, wait_timeout, mode, visibility_timeout, reclaim_interval, block, \
                         response_timeout, connect_timeout, claim_ttl, max_backoff, maxlen, \
                         maxlen.<topic>, consumer, confirm_acks, heartbeat, dialect, envelope.<field>, \
                         payload_field, field.<attribute>, tls_ca_file, tls_cert_file, \
                         tls_key_file",
                    ));
                }
            }
        }
        if config.sentinel.is_some() && !config.nodes.is_empty() {
            // The nodes are sentinels: those without a port get Sentinel's.
            config.nodes = split_hosts(url_given, SENTINEL_PORT)?.1;
        } else if !config.nodes.is_empty() {
            // A node list names a cluster's seeds unless they are sentinels.
            config.cluster = !cluster_said_false;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the values against each other.
    pub fn validate(&self) -> Result<()> {
        if !self.nodes.is_empty() && !self.cluster && self.sentinel.is_none() {
            return Err(config_error(
                "cluster",
                "a node list is a Redis Cluster's seed nodes (or, with `sentinel=<master>`, \
                 the sentinels); `cluster=false` cannot go with it alone",
            ));
        }
        if self.cluster && self.sentinel.is_some() {
            return Err(config_error(
                "sentinel",
                "a Redis Cluster fails over by itself; `sentinel` and `cluster` do not go together",
            ));
        }
        if self.cluster
            && url::Url::parse(&self.url)
                .is_ok_and(|u| !matches!(u.path().trim_start_matches('/'), "" | "0"))
        {
            return Err(config_error(
                "url",
                "a Redis Cluster has database 0 only; drop the `/<db>` of the URL",
            ));
        }
        if self.tls.is_set() && !self.url.starts_with("rediss://") {
            return Err(config_error(
                "url",
                "TLS options need a `rediss://` URL (TLS is chosen by the scheme)",
            ));
        }
        if self.tls.is_set() && self.url.contains("#insecure") {
            return Err(config_error(
                "url",
                "`#insecure` turns certificate checks off; it cannot go with TLS files",
            ));
        }
        if self.tls.server_name.is_some() {
            return Err(config_error(
                "tls_server_name",
                "not supported by the Redis client; use a host name the certificate carries",
            ));
        }
        self.tls.validate()?;
        if self.wait_replicas > 0 && self.wait_timeout * 2 > self.response_timeout {
            // A `WAIT` outliving the reply timeout fails a write that may
            // have been made, and the cluster client would send it again.
            return Err(config_error(
                "wait_timeout",
                format!(
                    "must be at most half of response_timeout ({:?})",
                    self.response_timeout
                ),
            ));
        }
        if self.visibility_timeout < Duration::from_millis(10) {
            return Err(config_error("visibility_timeout", "must be at least 10ms"));
        }
        if self.block < Duration::from_millis(1) {
            return Err(config_error("block", "must be at least 1ms"));
        }
        if self.response_timeout < Duration::from_millis(10) {
            return Err(config_error("response_timeout", "must be at least 10ms"));
        }
        Ok(())
    }

    /// The approximate MAXLEN for `topic`, if any.
    pub fn max_len_for(&self, topic: &str) -> Option<usize> {
        self.topic_max_len.get(topic).copied().or(self.max_len)
    }

    /// The effective reclaim interval.
    pub fn effective_reclaim_interval(&self) -> Duration {
        self.reclaim_interval.unwrap_or_else(|| {
            (self.visibility_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_core::Error;

    #[test]
    fn url_options_parse() {
        let c = RedisConfig::from_url(
            "redis://u:secret@localhost:6380/2?visibility_timeout=5s&block=200ms&maxlen=1000&maxlen.orders=10&consumer=c1",
        )
        .expect("valid");
        assert_eq!(c.mode, RedisMode::Streams);
        assert_eq!(c.visibility_timeout, Duration::from_secs(5));
        assert_eq!(c.block, Duration::from_millis(200));
        assert_eq!(c.max_len_for("orders"), Some(10));
        assert_eq!(c.max_len_for("other"), Some(1000));
        assert_eq!(c.consumer_name.as_deref(), Some("c1"));
        assert_eq!(c.url, "redis://u:secret@localhost:6380/2");
        let debug = format!("{c:?}");
        assert!(!debug.contains("secret"), "{debug}");
        assert!(debug.contains("***"), "{debug}");
    }

    #[test]
    fn a_node_list_is_a_cluster() {
        let c = RedisConfig::from_url("redis://:pw@n1:7000,n2,[::1]:7002?block=50ms").unwrap();
        assert!(c.cluster);
        assert_eq!(c.nodes, ["n1:7000", "n2:6379", "[::1]:7002"]);
        assert_eq!(c.url, "redis://:pw@n1:7000");
        assert!(!format!("{c:?}").contains("pw"));
        let one = RedisConfig::from_url("redis://n1:7000?cluster=true").unwrap();
        assert!(one.cluster && one.nodes.is_empty());
        assert!(!RedisConfig::from_url("redis://n1:7000").unwrap().cluster);
        let sentinels = RedisConfig::from_url(
            "redis://:pw@s1:26379,s2:26379/2?sentinel=orders&wait_replicas=1",
        )
        .unwrap();
        assert!(!sentinels.cluster);
        assert_eq!(sentinels.sentinel.as_deref(), Some("orders"));
        assert_eq!(sentinels.nodes, ["s1:26379", "s2:26379"]);
        let default_ports = RedisConfig::from_url("redis://s1,s2:26380?sentinel=m").unwrap();
        assert_eq!(default_ports.nodes, ["s1:26379", "s2:26380"]);
        assert!(
            RedisConfig::from_url("redis://s1?sentinel=m&wait_replicas=1&wait_timeout=6s").is_err()
        );
        assert_eq!(sentinels.wait_replicas, 1);
        for bad in [
            "redis://n1:7000,n2:7001/2",
            "redis://n1:7000/3?cluster=true",
            "redis://n1:7000,n2:7001?cluster=false",
            "redis://n1,,n2",
            "redis://n1:7000?cluster=true&sentinel=m",
            "redis://s1?sentinel=",
        ] {
            assert!(RedisConfig::from_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        for (url, key) in [
            ("redis://h?mode=kafka", "mode"),
            ("redis://h?visibility_timeout=soon", "visibility_timeout"),
            ("redis://h?maxlen=0", "maxlen"),
            ("redis://h?colour=blue", "colour"),
            ("http://h", "url"),
        ] {
            match RedisConfig::from_url(url) {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key, "{url}"),
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
