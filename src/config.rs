//! Configuration: the broker URL, adapter options and the middleware stack,
//! from a TOML file and `TIDINGS_*` environment variables.
//!
//! ```toml
//! url = "redis://127.0.0.1:6379"
//!
//! [options]            # adapter options, as the URL's query parameters
//! mode = "streams"
//!
//! [retry]              # the consumer runtime's retry policy
//! max_attempts = 5
//! initial_backoff = "200ms"
//! max_backoff = "30s"
//! mode = "broker"      # or "in-process"
//!
//! [idempotency]        # off when absent
//! store = "memory"     # or "redis"
//! ttl = "1h"
//! redis_url = "redis://127.0.0.1:6379"
//!
//! [breaker]            # off when absent
//! failures = 10
//! open_for = "30s"
//! probes = 1
//!
//! [publish_retry]      # off when absent
//! max_attempts = 3
//!
//! [tls]                # off when absent; see TlsConfig for each broker
//! ca_file = "/etc/tidings/ca.pem"
//!
//! [telemetry]          # off when absent; needs the `otel` cargo feature
//! enabled = true
//! parent = "parent"    # or "link"
//! ```
//!
//! Environment variables override the file: `TIDINGS_URL`,
//! `TIDINGS_RETRY__MAX_ATTEMPTS`, `TIDINGS_OPTIONS__EXCHANGE`, ... (nested
//! keys joined by a double underscore). Every value is checked when loaded;
//! an error names the key and what is allowed. The URL's password never
//! appears in `Debug` output or in errors.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

use tidings_core::{Error, Result};

/// Everything needed to connect and to build consumers and publishers; see the [module docs](self).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The broker: `memory://`, `redis://…`, `amqp://…`, `kafka://…`, `nats://…`.
    pub url: String,
    /// Adapter options, appended to the URL as query parameters.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// The consumer runtime's retry policy.
    #[serde(default)]
    pub retry: RetryConfig,
    /// The idempotency layer (off when absent).
    #[serde(default)]
    pub idempotency: Option<IdempotencyConfig>,
    /// The circuit breaker around handlers (off when absent).
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
    /// Retrying transient publish failures (off when absent).
    #[serde(default)]
    pub publish_retry: Option<PublishRetryConfig>,
    /// TLS files and names, passed to the adapter as the `tls_*` query
    /// parameters (off when absent).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// OpenTelemetry traces and metrics (off when absent; needs the `otel` feature).
    #[serde(default)]
    pub telemetry: Option<TelemetryConfig>,
}

/// OpenTelemetry tracing and metrics on the publisher and on every consumer
/// of the [`Bus`](crate::Bus), recorded through the global tracer and meter
/// providers (set them up in `main`); see `docs/observability.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// On or off (`TIDINGS_TELEMETRY__ENABLED=false` turns a configured table off).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How a consumer span relates to the producer span: `parent` (one
    /// trace from publish to handling) or `link` (a new trace, linked).
    #[serde(default)]
    pub parent: ParentConfig,
}

fn yes() -> bool {
    true
}

/// How a consumer span relates to the producer span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ParentConfig {
    /// The producer span is the parent.
    #[default]
    Parent,
    /// The consumer span links to the producer span.
    Link,
}

/// TLS options, passed to the adapter as the query parameters `tls_ca_file`,
/// `tls_cert_file`, `tls_key_file` and `tls_server_name`.
///
/// With `nats://` (or `tls://`) they make TLS required; RabbitMQ and Redis
/// need the TLS scheme (`amqps://`, `rediss://`); with `kafka://` they turn
/// on `security.protocol=ssl`. `server_name` works with NATS and RabbitMQ;
/// the Redis and Kafka clients check the certificate against the host they
/// connect to, and refuse it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the certificate authorities to trust for the server.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// PEM file of the client certificate (needs `key_file`).
    #[serde(default)]
    pub cert_file: Option<String>,
    /// PEM file of the client certificate's private key (needs `cert_file`).
    #[serde(default)]
    pub key_file: Option<String>,
    /// The name the server's certificate must carry, when it differs from the host.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl TlsConfig {
    /// The options as `(query parameter, value)` pairs, the unset ones left out.
    pub fn params(&self) -> Vec<(&'static str, &str)> {
        [
            ("tls_ca_file", &self.ca_file),
            ("tls_cert_file", &self.cert_file),
            ("tls_key_file", &self.key_file),
            ("tls_server_name", &self.server_name),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }
}

