//! The conformance suite against librdkafka's in-process mock cluster (the
//! default), or against a real broker named by `TIDINGS_KAFKA_BROKERS`:
//!
//! ```text
//! TIDINGS_KAFKA_BROKERS=127.0.0.1:9092 cargo test -p tidings-kafka --test conformance
//! ```

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{BROKERS, Target};
use tidings_core::testkit::Harness;
use tidings_core::{Publisher, Subscriber};

struct Kafka(Target);

#[async_trait]
impl Harness for Kafka {
    async fn connect(&self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        let bus = self.0.bus().await;
        (bus.publisher(), bus.subscriber())
    }

    async fn prepare(&self, topic: &str) {
        // Kafka orders per partition only. The replay test expects the whole
        // topic back in publish order, which needs a single-partition topic;
        // every other topic gets three partitions so that groups share load.
        let partitions = if topic.starts_with("tk-replay-") {
            1
        } else {
            3
        };
        self.0.create_topic(topic, partitions).await;
    }

    async fn disrupt(&self) -> bool {
        match &self.0 {
            Target::Mock(mock) => {
                for b in BROKERS {
                    mock.down(b);
                }
                // The outage lasts a moment; publishes in it wait or fail.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                for b in BROKERS {
                    mock.up(b);
                }
                true
            }
            Target::Real(_) => false,
        }
    }
}

tidings_core::conformance_tests!(Kafka(Target::from_env()));
