//! Kafka with several brokers (librdkafka's mock cluster, three brokers;
//! the conformance suite runs on it too): the broker leading a topic's
//! partitions goes down twice under a stream of 20,000 publishes, each
//! awaiting its acknowledgement, while a consumer group handles them (see
//! `tidings_core::testkit::outage`). The partitions are replicated three
//! times and their leadership moves to a live broker, as a controller
//! would; the broker comes back after. Nothing confirmed is lost.

mod common;

use std::time::Duration;

use async_trait::async_trait;
use common::{BROKERS, Mock, Target};
use tidings_core::testkit::outage::{self, BrokerProcess};
use tidings_core::testkit::unique;

const PARTITIONS: i32 = 3;

/// The broker leading every partition of the topic: down, leadership to
/// the next broker, up again.
struct Leader<'a> {
    mock: &'a Mock,
    topic: String,
    /// Index in `BROKERS` of the leader.
    leader: usize,
}

impl Leader<'_> {
    fn lead_all(&self) {
        for partition in 0..PARTITIONS {
            self.mock
                .leader(&self.topic, partition, BROKERS[self.leader]);
        }
    }
}

#[async_trait]
impl BrokerProcess for Leader<'_> {
    async fn kill(&mut self) {
        self.mock.down(BROKERS[self.leader]);
        self.leader = (self.leader + 1) % BROKERS.len();
        self.lead_all();
    }

    async fn start(&mut self) {
        let down = (self.leader + BROKERS.len() - 1) % BROKERS.len();
        self.mock.up(BROKERS[down]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leading_broker_lost_twice_loses_no_confirmed_message() {
    let target = Target::from_env();
    let Target::Mock(mock) = &target else {
        panic!(
            "leader failover needs librdkafka's mock cluster: unset TIDINGS_KAFKA_BROKERS (a real cluster's failover is not scripted here)"
        );
    };
    let topic = unique("failover");
    mock.create_replicated_topic(&topic, PARTITIONS, 3);
    let mut leader = Leader {
        mock,
        topic: topic.clone(),
        leader: 0,
    };
    leader.lead_all();
    let mut config = target.config();
    config.publish_timeout = Duration::from_secs(30);
    // One publish at a time, each awaited: no batch to wait for.
    config.linger = Duration::ZERO;
    let bus = target.bus_with(config).await;
    outage::assert_killed_twice_on(
        "kafka mock cluster (3 brokers, replication 3)",
        &topic,
        bus.publisher(),
        bus.subscriber(),
        &mut leader,
    )
    .await;
}
