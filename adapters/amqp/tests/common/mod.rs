//! Shared test helpers: reaching the real RabbitMQ on 127.0.0.1:5672.
#![allow(dead_code)]

use tidings_amqp::{AmqpBus, AmqpConfig, QueueType};

/// The broker the tests use.
pub const BROKER: &str = "127.0.0.1:5672";

/// The URL of `addr` with the test exchange. Test queues expire 3 minutes
/// after last use: the shared RabbitMQ runs with 1,024 file descriptors, and a
/// few hundred idle quorum queues come close to using them all up (see
/// `docs/amqp.md`, Tests).
pub fn config(addr: &str, queue_type: QueueType) -> AmqpConfig {
    AmqpConfig::from_url(&format!(
        "amqp://guest:guest@{addr}/%2f?exchange=tidings-test&queue_type={}&queue_expires=3m",
        queue_type.as_str()
    ))
    .expect("test config")
}

/// Connects, failing loudly with how to start the broker.
pub async fn connect(config: AmqpConfig) -> AmqpBus {
    match AmqpBus::connect(config).await {
        Ok(bus) => bus,
        Err(e) => panic!(
            "RabbitMQ is not reachable at {BROKER} ({e}). Start it: `rabbitmq-server -detached` \
             then wait for `rabbitmq-diagnostics -q check_port_connectivity` (guest/guest on 127.0.0.1:5672)"
        ),
    }
}

pub use tidings_core::testkit::free_port;

/// A RabbitMQ node of the test's own: its own name, ports and data
/// directory (the shared broker is untouched), kept across restarts; killed
/// (SIGKILL) and its directory removed when dropped.
pub struct RabbitNode {
    pub port: u16,
    dist_port: u16,
    /// `tidings-<tag>-<port>@localhost`.
    pub name: String,
    process: tidings_core::testkit::ServerProcess,
}

impl RabbitNode {
    /// A node on free ports, not configured or started yet.
    pub fn new(tag: &str) -> Self {
        let process = tidings_core::testkit::ServerProcess::new(&format!("rabbit-{tag}"));
        std::fs::write(process.dir().join("enabled_plugins"), "[].\n").expect("plugins");
        let port = free_port();
        RabbitNode {
            port,
            dist_port: free_port(),
            name: format!("tidings-{tag}-{port}@localhost"),
            process,
        }
    }

    /// Writes the node's configuration: its listener on loopback, guest
    /// allowed from there, and `extra` lines (`rabbitmq.conf` syntax).
    pub fn configure(&self, extra: &str) {
        std::fs::write(
            self.process.dir().join("rabbit.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{}\nloopback_users = none\n{extra}",
                self.port
            ),
        )
        .expect("config");
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the node's VM, without waiting for it.
    pub fn spawn(&mut self) {
        let d = self.process.dir();
        let mut command = std::process::Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
        command
            // Replace the script by the VM, so the child's PID is the broker's.
            .env("RABBITMQ_ALLOW_INPUT", "1")
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbit"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", d.join("feature_flags"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-noinput -kernel inet_dist_use_interface {127,0,0,1}",
            );
        self.process
            .start(command, "install Debian's `rabbitmq-server`");
    }

    /// Resolves once an AMQP connection to the node opens (within 120 s).
    pub async fn serving(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let url = format!("amqp://guest:guest@{}/%2f", self.addr());
        loop {
            let connected =
                lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await;
            if let Ok(conn) = connected {
                let _ = conn.close(200, "OK".into()).await;
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the RabbitMQ node on {} did not start within 120 s (logs in {})",
                self.addr(),
                self.process.dir().display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Starts the node and waits until it serves.
    pub async fn start(&mut self) {
        self.spawn();
        self.serving().await;
    }

    /// Kills the VM with SIGKILL (a crash) and waits for it to exit.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}
