//! A nats-server with JetStream, of the test's own, killed with SIGKILL
//! twice under a stream of 20,000 confirmed publishes (see
//! `tidings_core::testkit::outage`): nothing confirmed is lost, and the
//! publisher and the consumer resume on their own.

use std::time::Duration;

use async_trait::async_trait;
use tidings_core::testkit::outage::{self, BrokerProcess};
use tidings_core::testkit::unique;
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
    let config =
        NatsConfig::from_url(&format!("nats://{}?max_age=1h", server.0.addr())).expect("config");
    let bus = NatsBus::connect(config).await.expect("connected");
    let topic = unique("outage");
    let report = outage::run(
        bus.publisher(),
        bus.subscriber(),
        &topic,
        "g",
        &mut server,
        20_000,
        Duration::from_secs(60),
    )
    .await;
    eprintln!("nats jetstream: {report}");
    assert!(
        report.lost.is_empty(),
        "confirmed but never handled: {report}"
    );
    for resumed in report.publish_resumed.iter().chain(&report.consume_resumed) {
        assert!(*resumed < Duration::from_secs(30), "{report}");
    }
}

/// A member killed while holding deliveries: with the default `ack_wait`
/// (5 s) another member has them within about 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_members_deliveries_reach_another_member_within_seconds() {
    let proxy = tidings_core::testkit::FaultProxy::start("127.0.0.1:4222")
        .await
        .expect("proxy");
    let connect = |addr: String| async move {
        let config = NatsConfig::from_url(&format!("nats://{addr}?max_age=1h&connect_timeout=3s"))
            .expect("config");
        NatsBus::connect(config).await.unwrap_or_else(|e| {
            panic!("cannot reach nats-server at {addr} ({e}); start it with `nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/nats-js &`")
        })
    };
    let dying = connect(proxy.addr().to_string()).await;
    let live = connect("127.0.0.1:4222".to_owned()).await;
    let topic = unique("dead-member");
    // The stream must exist before the dying member's subscription.
    let elapsed = outage::member_dies_holding(
        dying.subscriber(),
        &proxy,
        (live.publisher(), live.subscriber()),
        &topic,
        "g",
        5,
    )
    .await;
    eprintln!("nats: a dead member's deliveries were handled by another after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(15), "{elapsed:?}");
}
