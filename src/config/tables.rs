//! The tables of a configuration: retry, idempotency, breaker, publish
//! retry, TLS, telemetry and the HTTP endpoint.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The HTTP endpoint an [`App`](crate::App) serves: `/healthz`, `/readyz`
/// and, with `[telemetry] prometheus = true`, `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where to listen, `host:port` (`0.0.0.0:9464` for every interface).
    pub address: std::net::SocketAddr,
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
    /// The metrics on the `[http]` endpoint's `/metrics` in the Prometheus
    /// text format (needs the `prometheus` cargo feature and `[http]`).
    #[serde(default)]
    pub prometheus: bool,
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
