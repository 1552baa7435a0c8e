//! Several RabbitMQ nodes in the URL: tried in turn when connecting and on
//! every reconnect.
//!
//! - A real three-node cluster of the test's own (its own node names, ports
//!   and data; the shared broker is untouched): the conformance suite's core
//!   cases on quorum queues replicated to every node, and the node the
//!   client is connected to killed (SIGKILL) and restarted, twice, under
//!   20,000 confirmed publishes: nothing confirmed is lost.
//! - Two fault proxies in front of the one shared broker standing in for two
//!   nodes (quick, and able to refuse connections at will): the node the
//!   connection uses "dies" in the middle of a stream and the adapter moves
//!   to the other.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{BROKER, RabbitNode, config, connect};
use tidings_amqp::QueueType;
use tidings_core::testkit::outage::{self, BrokerProcess};
use tidings_core::testkit::{FaultProxy, Harness, conformance, unique, within};
use tidings_core::{Consumer, Event, HandlerError, Publisher, PublisherExt, Subscriber};

async fn proxy() -> FaultProxy {
    FaultProxy::start(BROKER)
        .await
        .unwrap_or_else(|e| panic!("starting a fault proxy failed: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_node_is_skipped() {
    let (dead, alive) = (proxy().await, proxy().await);
    dead.refuse(true);
    let nodes = format!("{},{}", dead.addr(), alive.addr());
    let bus = connect(config(&nodes, QueueType::Quorum)).await;
    let topic = unique("cluster.start");
    bus.subscriber()
        .declare_group(&topic, "g")
        .await
        .expect("declared through the live node");
    bus.publisher()
        .publish(&topic, tidings_core::Message::new("x"))
        .await
        .expect("confirmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_connected_node_moves_to_the_next_and_loses_nothing_confirmed() {
    let (a, b) = (proxy().await, proxy().await);
    let nodes = format!("{},{}", a.addr(), b.addr());
    let bus = connect(config(&nodes, QueueType::Quorum)).await;
    let topic = unique("cluster.failover");
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let record = seen.clone();
    let consumer = Consumer::group(bus.subscriber(), "billing")
        .handle(&topic, move |e: Event<u32>| {
            record.lock().expect("lock").insert(e.id().to_owned());
            async { Ok::<_, HandlerError>(()) }
        })
        .start()
        .await
        .expect("consumer");
    let publisher = bus.publisher();
    let mut confirmed = Vec::new();
    for n in 0..200u32 {
        if n == 100 {
            // Node A dies: every connection through it is cut, new ones refused.
            a.refuse(true);
            a.cut();
        }
        let mut tries = 0;
        loop {
            let event = Event::new(n);
            let id = event.id().to_owned();
            match publisher.publish_event(&topic, event).await {
                Ok(_) => {
                    confirmed.push(id);
                    break;
                }
                Err(e) if tries < 40 => {
                    tries += 1;
                    assert!(e.is_transient(), "{e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("publishing kept failing after node A died: {e}"),
            }
        }
    }
    within(60, "every confirmed message", async {
        loop {
            {
                let seen = seen.lock().expect("lock");
                if confirmed.iter().all(|id| seen.contains(id)) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// Three nodes joined at boot (classic peer discovery lists them all).
struct Cluster {
    nodes: Vec<RabbitNode>,
    /// The node the client is on: the first listed, then the one after each
    /// node lost (the adapter's order).
    connected: usize,
}

impl Cluster {
    async fn start() -> Cluster {
        let mut nodes: Vec<RabbitNode> = ["a", "b", "c"].into_iter().map(RabbitNode::new).collect();
        let peers: String = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "cluster_formation.classic_config.nodes.{} = {}\n",
                    i + 1,
                    n.name
                )
            })
            .collect();
        let discovery =
            format!("cluster_formation.peer_discovery_backend = classic_config\n{peers}");
        for node in &mut nodes {
            node.configure(&discovery);
            node.spawn();
        }
        for node in &nodes {
            node.serving().await;
        }
        Cluster {
            nodes,
            connected: 0,
        }
    }

    /// Every node, in order, as the URL's node list.
    fn nodes(&self) -> String {
        self.nodes
            .iter()
            .map(RabbitNode::addr)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The node the client is connected to, as the outage test's broker process.
#[async_trait]
impl BrokerProcess for Cluster {
    async fn kill(&mut self) {
        self.nodes[self.connected].kill();
    }

    async fn start(&mut self) {
        let lost = self.connected;
        self.nodes[lost].start().await;
        self.connected = (lost + 1) % self.nodes.len();
    }
}

struct OnCluster(Arc<String>);

#[async_trait]
impl Harness for OnCluster {
    async fn connect(&self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        let bus = connect(config(&self.0, QueueType::Quorum)).await;
        (bus.publisher(), bus.subscriber())
    }
}

/// One cluster for both parts (booting three nodes takes 15-25 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_runs_the_core_cases_and_loses_nothing_when_a_node_dies() {
    let mut cluster = Cluster::start().await;
    let h = OnCluster(Arc::new(cluster.nodes()));
    conformance::core_cases(&h).await;

    let bus = connect(config(&cluster.nodes(), QueueType::Quorum)).await;
    outage::assert_killed_twice(
        "rabbitmq cluster (3 nodes, quorum queue)",
        bus.publisher(),
        bus.subscriber(),
        &mut cluster,
    )
    .await;
}
