//! Configuration of the NATS adapter.

use std::fmt;
use std::time::Duration;

use tidings_core::Result;
use tidings_core::tls::TlsOptions;

/// Which NATS layer the adapter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// JetStream: messages are stored in streams, groups are durable pull
    /// consumers with explicit acks. At least once. The default.
    JetStream,
    /// Core NATS: plain subjects and queue groups, nothing is stored.
    /// At most once: a message nobody is subscribed to is gone, and a
    /// message whose handler fails is not redelivered by the server.
    Core,
}

/// How topics map to JetStream streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamLayout {
    /// One stream per topic, created on first use (publish, subscribe,
    /// declare). The stream is named `<stream_prefix><topic>` with characters
    /// that stream names cannot hold replaced (and a short hash appended when
    /// anything was replaced), and captures exactly the topic's subject.
    /// Dead-letter subjects are topics of their own and get their own streams.
    PerTopic,
    /// One stream, created or checked at connect, that captures
    /// `<subject_prefix>.>`: every topic `t` is the subject `<subject_prefix>.t`,
    /// and dead letters (`<subject_prefix>.t.<group>.dlq`) land in the same stream.
    Shared {
        /// The stream's name.
        stream: String,
    },
}

/// Where stored messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// On disk (the default): survives a server restart.
    File,
    /// In memory: lost when the server restarts.
    Memory,
}

/// When the stream drops messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Kept until a limit (age, size) is reached, whoever consumed them (the
    /// default). Needed for replay and for groups created later.
    Limits,
    /// Kept while some consumer has not acked them.
    Interest,
    /// Removed on the first ack: one group per topic only.
    WorkQueue,
}

/// Settings of the NATS adapter.
///
/// Build it with [`NatsConfig::default`] (`nats://127.0.0.1:4222`, JetStream)
/// or [`NatsConfig::from_url`]:
///
/// ```
/// use tidings_nats::{NatsConfig, Mode};
/// let c = NatsConfig::from_url("nats://127.0.0.1:4222?ack_wait=10s&max_deliver=20").unwrap();
/// assert_eq!(c.mode, Mode::JetStream);
/// let core = NatsConfig::from_url("nats://127.0.0.1:4222?jetstream=false").unwrap();
/// assert_eq!(core.mode, Mode::Core);
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Server addresses (`host:port` or `nats://host:port`), tried in turn.
    pub servers: Vec<String>,
    /// User name, if the server wants one.
    pub user: Option<String>,
    /// Password for `user`. Never printed by `Debug`.
    pub password: Option<String>,
    /// Authentication token. Never printed by `Debug`.
    pub token: Option<String>,
    /// A file holding the seed of an NKey (`SU...`) the server knows by its
    /// public key; the seed signs the server's challenge and is never sent.
    /// URL: `nkey_seed_file=PATH`.
    pub nkey_seed_file: Option<std::path::PathBuf>,
    /// A `.creds` file (a user JWT and its NKey seed), as `nsc` writes for
    /// servers in operator mode (decentralised JWT authentication).
    /// URL: `creds_file=PATH`.
    pub creds_file: Option<std::path::PathBuf>,
    /// The connection's name, shown by the server's monitoring.
    pub connection_name: Option<String>,
    /// JetStream (at least once, the default) or core NATS (at most once).
    pub mode: Mode,
    /// How topics map to streams (JetStream).
    pub layout: StreamLayout,
    /// Prefix of the streams' names in [`StreamLayout::PerTopic`] (default `TIDINGS_`).
    pub stream_prefix: String,
    /// Prefix of every subject, without the trailing dot (default none).
    /// Required by [`StreamLayout::Shared`] (default there: `tidings`).
    pub subject_prefix: Option<String>,
    /// The topic dead letters of `{group}` on `{topic}` are published to
    /// (default `{topic}.{group}.dlq`). Put them outside the subjects other
    /// services' wildcard consumers capture, e.g. `dlq.{group}.{topic}`;
    /// it maps to a subject like any topic (the subject prefix first).
    pub dead_letters: String,
    /// Retention of the streams the adapter creates.
    pub retention: Retention,
    /// Storage of the streams the adapter creates.
    pub storage: Storage,
    /// Age after which stored messages are dropped (`None`: unlimited).
    pub max_age: Option<Duration>,
    /// Size in bytes above which the oldest messages are dropped (`None`: unlimited).
    pub max_bytes: Option<i64>,
    /// Window in which a message id published twice is stored once (default 2 min).
    pub duplicate_window: Duration,
    /// Copies of each stream the cluster keeps (`replicas`, 1 to 5): 3 on a
    /// three-node cluster keeps every stream through the loss of a node.
    /// Default 1 (what a single server can hold); streams that exist keep
    /// theirs.
    pub replicas: usize,
    /// How messages map to NATS headers and bodies (`dialect`, with
    /// `envelope.<field>=<path>`); per subscription and per publisher it can
    /// be overridden. Default: CloudEvents binary.
    pub dialect: tidings_core::Dialect,
    /// How long the server waits for an ack before redelivering (default
    /// 4 s: a member that dies holding deliveries has them given to another
    /// within about 4 s; one that is alive reports long handlers in progress, see
    /// `progress_interval`).
    pub ack_wait: Duration,
    /// Deliveries after which the server gives up on a message (default 20;
    /// `None`: unlimited). The consumer runtime's retry policy decides and
    /// dead-letters before that; a message the server gives up on anyway
    /// (one the client cannot read, or a policy allowing more attempts) is
    /// fetched and dead-lettered by the adapter, never dropped.
    pub max_deliver: Option<i64>,
    /// The group-wide bound on unacked messages of a durable consumer
    /// (`max_ack_pending`). `None` (the default): the subscription's prefetch.
    pub max_ack_pending: Option<i64>,
    /// How often deliveries still being handled are reported as in progress
    /// (`+WPI`), which restarts their `ack_wait`. `None` disables it: a
    /// handler running longer than `ack_wait` then sees its message
    /// redelivered meanwhile. Default: a third of `ack_wait`.
    pub progress_interval: Option<Duration>,
    /// How long to wait for a PubAck or another JetStream reply (default 10 s).
    pub request_timeout: Duration,
    /// How long to wait for the first connection (default 5 s).
    pub connect_timeout: Duration,
    /// TLS settings (`tls_ca_file`, `tls_cert_file`, `tls_key_file`,
    /// `tls_server_name`); any of them makes TLS required.
    pub tls: TlsOptions,
    /// Refuse servers without TLS. Set by a `tls://` URL and by any of the
    /// `tls_*` files; otherwise TLS is used only when the server requires it.
    pub tls_required: bool,
}