/// The consumer runtime's retry policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The delay after the first failure.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// The largest delay.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// `broker` (nack with delay) or `in-process`.
    pub mode: RetryModeConfig,
}

/// Where retries happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RetryModeConfig {
    /// The broker redelivers after the delay.
    #[default]
    Broker,
    /// The handler runs again in place.
    InProcess,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            mode: RetryModeConfig::Broker,
        }
    }
}

/// The idempotency layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// `memory` or `redis`.
    pub store: IdempotencyStoreConfig,
    /// How long a handled id is remembered.
    #[serde(with = "humantime_serde", default = "one_day")]
    pub ttl: Duration,
    /// The Redis URL for the `redis` store.
    #[serde(default)]
    pub redis_url: Option<String>,
}

fn one_day() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Where handled ids are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdempotencyStoreConfig {
    /// In process memory (one replica).
    Memory,
    /// Redis (shared by replicas; needs the `redis` feature).
    Redis,
}

/// The circuit breaker around handlers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker.
    pub failures: u32,
    /// How long it stays open.
    #[serde(with = "humantime_serde", default = "thirty_seconds")]
    pub open_for: Duration,
    /// Probe calls when half-open.
    #[serde(default = "one")]
    pub probes: u32,
}

fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}

fn one() -> u32 {
    1
}

/// Retrying transient publish failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRetryConfig {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The delay after the first failure.
    #[serde(with = "humantime_serde", default = "hundred_ms")]
    pub initial_backoff: Duration,
}

fn hundred_ms() -> Duration {
    Duration::from_millis(100)
}

impl Config {
    /// A configuration of just a URL, everything else default.
    pub fn from_url(url: impl Into<String>) -> Self {
        Config {
            url: url.into(),
            options: BTreeMap::new(),
            retry: RetryConfig::default(),
            idempotency: None,
            breaker: None,
            publish_retry: None,
            tls: None,
            telemetry: None,
        }
    }

