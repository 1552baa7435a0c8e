//! Redis Sentinel: connections to the master the sentinels name, which
//! follow it when they promote a replica.
//!
//! The redis crate finds the master through the sentinels (and checks that
//! it says it is one), but a [`ConnectionManager`] made for that master
//! reconnects to the same address forever. So a connection here keeps the
//! master's manager and, when a command fails in a way a failover explains
//! (the node is gone, or it answers `READONLY` because it was demoted), asks
//! the sentinels again and moves to the master they name. The failed
//! command's error goes back to the caller, who retries as after any
//! connection fault; the next command goes to the new master.

use std::sync::{Arc, Mutex};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Client, Cmd, ConnectionAddr, Pipeline, RedisError, RedisResult, Value};
use tracing::{info, warn};

use crate::config::RedisConfig;

/// The sentinels of one master, shared by every connection of a bus.
pub(crate) type Sentinels = Arc<Lookup>;

/// Asks the sentinels for the master, one question at a time, each bounded
/// in time (the redis crate's sentinel client sets no timeouts of its own:
/// a node that accepts a connection and never answers would hold every
/// connection of the bus waiting for a master).
pub(crate) struct Lookup {
    client: tokio::sync::Mutex<SentinelClient>,
    timeout: std::time::Duration,
}

impl Lookup {
    /// A client of the master the sentinels name now (checked to say it
    /// is a master).
    pub(crate) async fn master(&self) -> RedisResult<Client> {
        let mut client = self.client.lock().await;
        match tokio::time::timeout(self.timeout, client.async_get_client()).await {
            Ok(found) => found,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the sentinels named no master within {:?}", self.timeout),
            ))),
        }
    }
}

/// The sentinels for `config` (its nodes, or its one host), asked for the
/// master named by `config.sentinel`, with the URL's credentials and
/// database for the master.
pub(crate) fn sentinels(config: &RedisConfig, master: &str) -> RedisResult<Sentinels> {
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
            url.port().unwrap_or(26379)
        )]
    } else {
        config.nodes.clone()
    };
    let addrs = hosts.iter().map(|h| {
        let (host, port) = h.rsplit_once(':').unwrap_or((h, "26379"));
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ConnectionAddr::Tcp(host.to_owned(), port.parse().unwrap_or(26379))
    });
    let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?;
    if !url.username().is_empty() {
        builder = builder.set_client_to_redis_username(url.username());
    }
    if let Some(password) = url.password() {
        let password = percent_decode(password);
        builder = builder.set_client_to_redis_password(password);
    }
    if let Ok(db) = url.path().trim_start_matches('/').parse::<i64>() {
        builder = builder.set_client_to_redis_db(db);
    }
    Ok(Arc::new(Lookup {
        client: tokio::sync::Mutex::new(builder.build()?),
        timeout: config.connect_timeout,
    }))
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A connection to the current master, moved to the next one after a failover.
pub(crate) struct Follower {
    sentinels: Sentinels,
    settings: ConnectionManagerConfig,
    /// The master's address, its manager, and how many moves came before it.
    current: Mutex<Current>,
    /// Held while looking for a new master: one lookup per failover.
    moving: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Current {
    addr: ConnectionAddr,
    manager: ConnectionManager,
    moves: u64,
}

impl Follower {
    /// Connects to the master the sentinels name now.
    pub(crate) async fn connect(
        sentinels: Sentinels,
        settings: ConnectionManagerConfig,
    ) -> RedisResult<Follower> {
        let client = sentinels.master().await?;
        let manager = manager(&client, &settings).await?;
        Ok(Follower {
            current: Mutex::new(Current {
                addr: client.get_connection_info().addr().clone(),
                manager,
                moves: 0,
            }),
            sentinels,
            settings,
            moving: tokio::sync::Mutex::new(()),
        })
    }

    fn current(&self) -> Current {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends one command to the current master.
    pub(crate) async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let mut current = self.current();
        let result = current.manager.req_packed_command(cmd).await;
        let moved = match &result {
            Ok(value) => demoted(value),
            Err(e) => crate::is_connection_error(e),
        };
        if moved {
            self.follow(current.moves).await;
        }
        result
    }

    /// Sends a pipeline to the current master.
    pub(crate) async fn pipeline(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let mut current = self.current();
        let result = current
            .manager
            .req_packed_commands(pipeline, offset, count)
            .await;
        let moved = match &result {
            Ok(values) => values.iter().any(demoted),
            Err(e) => crate::is_connection_error(e),
        };
        if moved {
            self.follow(current.moves).await;
        }
        result
    }

    /// Asks the sentinels for the master and moves there, unless another
    /// request moved since `seen` moves (one lookup per failover).
    async fn follow(&self, seen: u64) {
        let _moving = self.moving.lock().await;
        let current = self.current();
        if current.moves != seen {
            return;
        }
        let client = match self.sentinels.master().await {
            Ok(client) => client,
            Err(error) => {
                warn!(%error, "asking the sentinels for the master failed; trying again on the next failure");
                return;
            }
        };
        let addr = client.get_connection_info().addr().clone();
        if addr == current.addr {
            return;
        }
        match manager(&client, &self.settings).await {
            Ok(manager) => {
                info!(from = %current.addr, to = %addr, "the sentinels promoted a new master; moving to it");
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Current {
                    addr,
                    manager,
                    moves: seen + 1,
                };
            }
            Err(error) => {
                warn!(%error, %addr, "connecting to the new master failed; trying again on the next failure");
            }
        }
    }

    /// The database of the master's connection.
    pub(crate) fn db(&self) -> i64 {
        self.current().manager.get_db()
    }
}

/// Whether a reply says the node is no longer the master: a command's
/// error comes back as a value (converted to an error only later, by the
/// caller's `query`), so a demoted master's `READONLY` is one of these, as
/// is `MASTERDOWN` (a replica whose master is gone).
fn demoted(value: &Value) -> bool {
    matches!(
        value,
        Value::ServerError(e) if matches!(
            e.kind(),
            Some(redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown)
        )
    )
}

async fn manager(
    client: &Client,
    settings: &ConnectionManagerConfig,
) -> RedisResult<ConnectionManager> {
    client
        .get_connection_manager_with_config(settings.clone())
        .await
}
