//! Tracing and metrics through the in-process bus, checked with the SDK's
//! in-memory span and metric exporters.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assert_span, attr, attr_str, otel};
use opentelemetry::Context;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use serde::{Deserialize, Serialize};
use tidings_core::middleware::LayeredPublisher;
use tidings_core::{Backoff, Consumer, Event, HandlerError, Message, Publisher, RetryPolicy};
use tidings_memory::MemoryBus;
use tidings_otel::ParentMode;
use tidings_otel::names::{attr as a, metric as m};

type Json = serde_json::Value;

fn publisher(bus: &MemoryBus, o: &common::Otel) -> Arc<LayeredPublisher> {
    Arc::new(
        LayeredPublisher::new(bus.publisher())
            .layer(Arc::new(o.telemetry.publish_layer(bus.subscriber().name()))),
    )
}

/// publish → handle → chained publish → handle: one trace, the right
/// parents, kinds, names and attributes; the headers carry `traceparent`.
#[tokio::test]
async fn consumer_span_continues_the_producer_trace_and_chains() {
    let o = otel(|b| b);
    let bus = MemoryBus::new();
    let publisher = publisher(&bus, &o);
    let (headers_tx, mut headers_rx) = tokio::sync::mpsc::unbounded_channel();

    let chained = publisher.clone();
    let billing = Consumer::group(bus.subscriber(), "billing")
        .layer(o.telemetry.process_layer(bus.subscriber().name()))
        .handle("orders", move |e: Event<Json>| {
            let publisher = chained.clone();
            let headers_tx = headers_tx.clone();
            async move {
                let _ = headers_tx.send(e.headers().clone());
                let invoice = Message::new(r#"{"invoice":1}"#)
                    .with_type("invoice.issued")
                    .caused_by(e.message());
                publisher.publish("invoices", invoice).await?;
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start billing");
    let mailer = Consumer::group(bus.subscriber(), "mailer")
        .layer(o.telemetry.process_layer(bus.subscriber().name()))
        .handle("invoices", |_: Event<Json>| async {
            Ok::<_, HandlerError>(())
        })
        .start()
        .await
        .expect("start mailer");

    // A request span the publish happens in.
    let tracer = o.tracer_provider.tracer("test");
    let cx = Context::new().with_span(tracer.start("request"));
    let order = Message::new(r#"{"order":7}"#)
        .with_type("order.placed")
        .with_correlation_id("corr-1");
    let order_id = order.id.clone();
    publisher
        .publish("orders", order)
        .with_context(cx.clone())
        .await
        .expect("publish");
    cx.span().end();
    let root = cx.span().span_context().clone();

    let process_invoices = o.wait_spans("process invoices", 1).await.remove(0);
    let send_orders = o.wait_spans("send orders", 1).await.remove(0);
    let process_orders = o.wait_spans("process orders", 1).await.remove(0);
    let send_invoices = o.wait_spans("send invoices", 1).await.remove(0);

    assert_span(&send_orders, "send orders", SpanKind::Producer);
    assert_span(&process_orders, "process orders", SpanKind::Consumer);
    assert_span(&send_invoices, "send invoices", SpanKind::Producer);
    assert_span(&process_invoices, "process invoices", SpanKind::Consumer);

    // One trace, each span the child of the one before.
    for s in [
        &send_orders,
        &process_orders,
        &send_invoices,
        &process_invoices,
    ] {
        assert_eq!(
            s.span_context.trace_id(),
            root.trace_id(),
            "{} in the request's trace",
            s.name
        );
        assert_eq!(s.status, Status::Unset, "{}", s.name);
    }
    assert_eq!(send_orders.parent_span_id, root.span_id());
    assert_eq!(
        process_orders.parent_span_id,
        send_orders.span_context.span_id()
    );
    assert_eq!(
        send_invoices.parent_span_id,
        process_orders.span_context.span_id()
    );
    assert_eq!(
        process_invoices.parent_span_id,
        send_invoices.span_context.span_id()
    );

    // The propagated headers.
    let headers = tokio::time::timeout(common::WAIT, headers_rx.recv())
        .await
        .expect("handler ran")
        .expect("headers");
    assert_eq!(
        headers.get("traceparent").map(String::as_str),
        Some(
            format!(
                "00-{}-{}-01",
                root.trace_id(),
                send_orders.span_context.span_id()
            )
            .as_str()
        )
    );
    assert!(
        !headers.contains_key("tracestate"),
        "empty tracestate is not written"
    );

    // Producer attributes.
    assert_eq!(attr_str(&send_orders, a::MESSAGING_SYSTEM), "tidings");
    assert_eq!(attr_str(&send_orders, a::DESTINATION_NAME), "orders");
    assert_eq!(attr_str(&send_orders, a::OPERATION_TYPE), "send");
    assert_eq!(attr_str(&send_orders, a::MESSAGE_ID), order_id);
    assert_eq!(attr_str(&send_orders, a::BODY_SIZE), "11");
    assert_eq!(attr_str(&send_orders, a::CONVERSATION_ID), "corr-1");
    assert_eq!(attr_str(&send_orders, a::EVENT_TYPE), "order.placed");
    assert!(attr(&send_orders, a::CAUSATION_ID).is_none());

    // Consumer attributes.
    assert_eq!(attr_str(&process_orders, a::MESSAGING_SYSTEM), "tidings");
    assert_eq!(attr_str(&process_orders, a::DESTINATION_NAME), "orders");
    assert_eq!(attr_str(&process_orders, a::OPERATION_TYPE), "process");
    assert_eq!(attr_str(&process_orders, a::CONSUMER_GROUP), "billing");
    assert_eq!(attr_str(&process_orders, a::MESSAGE_ID), order_id);
    assert_eq!(attr_str(&process_orders, a::ATTEMPT), "1");
    assert_eq!(attr_str(&process_orders, a::BODY_SIZE), "11");
    assert_eq!(attr_str(&process_orders, a::CONVERSATION_ID), "corr-1");
    assert_eq!(attr_str(&process_orders, a::EVENT_TYPE), "order.placed");
    assert_eq!(attr_str(&process_orders, a::OUTCOME), "ack");

    // The chained message names its cause and keeps the conversation.
    assert_eq!(attr_str(&send_invoices, a::CAUSATION_ID), order_id);
    assert_eq!(attr_str(&send_invoices, a::CONVERSATION_ID), "corr-1");
    assert_eq!(attr_str(&process_invoices, a::CONSUMER_GROUP), "mailer");
    assert_eq!(attr_str(&process_invoices, a::EVENT_TYPE), "invoice.issued");

    // Metrics.
    o.wait_sum(
        m::CONSUMED_MESSAGES,
        &[
            (a::DESTINATION_NAME, "invoices"),
            (a::CONSUMER_GROUP, "mailer"),
            (a::OUTCOME, "ack"),
        ],
        1,
    )
    .await;
    assert_eq!(
        o.sum(
            m::SENT_MESSAGES,
            &[
                (a::DESTINATION_NAME, "orders"),
                (a::OUTCOME, "ok"),
                (a::MESSAGING_SYSTEM, "tidings")
            ]
        ),
        1
    );
    assert_eq!(
        o.sum(
            m::SENT_MESSAGES,
            &[(a::DESTINATION_NAME, "invoices"), (a::OUTCOME, "ok")]
        ),
        1
    );
    assert_eq!(
        o.sum(
            m::CONSUMED_MESSAGES,
            &[
                (a::DESTINATION_NAME, "orders"),
                (a::CONSUMER_GROUP, "billing"),
                (a::OUTCOME, "ack")
            ]
        ),
        1
    );
    assert_eq!(
        o.histogram_count(m::OPERATION_DURATION, &[(a::DESTINATION_NAME, "orders")]),
        1
    );
    assert_eq!(
        o.histogram_count(m::PROCESS_DURATION, &[(a::CONSUMER_GROUP, "billing")]),
        1
    );
    assert_eq!(
        o.histogram_count(m::LAG, &[(a::DESTINATION_NAME, "orders")]),
        1
    );
    assert_eq!(
        o.sum(m::IN_FLIGHT, &[]),
        0,
        "nothing in flight once handled"
    );
    assert_eq!(o.sum(m::DEAD_LETTERS, &[]), 0);

    billing.shutdown(Duration::from_secs(5)).await;
    mailer.shutdown(Duration::from_secs(5)).await;
}

#[derive(Serialize, Deserialize)]
struct Order {
    #[allow(dead_code)]
    id: u32,
}

/// Retryable failures count as `retry` until the last attempt, then as
/// `dead_letter` (attempts-exhausted); permanent and undecodable failures
/// are dead letters at once; the spans carry the error.
#[tokio::test]
async fn retries_and_dead_letters_show_in_metrics() {
    let o = otel(|b| b.max_attempts(3));
    let bus = MemoryBus::new();
    let publisher = publisher(&bus, &o);
    let consumer = Consumer::group(bus.subscriber(), "workers")
        .layer(o.telemetry.process_layer(bus.subscriber().name()))
        .retry(RetryPolicy::new(3).with_backoff(Backoff::fixed(Duration::from_millis(1))))
        .handle("flaky", |_: Event<Json>| async {
            Err::<(), _>(HandlerError::retryable("database unavailable"))
        })
        .handle("bad", |_: Event<Json>| async {
            Err::<(), _>(HandlerError::permanent("order rejected"))
        })
        .handle("typed", |_: Event<Order>| async {
            Ok::<_, HandlerError>(())
        })
        .start()
        .await
        .expect("start");

    publisher
        .publish("flaky", Message::new("{}"))
        .await
        .expect("publish");
    publisher
        .publish("bad", Message::new("{}"))
        .await
        .expect("publish");
    publisher
        .publish("typed", Message::new("not json"))
        .await
        .expect("publish");

    let flaky = [
        (a::DESTINATION_NAME, "flaky"),
        (a::CONSUMER_GROUP, "workers"),
    ];
    o.wait_sum(m::DEAD_LETTERS, &[], 3).await;
    assert_eq!(
        o.sum(
            m::CONSUMED_MESSAGES,
            &[flaky[0], flaky[1], (a::OUTCOME, "retry")]
        ),
        2
    );
    assert_eq!(
        o.sum(
            m::CONSUMED_MESSAGES,
            &[flaky[0], flaky[1], (a::OUTCOME, "dead_letter")]
        ),
        1
    );
    assert_eq!(
        o.sum(m::CONSUMED_MESSAGES, &[flaky[0], (a::OUTCOME, "ack")]),
        0
    );
    assert_eq!(
        o.sum(
            m::DEAD_LETTERS,
            &[
                flaky[0],
                flaky[1],
                (a::DEAD_LETTER_REASON, "attempts-exhausted")
            ]
        ),
        1
    );
    assert_eq!(
        o.sum(
            m::CONSUMED_MESSAGES,
            &[(a::DESTINATION_NAME, "flaky"), (a::ERROR_TYPE, "retryable")]
        ),
        3
    );
    assert_eq!(
        o.sum(
            m::DEAD_LETTERS,
            &[
                (a::DESTINATION_NAME, "bad"),
                (a::DEAD_LETTER_REASON, "permanent-error")
            ]
        ),
        1
    );
    assert_eq!(
        o.sum(
            m::CONSUMED_MESSAGES,
            &[
                (a::DESTINATION_NAME, "bad"),
                (a::OUTCOME, "dead_letter"),
                (a::ERROR_TYPE, "permanent")
            ]
        ),
        1
    );
    assert_eq!(
        o.sum(
            m::DEAD_LETTERS,
            &[
                (a::DESTINATION_NAME, "typed"),
                (a::DEAD_LETTER_REASON, "undecodable")
            ]
        ),
        1
    );
    assert_eq!(o.sum(m::IN_FLIGHT, &[]), 0);

    // Spans: one per attempt, with the attempt number and error status.
    let attempts = o.wait_spans("process flaky", 3).await;
    let mut numbers: Vec<String> = attempts.iter().map(|s| attr_str(s, a::ATTEMPT)).collect();
    numbers.sort();
    assert_eq!(numbers, ["1", "2", "3"]);
    for s in &attempts {
        assert_eq!(s.status, Status::error("database unavailable"));
        assert_eq!(attr_str(s, a::ERROR_TYPE), "retryable");
        let expected = if attr_str(s, a::ATTEMPT) == "3" {
            "dead_letter"
        } else {
            "retry"
        };
        assert_eq!(attr_str(s, a::OUTCOME), expected);
    }
    // Every attempt of the same message is in the producer's trace.
    let send = o.wait_spans("send flaky", 1).await.remove(0);
    assert!(
        attempts
            .iter()
            .all(|s| s.span_context.trace_id() == send.span_context.trace_id())
    );

    consumer.shutdown(Duration::from_secs(5)).await;
}

/// Without a known last attempt, retryable failures are counted as `failed`.
#[tokio::test]
async fn the_runtimes_retry_limit_wins_over_the_layers_guess() {
    // The layer guesses 10 attempts; the runtime allows 2 and says so on the delivery.
    let o = otel(|b| b.max_attempts(10));
    let bus = MemoryBus::new();
    let publisher = publisher(&bus, &o);
    let consumer = Consumer::group(bus.subscriber(), "g")
        .layer(o.telemetry.process_layer(bus.subscriber().name()))
        .retry(RetryPolicy::new(2).with_backoff(Backoff::fixed(Duration::from_millis(1))))
        .handle("t", |_: Event<Json>| async {
            Err::<(), _>(HandlerError::retryable("no"))
        })
        .start()
        .await
        .expect("start");
    publisher
        .publish("t", Message::new("{}"))
        .await
        .expect("publish");
    o.wait_sum(m::CONSUMED_MESSAGES, &[(a::OUTCOME, "dead_letter")], 1)
        .await;
    assert_eq!(o.sum(m::CONSUMED_MESSAGES, &[(a::OUTCOME, "retry")]), 1);
    assert_eq!(o.sum(m::CONSUMED_MESSAGES, &[(a::OUTCOME, "failed")]), 0);
    consumer.shutdown(Duration::from_secs(5)).await;
}

/// Link mode: the consumer span starts its own trace and links to the producer span.
#[tokio::test]
async fn link_mode_links_instead_of_parenting() {
    let o = otel(|b| b.parent_mode(ParentMode::Link));
    let bus = MemoryBus::new();
    let publisher = publisher(&bus, &o);
    let consumer = Consumer::group(bus.subscriber(), "g")
        .layer(o.telemetry.process_layer(bus.subscriber().name()))
        .handle("t", |_: Event<Json>| async { Ok::<_, HandlerError>(()) })
        .start()
        .await
        .expect("start");
    publisher
        .publish("t", Message::new("{}"))
        .await
        .expect("publish");
    let process = o.wait_spans("process t", 1).await.remove(0);
    let send = o.wait_spans("send t", 1).await.remove(0);
    assert_ne!(
        process.span_context.trace_id(),
        send.span_context.trace_id()
    );
    assert_eq!(
        process.parent_span_id,
        opentelemetry::trace::SpanId::INVALID
    );
    let links: Vec<_> = process.links.iter().collect();
    assert_eq!(links.len(), 1);
    assert_eq!(
        links[0].span_context.trace_id(),
        send.span_context.trace_id()
    );
    assert_eq!(links[0].span_context.span_id(), send.span_context.span_id());
    consumer.shutdown(Duration::from_secs(5)).await;
}

/// With the marker layer last, a duplicate that idempotency skips is counted
/// as `duplicate_skipped`, not `ack`.
#[tokio::test]
async fn duplicates_skipped_are_counted() {
    let o = otel(|b| b);
    let bus = MemoryBus::new();
    let publisher = publisher(&bus, &o);
    let consumer = Consumer::group(bus.subscriber(), "g")
        .concurrency(1)
        .layer(o.telemetry.process_layer(bus.subscriber().name()))
        .layer(tidings_middleware::Idempotency::in_memory(
            Duration::from_secs(60),
        ))
        .layer(o.telemetry.handler_reached())
        .handle("t", |_: Event<Json>| async { Ok::<_, HandlerError>(()) })
        .start()
        .await
        .expect("start");
    let message = Message::new("{}");
    publisher
        .publish("t", message.clone())
        .await
        .expect("publish");
    publisher
        .publish("t", message)
        .await
        .expect("publish again");
    o.wait_sum(m::CONSUMED_MESSAGES, &[(a::DESTINATION_NAME, "t")], 2)
        .await;
    assert_eq!(o.sum(m::CONSUMED_MESSAGES, &[(a::OUTCOME, "ack")]), 1);
    assert_eq!(
        o.sum(m::CONSUMED_MESSAGES, &[(a::OUTCOME, "duplicate_skipped")]),
        1
    );
    consumer.shutdown(Duration::from_secs(5)).await;
}

/// A panicking handler is a failed attempt like any other (here the last:
/// dead-lettered) and its span ends in error; nothing stays in flight.
/// (`aborted` is left for a layer below that panics.)
#[tokio::test]
async fn handler_panics_are_failed_attempts_and_leave_nothing_in_flight() {
    let o = otel(|b| b.max_attempts(1));
    let bus = MemoryBus::new();
    let publisher = publisher(&bus, &o);
    let consumer = Consumer::group(bus.subscriber(), "g")
        .layer(o.telemetry.process_layer(bus.subscriber().name()))
        .retry(RetryPolicy::new(1))
        .handle("t", |_: Event<Json>| async {
            if true {
                panic!("boom");
            }
            Ok::<_, HandlerError>(())
        })
        .start()
        .await
        .expect("start");
    publisher
        .publish("t", Message::new("{}"))
        .await
        .expect("publish");
    o.wait_sum(m::CONSUMED_MESSAGES, &[(a::OUTCOME, "dead_letter")], 1)
        .await;
    assert_eq!(o.sum(m::CONSUMED_MESSAGES, &[(a::OUTCOME, "aborted")]), 0);
    let span = o.wait_spans("process t", 1).await.remove(0);
    assert!(matches!(span.status, Status::Error { .. }));
    assert_eq!(o.sum(m::IN_FLIGHT, &[]), 0);
    consumer.shutdown(Duration::from_secs(5)).await;
}

/// The circuit breaker's state is a gauge.
#[tokio::test]
async fn breaker_state_gauge() {
    use tidings_middleware::{CircuitBreaker, Threshold};
    let o = otel(|b| b);
    let breaker = CircuitBreaker::new(Threshold::Consecutive(1)).open_for(Duration::from_secs(60));
    let _gauge = o.telemetry.observe_breaker("payments", &breaker);
    let labels = [(a::BREAKER_NAME, "payments")];
    assert_eq!(o.gauge(m::BREAKER_STATE, &labels), Some(0));
    breaker.try_acquire().expect("closed").record(false);
    assert_eq!(o.gauge(m::BREAKER_STATE, &labels), Some(2));
}

/// Publish errors set the span status and count as `error`.
#[tokio::test]
async fn publish_errors_are_recorded() {
    let o = otel(|b| b);
    let bus = MemoryBus::new();
    let publisher = publisher(&bus, &o);
    publisher.close().await.expect("close");
    let error = publisher
        .publish("t", Message::new("{}"))
        .await
        .expect_err("closed");
    let span = o.wait_spans("send t", 1).await.remove(0);
    assert_eq!(span.status, Status::error(error.to_string()));
    assert_eq!(attr_str(&span, a::ERROR_TYPE), "closed");
    assert_eq!(
        o.sum(
            m::SENT_MESSAGES,
            &[(a::OUTCOME, "error"), (a::ERROR_TYPE, "closed")]
        ),
        1
    );
}

/// The settlement observer counts what the runtime asked of the broker and
/// whether the broker took it; a refused settlement is `failed` with its
/// error type.
#[tokio::test]
async fn settlements_are_counted_with_their_result() {
    use tidings_core::testkit::ScriptedSubscriber;

    let o = otel(|b| b);
    let refused = Message::new("{}");
    let subscriber = ScriptedSubscriber::new()
        .with("orders", Message::new("{}"))
        .with("orders", refused.clone())
        .with("orders", Message::new("not json"))
        .refusing(&refused.id);
    let consumer = Consumer::group(subscriber.clone().into_arc(), "billing")
        .concurrency(1)
        .layer(o.telemetry.process_layer("scripted"))
        .on_settle(o.telemetry.settle_observer("scripted"))
        .handle("orders", |_: Event<Json>| async {
            Ok::<_, HandlerError>(())
        })
        .start()
        .await
        .expect("start");
    subscriber.wait_settled(3, Duration::from_secs(10)).await;
    consumer.shutdown(Duration::from_secs(10)).await;

    let base = [
        (a::DESTINATION_NAME, "orders"),
        (a::CONSUMER_GROUP, "billing"),
    ];
    let count = |action: &str, result: &str| {
        o.sum(
            m::SETTLEMENTS,
            &[
                base[0],
                base[1],
                (a::SETTLE_ACTION, action),
                (a::SETTLE_RESULT, result),
            ],
        )
    };
    assert_eq!(count("ack", "ok"), 1);
    assert_eq!(count("ack", "failed"), 1);
    assert_eq!(count("dead_letter", "ok"), 1);
    assert_eq!(
        o.sum(
            m::SETTLEMENTS,
            &[(a::SETTLE_RESULT, "failed"), (a::ERROR_TYPE, "connection")]
        ),
        1
    );
    // The process layer saw two handled messages as acked: the refusal is
    // visible only in the settlements.
    assert_eq!(o.sum(m::CONSUMED_MESSAGES, &[(a::OUTCOME, "ack")]), 2);
}
