//! A Redis Cluster of the test's own: three masters on free loopback
//! ports, each with AOF. The conformance suite's core cases run on it in
//! Streams and Pub/Sub mode, with the client given every seed node; and the
//! master serving a topic is killed (SIGKILL) and restarted twice under a
//! stream of 20,000 confirmed publishes: nothing confirmed is lost, the
//! publisher and the consumer recover on their own.
//!
//! Three masters without replicas: a replica promoted after its master died
//! may miss the writes the master confirmed last (Redis replicates
//! asynchronously), so the node is restarted from its own AOF instead;
//! docs/redis.md says what a replicated cluster keeps.

mod common;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use common::OwnNode;
use tidings_core::testkit::outage::{self, BrokerProcess};
use tidings_core::testkit::{Harness, conformance, unique, within};
use tidings_core::{Message, Publisher, Subscriber};
use tidings_redis::{RedisBus, RedisConfig};

/// Slots served by each master: the whole range in three parts.
const SLOTS: [(u16, u16); 3] = [(0, 5460), (5461, 10922), (10923, 16383)];

/// A master of the cluster: a cluster bus port chosen apart from its
/// client port (`port + 10000` may not be free, or not a port at all), AOF
/// and `nodes.conf` in its data directory, kept across restarts.
fn master(name: &str) -> OwnNode {
    let bus = common::free_port().to_string();
    OwnNode::new(
        &format!("cluster-{name}"),
        &[
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &bus,
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
        ],
    )
}

/// Resolves once `node` sees the whole cluster serving every slot.
async fn cluster_ok(node: &OwnNode) {
    node.wait_info(
        &["CLUSTER", "INFO"],
        &["cluster_state:ok", "cluster_known_nodes:3"],
        30,
    )
    .await;
}

/// Three masters sharing the slots, joined into one cluster.
struct Cluster {
    nodes: Vec<OwnNode>,
}

impl Cluster {
    async fn start() -> Cluster {
        let mut nodes: Vec<OwnNode> = ["a", "b", "c"].into_iter().map(master).collect();
        for node in &mut nodes {
            node.spawn(&[]);
        }
        for (node, (first, last)) in nodes.iter().zip(SLOTS) {
            let mut c = node.connection().await;
            let () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query_async(&mut c)
                .await
                .expect("slots assigned");
        }
        let mut first = nodes[0].connection().await;
        for other in &nodes[1..] {
            let bus = other
                .args
                .iter()
                .position(|a| a == "--cluster-port")
                .map(|i| other.args[i + 1].clone())
                .expect("a cluster bus port");
            let () = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(other.port)
                .arg(bus)
                .query_async(&mut first)
                .await
                .expect("nodes meet");
        }
        for node in &nodes {
            cluster_ok(node).await;
        }
        Cluster { nodes }
    }

    /// The URL listing every master as a seed node, with `options`.
    fn url(&self, options: &str) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis://{}/?{options}", seeds.join(","))
    }

    async fn bus(&self, options: &str) -> RedisBus {
        let config = RedisConfig::from_url(&self.url(options)).expect("a valid cluster URL");
        assert!(config.cluster);
        RedisBus::connect(config)
            .await
            .unwrap_or_else(|e| panic!("connecting to the cluster failed: {e}"))
    }

    /// The index of the master serving `key`.
    async fn owner(&self, key: &str) -> usize {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut self.nodes[0].connection().await)
            .await
            .expect("the key's slot");
        SLOTS
            .iter()
            .position(|(first, last)| (*first..=*last).contains(&slot))
            .expect("every slot is served")
    }
}

/// The conformance harness on a cluster: every connection is the cluster
/// client's; faults are this file's own test.
struct OnCluster {
    cluster: Arc<Cluster>,
    options: &'static str,
}

#[async_trait]
impl Harness for OnCluster {
    async fn connect(&self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        let bus = self.cluster.bus(self.options).await;
        (bus.publisher(), bus.subscriber())
    }
}

const STREAMS: &str = "visibility_timeout=2s&reclaim_interval=200ms&block=200ms";

/// The core cases, one after another on one cluster (one cluster start for
/// all; every case's topics are its own, so they land on every master).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_conformance_cases_on_a_cluster() {
    let h = OnCluster {
        cluster: Arc::new(Cluster::start().await),
        options: STREAMS,
    };
    conformance::core_cases(&h).await;
    conformance::volume(&h).await;
    conformance::isolation(&h).await;
    conformance::fan_out(&h).await;
    conformance::undecodable_payload_dead_lettered(&h).await;
    conformance::replay_from_earliest(&h).await;
    conformance::in_flight_bound(&h).await;
    conformance::api_contract(&h).await;
}

