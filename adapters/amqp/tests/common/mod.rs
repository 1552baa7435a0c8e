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
