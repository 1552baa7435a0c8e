//! Through a real broker: NATS JetStream on 127.0.0.1:4222.

mod common;

use std::time::Duration;

use common::{attr_str, otel, traced_round_trip};
use tidings_core::Receipt;
use tidings_nats::{NatsBus, NatsConfig};
use tidings_otel::names::attr as a;

async fn nats() -> NatsBus {
    let config = NatsConfig::from_url("nats://127.0.0.1:4222?max_age=1h").expect("valid URL");
    NatsBus::connect(config).await.unwrap_or_else(|e| {
        panic!(
            "nats-server with JetStream must run on 127.0.0.1:4222 for this test ({e}); \
             start it with `nats-server -js -a 127.0.0.1 -p 4222 &`"
        )
    })
}

/// The consumer span carries the delivery's JetStream stream and stream
/// sequence, the ones the publish acknowledgement named.
#[tokio::test]
async fn consumer_span_carries_the_stream_sequence() {
    let o = otel(|b| b);
    let bus = nats().await;
    let (topic, receipt, consumer) = traced_round_trip(&o, bus.publisher(), bus.subscriber()).await;
    let Receipt::Sequence {
        stream, sequence, ..
    } = receipt
    else {
        panic!("a JetStream publish returns a stream sequence, got {receipt:?}");
    };

    let process = o.wait_spans(&format!("process {topic}"), 1).await.remove(0);
    assert_eq!(attr_str(&process, a::NATS_STREAM), stream);
    assert_eq!(
        attr_str(&process, a::NATS_STREAM_SEQUENCE),
        sequence.to_string()
    );
    assert_eq!(attr_str(&process, a::MESSAGING_SYSTEM), "nats");
    consumer.shutdown(Duration::from_secs(5)).await;
}
