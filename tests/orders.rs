//! The `orders` example's flow on the in-process bus and on every real
//! broker: the same outcome everywhere.
#![allow(clippy::unwrap_used)]

#[path = "../examples/orders/flow.rs"]
#[allow(dead_code)]
mod flow;

use tidings_tests::{kafka_mock, namespace};

const EXPECTED: &[&str] = &[
    "summary: analytics: counted o-1, counted o-2, counted o-3",
    "summary: billing: invoiced o-1, invoiced o-2, invoiced o-3",
    "summary: dead-lettered o-3 (permanent-error: invalid quantity 0)",
    "summary: email: confirmed o-1 on attempt 2, confirmed o-2 on attempt 2, confirmed o-3 on attempt 2",
    "summary: inventory: reserved o-1 x2, reserved o-2 x1, reserved o-3 x0",
    "summary: pdf: rendered inv-o-1 (chained: true), rendered inv-o-2 (chained: true), rendered inv-o-3 (chained: true)",
    "summary: replayed 1 dead letter(s) after the fix",
];

async fn outcome_on(url: &str, how_to_start: &str) {
    let bus = match tidings::connect(url).await {
        Ok(bus) => bus,
        Err(e) => panic!("cannot connect to {url}: {e}; {how_to_start}"),
    };
    let summary = tokio::time::timeout(
        std::time::Duration::from_secs(180),
        flow::run(&bus, &namespace("orders")),
    )
    .await
    .expect("the flow finished within 180 s")
    .expect("the flow ran");
    assert_eq!(summary, EXPECTED, "outcome on {url}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    outcome_on("memory://", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams() {
    outcome_on(
        "redis://127.0.0.1:6379",
        "start Redis with scripts/brokers.sh",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq() {
    outcome_on(
        "amqp://guest:guest@127.0.0.1:5672/%2f?queue_expires=5m",
        "start RabbitMQ with scripts/brokers.sh",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream() {
    outcome_on(
        "nats://127.0.0.1:4222",
        "start NATS with scripts/brokers.sh",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_mock_cluster() {
    let url = format!("kafka://{}?auto_create_topics=true", kafka_mock());
    outcome_on(&url, "librdkafka's mock cluster runs in process").await;
}
