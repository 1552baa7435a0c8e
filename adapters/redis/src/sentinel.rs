//! Redis Sentinel: finding the master the sentinels name, for the
//! connections that follow it (`follow`) when they promote a replica.
//!
//! The redis crate finds the master through the sentinels (and checks that
//! it says it is one); a lookup here is bounded in time and shared by every
//! connection of a bus that failed at the same time.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Client, ConnectionAddr, RedisError, RedisResult, TlsCertificates, TlsMode};

use crate::config::{RedisConfig, SENTINEL_PORT};
use tidings_core::params::percent_decode;

/// The sentinels of one master, shared by every connection of a bus.
pub(crate) type Sentinels = Arc<Lookup>;

/// Asks the sentinels for the master: one question at a time for the whole
/// bus, each bounded in time (above the redis crate's own per-request
/// timeouts: a sentinel lookup makes several requests), and its answer
/// shared by every connection whose failure began before it was asked, so a
/// failover costs one lookup per wave of failures, not one per command.
pub(crate) struct Lookup {
    client: tokio::sync::Mutex<SentinelClient>,
    timeout: std::time::Duration,
    /// When the last lookup finished, and what it found.
    last: Mutex<Option<(Instant, RedisResult<Client>)>>,
}

impl Lookup {
    /// A client of the master the sentinels name (checked to say it is a
    /// master), as found by a lookup that finished after `since`.
    pub(crate) async fn master_since(&self, since: Instant) -> RedisResult<Client> {
        let mut client = self.client.lock().await;
        if let Some((at, found)) = &*self.last.lock().unwrap_or_else(|e| e.into_inner())
            && *at >= since
        {
            return found.clone();
        }
        let found = match tokio::time::timeout(self.timeout, client.async_get_client()).await {
            Ok(found) => found,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the sentinels named no master within {:?}", self.timeout),
            ))),
        };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), found.clone()));
        found
    }

    /// The master the sentinels name now.
    pub(crate) async fn master(&self) -> RedisResult<Client> {
        self.master_since(Instant::now()).await
    }
}

/// The sentinels for `config` (its nodes, or its one host), asked for the
/// master named by `config.sentinel`, with the URL's credentials and
/// database for the master, and with `rediss://` over TLS to both, with
/// `certificates` (the configuration's TLS files, read).
pub(crate) fn sentinels(
    config: &RedisConfig,
    master: &str,
    certificates: Option<TlsCertificates>,
) -> RedisResult<Sentinels> {
    let url = url::Url::parse(&config.url).map_err(|e| {
        RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "not a URL",
            e.to_string(),
        ))
    })?;
    let hosts = if config.nodes.is_empty() {
        vec![format!(
            "{}:{}",
            url.host_str().unwrap_or("127.0.0.1"),
            url.port().unwrap_or(SENTINEL_PORT)
        )]
    } else {
        config.nodes.clone()
    };
    // `rediss://`: the sentinels and the master are both reached over TLS,
    // with the same files, as managed services and most TLS set-ups run them.
    let tls = (url.scheme() == "rediss").then(|| match url.fragment() {
        Some("insecure") => TlsMode::Insecure,
        _ => TlsMode::Secure,
    });
    let addrs = hosts.iter().map(|h| {
        let (host, port) = h.rsplit_once(':').unwrap_or((h, ""));
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = port.parse().unwrap_or(SENTINEL_PORT);
        match tls {
            None => ConnectionAddr::Tcp(host, port),
            Some(mode) => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: mode == TlsMode::Insecure,
                tls_params: None,
            },
        }
    });
    let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?;
    if let Some(mode) = tls {
        // The redis crate builds its rustls configuration from the
        // process's default crypto provider.
        tidings_core::tls::install_default_provider();
        builder = builder
            .set_client_to_sentinel_tls_mode(mode)
            .set_client_to_redis_tls_mode(mode);
        if let Some(certificates) = certificates {
            builder = builder
                .set_client_to_sentinel_certificates(certificates.clone())
                .set_client_to_redis_certificates(certificates);
        }
    }
    if !url.username().is_empty() {
        builder = builder.set_client_to_redis_username(percent_decode(url.username()));
    }
    if let Some(password) = url.password() {
        let password = percent_decode(password);
        builder = builder.set_client_to_redis_password(password);
    }
    match url.path().trim_start_matches('/') {
        "" => {}
        db => match db.parse::<i64>() {
            Ok(db) => builder = builder.set_client_to_redis_db(db),
            Err(_) => {
                return Err(RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "the database must be a number",
                    db.to_owned(),
                )));
            }
        },
    }
    Ok(Arc::new(Lookup {
        client: tokio::sync::Mutex::new(builder.build()?),
        timeout: config.connect_timeout,
        last: Mutex::new(None),
    }))
}
