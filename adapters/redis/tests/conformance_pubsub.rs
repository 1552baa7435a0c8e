//! The conformance suite against the real Redis, in Pub/Sub mode (at most once).

mod common;

const PUBSUB: &str = "mode=pubsub";

tidings_core::conformance_tests!(common::Redis::new(PUBSUB));

#[tokio::test]
async fn capabilities_of_pubsub_mode() {
    let bus = common::bus(common::REDIS, PUBSUB).await;
    let caps = bus.subscriber().capabilities();
    assert!(caps.at_most_once);
    assert!(!caps.persistent && !caps.redelivery && !caps.delayed_nack);
    assert!(!caps.replay && !caps.retains_for_declared_groups);
}
