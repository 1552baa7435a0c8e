//! Shared test support: the broker under test (librdkafka's in-process mock
//! cluster by default, a real broker through `TIDINGS_KAFKA_BROKERS`).
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tidings_kafka::{KafkaBus, KafkaConfig};

enum Cmd {
    CreateTopic(String, i32, mpsc::Sender<Result<(), String>>),
    CreateReplicated(String, i32, i32, mpsc::Sender<Result<(), String>>),
    Leader(String, i32, i32, mpsc::Sender<Result<(), String>>),
    Down(i32, mpsc::Sender<Result<(), String>>),
    Up(i32, mpsc::Sender<Result<(), String>>),
    FailCommits(usize, mpsc::Sender<Result<(), String>>),
}

/// A mock cluster of three brokers living on its own thread (the handle is
/// not `Send`); it lives until the test process ends.
pub struct Mock {
    tx: Mutex<mpsc::Sender<Cmd>>,
    pub bootstrap: String,
}

pub const BROKERS: [i32; 3] = [1, 2, 3];

impl Mock {
    pub fn start() -> Mock {
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (boot_tx, boot_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let cluster = MockCluster::new(3).expect("start the mock cluster");
            boot_tx.send(cluster.bootstrap_servers()).expect("report");
            while let Ok(cmd) = rx.recv() {
                match cmd {
                    Cmd::CreateTopic(t, n, r) => {
                        let _ = r.send(cluster.create_topic(&t, n, 1).map_err(|e| e.to_string()));
                    }
                    Cmd::CreateReplicated(t, n, replicas, r) => {
                        let _ = r.send(
                            cluster
                                .create_topic(&t, n, replicas)
                                .map_err(|e| e.to_string()),
                        );
                    }
                    Cmd::Leader(t, p, b, r) => {
                        let _ = r.send(
                            cluster
                                .partition_leader(&t, p, Some(b))
                                .map_err(|e| e.to_string()),
                        );
                    }
                    Cmd::Down(b, r) => {
                        let _ = r.send(cluster.broker_down(b).map_err(|e| e.to_string()));
                    }
                    Cmd::Up(b, r) => {
                        let _ = r.send(cluster.broker_up(b).map_err(|e| e.to_string()));
                    }
                    Cmd::FailCommits(n, r) => {
                        // A permanent per-partition error: librdkafka reports
                        // it to the commit callback and does not retry.
                        let errors =
                            vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; n];
                        cluster.request_errors(RDKafkaApiKey::OffsetCommit, &errors);
                        let _ = r.send(Ok(()));
                    }
                }
            }
            // Keep the cluster alive for clients still closing.
            loop {
                std::thread::park();
            }
        });
        let bootstrap = boot_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("mock cluster start");
        Mock {
            tx: Mutex::new(tx),
            bootstrap,
        }
    }

    fn call(&self, cmd: impl FnOnce(mpsc::Sender<Result<(), String>>) -> Cmd) {
        let (tx, rx) = mpsc::channel();
        self.tx.lock().unwrap().send(cmd(tx)).expect("mock thread");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("mock reply")
            .expect("mock op");
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) {
        self.call(|r| Cmd::CreateTopic(topic.to_owned(), partitions, r));
    }

    /// A topic of `partitions`, each replicated on `replicas` brokers.
    pub fn create_replicated_topic(&self, topic: &str, partitions: i32, replicas: i32) {
        self.call(|r| Cmd::CreateReplicated(topic.to_owned(), partitions, replicas, r));
    }

    /// Makes `broker` the leader of `topic`'s `partition`.
    pub fn leader(&self, topic: &str, partition: i32, broker: i32) {
        self.call(|r| Cmd::Leader(topic.to_owned(), partition, broker, r));
    }

    pub fn down(&self, broker: i32) {
        self.call(|r| Cmd::Down(broker, r));
    }

    pub fn up(&self, broker: i32) {
        self.call(|r| Cmd::Up(broker, r));
    }

    /// The next `n` offset commits fail.
    pub fn fail_commits(&self, n: usize) {
        self.call(|r| Cmd::FailCommits(n, r));
    }
}

/// The broker under test.
pub enum Target {
    Mock(Mock),
    Real(String),
}

impl Target {
    /// The mock cluster, unless `TIDINGS_KAFKA_BROKERS` names a real broker.
    pub fn from_env() -> Target {
        match std::env::var("TIDINGS_KAFKA_BROKERS") {
            Ok(b) if !b.trim().is_empty() => Target::Real(b),
            _ => Target::Mock(Mock::start()),
        }
    }

    pub fn brokers(&self) -> String {
        match self {
            Target::Mock(m) => m.bootstrap.clone(),
            Target::Real(b) => b.clone(),
        }
    }

    pub fn config(&self) -> KafkaConfig {
        let mut c = KafkaConfig::new(self.brokers());
        c.auto_create_topics = true;
        c.session_timeout = Duration::from_secs(6);
        c.heartbeat_interval = Duration::from_millis(500);
        c.revoke_timeout = Duration::from_secs(5);
        c.close_timeout = Duration::from_secs(10);
        c
    }

    pub async fn bus(&self) -> KafkaBus {
        self.bus_with(self.config()).await
    }

    pub async fn bus_with(&self, config: KafkaConfig) -> KafkaBus {
        match KafkaBus::connect(config).await {
            Ok(bus) => bus,
            Err(e) => panic!(
                "cannot reach Kafka at {} ({e}). Unset TIDINGS_KAFKA_BROKERS to use the in-process \
                 mock cluster, or start a broker there (see docs/kafka.md)",
                self.brokers()
            ),
        }
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        match self {
            Target::Mock(m) => m.create_topic(topic, partitions),
            Target::Real(_) => {
                let bus = self.bus().await;
                bus.admin()
                    .create_topics(&[topic], partitions, 1)
                    .await
                    .unwrap_or_else(|e| panic!("creating {topic}: {e}"));
            }
        }
    }
}
