//! The conformance suite on the in-process bus.

use std::sync::Arc;

use async_trait::async_trait;
use tidings_core::testkit::Harness;
use tidings_core::{Publisher, Subscriber};
use tidings_memory::{MemoryBus, MemoryConfig};

/// Each test gets its own bus; `connect` hands out the same bus each time,
/// as every connection to one broker sees the same topics.
struct Memory(MemoryBus);

#[async_trait]
impl Harness for Memory {
    async fn connect(&self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        (self.0.publisher(), self.0.subscriber())
    }
}

// With a history, so that replay (from the beginning) is tested too.
tidings_core::conformance_tests!(Memory(MemoryBus::with_config(MemoryConfig {
    history: 1_000,
    ..MemoryConfig::default()
})));