    /// Loads `path` (TOML), then `TIDINGS_*` environment variables over it,
    /// and checks the result.
    ///
    /// Strict, because a service that silently runs on the wrong broker
    /// loses data: a file that was named and does not exist is an error
    /// (naming it and the current directory), and so is a configuration
    /// that names no broker URL — `memory://` is used only when the file or
    /// `TIDINGS_URL` says so. Unknown keys, in the file or in `TIDINGS_*`
    /// variables, are errors naming the key.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            let here = std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "?".into());
            return Err(Error::Config {
                key: "config".into(),
                message: format!(
                    "the configuration file `{}` does not exist (current directory: {here}); \
                     give the right path, or use Config::from_env() for TIDINGS_* variables alone",
                    path.display()
                ),
            });
        }
        Self::from_figment(
            Figment::new()
                .merge(Toml::file(path))
                .merge(Env::prefixed("TIDINGS_").split("__")),
        )
    }

    /// The configuration from `TIDINGS_*` environment variables alone
    /// (`TIDINGS_URL` is required), checked like [`load`](Config::load).
    pub fn from_env() -> Result<Self> {
        Self::from_figment(Figment::new().merge(Env::prefixed("TIDINGS_").split("__")))
    }

    /// Parses TOML text (no environment), and checks the result; `url` is
    /// required, as in [`load`](Config::load).
    pub fn from_toml(text: &str) -> Result<Self> {
        Self::from_figment(Figment::new().merge(Toml::string(text)))
    }

    fn from_figment(figment: Figment) -> Result<Self> {
        let config: Config = figment.extract().map_err(|e| {
            let key = e.path.join(".");
            if matches!(&e.kind, figment::error::Kind::MissingField(f) if f == "url") {
                return Error::Config {
                    key: "url".into(),
                    message: "no broker URL is configured: set `url` in the file or \
                              TIDINGS_URL (`memory://` for the in-process bus)"
                        .into(),
                };
            }
            Error::Config {
                key: if key.is_empty() { "config".into() } else { key },
                message: redact_text(&e.kind.to_string()),
            }
        })?;
        config.check()?;
        Ok(config)
    }

    /// Checks values that serde alone cannot.
    pub fn check(&self) -> Result<()> {
        let bad = |key: &str, message: &str| {
            Err(Error::Config {
                key: key.into(),
                message: message.into(),
            })
        };
        if let Some(tls) = &self.tls {
            if tls.cert_file.is_some() && tls.key_file.is_none() {
                return bad("tls.key_file", "is required when tls.cert_file is set");
            }
            if tls.key_file.is_some() && tls.cert_file.is_none() {
                return bad("tls.cert_file", "is required when tls.key_file is set");
            }
        }
        // Only the scheme is checked here: the adapter parses the rest (a Kafka
        // URL lists several hosts, which is no URL to a URL parser).
        let scheme = match self.url.split_once("://") {
            Some((scheme, _)) if !scheme.is_empty() => scheme,
            _ => {
                return bad(
                    "url",
                    &format!(
                        "`{}` has no scheme; expected one of {}",
                        redact(&self.url),
                        crate::SCHEMES.join(", ")
                    ),
                );
            }
        };
        if !crate::SCHEMES
            .iter()
            .any(|s| s.trim_end_matches("://") == scheme)
        {
            return bad(
                "url",
                &format!(
                    "unknown or disabled scheme `{scheme}`; this build supports: {}",
                    crate::SCHEMES.join(", ")
                ),
            );
        }
        if self.retry.max_attempts == 0 {
            return bad("retry.max_attempts", "must be at least 1");
        }
        if self.retry.initial_backoff > self.retry.max_backoff {
            return bad("retry.initial_backoff", "must not exceed retry.max_backoff");
        }
        if let Some(idem) = &self.idempotency {
            if idem.store == IdempotencyStoreConfig::Redis && idem.redis_url.is_none() {
                return bad(
                    "idempotency.redis_url",
                    "is required when idempotency.store = \"redis\"",
                );
            }
            if idem.store == IdempotencyStoreConfig::Redis && !cfg!(feature = "redis") {
                return bad(
                    "idempotency.store",
                    "\"redis\" needs the cargo feature `redis` of tidings; allowed here: \"memory\"",
                );
            }
        }
        if let Some(b) = &self.breaker
            && b.failures == 0
        {
            return bad("breaker.failures", "must be at least 1");
        }
        if let Some(p) = &self.publish_retry
            && p.max_attempts == 0
        {
            return bad("publish_retry.max_attempts", "must be at least 1");
        }
        if self.tls.is_some() && !matches!(scheme, "nats" | "tls" | "amqps" | "rediss" | "kafka") {
            return bad(
                "tls",
                &format!(
                    "TLS options need nats://, tls://, amqps://, rediss:// or kafka://, \
                     not {scheme}://"
                ),
            );
        }
        if cfg!(not(feature = "otel")) && self.telemetry_enabled() {
            return bad(
                "telemetry",
                "needs the cargo feature `otel` (tidings = { features = [\"otel\"] })",
            );
        }
        Ok(())
    }

    /// Whether a `[telemetry]` table is present and enabled.
    pub fn telemetry_enabled(&self) -> bool {
        self.telemetry.as_ref().is_some_and(|t| t.enabled)
    }

    /// The URL with the options, then the TLS options (as `tls_*`),
    /// appended as query parameters.
    pub fn full_url(&self) -> String {
        let tls = self.tls.as_ref().map(TlsConfig::params).unwrap_or_default();
        if self.options.is_empty() && tls.is_empty() {
            return self.url.clone();
        }
        let mut url = self.url.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        let options = self.options.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (k, v) in options.chain(tls) {
            url.push(sep);
            url.push_str(&url_encode(k));
            url.push('=');
            url.push_str(&url_encode(v));
            sep = '&';
        }
        url
    }

    /// The retry policy for the consumer runtime.
    pub fn retry_policy(&self) -> tidings_core::RetryPolicy {
        tidings_core::RetryPolicy::new(self.retry.max_attempts).with_backoff(
            tidings_core::Backoff::exponential(self.retry.initial_backoff)
                .with_max(self.retry.max_backoff),
        )
    }
}

