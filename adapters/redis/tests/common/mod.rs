//! Shared test helpers: the harness over a fault proxy, broker checks.
#![allow(dead_code)]

use std::sync::Arc;

use async_trait::async_trait;
use tidings_core::testkit::{FaultProxy, Harness, ServerProcess};
use tidings_core::{Publisher, Subscriber};
use tidings_redis::{RedisBus, RedisConfig};
use tokio::sync::OnceCell;

/// The Redis every test talks to.
pub const REDIS: &str = "127.0.0.1:6379";

pub const HOW_TO_START: &str = "Redis must run on 127.0.0.1:6379 for these tests; start it with \
     `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no`";

/// Connects a bus to `addr` with the query `options`, failing loudly when Redis is down.
pub async fn bus(addr: impl std::fmt::Display, options: &str) -> RedisBus {
    let url = format!("redis://{addr}/?{options}");
    let config = RedisConfig::from_url(&url).expect("valid test URL");
    match RedisBus::connect(config).await {
        Ok(bus) => bus,
        Err(e) => panic!("connecting to {url} failed: {e}. {HOW_TO_START}"),
    }
}

/// The conformance harness: every connection goes through a fault proxy in
/// front of the real Redis, so `disrupt` can cut them all.
pub struct Redis {
    options: &'static str,
    proxy: OnceCell<FaultProxy>,
}

impl Redis {
    pub fn new(options: &'static str) -> Self {
        Redis {
            options,
            proxy: OnceCell::new(),
        }
    }

    async fn proxy(&self) -> &FaultProxy {
        self.proxy
            .get_or_init(|| async {
                FaultProxy::start(REDIS)
                    .await
                    .unwrap_or_else(|e| panic!("starting the fault proxy failed: {e}"))
            })
            .await
    }
}

#[async_trait]
impl Harness for Redis {
    async fn connect(&self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        let addr = self.proxy().await.addr();
        let bus = bus(addr, self.options).await;
        (bus.publisher(), bus.subscriber())
    }

    async fn disrupt(&self) -> bool {
        self.proxy().await.cut();
        true
    }
}

pub use tidings_core::testkit::free_port;

/// A loopback port nothing listens on, held (bound, not listening) for as
/// long as the socket lives, so no other server of a parallel test takes
/// it: connecting to it is refused.
pub fn dead_port() -> (u16, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind("127.0.0.1:0".parse().expect("an address"))
        .expect("a port");
    let port = socket.local_addr().expect("its address").port();
    (port, socket)
}

/// A redis-server (or sentinel) of the test's own: its port and data
/// directory stay the same across restarts (see [`ServerProcess`]).
pub struct OwnNode {
    pub port: u16,
    pub args: Vec<String>,
    sentinel: bool,
    process: ServerProcess,
}

impl OwnNode {
    /// A server on a free port, started with `args` added by [`spawn`](Self::spawn).
    pub fn new(name: &str, args: &[&str]) -> OwnNode {
        OwnNode {
            port: free_port(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            sentinel: false,
            process: ServerProcess::new(&format!("redis-{name}")),
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &std::path::Path {
        self.process.dir()
    }

    /// A sentinel on a free port watching the master `name` at `master_port`:
    /// down after 2.5 s (shorter, and a freshly promoted master can look
    /// down to it and be failed over again at once), one sentinel enough
    /// to agree (the quorum).
    pub fn sentinel(master: &str, master_port: u16) -> OwnNode {
        let mut node = OwnNode::new("sentinel", &[]);
        node.sentinel = true;
        let conf = format!(
            "port {}\nbind 127.0.0.1\ndir {}\nlogfile sentinel.log\nsentinel monitor {master} 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds {master} 2500\nsentinel failover-timeout {master} 4000\n",
            node.port,
            node.dir().display()
        );
        std::fs::write(node.dir().join("sentinel.conf"), conf)
            .expect("the sentinel's configuration");
        node
    }

    /// Starts the process (again), with `extra` arguments this time only.
    pub fn spawn(&mut self, extra: &[&str]) {
        let mut command = std::process::Command::new("redis-server");
        if self.sentinel {
            // Sentinel rewrites its configuration file, which comes first.
            command
                .arg(self.dir().join("sentinel.conf"))
                .arg("--sentinel");
        } else {
            command
                .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--save", ""])
                .arg("--dir")
                .arg(self.dir());
        }
        command
            .args(["--daemonize", "no"])
            .args(&self.args)
            .args(extra);
        self.process
            .start(command, "install Debian's `redis-server`");
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    /// A connection once the process answers `PING` (within 15 s).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(format!("redis://{}/", self.addr())).expect("url");
        tidings_core::testkit::within(15, "a redis-server of the test to answer", async {
            loop {
                if let Ok(mut c) = client.get_multiplexed_async_connection().await
                    && redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok()
                {
                    return c;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// Waits (at most `secs` s) until the reply to `command` (`INFO
    /// replication`, `CLUSTER INFO`, ...) holds every one of `lines`; fails
    /// with the last reply, which tells what the node saw instead.
    pub async fn wait_info(&self, command: &[&str], lines: &[&str], secs: u64) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
        let mut c = self.connection().await;
        let mut last = String::from("(no reply yet)");
        loop {
            let mut cmd = redis::cmd(command[0]);
            cmd.arg(&command[1..]);
            match tokio::time::timeout_at(deadline, cmd.query_async::<String>(&mut c)).await {
                Ok(Ok(info)) if lines.iter().all(|l| info.contains(l)) => return,
                Ok(Ok(info)) => last = info,
                Ok(Err(e)) => last = format!("(error: {e})"),
                Err(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} did not report {lines:?} to {command:?} within {secs} s; its last reply:\n{last}",
                    self.addr()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Kills the process with SIGKILL (a crash) and waits for it to exit.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}
