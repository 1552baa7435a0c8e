//! The conformance suite against the real Redis, in Streams mode (the default).
//!
//! A short visibility timeout keeps reclaims of abandoned entries quick.

mod common;

const STREAMS: &str = "visibility_timeout=2s&reclaim_interval=200ms&block=200ms";

tidings_core::conformance_tests!(common::Redis::new(STREAMS));

#[tokio::test]
async fn capabilities_of_streams_mode() {
    let bus = common::bus(common::REDIS, STREAMS).await;
    let caps = bus.subscriber().capabilities();
    assert!(!caps.at_most_once);
    assert!(caps.consumer_groups && caps.redelivery && caps.delayed_nack);
    assert!(caps.replay && caps.retains_for_declared_groups && caps.persistent);
}