/// Percent-encodes a query key or value; a space is `%20` rather than `+`
/// (not every adapter's parser reads `+` as a space; a literal `+` is `%2B`).
fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

pub(crate) use tidings_core::params::redact_url as redact;

/// Replaces anything that looks like `scheme://user:password@` in free text.
fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_inclusive(|c: char| c.is_whitespace() || c == '"' || c == '`') {
        let trimmed = word.trim_end_matches(|c: char| c.is_whitespace() || c == '"' || c == '`');
        if trimmed.contains("://") && trimmed.contains('@') {
            out.push_str(&redact(trimmed));
            out.push_str(&word[trimmed.len()..]);
        } else {
            out.push_str(word);
        }
    }
    out
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = |k: &str| {
            let k = k.to_ascii_lowercase();
            ["password", "secret", "token", "key"]
                .iter()
                .any(|s| k.contains(s))
        };
        let options: BTreeMap<&str, &str> = self
            .options
            .iter()
            .map(|(k, v)| (k.as_str(), if secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("Config")
            .field("url", &redact(&self.url))
            .field("options", &options)
            .field("retry", &self.retry)
            .field(
                "idempotency",
                &self
                    .idempotency
                    .as_ref()
                    .map(|i| (i.store, i.ttl, i.redis_url.as_deref().map(redact))),
            )
            .field("breaker", &self.breaker)
            .field("publish_retry", &self.publish_retry)
            .field("tls", &self.tls)
            .field("telemetry", &self.telemetry)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(toml: &str) -> (String, String) {
        match Config::from_toml(toml) {
            Err(Error::Config { key, message }) => (key, message),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn a_full_file_loads() {
        let c = Config::from_toml(
            r#"
            url = "memory://"
            [options]
            exchange = "events"
            [retry]
            max_attempts = 7
            initial_backoff = "250ms"
            max_backoff = "1m"
            mode = "in-process"
            [idempotency]
            store = "memory"
            ttl = "2h"
            [breaker]
            failures = 3
            [publish_retry]
            max_attempts = 4
            "#,
        )
        .unwrap();
        assert_eq!(c.retry.max_attempts, 7);
        assert_eq!(c.retry.initial_backoff, Duration::from_millis(250));
        assert_eq!(c.retry.mode, RetryModeConfig::InProcess);
        assert_eq!(
            c.idempotency.as_ref().unwrap().ttl,
            Duration::from_secs(7200)
        );
        assert_eq!(
            c.breaker.as_ref().unwrap().open_for,
            Duration::from_secs(30)
        );
        assert_eq!(c.full_url(), "memory://?exchange=events");
    }

    #[test]
    fn invalid_values_name_the_key_and_the_allowed_values() {
        let (key, message) = err("url = \"memory://\"\n[retry]\nmode = \"sometimes\"");
        assert_eq!(key, "retry.mode");
        assert!(
            message.contains("broker") && message.contains("in-process"),
            "{message}"
        );

        let (key, message) = err("url = \"pigeon://coop\"");
        assert_eq!(key, "url");
        assert!(message.contains("memory://"), "{message}");

        let (key, _) = err("url = \"memory://\"\n[retry]\nmax_attempts = 0");
        assert_eq!(key, "retry.max_attempts");

        let (key, message) = err("url = \"memory://\"\n[retry]\ninitial_backoff = \"soon\"");
        assert_eq!(key, "retry.initial_backoff");
        assert!(!message.is_empty());

        let (key, _) = err("url = \"memory://\"\n[idempotency]\nstore = \"redis\"");
        assert_eq!(key, "idempotency.redis_url");

        let (key, message) = err("url = \"memory://\"\ncolour = \"blue\"");
        assert!(message.contains("colour"), "{key}: {message}");
    }

    /// The reference in docs/configuration.md parses as it is.
    #[test]
    fn the_documented_example_is_valid() {
        let doc = include_str!("../docs/configuration.md");
        let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let end = start + doc[start..].find("```").expect("the block's end");
        let c = Config::from_toml(&doc[start..end]).unwrap();
        assert_eq!(c, {
            let mut expected = Config::from_url("memory://");
            expected.idempotency = Some(IdempotencyConfig {
                store: IdempotencyStoreConfig::Memory,
                ttl: Duration::from_secs(24 * 3600),
                redis_url: None,
            });
            expected.breaker = Some(BreakerConfig {
                failures: 10,
                open_for: Duration::from_secs(30),
                probes: 1,
            });
            expected.publish_retry = Some(PublishRetryConfig {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(100),
            });
            expected
        });

        // The commented-out [tls] and [telemetry] tables are valid too, once
        // uncommented (the prose comments between them are left out).
        let tls_start = doc[start..end].find("# [tls]").expect("a [tls] example") + start;
        let mut text = String::from("url = \"nats://h\"\n");
        for line in doc[tls_start..end].lines() {
            let code = line.trim_start_matches("# ");
            let is_code = code.starts_with('[')
                || code
                    .split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            if is_code {
                text.push_str(code);
                text.push('\n');
            }
        }
        let c: Config = Figment::from(Toml::string(&text))
            .extract()
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        let tls = c.tls.clone().expect("a tls table");
        assert!(tls.ca_file.is_some() && tls.cert_file.is_some() && tls.key_file.is_some());
        assert!(c.full_url().contains("&tls_key_file="), "{}", c.full_url());
        assert_eq!(
            c.telemetry,
            Some(TelemetryConfig {
                enabled: true,
                parent: ParentConfig::Parent
            })
        );
    }

    #[test]
    fn tls_options_become_query_parameters() {
        let mut c = Config::from_url("nats://127.0.0.1:4222?jetstream=false");
        c.tls = Some(TlsConfig {
            ca_file: Some("/etc/ca dir/ca.pem".into()),
            cert_file: Some("client.pem".into()),
            key_file: Some("client.key".into()),
            server_name: Some("nats.internal".into()),
        });
        assert_eq!(
            c.full_url(),
            "nats://127.0.0.1:4222?jetstream=false&tls_ca_file=%2Fetc%2Fca%20dir%2Fca.pem\
             &tls_cert_file=client.pem&tls_key_file=client.key&tls_server_name=nats.internal"
        );
        c.url = "nats://h".into();
        c.options.insert("name".into(), "svc".into());
        c.tls = Some(TlsConfig {
            ca_file: Some("ca.pem".into()),
            ..TlsConfig::default()
        });
        assert_eq!(c.full_url(), "nats://h?name=svc&tls_ca_file=ca.pem");
        c.options.clear();
        c.tls = Some(TlsConfig::default());
        assert_eq!(c.full_url(), "nats://h");
    }

    #[test]
    fn telemetry_is_checked() {
        let (key, message) = err("url = \"memory://\"\n[telemetry]\nparent = \"sideways\"");
        assert_eq!(key, "telemetry.parent", "{message}");
        let c = Config::from_toml("url = \"memory://\"").unwrap();
        assert!(!c.telemetry_enabled(), "off when absent");
        if cfg!(feature = "otel") {
            let c = Config::from_toml("url = \"memory://\"\n[telemetry]\nenabled = false").unwrap();
            assert!(!c.telemetry_enabled());
        } else {
            let (key, message) = err("url = \"memory://\"\n[telemetry]");
            assert_eq!(key, "telemetry");
            assert!(message.contains("otel"), "{message}");
        }
    }

    #[test]
    fn invalid_tls_options_name_the_key() {
        let (key, _) = err("url = \"memory://\"\n[tls]\ncert_file = \"c.pem\"");
        assert_eq!(key, "tls.key_file");
        let (key, _) = err("url = \"memory://\"\n[tls]\nkey_file = \"c.key\"");
        assert_eq!(key, "tls.cert_file");
        let (key, message) = err("url = \"memory://\"\n[tls]\nca = \"c.pem\"");
        assert!(message.contains("ca"), "{key}: {message}");
        let (key, message) = err("url = \"memory://\"\n[tls]\nca_file = \"c.pem\"");
        assert_eq!(key, "tls");
        assert!(message.contains("amqps://"), "{message}");
        let (key, _) = err("url = \"amqp://h\"\n[tls]\nca_file = \"c.pem\"");
        assert_eq!(key, "tls", "TLS with RabbitMQ is chosen by amqps://");
    }

    #[cfg(feature = "nats")]
    #[test]
    fn a_nats_tls_table_loads() {
        let c = Config::from_toml(
            "url = \"nats://h\"\n[tls]\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"c.key\"",
        )
        .unwrap();
        assert_eq!(
            c.full_url(),
            "nats://h?tls_ca_file=ca.pem&tls_cert_file=c.pem&tls_key_file=c.key"
        );
    }

    #[test]
    fn credentials_never_show() {
        let mut c = Config::from_url("amqp://guest:hunter2@127.0.0.1:5672/%2f");
        c.options.insert("sasl_password".into(), "hunter3".into());
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
        assert_eq!(
            redact_text("bad url \"amqp://u:pw@h/\" here"),
            "bad url \"amqp://u:***@h/\" here"
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail returns its own error type
    fn loading_is_strict() {
        figment::Jail::expect_with(|jail| {
            // A named file that is not there.
            let e = Config::load("nowhere/tidings.toml").expect_err("missing file");
            assert!(e.to_string().contains("nowhere/tidings.toml"), "{e}");
            assert!(e.to_string().contains("does not exist"), "{e}");
            // A file that names no broker: no silent memory://.
            jail.create_file("empty.toml", "[retry]\nmax_attempts = 3\n")?;
            let e = Config::load("empty.toml").expect_err("no url");
            assert!(e.to_string().contains("no broker URL"), "{e}");
            // The environment can name it.
            jail.set_env("TIDINGS_URL", "memory://");
            let c = Config::load("empty.toml").expect("url from the environment");
            assert_eq!(c.url, "memory://");
            // A variable the loader does not know is an error naming it.
            jail.set_env("TIDINGS_RETRY__MAX_ATEMPTS", "4");
            let e = Config::load("empty.toml").expect_err("unknown variable");
            assert!(e.to_string().contains("max_atempts"), "{e}");
            jail.set_env("TIDINGS_RETRY__MAX_ATEMPTS", "");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("TIDINGS_URL", "redis://127.0.0.1:6379");
            let c = Config::from_env().expect("from the environment");
            assert_eq!(c.url, "redis://127.0.0.1:6379");
            Ok(())
        });
        figment::Jail::expect_with(|_| {
            let e = Config::from_env().expect_err("nothing set");
            assert!(e.to_string().contains("no broker URL"), "{e}");
            Ok(())
        });
        let e = Config::from_toml("[retry]\nmax_attempts = 3").expect_err("no url");
        assert!(e.to_string().contains("TIDINGS_URL"), "{e}");
    }
}
