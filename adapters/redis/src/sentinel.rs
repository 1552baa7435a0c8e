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
use std::time::Instant;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Client, Cmd, ConnectionAddr, Pipeline, RedisError, RedisResult, Value};
use tracing::{info, warn};

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
            url.port().unwrap_or(SENTINEL_PORT)
        )]
    } else {
        config.nodes.clone()
    };
    let addrs = hosts.iter().map(|h| {
        let (host, port) = h.rsplit_once(':').unwrap_or((h, ""));
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ConnectionAddr::Tcp(host.to_owned(), port.parse().unwrap_or(SENTINEL_PORT))
    });
    let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?;
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
        let started = Instant::now();
        let mut current = self.current();
        let result = current.manager.req_packed_command(cmd).await;
        let moved = match &result {
            Ok(value) => demoted(value),
            Err(e) => crate::is_connection_error(e),
        };
        if moved {
            self.follow(current.moves, started).await;
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
        let started = Instant::now();
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
            self.follow(current.moves, started).await;
        }
        result
    }

    /// Asks the sentinels whether the master changed, as after a failed
    /// command: for a write the master accepted but no replica confirmed
    /// (it may be cut off from the others, which promoted one of them).
    pub(crate) async fn recheck(&self) {
        let started = Instant::now();
        self.follow(self.current().moves, started).await;
    }

    /// Asks the sentinels for the master (a lookup that finished after the
    /// failure began at `started`) and moves there, unless another request
    /// of this connection moved since `seen` moves.
    async fn follow(&self, seen: u64, started: Instant) {
        let _moving = self.moving.lock().await;
        let current = self.current();
        if current.moves != seen {
            return;
        }
        let client = match self.sentinels.master_since(started).await {
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
