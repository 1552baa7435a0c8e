//! Support for the cross-broker tests: a Kafka mock cluster that lives on
//! its own thread (its handle is not `Send`) until the test process ends.

use std::sync::OnceLock;
use std::time::Duration;

/// The bootstrap servers of this process's Kafka mock cluster, started on first use.
///
/// # Panics
/// If librdkafka cannot start the mock cluster: the test cannot run without it.
pub fn kafka_mock() -> &'static str {
    static BOOTSTRAP: OnceLock<String> = OnceLock::new();
    BOOTSTRAP.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let cluster = match rdkafka::mocking::MockCluster::new(3) {
                Ok(cluster) => cluster,
                Err(e) => panic!("cannot start librdkafka's mock cluster: {e}"),
            };
            let _ = tx.send(cluster.bootstrap_servers());
            loop {
                std::thread::park();
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(bootstrap) => bootstrap,
            Err(e) => panic!("the Kafka mock cluster did not start: {e}"),
        }
    })
}

/// A fresh prefix for topic and group names.
pub fn namespace(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{test}{:x}{nanos:x}.", std::process::id())
}
