//! A RabbitMQ node of the test's own (its own name, ports and data
//! directory; the shared broker is untouched), killed with SIGKILL twice
//! under a stream of 20,000 confirmed publishes to a quorum queue (see
//! `tidings_core::testkit::outage`): nothing confirmed is lost, and the
//! publisher and the consumer resume on their own.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tidings_amqp::QueueType;
use tidings_core::testkit::outage::{self, BrokerProcess};
use tidings_core::testkit::unique;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct RabbitNode {
    port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RabbitNode {
    async fn started() -> Self {
        let dir = std::env::temp_dir().join(unique("tidings-rabbit-outage"));
        std::fs::create_dir_all(&dir).expect("a data directory");
        let port = free_port();
        std::fs::write(
            dir.join("rabbit.conf"),
            format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("config");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins");
        let mut node = RabbitNode {
            port,
            dist_port: free_port(),
            dir,
            child: None,
        };
        node.start().await;
        node
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

#[async_trait]
impl BrokerProcess for RabbitNode {
    async fn kill(&mut self) {
        // The child is the Erlang VM itself (the start script `exec`s it).
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn start(&mut self) {
        let d = &self.dir;
        let child = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
            // Replace the script by the VM, so the child's PID is the broker's.
            .env("RABBITMQ_ALLOW_INPUT", "1")
            .env(
                "RABBITMQ_NODENAME",
                format!("tidings-outage-{}@localhost", self.port),
            )
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbit"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-noinput -kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting a RabbitMQ node failed ({e}); install Debian's `rabbitmq-server`")
            });
        self.child = Some(child);
        // Serving once an AMQP connection opens (2-7 s); bounded.
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("amqp://guest:guest@{}/%2f", self.addr());
        loop {
            let connected =
                lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await;
            if let Ok(conn) = connected {
                let _ = conn.close(200, "OK".into()).await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the RabbitMQ node on {} did not start within 60 s (logs in {})",
                self.addr(),
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twice_nothing_confirmed_is_lost() {
    let mut node = RabbitNode::started().await;
    let bus = common::connect(common::config(&node.addr(), QueueType::Quorum)).await;
    outage::assert_killed_twice(
        "rabbitmq (quorum queue)",
        bus.publisher(),
        bus.subscriber(),
        &mut node,
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
