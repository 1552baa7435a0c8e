//! A RabbitMQ node of the test's own (its own name, ports and data
//! directory; the shared broker is untouched), killed with SIGKILL twice
//! under a stream of 20,000 confirmed publishes to a quorum queue (see
//! `tidings_core::testkit::outage`): nothing confirmed is lost, and the
//! publisher and the consumer resume on their own.

mod common;

use async_trait::async_trait;
use common::RabbitNode;
use tidings_amqp::QueueType;
use tidings_core::testkit::outage::{self, BrokerProcess};

/// The node, restarted from its own data.
struct Outage(RabbitNode);

#[async_trait]
impl BrokerProcess for Outage {
    async fn kill(&mut self) {
        self.0.kill();
    }

    async fn start(&mut self) {
        self.0.start().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twice_nothing_confirmed_is_lost() {
    let mut node = RabbitNode::new("outage");
    node.configure("");
    node.start().await;
    let bus = common::connect(common::config(&node.addr(), QueueType::Quorum)).await;
    outage::assert_killed_twice(
        "rabbitmq (quorum queue)",
        bus.publisher(),
        bus.subscriber(),
        &mut Outage(node),
    )
    .await;
}

/// A member killed while holding deliveries: RabbitMQ requeues them when
/// its connection closes, so another member has them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_members_deliveries_reach_another_member_within_seconds() {
    let proxy = tidings_core::testkit::FaultProxy::start(common::BROKER)
        .await
        .expect("proxy");
    let dying = common::connect(common::config(&proxy.addr().to_string(), QueueType::Quorum)).await;
    let live = common::connect(common::config(common::BROKER, QueueType::Quorum)).await;
    outage::assert_dead_member_replaced(
        "rabbitmq",
        dying.subscriber(),
        &proxy,
        (live.publisher(), live.subscriber()),
    )
    .await;
}