/// Pub/Sub on a cluster: classic `PUBLISH` reaches every node, so a
/// subscriber on one seed gets what is published through any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_mode_on_a_cluster() {
    let h = OnCluster {
        cluster: Arc::new(Cluster::start().await),
        options: "mode=pubsub",
    };
    conformance::round_trip(&h).await;
    conformance::fan_out(&h).await;
    conformance::competing_consumers(&h).await;
}

/// A seed list whose first node is down still connects (the cluster client
/// learns the slot map from any seed), and a group's stats read across nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_seed_is_skipped_and_groups_report_across_nodes() {
    let cluster = Cluster::start().await;
    let (dead, _held) = common::dead_port();
    let seeds: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let url = format!("redis://127.0.0.1:{dead},{}/", seeds.join(","));
    let bus = RedisBus::connect(RedisConfig::from_url(&url).expect("url"))
        .await
        .expect("connected through the live seeds");
    let topic = unique("cluster-groups");
    bus.subscriber()
        .declare_group(&topic, "billing")
        .await
        .expect("declared");
    for n in 0..3 {
        bus.publisher()
            .publish(&topic, Message::new(format!("m{n}")))
            .await
            .expect("published");
    }
    let groups = bus
        .subscriber()
        .groups(&topic, &[])
        .await
        .expect("group stats");
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0].group, "billing");
    assert_eq!(groups[0].lag, Some(3), "{groups:?}");
    assert_eq!(groups[0].dead_letters, Some(0), "{groups:?}");
}

/// The idempotency layer's Redis store on a cluster, through the bus's
/// connection: every command is routed by its key, so on every master a
/// key is claimed, found in progress and completed, and another claimed
/// and released (the release is a script: `EVALSHA`, loaded on first use).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_store_reaches_every_master_through_the_bus_connection() {
    use std::collections::HashMap;
    use std::time::Duration;
    use tidings_middleware::idempotency::{Claim, IdempotencyStore, RedisStore};

    let cluster = Cluster::start().await;
    let bus = cluster.bus("").await;
    let prefix = format!("{}:", unique("idem"));
    let store = RedisStore::new(bus.connection()).prefix(&prefix);
    let (lease, ttl) = (Duration::from_secs(30), Duration::from_secs(60));
    // Two keys per master (bounded: a few hundred random slots cover three
    // masters twice over for any practical purpose).
    let mut by_master: HashMap<usize, Vec<String>> = HashMap::new();
    for n in 0..300 {
        let key = format!("order-{n}");
        let keys = by_master
            .entry(cluster.owner(&format!("{prefix}{key}")).await)
            .or_default();
        if keys.len() < 2 {
            keys.push(key);
        }
        if by_master.len() == SLOTS.len() && by_master.values().all(|k| k.len() == 2) {
            break;
        }
    }
    assert!(
        by_master.len() == SLOTS.len() && by_master.values().all(|k| k.len() == 2),
        "two keys on every master: {by_master:?}"
    );
    within(30, "the store's commands on every master", async {
        for keys in by_master.values() {
            let (done, released) = (&keys[0], &keys[1]);
            let mut claims = Vec::new();
            for key in [done, released] {
                let Claim::Claimed(claim) = store.claim(key, lease).await.expect("claim") else {
                    panic!("{key} is free");
                };
                claims.push(claim);
                assert_eq!(
                    store.claim(key, lease).await.expect("claim"),
                    Claim::InProgress
                );
            }
            store.complete(done, ttl).await.expect("complete");
            assert_eq!(store.claim(done, lease).await.expect("claim"), Claim::Done);
            store.release(released, claims[1]).await.expect("release");
            assert!(matches!(
                store.claim(released, lease).await.expect("claim"),
                Claim::Claimed(_)
            ));
        }
    })
    .await;
}

/// The master serving one topic, as the outage test's broker process.
struct TopicMaster<'a> {
    cluster: &'a mut Cluster,
    index: usize,
}

#[async_trait]
impl BrokerProcess for TopicMaster<'_> {
    async fn kill(&mut self) {
        self.cluster.nodes[self.index].kill();
    }

    async fn start(&mut self) {
        let node = &mut self.cluster.nodes[self.index];
        node.spawn(&[]);
        cluster_ok(node).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_master_of_a_topic_loses_no_confirmed_message() {
    let mut cluster = Cluster::start().await;
    let bus = cluster.bus("").await;
    let topic = unique("cluster-outage");
    let index = cluster.owner(&topic).await;
    let started = Instant::now();
    outage::assert_killed_twice_on(
        "redis cluster (3 masters, AOF everysec)",
        &topic,
        bus.publisher(),
        bus.subscriber(),
        &mut TopicMaster {
            cluster: &mut cluster,
            index,
        },
    )
    .await;
    eprintln!(
        "the master of slot range {:?} killed twice; {:.1} s in all",
        SLOTS[index],
        started.elapsed().as_secs_f64()
    );
}
