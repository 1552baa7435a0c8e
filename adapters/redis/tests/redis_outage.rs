//! A Redis server with AOF, of the test's own, killed with SIGKILL twice
//! under a stream of 20,000 confirmed publishes (see
//! `tidings_core::testkit::outage`): nothing confirmed is lost, and the
//! publisher and the consumer resume on their own.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tidings_core::testkit::outage::{self, BrokerProcess};
use tidings_core::testkit::unique;

struct RedisProcess {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisProcess {
    async fn started() -> Self {
        let dir = std::env::temp_dir().join(format!("tidings-redis-outage-{}", unique("aof")));
        std::fs::create_dir_all(&dir).expect("a data directory");
        let mut p = RedisProcess {
            port: common::free_port(),
            dir,
            child: None,
        };
        p.start().await;
        p
    }

    fn url(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

#[async_trait]
impl BrokerProcess for RedisProcess {
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn start(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting redis-server failed: {e}; {}",
                    common::HOW_TO_START
                )
            });
        self.child = Some(child);
        // Serving once PING answers PONG (not LOADING); bounded.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let client = redis::Client::open(format!("redis://{}/", self.url())).expect("url");
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut c).await;
                if pong.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start within 15 s",
                self.url()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisProcess {
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
    let mut redis = RedisProcess::started().await;
    let bus = common::bus(redis.url(), "").await;
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
