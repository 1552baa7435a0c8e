//! Through a real broker: Redis Streams on 127.0.0.1:6379.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assert_span, attr_str, otel, traced_round_trip};
use opentelemetry::trace::SpanKind;
use tidings_core::middleware::LayeredPublisher;
use tidings_core::{
    Backoff, Consumer, Event, HandlerError, Message, Publisher, Receipt, RetryPolicy,
};
use tidings_otel::names::{attr as a, metric as m};
use tidings_redis::{RedisBus, RedisConfig};

type Json = serde_json::Value;

async fn redis() -> RedisBus {
    let config = RedisConfig::from_url("redis://127.0.0.1:6379").expect("valid URL");
    RedisBus::connect(config).await.unwrap_or_else(|e| {
        panic!(
            "Redis must run on 127.0.0.1:6379 for this test ({e}); start it with \
             `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no`"
        )
    })
}

/// A message published on one side and handled on the other through Redis:
/// the consumer span is in the producer's trace with the right attributes;
/// a retry then a dead letter show up in the metrics.
#[tokio::test]
async fn trace_continues_through_redis() {
    let o = otel(|b| b.max_attempts(2));
    let bus = redis().await;
    let name = bus.subscriber().name();
    let topic = format!("otel-{}", tidings_core::message::new_id());
    let failing = format!("{topic}-failing");
    let publisher =
        LayeredPublisher::new(bus.publisher()).layer(Arc::new(o.telemetry.publish_layer(name)));
    let consumer = Consumer::group(bus.subscriber(), "otel-test")
        .layer(o.telemetry.process_layer(name))
        .retry(RetryPolicy::new(2).with_backoff(Backoff::fixed(Duration::from_millis(10))))
        .handle(topic.clone(), |_: Event<Json>| async {
            Ok::<_, HandlerError>(())
        })
        .handle(failing.clone(), |_: Event<Json>| async {
            Err::<(), _>(HandlerError::retryable("downstream timeout"))
        })
        .start()
        .await
        .expect("start consumer");

    let message = Message::new(r#"{"n":1}"#).with_type("thing.happened");
    let id = message.id.clone();
    publisher.publish(&topic, message).await.expect("publish");
    publisher
        .publish(&failing, Message::new("{}"))
        .await
        .expect("publish");

    let process = o.wait_spans(&format!("process {topic}"), 1).await.remove(0);
    let send = o.wait_spans(&format!("send {topic}"), 1).await.remove(0);
    assert_span(&send, &format!("send {topic}"), SpanKind::Producer);
    assert_span(&process, &format!("process {topic}"), SpanKind::Consumer);
    assert_eq!(
        process.span_context.trace_id(),
        send.span_context.trace_id()
    );
    assert_eq!(process.parent_span_id, send.span_context.span_id());
    for span in [&send, &process] {
        assert_eq!(attr_str(span, a::MESSAGING_SYSTEM), "redis");
        assert_eq!(attr_str(span, a::DESTINATION_NAME), topic);
        assert_eq!(attr_str(span, a::MESSAGE_ID), id);
        assert_eq!(attr_str(span, a::EVENT_TYPE), "thing.happened");
    }
    assert_eq!(attr_str(&process, a::CONSUMER_GROUP), "otel-test");
    assert_eq!(attr_str(&process, a::ATTEMPT), "1");

    let labels = [
        (a::DESTINATION_NAME, failing.as_str()),
        (a::CONSUMER_GROUP, "otel-test"),
    ];
    o.wait_sum(m::DEAD_LETTERS, &labels, 1).await;
    assert_eq!(
        o.sum(
            m::CONSUMED_MESSAGES,
            &[labels[0], labels[1], (a::OUTCOME, "retry")]
        ),
        1
    );
    assert_eq!(
        o.sum(
            m::CONSUMED_MESSAGES,
            &[labels[0], labels[1], (a::OUTCOME, "dead_letter")]
        ),
        1
    );
    assert_eq!(
        o.sum(
            m::CONSUMED_MESSAGES,
            &[
                (a::DESTINATION_NAME, topic.as_str()),
                (a::OUTCOME, "ack"),
                (a::MESSAGING_SYSTEM, "redis")
            ]
        ),
        1
    );
    consumer.shutdown(Duration::from_secs(5)).await;
}

/// The consumer span carries the delivery's stream entry id, the one the
/// publish receipt named (and the `send` span carries it too).
#[tokio::test]
async fn consumer_span_carries_the_stream_entry_id() {
    let o = otel(|b| b);
    let bus = redis().await;
    let (topic, receipt, consumer) = traced_round_trip(&o, bus.publisher(), bus.subscriber()).await;
    let Receipt::EntryId(entry_id) = receipt else {
        panic!("Redis Streams publish returns an entry id, got {receipt:?}");
    };

    let process = o.wait_spans(&format!("process {topic}"), 1).await.remove(0);
    assert_eq!(attr_str(&process, a::REDIS_ENTRY_ID), entry_id);
    assert!(
        common::attr(&process, a::KAFKA_OFFSET).is_none(),
        "no Kafka offset on a Redis span"
    );
    let send = o.wait_spans(&format!("send {topic}"), 1).await.remove(0);
    assert_eq!(attr_str(&send, a::REDIS_ENTRY_ID), entry_id);
    consumer.shutdown(Duration::from_secs(5)).await;
}
