//! A Redis server with AOF, of the test's own, killed with SIGKILL twice
//! under a stream of 20,000 confirmed publishes (see
//! `tidings_core::testkit::outage`): nothing confirmed is lost, and the
//! publisher and the consumer resume on their own.

mod common;

use async_trait::async_trait;
use common::OwnNode;
use tidings_core::testkit::outage::{self, BrokerProcess};

/// The server, with AOF: restarted from its own data.
struct RedisProcess(OwnNode);

#[async_trait]
impl BrokerProcess for RedisProcess {
    async fn kill(&mut self) {
        self.0.kill();
    }

    async fn start(&mut self) {
        self.0.spawn(&[]);
        // Serving once PING answers PONG (not LOADING); bounded.
        let _ = self.0.connection().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twice_nothing_confirmed_is_lost() {
    let mut redis = RedisProcess(OwnNode::new(
        "outage",
        &["--appendonly", "yes", "--appendfsync", "everysec"],
    ));
    redis.start().await;
    let bus = common::bus(redis.0.addr(), "").await;
    outage::assert_killed_twice(
        "redis (AOF everysec)",
        bus.publisher(),
        bus.subscriber(),
        &mut redis,
    )
    .await;
}

/// A member killed while holding entries: with the default visibility
/// timeout (4 s) another member has them within about 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_members_entries_reach_another_member_within_seconds() {
    let proxy = tidings_core::testkit::FaultProxy::start(common::REDIS)
        .await
        .expect("proxy");
    let dying = common::bus(proxy.addr(), "").await;
    let live = common::bus(common::REDIS, "").await;
    outage::assert_dead_member_replaced(
        "redis",
        dying.subscriber(),
        &proxy,
        (live.publisher(), live.subscriber()),
    )
    .await;
}
