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
//! prometheus = true    # metrics on the HTTP endpoint's /metrics; needs `prometheus`
//!
//! [http]               # off when absent; needs the `http` cargo feature
//! address = "0.0.0.0:9464"   # /healthz, /readyz (and /metrics), served by App
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

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

use tidings_core::{Error, Result};

mod tables;
pub use tables::{
    BreakerConfig, HttpConfig, IdempotencyConfig, IdempotencyStoreConfig, ParentConfig,
    PublishRetryConfig, RetryConfig, RetryModeConfig, TelemetryConfig, TlsConfig,
};

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
    /// The HTTP endpoint for probes and metrics that [`App`](crate::App)
    /// serves (off when absent; needs the `http` feature).
    #[serde(default)]
    pub http: Option<HttpConfig>,
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
            http: None,
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
        // The scheme, and whether it takes `[tls]`, are checked by the
        // adapter registry at connect; the adapter parses the rest (a Kafka
        // URL lists several hosts, which is no URL to a URL parser).
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
        if cfg!(not(feature = "otel")) && self.telemetry_enabled() {
            return bad(
                "telemetry",
                "needs the cargo feature `otel` (tidings = { features = [\"otel\"] })",
            );
        }
        if cfg!(not(feature = "http")) && self.http.is_some() {
            return bad(
                "http",
                "needs the cargo feature `http` (tidings = { features = [\"http\"] })",
            );
        }
        if self.prometheus_enabled() {
            if cfg!(not(feature = "prometheus")) {
                return bad(
                    "telemetry.prometheus",
                    "needs the cargo feature `prometheus` (tidings = { features = [\"prometheus\"] })",
                );
            }
            if self.http.is_none() {
                return bad(
                    "telemetry.prometheus",
                    "serves /metrics on the HTTP endpoint: add `[http] address = \"0.0.0.0:9464\"`",
                );
            }
        }
        Ok(())
    }

    /// Whether a `[telemetry]` table is present and enabled.
    pub fn telemetry_enabled(&self) -> bool {
        self.telemetry.as_ref().is_some_and(|t| t.enabled)
    }

    /// Whether telemetry is enabled with `prometheus = true`.
    pub fn prometheus_enabled(&self) -> bool {
        self.telemetry
            .as_ref()
            .is_some_and(|t| t.enabled && t.prometheus)
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
            .field("http", &self.http)
            .finish()
    }
}

#[cfg(test)]
mod tests;
