//! `[telemetry]` in the configuration: the bus's publisher and consumers
//! trace through the global tracer provider, one trace from publish to
//! handling, or, with `parent = "link"`, a new trace linked to the
//! publisher's. (A test binary of its own: it sets the global provider;
//! both cases share it and look only at spans of their own topic.)

use std::time::Duration;

use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tidings::testkit::{unique, within};
use tidings::{Config, Event, HandlerError, Message, Publisher};

async fn spans_named(exporter: &InMemorySpanExporter, name: &str) -> SpanData {
    within(15, "the span", async {
        loop {
            let found = exporter
                .get_finished_spans()
                .expect("spans")
                .into_iter()
                .find(|s| s.name == name);
            if let Some(span) = found {
                return span;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// The global provider, installed once for both tests.
fn exporter() -> InMemorySpanExporter {
    static EXPORTER: std::sync::OnceLock<InMemorySpanExporter> = std::sync::OnceLock::new();
    EXPORTER
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            opentelemetry::global::set_tracer_provider(provider);
            exporter
        })
        .clone()
}

/// Connects with `toml`, publishes one message to a fresh topic, handles
/// it, and returns the `send` and `process` spans of that topic.
async fn traced_round_trip(toml: &str) -> (SpanData, SpanData) {
    let exporter = exporter();
    let config = Config::from_toml(toml).expect("config");
    assert!(config.telemetry_enabled());
    let bus = tidings::connect(&config).await.expect("connect");
    let topic = unique("traced");
    let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let consumer = bus
        .consumer("g")
        .handle(&topic, move |_: Event<String>| {
            let handled = handled_tx.clone();
            async move {
                let _ = handled.send(());
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start");
    bus.publish(&topic, Message::new("\"hello\""))
        .await
        .expect("publish");
    within(15, "the handler", handled.recv())
        .await
        .expect("handled");
    let send = spans_named(&exporter, &format!("send {topic}")).await;
    let process = spans_named(&exporter, &format!("process {topic}")).await;
    consumer.shutdown(Duration::from_secs(10)).await;
    (send, process)
}

#[tokio::test]
async fn configured_telemetry_traces_publish_and_handling() {
    let (send, process) =
        traced_round_trip("url = \"memory://\"\n[telemetry]\nparent = \"parent\"\n").await;
    assert_eq!(
        process.span_context.trace_id(),
        send.span_context.trace_id(),
        "one trace from publish to handling"
    );
    assert_eq!(process.parent_span_id, send.span_context.span_id());
}

#[tokio::test]
async fn link_mode_links_instead_of_parenting() {
    let (send, process) =
        traced_round_trip("url = \"memory://\"\n[telemetry]\nparent = \"link\"\n").await;
    assert_ne!(process.parent_span_id, send.span_context.span_id());
    assert!(
        process
            .links
            .iter()
            .any(|l| l.span_context.span_id() == send.span_context.span_id()),
        "the process span links to the send span"
    );
}
