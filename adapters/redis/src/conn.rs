//! Connections to one Redis server, a Redis Cluster or a master behind
//! Redis Sentinel, behind one type, so every command of the adapter is
//! written once for all three.
//!
//! A standalone server and a master behind Redis Sentinel are reached
//! through the redis crate's reconnecting
//! [`ConnectionManager`](redis::aio::ConnectionManager), replaced
//! when the node stops being the master (`follow`); a cluster through its
//! cluster client, which
//! routes each command by its key's hash slot, follows `MOVED`/`ASK`
//! redirections and refreshes the slot map when a node fails over or comes
//! back. Every command Tidings sends names one key (or pipelines commands on
//! one key), so no design of keys is needed for multi-key commands: a
//! topic's stream holds its groups, and its dead-letter stream may live on
//! another node.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};
use tidings_core::Result;

use crate::config::RedisConfig;
use crate::connection_error;
use crate::follow::{Follower, Source};
use crate::sentinel::Sentinels;

/// Makes connections: to the one server, or to the cluster through its seeds.
#[derive(Clone)]
pub(crate) enum Connector {
    /// One server (or a TLS one).
    Single(Box<Client>),
    /// A Redis Cluster: the cluster client, and a plain client per seed
    /// node for Pub/Sub subscriptions (classic `PUBLISH` reaches every node
    /// of a cluster, so any node can serve a subscriber).
    Cluster {
        client: Box<ClusterClient>,
        seeds: Vec<Client>,
    },
    /// The master that Redis Sentinel names, followed across failovers.
    Sentinel(Sentinels),
}

/// A reconnecting, multiplexed connection to a server or a cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    /// One server, or the master behind Redis Sentinel.
    Master(Arc<Follower>),
    /// A cluster.
    Cluster(ClusterConnection),
}

impl Connector {
    /// A connector for `config`: a cluster when it lists several nodes or
    /// says `cluster=true`. `client` builds the client of one node URL
    /// (with its TLS settings).
    pub(crate) fn new(
        config: &RedisConfig,
        client: impl Fn(&str) -> Result<Client>,
    ) -> Result<Self> {
        if let Some(master) = &config.sentinel {
            let certificates = crate::tls_certificates(config)?;
            return crate::sentinel::sentinels(config, master, certificates)
                .map(Connector::Sentinel)
                .map_err(|e| tidings_core::params::invalid("sentinel", e.to_string()));
        }
        if !config.cluster {
            return client(&config.url).map(|c| Connector::Single(Box::new(c)));
        }
        let urls = tidings_core::params::node_urls(&config.url, &config.nodes);
        let seeds = urls.iter().map(|u| client(u)).collect::<Result<Vec<_>>>()?;
        let infos = seeds.iter().map(|c| c.get_connection_info().clone());
        let mut builder = ClusterClient::builder(infos)
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.response_timeout)
            // A command that meets a node going away is tried again after
            // the slot map was refreshed: a few times, with backoff up to
            // the configured longest pause.
            .retries(4)
            .min_retry_wait(20)
            .max_retry_wait(config.max_backoff.as_millis() as u64);
        if let Some(certificates) = crate::tls_certificates(config)? {
            builder = builder.certs(certificates);
        }
        let cluster = builder
            .build()
            .map_err(|e| tidings_core::params::invalid("url", e.to_string()))?;
        Ok(Connector::Cluster {
            client: Box::new(cluster),
            seeds,
        })
    }

    /// A new connection whose replies may take up to `response_timeout`.
    pub(crate) async fn connect(
        &self,
        config: &RedisConfig,
        response_timeout: Duration,
    ) -> Result<Conn> {
        match self {
            Connector::Single(client) => Follower::connect(
                Source::Server(client.clone()),
                manager_settings(config, response_timeout),
            )
            .await
            .map(|f| Conn::Master(Arc::new(f)))
            .map_err(connection_error),
            Connector::Sentinel(sentinels) => Follower::connect(
                Source::Sentinels(sentinels.clone()),
                manager_settings(config, response_timeout),
            )
            .await
            .map(|f| Conn::Master(Arc::new(f)))
            .map_err(|e| match e.kind() {
                // A mistyped master name is the configuration's fault.
                redis::ErrorKind::MasterNameNotFoundBySentinel => tidings_core::params::invalid(
                    "sentinel",
                    format!("the sentinels watch no healthy master of this name: {e}"),
                ),
                _ => connection_error(e),
            }),
            Connector::Cluster { client, .. } => {
                let settings = ClusterConfig::new()
                    .set_connection_timeout(config.connect_timeout)
                    .set_response_timeout(response_timeout);
                client
                    .get_async_connection_with_config(settings)
                    .await
                    .map(Conn::Cluster)
                    .map_err(connection_error)
            }
        }
    }

    /// How many nodes a Pub/Sub subscription may try in turn before an
    /// error is final: a cluster's seeds; one otherwise.
    pub(crate) fn pubsub_nodes(&self) -> usize {
        match self {
            Connector::Cluster { seeds, .. } => seeds.len(),
            _ => 1,
        }
    }

    /// The client a Pub/Sub subscription subscribes through on its
    /// `attempt`-th try: the server; the cluster's seeds in turn (classic
    /// `PUBLISH` reaches every node); the master the sentinels name now.
    pub(crate) async fn pubsub_client(&self, attempt: usize) -> RedisResult<Client> {
        match self {
            Connector::Single(client) => Ok((**client).clone()),
            Connector::Cluster { seeds, .. } => Ok(seeds[attempt % seeds.len()].clone()),
            Connector::Sentinel(sentinels) => sentinels.master().await,
        }
    }
}

/// How a connection manager (of a server, or of a sentinel's master)
/// reconnects: a few quick retries with backoff up to `max_backoff`.
fn manager_settings(config: &RedisConfig, response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(config.connect_timeout))
        .set_number_of_retries(3)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(config.max_backoff)
}

impl Conn {
    /// Checks that the connection still goes to the master, after a write
    /// the master accepted but too few replicas confirmed: behind Redis
    /// Sentinel, the master may be cut off from the sentinels, which
    /// promoted another. Nothing to check for a server or a cluster.
    pub(crate) async fn recheck(&self) {
        if let Conn::Master(follower) = self {
            follower.recheck().await;
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Master(f) => Box::pin(f.command(cmd)),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Master(f) => Box::pin(f.pipeline(pipeline, offset, count)),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Master(f) => f.db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
