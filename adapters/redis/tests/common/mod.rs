//! Shared test helpers: the harness over a fault proxy, broker checks.
#![allow(dead_code)]

use std::sync::Arc;

use async_trait::async_trait;
use tidings_core::testkit::{FaultProxy, Harness};
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

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts a redis-server of the test's own on loopback, keeping nothing on
/// disk, with `args` added (its ports among them).
pub fn spawn_redis_server(args: &[&str]) -> std::process::Child {
    std::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--daemonize", "no"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("starting redis-server failed: {e}; install Debian's `redis-server`")
        })
}