/// The default `ack_wait`.
const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(4);

/// The default `dead_letters` template.
pub(crate) const DEFAULT_DEAD_LETTERS: &str = "{topic}.{group}.dlq";

/// The default `max_deliver`.
const DEFAULT_MAX_DELIVER: i64 = 20;

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: vec!["127.0.0.1:4222".into()],
            user: None,
            password: None,
            token: None,
            nkey_seed_file: None,
            creds_file: None,
            connection_name: None,
            mode: Mode::JetStream,
            layout: StreamLayout::PerTopic,
            stream_prefix: "TIDINGS_".into(),
            subject_prefix: None,
            dead_letters: DEFAULT_DEAD_LETTERS.into(),
            retention: Retention::Limits,
            storage: Storage::File,
            max_age: None,
            max_bytes: None,
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            dialect: tidings_core::Dialect::default(),
            ack_wait: DEFAULT_ACK_WAIT,
            max_deliver: Some(DEFAULT_MAX_DELIVER),
            max_ack_pending: None,
            progress_interval: Some(DEFAULT_ACK_WAIT / 3),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            tls: TlsOptions::default(),
            tls_required: false,
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |o: &Option<String>| o.as_ref().map(|_| "<hidden>");
        f.debug_struct("NatsConfig")
            .field("servers", &self.servers)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .field("connection_name", &self.connection_name)
            .field("mode", &self.mode)
            .field("layout", &self.layout)
            .field("stream_prefix", &self.stream_prefix)
            .field("subject_prefix", &self.subject_prefix)
            .field("dead_letters", &self.dead_letters)
            .field("retention", &self.retention)
            .field("storage", &self.storage)
            .field("max_age", &self.max_age)
            .field("max_bytes", &self.max_bytes)
            .field("duplicate_window", &self.duplicate_window)
            .field("dialect", &self.dialect)
            .field("ack_wait", &self.ack_wait)
            .field("max_deliver", &self.max_deliver)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("progress_interval", &self.progress_interval)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

use tidings_core::params::{boolean, duration, invalid as config_error, optional_duration};

fn positive(key: &str, value: &str) -> Result<Option<i64>> {
    match value {
        "" | "none" | "unlimited" | "-1" => Ok(None),
        v => match v.parse::<i64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(config_error(
                key,
                format!("`{v}` is not a positive integer or `unlimited`"),
            )),
        },
    }
}

