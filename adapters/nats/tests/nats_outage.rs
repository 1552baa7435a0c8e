//! A nats-server with JetStream, of the test's own, killed with SIGKILL
//! twice under a stream of 20,000 confirmed publishes (see
//! `tidings_core::testkit::outage`): nothing confirmed is lost, and the
//! publisher and the consumer resume on their own. Then the same on a
//! three-node cluster (streams replicated three times), killing the node
//! the client is connected to, after the conformance suite's core cases.

use std::sync::Arc;

use async_trait::async_trait;
use tidings_core::testkit::outage::{self, BrokerProcess};
use tidings_core::testkit::{Harness, conformance, unique, within};
use tidings_core::{Publisher, Subscriber};
use tidings_nats::{NatsBus, NatsConfig};

mod support;

struct Nats(support::Server);

#[async_trait]
impl BrokerProcess for Nats {
    async fn kill(&mut self) {
        self.0.kill();
    }

    async fn start(&mut self) {
        self.0.spawn().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twice_nothing_confirmed_is_lost() {
    let mut server = Nats(support::Server::start(None).await);
    let bus = connect(&server.0.addr()).await;
    outage::assert_killed_twice(
        "nats jetstream",
        bus.publisher(),
        bus.subscriber(),
        &mut server,
    )
    .await;
}

/// A member killed while holding deliveries: with the default `ack_wait`
/// (4 s) another member has them within about 4 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_members_deliveries_reach_another_member_within_seconds() {
    let proxy = tidings_core::testkit::FaultProxy::start("127.0.0.1:4222")
        .await
        .expect("proxy");
    let dying = connect(&proxy.addr().to_string()).await;
    let live = connect("127.0.0.1:4222").await;
    outage::assert_dead_member_replaced(
        "nats",
        dying.subscriber(),
        &proxy,
        (live.publisher(), live.subscriber()),
    )
    .await;
}

async fn connect(addr: &str) -> NatsBus {
    connect_url(&format!("nats://{addr}?max_age=1h&connect_timeout=3s")).await
}

async fn connect_url(url: &str) -> NatsBus {
    let config = NatsConfig::from_url(url).expect("config");
    NatsBus::connect(config).await.unwrap_or_else(|e| {
        panic!("cannot reach nats-server at {url} ({e}); start it with `nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/nats-js &`")
    })
}

/// The cluster, and the client whose server is the one to kill.
struct Cluster {
    nodes: Vec<support::Server>,
    client: async_nats::Client,
    killed: Option<usize>,
}

#[async_trait]
impl BrokerProcess for Cluster {
    async fn kill(&mut self) {
        let port = self.client.server_info().port;
        let serving = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .expect("the client is on a node of the cluster");
        self.nodes[serving].kill();
        self.killed = Some(serving);
    }

    async fn start(&mut self) {
        if let Some(node) = self.killed.take() {
            self.nodes[node].spawn().await;
        }
    }
}

struct OnCluster(Arc<String>);

#[async_trait]
impl Harness for OnCluster {
    async fn connect(&self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        let bus = connect_url(&self.0).await;
        (bus.publisher(), bus.subscriber())
    }
}

/// The client is given the first node only and learns the others from it;
/// streams have three replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_runs_the_core_cases_and_loses_nothing_when_its_node_dies() {
    let nodes = support::cluster(3).await;
    let url = format!("{}?replicas=3&ack_wait=5s&max_age=1h", nodes[0].url());
    let bus = connect_url(&url).await;
    // The cluster elects its JetStream leader after it forms: a replicated
    // stream can be made once it has.
    within(
        60,
        "the cluster's JetStream to accept an R3 stream",
        async {
            let probe = unique("cluster-ready");
            while let Err(e) = bus.subscriber().declare_group(&probe, "g").await {
                eprintln!("the cluster is not ready yet: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        },
    )
    .await;
    let h = OnCluster(Arc::new(url));
    conformance::core_cases(&h).await;

    let mut cluster = Cluster {
        nodes,
        client: bus.client().clone(),
        killed: None,
    };
    outage::assert_killed_twice(
        "nats jetstream cluster (3 nodes, R3)",
        bus.publisher(),
        bus.subscriber(),
        &mut cluster,
    )
    .await;
}
