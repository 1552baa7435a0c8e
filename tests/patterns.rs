//! The event-driven pattern examples, run as tests on the in-process bus and
//! on real brokers.
#![allow(clippy::unwrap_used)]

#[path = "../examples/batching.rs"]
mod batching;
#[path = "../examples/projector.rs"]
mod projector;
#[path = "../examples/publish_and_wait.rs"]
mod publish_and_wait;
#[path = "../examples/schema_upcast.rs"]
mod schema_upcast;

use std::collections::BTreeMap;

use tidings_tests::{kafka_mock, namespace};

const NATS: &str = "nats://127.0.0.1:4222";
const REDIS: &str = "redis://127.0.0.1:6379";
/// Test queues expire 5 minutes after their last use, so runs leave nothing behind.
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f?queue_expires=5m";

async fn bus(url: &str) -> tidings::Bus {
    tidings::connect(url).await.unwrap_or_else(|e| {
        panic!("cannot connect to {url}: {e}; start the brokers with scripts/brokers.sh")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_versions_are_upcast() {
    for url in ["memory://", NATS, AMQP, REDIS] {
        let seen = schema_upcast::demo(&bus(url).await, &namespace("upcast"))
            .await
            .unwrap();
        let names: Vec<_> = seen
            .iter()
            .map(|c| format!("{} {}", c.first_name, c.last_name))
            .collect();
        assert_eq!(names, ["Ada Lovelace", "Grace Hopper"], "on {url}");
    }
}

fn expected_balances() -> BTreeMap<String, i64> {
    [("acc-1", 600), ("acc-2", 1000), ("acc-3", 100)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_builds_and_rebuilds_by_replay() {
    let (live, rebuilt) = projector::demo(&bus("memory://").await, &namespace("proj"))
        .await
        .unwrap();
    assert_eq!(live, expected_balances());
    assert_eq!(
        rebuilt, None,
        "the in-process bus keeps no history by default"
    );
    let kafka = format!("kafka://{}?auto_create_topics=true", kafka_mock());
    for url in ["memory://?history=100", NATS, REDIS, kafka.as_str()] {
        let (live, rebuilt) = projector::demo(&bus(url).await, &namespace("proj"))
            .await
            .unwrap();
        assert_eq!(live, expected_balances(), "live on {url}");
        assert_eq!(rebuilt, Some(expected_balances()), "rebuilt on {url}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_wait_returns_after_the_group_handled_it() {
    for url in ["memory://", NATS, AMQP] {
        assert!(
            publish_and_wait::demo(&bus(url).await, &namespace("wait"))
                .await
                .unwrap(),
            "on {url}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_confirmed_and_handled() {
    for url in ["memory://", NATS, AMQP] {
        assert_eq!(
            batching::demo(&bus(url).await, &namespace("batch"), 500)
                .await
                .unwrap(),
            500,
            "on {url}"
        );
    }
}
