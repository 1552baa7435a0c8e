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
use tidings_kafka::PartitionOrder;

struct Kafka(Target);

#[async_trait]
impl Harness for Kafka {
    async fn connect(&self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        // `ordering=key`, not the adapter's default `partition`: the suite's
        // `in_flight_bound` publishes six unkeyed messages and expects three
        // unsettled deliveries at once (prefetch 3), which per-partition
        // order allows only if they happened to land on three different
        // partitions (seen failing with the default: "timed out waiting for
        // a delivery within the bound"). With `key`, records without a key
        // are not held back, so the suite checks the concurrent path, and
        // keyed records (`order_per_key`) still keep their order.
        // `tests/kafka_ordering.rs` proves the default.
        let mut config = self.0.config();
        config.ordering = PartitionOrder::Key;
        let bus = self.0.bus_with(config).await;
        (bus.publisher(), bus.subscriber())
    }

    async fn prepare(&self, topic: &str) {
        // Three partitions, so that members of a group share the load.
        self.0.create_topic(topic, 3).await;
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