use tidings_core::params::percent_decode;

impl NatsConfig {
    /// Parses `nats://[user:password@|token@]host:port[,host:port...][?options]`.
    ///
    /// Options (query parameters):
    /// - `jetstream=true|false` (default true): false selects core NATS (at most once);
    /// - `stream=NAME`: one shared stream capturing `<subject_prefix>.>` instead of a stream per topic;
    /// - `stream_prefix=TIDINGS_`, `subject_prefix=PREFIX`;
    /// - `retention=limits|interest|workqueue`, `storage=file|memory`;
    /// - `max_age=7d`, `max_bytes=N`, `duplicate_window=2m`;
    /// - `ack_wait=4s`, `max_deliver=20|N|unlimited`, `max_ack_pending=N`;
    /// - `progress_interval=<a third of ack_wait>|off`; `request_timeout=10s`, `connect_timeout=5s`;
    /// - `name=NAME` (connection name), `token=TOKEN`, `nkey_seed_file=PATH`
    ///   (an NKey seed), `creds_file=PATH` (a user JWT and seed, operator mode);
    /// - `tls_ca_file=PATH`, `tls_cert_file=PATH`, `tls_key_file=PATH` (PEM
    ///   files, read at connect), `tls_server_name=NAME` (the name the
    ///   server's certificate must carry, when it is not the URL's host); any
    ///   of them makes TLS required, as does a `tls://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        let mut config = NatsConfig::default();
        let rest = match url.strip_prefix("tls://") {
            Some(rest) => {
                config.tls_required = true;
                rest
            }
            None => url
                .strip_prefix("nats://")
                .ok_or_else(|| config_error("url", "must start with nats:// or tls://"))?,
        };
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let authority = authority.trim_end_matches('/');
        let hosts = match authority.rsplit_once('@') {
            Some((credentials, hosts)) => {
                match credentials.split_once(':') {
                    Some((user, password)) => {
                        config.user = Some(percent_decode(user));
                        config.password = Some(percent_decode(password));
                    }
                    None => config.token = Some(percent_decode(credentials)),
                }
                hosts
            }
            None => authority,
        };
        if !hosts.is_empty() {
            config.servers = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| {
                    if h.contains(':') {
                        h.to_owned()
                    } else {
                        format!("{h}:4222")
                    }
                })
                .collect();
        }
        let mut shared_stream = None;
        let mut progress_set = false;
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            let v = value.as_str();
            match key {
                "jetstream" => {
                    config.mode = if boolean(key, v)? {
                        Mode::JetStream
                    } else {
                        Mode::Core
                    }
                }
                "stream" => shared_stream = Some(v.to_owned()),
                "stream_prefix" => config.stream_prefix = v.to_owned(),
                "dead_letters" => config.dead_letters = v.to_owned(),
                "subject_prefix" => {
                    config.subject_prefix = Some(v.trim_end_matches('.').to_owned())
                }
                "retention" => {
                    config.retention = match v {
                        "limits" => Retention::Limits,
                        "interest" => Retention::Interest,
                        "workqueue" => Retention::WorkQueue,
                        _ => {
                            return Err(config_error(
                                key,
                                format!("`{v}` is not one of limits, interest, workqueue"),
                            ));
                        }
                    }
                }
                "storage" => {
                    config.storage = match v {
                        "file" => Storage::File,
                        "memory" => Storage::Memory,
                        _ => {
                            return Err(config_error(
                                key,
                                format!("`{v}` is not one of file, memory"),
                            ));
                        }
                    }
                }
                "max_age" => config.max_age = optional_duration(key, v)?,
                "max_bytes" => config.max_bytes = positive(key, v)?,
                "duplicate_window" => config.duplicate_window = duration(key, v)?,
                "replicas" => {
                    config.replicas = match v.parse::<usize>() {
                        Ok(n @ 1..=5) => n,
                        _ => return Err(config_error(key, "use 1 to 5 (JetStream's limit)")),
                    }
                }
                "ack_wait" => config.ack_wait = duration(key, v)?,
                "max_deliver" => config.max_deliver = positive(key, v)?,
                "max_ack_pending" => config.max_ack_pending = positive(key, v)?,
                "progress_interval" => {
                    progress_set = true;
                    config.progress_interval = optional_duration(key, v)?;
                }
                "request_timeout" => config.request_timeout = duration(key, v)?,
                "connect_timeout" => config.connect_timeout = duration(key, v)?,
                "name" => config.connection_name = Some(v.to_owned()),
                "token" => config.token = Some(v.to_owned()),
                "nkey_seed_file" => config.nkey_seed_file = Some(v.into()),
                "creds_file" => config.creds_file = Some(v.into()),
                _ if config.tls.set(key, v)? => {}
                _ if config.dialect.apply_option(key, v)? => {}
                _ => {
                    return Err(config_error(
                        key,
                        "unknown option; known: jetstream, stream, stream_prefix, subject_prefix, \
                         retention, storage, max_age, max_bytes, duplicate_window, ack_wait, \
                         max_deliver, max_ack_pending, progress_interval, request_timeout, \
                         connect_timeout, name, token, nkey_seed_file, creds_file, dialect, envelope.<field>, tls_ca_file, \
                         tls_cert_file, tls_key_file, tls_server_name",
                    ));
                }
            }
        }
        if config.tls.is_set() {
            config.tls_required = true;
        }
        if !progress_set {
            config.progress_interval = Some(config.ack_wait / 3);
        }
        if let Some(stream) = shared_stream {
            config = config.with_shared_stream(stream);
        }
        config.validate()?;
        Ok(config)
    }

    /// Uses one shared stream named `stream` capturing `<subject_prefix>.>`
    /// (the subject prefix defaults to `tidings`).
    #[must_use]
    pub fn with_shared_stream(mut self, stream: impl Into<String>) -> Self {
        self.layout = StreamLayout::Shared {
            stream: stream.into(),
        };
        if self.subject_prefix.is_none() {
            self.subject_prefix = Some("tidings".into());
        }
        self
    }

    /// Selects core NATS (at most once) instead of JetStream.
    #[must_use]
    pub fn core(mut self) -> Self {
        self.mode = Mode::Core;
        self
    }

    /// Sets `ack_wait` and the progress interval to a third of it.
    #[must_use]
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self.progress_interval = self.progress_interval.map(|_| ack_wait / 3);
        self
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<()> {
        if self.servers.is_empty() {
            return Err(config_error("servers", "at least one server is needed"));
        }
        let ways = [
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
            self.nkey_seed_file.is_some(),
            self.creds_file.is_some(),
        ];
        if ways.iter().filter(|w| **w).count() > 1 {
            return Err(config_error(
                "creds_file",
                "one way to authenticate: a user and password, a token, an NKey seed \
                 (`nkey_seed_file`) or a creds file (`creds_file`)",
            ));
        }
        if let StreamLayout::Shared { stream } = &self.layout {
            if !crate::topology::valid_stream_name(stream) {
                return Err(config_error(
                    "stream",
                    format!(
                        "`{stream}` is not a valid stream name (no spaces, `.`, `*`, `>`, `/`, `\\`)"
                    ),
                ));
            }
            if self
                .subject_prefix
                .as_deref()
                .unwrap_or_default()
                .is_empty()
            {
                return Err(config_error(
                    "subject_prefix",
                    "a shared stream needs a subject prefix to capture",
                ));
            }
        }
        if let Some(prefix) = &self.subject_prefix {
            crate::topology::check_subject("subject_prefix", prefix)?;
        }
        if !(self.dead_letters.contains("{topic}") && self.dead_letters.contains("{group}")) {
            return Err(config_error(
                "dead_letters",
                format!(
                    "`{}` must name both `{{topic}}` and `{{group}}`, so that every group's \
                     dead letters of every topic have a topic of their own",
                    self.dead_letters
                ),
            ));
        }
        crate::topology::check_subject(
            "dead_letters",
            &self
                .dead_letters
                .replace("{topic}", "t")
                .replace("{group}", "g"),
        )?;
        if let Some(p) = self.progress_interval
            && (p.is_zero() || p >= self.ack_wait)
        {
            return Err(config_error(
                "progress_interval",
                "must be above zero and below ack_wait (or off)",
            ));
        }
        if self.ack_wait < Duration::from_millis(100) {
            return Err(config_error("ack_wait", "must be at least 100ms"));
        }
        self.tls.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_core::Error;

    #[test]
    fn one_way_to_authenticate() {
        let c = NatsConfig::from_url("nats://h:4222?nkey_seed_file=/run/user.nk").unwrap();
        assert_eq!(
            c.nkey_seed_file.as_deref(),
            Some(std::path::Path::new("/run/user.nk"))
        );
        assert!(NatsConfig::from_url("nats://h:4222?creds_file=/run/u.creds").is_ok());
        for both in [
            "nats://tok@h:4222?nkey_seed_file=/k",
            "nats://u:p@h:4222?creds_file=/c",
            "nats://h:4222?nkey_seed_file=/k&creds_file=/c",
        ] {
            assert!(NatsConfig::from_url(both).is_err(), "{both}");
        }
    }

    #[test]
    fn url_with_everything() {
        let c = NatsConfig::from_url(
            "nats://ann:s%40cret@h1:4223,h2?jetstream=true&stream=EVENTS&subject_prefix=app.&\
             retention=interest&storage=memory&max_age=1h&max_bytes=1000&duplicate_window=1m&\
             ack_wait=20s&max_deliver=5&max_ack_pending=100&progress_interval=5s&name=svc",
        )
        .unwrap();
        assert_eq!(c.servers, ["h1:4223", "h2:4222"]);
        assert_eq!(c.user.as_deref(), Some("ann"));
        assert_eq!(c.password.as_deref(), Some("s@cret"));
        assert_eq!(
            c.layout,
            StreamLayout::Shared {
                stream: "EVENTS".into()
            }
        );
        assert_eq!(c.subject_prefix.as_deref(), Some("app"));
        assert_eq!(c.retention, Retention::Interest);
        assert_eq!(c.storage, Storage::Memory);
        assert_eq!(c.max_age, Some(Duration::from_secs(3600)));
        assert_eq!(c.max_bytes, Some(1000));
        assert_eq!(c.max_deliver, Some(5));
        assert_eq!(c.progress_interval, Some(Duration::from_secs(5)));
        assert!(!format!("{c:?}").contains("cret"));
        assert!(!c.tls_required);
    }

    #[test]
    fn tls_options() {
        use std::path::PathBuf;
        let c = NatsConfig::from_url(
            "nats://h?tls_ca_file=%2Fetc%2Fca%20dir%2Fca.pem&tls_cert_file=c.pem&tls_key_file=c.key",
        )
        .unwrap();
        assert_eq!(c.tls.ca_file, Some(PathBuf::from("/etc/ca dir/ca.pem")));
        assert_eq!(c.tls.cert_file, Some(PathBuf::from("c.pem")));
        assert_eq!(c.tls.key_file, Some(PathBuf::from("c.key")));
        assert!(c.tls_required);
        let c = NatsConfig::from_url("nats://10.0.0.7?tls_server_name=nats.internal").unwrap();
        assert_eq!(c.tls.server_name.as_deref(), Some("nats.internal"));
        assert!(c.tls_required);
        let c = NatsConfig::from_url("tls://h:4222").unwrap();
        assert!(c.tls_required && !c.tls.is_set());
        assert_eq!(c.servers, ["h:4222"]);
    }

    #[test]
    fn defaults_and_errors() {
        let c = NatsConfig::from_url("nats://127.0.0.1:4222").unwrap();
        assert_eq!(c.mode, Mode::JetStream);
        assert_eq!(c.layout, StreamLayout::PerTopic);
        assert_eq!(c.ack_wait, Duration::from_secs(4));
        assert_eq!(c.progress_interval, Some(Duration::from_secs(4) / 3));
        assert_eq!(c.max_deliver, Some(20));
        assert_eq!(c.replicas, 1);
        let c = NatsConfig::from_url("nats://a:4222,b:4222,c:4222?replicas=3").unwrap();
        assert_eq!((c.replicas, c.servers.len()), (3, 3));
        let c = NatsConfig::from_url("nats://tok@localhost?jetstream=false").unwrap();
        assert_eq!(c.mode, Mode::Core);
        assert_eq!(c.token.as_deref(), Some("tok"));
        for (url, key) in [
            ("nats://h?retention=forever", "retention"),
            ("nats://h?ack_wait=soon", "ack_wait"),
            ("nats://h?jetstream=maybe", "jetstream"),
            ("nats://h?bogus=1", "bogus"),
            ("nats://h?stream=a.b", "stream"),
            ("nats://h?max_deliver=-5", "max_deliver"),
            ("nats://h?replicas=7", "replicas"),
            ("nats://h?replicas=0", "replicas"),
            ("nats://h?tls_server_name=", "tls_server_name"),
            ("nats://h?tls_cert_file=c.pem", "tls_key_file"),
            ("nats://h?tls_key_file=c.key", "tls_cert_file"),
            ("nats://h?tls_ca_file=", "tls_ca_file"),
            ("redis://h", "url"),
        ] {
            match NatsConfig::from_url(url) {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key, "{url}"),
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
