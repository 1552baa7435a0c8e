//! Tracing across the in-process bus, printed without a collector:
//! an HTTP-ish `checkout` span publishes `order.placed`; the billing service
//! handles it and publishes `invoice.issued` from inside its handler; the
//! mailer handles that. All five spans share one trace id.
//!
//! Run with `cargo run --example tracing --features otel`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tidings::memory::MemoryBus;
use tidings::middleware::LayeredPublisher;
use tidings::otel::Telemetry;
use tidings::prelude::*;
use tokio::sync::Notify;

/// An exporter that keeps finished spans in memory, to print them at the end.
#[derive(Debug, Clone, Default)]
struct Collect {
    spans: Arc<Mutex<Vec<SpanData>>>,
    finished: Arc<Notify>,
}

impl SpanExporter for Collect {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(batch);
        }
        self.finished.notify_one();
        Ok(())
    }
}

impl Collect {
    fn count(&self) -> usize {
        self.spans.lock().map(|s| s.len()).unwrap_or(0)
    }
}

#[tokio::main]
async fn main() -> tidings::Result<()> {
    let exporter = Collect::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let telemetry = Telemetry::builder()
        .tracer(provider.tracer("tracing-example"))
        .build();

    let bus = MemoryBus::new();
    let system = bus.subscriber().name();
    let publisher = Arc::new(
        LayeredPublisher::new(bus.publisher()).layer(Arc::new(telemetry.publish_layer(system))),
    );

    let chained = publisher.clone();
    let billing = Consumer::group(bus.subscriber(), "billing")
        .layer(telemetry.process_layer(system))
        .handle("order.placed", move |e: Event<serde_json::Value>| {
            let publisher = chained.clone();
            async move {
                // Published inside the `process order.placed` span: same trace.
                let invoice = Message::new(r#"{"invoice":"INV-1"}"#)
                    .with_type("invoice.issued")
                    .caused_by(e.message());
                publisher.publish("invoice.issued", invoice).await?;
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await?;
    let mailer = Consumer::group(bus.subscriber(), "mailer")
        .layer(telemetry.process_layer(system))
        .handle("invoice.issued", |_: Event<serde_json::Value>| async {
            Ok::<_, HandlerError>(())
        })
        .start()
        .await?;

    // The request that starts it all.
    let tracer = provider.tracer("tracing-example");
    let cx = Context::new().with_span(tracer.start("checkout"));
    publisher
        .publish(
            "order.placed",
            Message::new(r#"{"order":"A-7"}"#).with_type("order.placed"),
        )
        .with_context(cx.clone())
        .await?;
    cx.span().end();

    // Five spans: checkout, send, process, send, process (bounded wait).
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while exporter.count() < 5 {
            exporter.finished.notified().await;
        }
    })
    .await;
    if waited.is_err() {
        eprintln!("only {} spans finished within 10 s", exporter.count());
    }
    billing.shutdown(Duration::from_secs(5)).await;
    mailer.shutdown(Duration::from_secs(5)).await;

    let mut spans = exporter.spans.lock().map(|s| s.clone()).unwrap_or_default();
    spans.sort_by_key(|s| s.start_time);
    for span in &spans {
        println!(
            "trace {} span {} parent {} {:?} \"{}\"",
            span.span_context.trace_id(),
            span.span_context.span_id(),
            span.parent_span_id,
            span.span_kind,
            span.name
        );
        for kv in &span.attributes {
            println!("    {} = {}", kv.key, kv.value);
        }
    }
    let _ = provider.shutdown();
    Ok(())
}
