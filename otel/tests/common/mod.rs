//! Test helpers: OpenTelemetry SDK providers with in-memory exporters, and
//! bounded waits on what they collected.
#![allow(dead_code)]

use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry::{Key, KeyValue, Value};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tidings_otel::{Telemetry, TelemetryBuilder};

/// Providers wired to in-memory exporters, and a telemetry using them.
pub struct Otel {
    pub spans: InMemorySpanExporter,
    pub metrics: InMemoryMetricExporter,
    pub tracer_provider: SdkTracerProvider,
    pub meter_provider: SdkMeterProvider,
    pub telemetry: Telemetry,
}

pub fn otel(configure: impl FnOnce(TelemetryBuilder) -> TelemetryBuilder) -> Otel {
    let spans = InMemorySpanExporter::default();
    let tracer_provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let metrics = InMemoryMetricExporter::default();
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(metrics.clone()).build())
        .build();
    let telemetry = configure(
        Telemetry::builder()
            .tracer(tracer_provider.tracer("tidings-test"))
            .meter(meter_provider.meter("tidings-test")),
    )
    .build();
    Otel {
        spans,
        metrics,
        tracer_provider,
        meter_provider,
        telemetry,
    }
}

/// How long any wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(15);

impl Otel {
    /// The finished spans.
    pub fn finished(&self) -> Vec<SpanData> {
        self.spans.get_finished_spans().expect("finished spans")
    }

    /// Waits (bounded) until `n` spans named `name` finished; returns them.
    pub async fn wait_spans(&self, name: &str, n: usize) -> Vec<SpanData> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let found: Vec<_> = self
                .finished()
                .into_iter()
                .filter(|s| s.name == name)
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited {WAIT:?} for {n} `{name}` spans; finished: {:?}",
                self.finished().iter().map(|s| &s.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Collects the metrics now.
    pub fn collect(&self) -> ResourceMetrics {
        self.metrics.reset();
        self.meter_provider.force_flush().expect("flush metrics");
        self.metrics
            .get_finished_metrics()
            .expect("metrics")
            .pop()
            .expect("one collection")
    }

    /// The sum of a counter's (or up-down counter's) points whose attributes include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> i64 {
        let rm = self.collect();
        let mut total = 0i64;
        for metric in rm.scope_metrics().flat_map(|s| s.metrics()) {
            if metric.name() != name {
                continue;
            }
            match metric.data() {
                AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                    for p in sum.data_points() {
                        if matches(p.attributes(), labels) {
                            total += p.value() as i64;
                        }
                    }
                }
                AggregatedMetrics::I64(MetricData::Sum(sum)) => {
                    for p in sum.data_points() {
                        if matches(p.attributes(), labels) {
                            total += p.value();
                        }
                    }
                }
                other => panic!("{name} is not a sum: {other:?}"),
            }
        }
        total
    }

    /// The number of recordings of a histogram whose attributes include `labels`.
    pub fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let rm = self.collect();
        let mut total = 0;
        for metric in rm.scope_metrics().flat_map(|s| s.metrics()) {
            if metric.name() != name {
                continue;
            }
            match metric.data() {
                AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                    for p in h.data_points() {
                        if matches(p.attributes(), labels) {
                            total += p.count();
                        }
                    }
                }
                other => panic!("{name} is not a histogram: {other:?}"),
            }
        }
        total
    }

    /// The value of a u64 gauge's point whose attributes include `labels`.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let rm = self.collect();
        for metric in rm.scope_metrics().flat_map(|s| s.metrics()) {
            if metric.name() != name {
                continue;
            }
            if let AggregatedMetrics::U64(MetricData::Gauge(g)) = metric.data() {
                for p in g.data_points() {
                    if matches(p.attributes(), labels) {
                        return Some(p.value());
                    }
                }
            }
        }
        None
    }

    /// Waits (bounded) until the counter `name` with `labels` reaches `n`.
    pub async fn wait_sum(&self, name: &str, labels: &[(&str, &str)], n: i64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.sum(name, labels);
            if got >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited {WAIT:?} for {name}{labels:?} to reach {n}; it is {got}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn matches<'a>(attrs: impl Iterator<Item = &'a KeyValue>, labels: &[(&str, &str)]) -> bool {
    let attrs: Vec<&KeyValue> = attrs.collect();
    labels.iter().all(|(k, v)| {
        attrs
            .iter()
            .any(|kv| kv.key.as_str() == *k && kv.value.as_str() == *v)
    })
}

/// The attribute `key` of a span.
pub fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == Key::from(key.to_owned()))
        .map(|kv| &kv.value)
}

/// The attribute `key` of a span, as a string (panics when missing).
pub fn attr_str(span: &SpanData, key: &str) -> String {
    attr(span, key)
        .unwrap_or_else(|| {
            panic!(
                "span `{}` has no attribute {key}: {:?}",
                span.name, span.attributes
            )
        })
        .as_str()
        .into_owned()
}

/// Asserts the span's name and kind.
pub fn assert_span(span: &SpanData, name: &str, kind: SpanKind) {
    assert_eq!(span.name, name);
    assert_eq!(span.span_kind, kind, "kind of {name}");
}

/// Through `bus`'s broker: a traced consumer in a group, and one traced
/// message published to a fresh topic. Returns the topic, the publish
/// receipt and the running consumer.
pub async fn traced_round_trip(
    o: &Otel,
    publisher: std::sync::Arc<dyn tidings_core::Publisher>,
    subscriber: std::sync::Arc<dyn tidings_core::Subscriber>,
) -> (String, tidings_core::Receipt, tidings_core::Consumer) {
    use tidings_core::{Consumer, Event, HandlerError, Message, Publisher as _};
    let name = subscriber.name();
    let topic = format!("otel-pos-{}", tidings_core::message::new_id());
    let publisher = tidings_core::middleware::LayeredPublisher::new(publisher)
        .layer(std::sync::Arc::new(o.telemetry.publish_layer(name)));
    let consumer = Consumer::group(subscriber, "otel-position")
        .layer(o.telemetry.process_layer(name))
        .handle(topic.clone(), |_: Event<serde_json::Value>| async {
            Ok::<_, HandlerError>(())
        })
        .start()
        .await
        .expect("start consumer");
    let receipt = publisher
        .publish(&topic, Message::new(r#"{"n":1}"#))
        .await
        .expect("publish");
    (topic, receipt, consumer)
}
