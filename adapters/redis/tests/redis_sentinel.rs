//! Redis behind Sentinel, of the test's own: a master, a replica and a
//! sentinel on free loopback ports. The conformance suite's core cases run
//! through the sentinel (the client is given the sentinels, never the
//! master); and the master is killed (SIGKILL) twice under a stream of
//! 20,000 publishes each confirmed by the replica (`wait_replicas=1`): the
//! sentinel promotes the replica, the adapter follows it, nothing confirmed
//! is lost. The killed node comes back as the new master's replica, ready
//! for the next failover.
//!
//! One sentinel (quorum 1) keeps the test quick; production runs three or
//! more, which changes how the failover is agreed on, not what the client does.

mod common;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use common::OwnNode;
use tidings_core::testkit::outage::{self, BrokerProcess};
use tidings_core::testkit::{Harness, conformance, unique, within};
use tidings_core::{Message, Publisher, Subscriber};
use tidings_redis::{RedisBus, RedisConfig};

/// Two data nodes (one master, one replica at a time) and their sentinel.
struct Watched {
    nodes: [OwnNode; 2],
    sentinel: OwnNode,
    /// The name the sentinel knows the master by: unique to the test, so a
    /// client that reached another test's sentinel would find nothing.
    name: String,
    /// The node that was master when last asked.
    master: usize,
    /// A sentinel address nothing answers on, listed first in the URL.
    dead: (u16, tokio::net::TcpSocket),
}

impl Watched {
    async fn start() -> Watched {
        let mut nodes = [OwnNode::new("primary", &[]), OwnNode::new("secondary", &[])];
        nodes[0].spawn(&[]);
        let _ = nodes[0].connection().await;
        let port = nodes[0].port.to_string();
        nodes[1].spawn(&["--replicaof", "127.0.0.1", &port]);
        nodes[1]
            .wait_info(&["INFO", "replication"], &["master_link_status:up"], 15)
            .await;
        // The sentinel learns the replica from the master's INFO, at once
        // when it starts.
        let name = unique("master");
        let mut sentinel = OwnNode::sentinel(&name, nodes[0].port);
        sentinel.spawn(&[]);
        sentinel
            .wait_info(&["INFO", "sentinel"], &["status=ok", "slaves=1"], 30)
            .await;
        Watched {
            nodes,
            sentinel,
            name,
            master: 0,
            dead: common::dead_port(),
        }
    }

    /// The URL naming a dead sentinel first, then the live one.
    fn url(&self, options: &str) -> String {
        format!(
            "redis://127.0.0.1:{},{}/0?sentinel={}&{options}",
            self.dead.0,
            self.sentinel.addr(),
            self.name
        )
    }

    async fn bus(&self, options: &str) -> RedisBus {
        let config = RedisConfig::from_url(&self.url(options)).expect("a valid sentinel URL");
        RedisBus::connect(config)
            .await
            .unwrap_or_else(|e| panic!("connecting through the sentinel failed: {e}"))
    }

    /// Waits until the sentinel names the other node as the master.
    async fn promoted(&self) -> usize {
        let next = 1 - self.master;
        let address = format!("address={}", self.nodes[next].addr());
        self.sentinel
            .wait_info(&["INFO", "sentinel"], &["status=ok", &address], 60)
            .await;
        next
    }
}

impl Watched {
    /// Waits until the sentinel lists `node` as a replica that is up: no
    /// `s_down` or `disconnected` flag, its link to the master `ok`.
    async fn replica_up(&self, node: usize) {
        let port = self.nodes[node].port.to_string();
        let mut c = self.sentinel.connection().await;
        within(30, "the sentinel to see the restarted replica up", async {
            loop {
                let replicas: Vec<Vec<String>> = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg(&self.name)
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default();
                let up = replicas.iter().any(|fields| {
                    let field = |name: &str| {
                        fields
                            .chunks(2)
                            .find(|kv| kv[0] == name)
                            .map(|kv| kv[1].as_str())
                    };
                    field("port") == Some(&port)
                        && field("flags") == Some("slave")
                        && field("master-link-status") == Some("ok")
                });
                if up {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await;
    }
}

/// The master of the moment, as the outage test's broker process: killed,
/// and started again as the promoted node's replica once the sentinel
/// promoted it (what the sentinel would make of it on its own, sooner).
#[async_trait]
impl BrokerProcess for Watched {
    async fn kill(&mut self) {
        self.nodes[self.master].kill();
    }

    async fn start(&mut self) {
        let old = self.master;
        self.master = self.promoted().await;
        let port = self.nodes[self.master].port.to_string();
        self.nodes[old].spawn(&["--replicaof", "127.0.0.1", &port]);
        self.nodes[old]
            .wait_info(&["INFO", "replication"], &["master_link_status:up"], 30)
            .await;
        // Ready for the next failover once the sentinel sees the replica up
        // (it lists the killed master as a replica at once, flagged down).
        self.replica_up(old).await;
    }
}

struct ThroughSentinel {
    watched: Arc<Watched>,
    options: &'static str,
}

#[async_trait]
impl Harness for ThroughSentinel {
    async fn connect(&self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        let bus = self.watched.bus(self.options).await;
        (bus.publisher(), bus.subscriber())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_conformance_cases_through_a_sentinel() {
    let h = ThroughSentinel {
        watched: Arc::new(Watched::start().await),
        options: "visibility_timeout=2s&reclaim_interval=200ms&block=200ms&wait_replicas=1",
    };
    conformance::core_cases(&h).await;
    conformance::replay_from_earliest(&h).await;
    let pubsub = ThroughSentinel {
        watched: h.watched.clone(),
        options: "mode=pubsub",
    };
    conformance::round_trip(&pubsub).await;
}

/// A replica that cannot confirm in time makes the publish a transient error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_no_replica_confirmed_is_a_transient_error() {
    let mut watched = Watched::start().await;
    let bus = watched.bus("wait_replicas=1&wait_timeout=200ms").await;
    let topic = unique("sentinel-wait");
    bus.publisher()
        .publish(&topic, Message::new("confirmed by the replica"))
        .await
        .expect("confirmed");
    watched.nodes[1].kill();
    let error = bus
        .publisher()
        .publish(&topic, Message::new("no replica to confirm it"))
        .await
        .expect_err("no replica confirmed it");
    assert!(error.is_transient(), "{error}");
    assert!(error.to_string().contains("replicas"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_twice_loses_no_confirmed_message() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut watched = Watched::start().await;
    let bus = watched.bus("wait_replicas=1&max_backoff=200ms").await;
    let started = Instant::now();
    outage::assert_killed_twice(
        "redis sentinel (master + replica, wait_replicas=1)",
        bus.publisher(),
        bus.subscriber(),
        &mut watched,
    )
    .await;
    eprintln!(
        "two failovers; {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}
