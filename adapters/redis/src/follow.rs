//! Connections that move when the node behind them stops being the master:
//! to the master the sentinels name after a failover, or anew to the
//! server's address when the node there was demoted.
//!
//! A [`ConnectionManager`] reconnects to the same address after a broken
//! connection, but a node that is up and answers `READONLY` (demoted to a
//! replica) or `MASTERDOWN` keeps its connection, so every write fails
//! there for good. So a connection here keeps a manager and, when a command
//! fails in a way a failover explains, makes a new one:
//! - behind Redis Sentinel, to the master the sentinels name now (also when
//!   the node is gone: the manager would wait for it at the old address);
//! - to one server, to the same URL: a managed service's endpoint or a
//!   virtual address moved to the promoted node reaches it only on a new
//!   connection, which resolves the name again.
//!
//! The failed command's error goes back to the caller, who retries as after
//! any connection fault; the next command goes to the new master.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Cmd, ConnectionAddr, Pipeline, RedisResult, Value};
use tracing::{info, warn};

use crate::sentinel::Sentinels;

/// Where a [`Follower`] finds the master.
pub(crate) enum Source {
    /// The sentinels of the master.
    Sentinels(Sentinels),
    /// One server's URL.
    Server(Box<Client>),
}

/// A connection to the current master, moved to the next one after a failover.
pub(crate) struct Follower {
    source: Source,
    settings: ConnectionManagerConfig,
    /// The master's address, its manager, and how many moves came before it.
    current: Mutex<Current>,
    /// Held while moving: one move per failover. It guards when the
    /// connection was made or a move to the server's URL last tried, which
    /// bounds how often one is.
    moving: tokio::sync::Mutex<Instant>,
}

#[derive(Clone)]
struct Current {
    addr: ConnectionAddr,
    manager: ConnectionManager,
    moves: u64,
}

/// The least time between two moves to the same server's URL: a URL that
/// names a replica for good (a mistake of configuration) reconnects at
/// most this often, not on every command.
const SERVER_MOVE_INTERVAL: Duration = Duration::from_secs(1);

impl Follower {
    /// Connects to the master: the one the sentinels name now, or the server.
    pub(crate) async fn connect(
        source: Source,
        settings: ConnectionManagerConfig,
    ) -> RedisResult<Follower> {
        let client = match &source {
            Source::Sentinels(sentinels) => sentinels.master().await?,
            Source::Server(client) => (**client).clone(),
        };
        let manager = manager(&client, &settings).await?;
        Ok(Follower {
            current: Mutex::new(Current {
                addr: client.get_connection_info().addr().clone(),
                manager,
                moves: 0,
            }),
            source,
            settings,
            moving: tokio::sync::Mutex::new(Instant::now()),
        })
    }

    fn current(&self) -> Current {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a failed command's error calls for a move: the node gone
    /// (behind sentinels; a server's own manager reconnects to it), or a
    /// demoted node's error.
    fn moves_on(&self, error: &redis::RedisError) -> bool {
        match self.source {
            Source::Sentinels(_) => crate::is_connection_error(error),
            Source::Server(_) => matches!(
                error.kind(),
                redis::ErrorKind::Server(
                    redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown
                )
            ),
        }
    }

    /// Sends one command to the current master.
    pub(crate) async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let started = Instant::now();
        let mut current = self.current();
        let result = current.manager.req_packed_command(cmd).await;
        let moved = match &result {
            Ok(value) => demoted(value),
            Err(e) => self.moves_on(e),
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
            Err(e) => self.moves_on(e),
        };
        if moved {
            self.follow(current.moves, started).await;
        }
        result
    }

    /// Asks the sentinels whether the master changed, as after a failed
    /// command: for a write the master accepted but no replica confirmed
    /// (it may be cut off from the others, which promoted one of them).
    /// Nothing to ask for one server.
    pub(crate) async fn recheck(&self) {
        if let Source::Sentinels(_) = self.source {
            let started = Instant::now();
            self.follow(self.current().moves, started).await;
        }
    }

    /// Moves to the master (behind sentinels: as found by a lookup that
    /// finished after the failure began at `started`), unless another
    /// request of this connection moved since `seen` moves.
    async fn follow(&self, seen: u64, started: Instant) {
        let mut tried = self.moving.lock().await;
        let current = self.current();
        if current.moves != seen {
            return;
        }
        let client = match &self.source {
            Source::Sentinels(sentinels) => match sentinels.master_since(started).await {
                Ok(client) if client.get_connection_info().addr() == &current.addr => return,
                Ok(client) => client,
                Err(error) => {
                    warn!(%error, "asking the sentinels for the master failed; trying again on the next failure");
                    return;
                }
            },
            Source::Server(_) if tried.elapsed() < SERVER_MOVE_INTERVAL => {
                return;
            }
            Source::Server(client) => {
                // A failed try counts too: commands queued behind it do not
                // each try again at once.
                *tried = Instant::now();
                (**client).clone()
            }
        };
        let addr = client.get_connection_info().addr().clone();
        match manager(&client, &self.settings).await {
            Ok(manager) => {
                match self.source {
                    Source::Sentinels(_) => {
                        info!(from = %current.addr, to = %addr, "the sentinels promoted a new master; moving to it")
                    }
                    Source::Server(_) => {
                        warn!(%addr, "the server answered as a replica (demoted); connecting to its address again")
                    }
                }
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
