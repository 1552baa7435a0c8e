//! A nats-server with JetStream, of the test's own, killed with SIGKILL
//! twice under a stream of 20,000 confirmed publishes (see
//! `tidings_core::testkit::outage`): nothing confirmed is lost, and the
//! publisher and the consumer resume on their own.

use async_trait::async_trait;
use tidings_core::testkit::outage::{self, BrokerProcess};
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
    let config = NatsConfig::from_url(&format!("nats://{addr}?max_age=1h&connect_timeout=3s"))
        .expect("config");
    NatsBus::connect(config).await.unwrap_or_else(|e| {
        panic!("cannot reach nats-server at {addr} ({e}); start it with `nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/nats-js &`")
    })
}
