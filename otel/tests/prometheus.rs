//! The metrics in the Prometheus text format, as the `prometheus` feature of
//! `tidings` serves them: the `opentelemetry-prometheus` reader on the meter provider,
//! the registry encoded with `prometheus::TextEncoder` on each scrape.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder as _, TextEncoder};
use tidings_core::middleware::LayeredPublisher;
use tidings_core::{Consumer, Event, HandlerError, Message, Publisher};
use tidings_memory::MemoryBus;
use tidings_otel::Telemetry;

/// How long the test waits for the handler.
const WAIT: Duration = Duration::from_secs(15);

fn scrape(registry: &prometheus::Registry) -> String {
    let mut body = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut body)
        .expect("encode");
    String::from_utf8(body).expect("UTF-8")
}

/// One message published and handled on the in-process bus; one scrape shows
/// the consumed-messages counter with its labels, and the process-duration
/// histogram with its buckets.
#[tokio::test]
async fn scrape_shows_consumed_messages_with_labels() {
    let registry = prometheus::Registry::new();
    let reader = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()
        .expect("prometheus exporter");
    let provider = SdkMeterProvider::builder().with_reader(reader).build();
    let telemetry = Telemetry::builder()
        .meter(provider.meter("tidings"))
        .build();

    let bus = MemoryBus::new();
    let system = bus.subscriber().name();
    let publisher =
        LayeredPublisher::new(bus.publisher()).layer(Arc::new(telemetry.publish_layer(system)));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = Consumer::group(bus.subscriber(), "billing")
        .layer(telemetry.process_layer(system))
        .handle("orders", move |_: Event<serde_json::Value>| {
            let done_tx = done_tx.clone();
            async move {
                let _ = done_tx.send(());
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start consumer");

    publisher
        .publish("orders", Message::new(r#"{"order":1}"#))
        .await
        .expect("publish");
    tokio::time::timeout(WAIT, done_rx.recv())
        .await
        .expect("handled within the wait")
        .expect("handler ran");
    // The handler returned; the layer records right after. Shutting the
    // consumer down waits for the in-flight delivery to finish.
    consumer.shutdown(Duration::from_secs(5)).await;

    let text = scrape(&registry);
    let line = text
        .lines()
        .find(|l| l.starts_with("messaging_client_consumed_messages_total{"))
        .unwrap_or_else(|| panic!("no consumed-messages counter in:\n{text}"));
    for label in [
        r#"messaging_system="tidings""#,
        r#"messaging_destination_name="orders""#,
        r#"messaging_consumer_group_name="billing""#,
        r#"tidings_outcome="ack""#,
        r#"messaging_operation_name="process""#,
    ] {
        assert!(line.contains(label), "{label} missing from {line}");
    }
    assert!(line.ends_with(" 1"), "one message consumed: {line}");
    assert!(
        text.contains("# TYPE messaging_client_consumed_messages_total counter"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE messaging_process_duration_seconds histogram"),
        "{text}"
    );
    assert!(
        text.lines().any(
            |l| l.starts_with("messaging_process_duration_seconds_bucket{")
                && l.contains(r#"le="+Inf""#)
                && l.contains(r#"tidings_outcome="ack""#)
        ),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("messaging_client_sent_messages_total{")
                && l.contains(r#"tidings_outcome="ok""#)),
        "{text}"
    );
    let _ = provider.shutdown();
}
