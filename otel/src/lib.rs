//! OpenTelemetry tracing and metrics, and structured `tracing` logs, for
//! Tidings, following the OpenTelemetry semantic conventions for messaging.
//!
//! Two layers, made by one [`Telemetry`]:
//!
//! - [`OtelPublish`], a publish middleware: a `PRODUCER` span `send <topic>`
//!   per message, the W3C trace context (`traceparent`, `tracestate`) written
//!   into the message headers, the publish duration and the sent-messages
//!   counter;
//! - [`OtelProcess`], a handler middleware: the trace context read back from
//!   the headers, a `CONSUMER` span `process <topic>` whose parent (or link,
//!   see [`ParentMode`]) is the producer's span, the handler run *inside* that
//!   span's context (so a message the handler publishes continues the trace),
//!   the outcome counter (ack, retry, dead letter, duplicate skipped), process
//!   duration, lag and in-flight metrics, and a `tracing` span carrying the
//!   message's id, type, topic, group, attempt, correlation id and trace id.
//!
//! Nothing logs a payload unless [`TelemetryBuilder::log_payloads`] is set; no
//! header is ever logged or recorded (headers may carry credentials).
//!
//! ```
//! use std::sync::Arc;
//! use tidings_core::middleware::LayeredPublisher;
//! use tidings_core::{Consumer, Event, HandlerError, Publisher, Subscriber};
//! use tidings_otel::Telemetry;
//! # async fn f(bus: tidings_memory::MemoryBus) -> tidings_core::Result<()> {
//! // The global tracer and meter providers; or `.tracer(..)` / `.meter(..)`.
//! let telemetry = Telemetry::builder().max_attempts(5).build();
//! let publisher = LayeredPublisher::new(bus.publisher())
//!     .layer(Arc::new(telemetry.publish_layer(bus.subscriber().name())));
//! let consumer = Consumer::group(bus.subscriber(), "billing")
//!     .layer(telemetry.process_layer(bus.subscriber().name()))
//!     .handle("order.placed", |e: Event<serde_json::Value>| async move {
//!         Ok::<_, HandlerError>(())
//!     })
//!     .start()
//!     .await?;
//! # let _ = (publisher, consumer); Ok(()) }
//! ```
//!
//! Metrics, attributes and spans are listed in `docs/observability.md` and in
//! [`names`].

mod breaker;
pub mod names;
mod process;
mod propagation;
mod publish;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span, Tracer};
use opentelemetry::{Context, InstrumentationScope, KeyValue};

pub use breaker::BreakerGauge;
pub use names::messaging_system;
pub use process::{HandlerReached, OtelProcess, Outcome};
pub use propagation::W3cTraceContext;
pub use publish::{OtelPublish, SendOutcome};

/// The instrumentation scope name of the tracer and meter taken from the global providers.
pub const SCOPE: &str = "tidings";

/// Whether the consumer span is a child of the producer span or starts its
/// own trace with a link to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ParentMode {
    /// The producer span is the parent: one trace from publish to handling (the default).
    #[default]
    Parent,
    /// The consumer span is a root (or a child of the current context) and
    /// links to the producer span: for long-lived flows where one trace per
    /// message is preferred.
    Link,
}

/// Where the trace context is injected from and extracted with.
#[derive(Clone)]
enum Propagator {
    W3c,
    Global,
    Custom(Arc<dyn TextMapPropagator + Send + Sync>),
}

impl Propagator {
    fn inject(&self, cx: &Context, injector: &mut dyn Injector) {
        match self {
            Propagator::W3c => W3cTraceContext.inject_context(cx, injector),
            Propagator::Global => {
                global::get_text_map_propagator(|p| p.inject_context(cx, injector));
            }
            Propagator::Custom(p) => p.inject_context(cx, injector),
        }
    }

    fn extract(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        match self {
            Propagator::W3c => W3cTraceContext.extract_with_context(cx, extractor),
            Propagator::Global => {
                global::get_text_map_propagator(|p| p.extract_with_context(cx, extractor))
            }
            Propagator::Custom(p) => p.extract_with_context(cx, extractor),
        }
    }
}

/// The instruments, made once per [`Telemetry`].
pub(crate) struct Instruments {
    pub(crate) sent: Counter<u64>,
    pub(crate) publish_duration: Histogram<f64>,
    pub(crate) consumed: Counter<u64>,
    pub(crate) process_duration: Histogram<f64>,
    pub(crate) lag: Histogram<f64>,
    pub(crate) in_flight: UpDownCounter<i64>,
    pub(crate) dead_letters: Counter<u64>,
    pub(crate) settlements: Counter<u64>,
}

/// Bucket boundaries in seconds: the conventions' ones, with finer buckets
/// below 5 ms for in-process and local brokers.
const DURATION_BUCKETS: [f64; 19] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,
    0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];

/// Lag buckets in seconds, up to a day.
const LAG_BUCKETS: [f64; 17] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
    21600.0, 86400.0,
];

impl Instruments {
    fn new(meter: &Meter) -> Self {
        use names::metric::*;
        Instruments {
            sent: meter
                .u64_counter(SENT_MESSAGES)
                .with_description("Messages the publisher tried to send, by outcome")
                .with_unit("{message}")
                .build(),
            publish_duration: meter
                .f64_histogram(OPERATION_DURATION)
                .with_description(
                    "Duration of publishing one message, until the broker accepted it",
                )
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            consumed: meter
                .u64_counter(CONSUMED_MESSAGES)
                .with_description("Deliveries handled, by outcome")
                .with_unit("{message}")
                .build(),
            process_duration: meter
                .f64_histogram(PROCESS_DURATION)
                .with_description("Duration of handling one delivery")
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            lag: meter
                .f64_histogram(LAG)
                .with_description("Time between the event time and the start of its handling")
                .with_unit("s")
                .with_boundaries(LAG_BUCKETS.to_vec())
                .build(),
            in_flight: meter
                .i64_up_down_counter(IN_FLIGHT)
                .with_description("Deliveries being handled now")
                .with_unit("{message}")
                .build(),
            dead_letters: meter
                .u64_counter(DEAD_LETTERS)
                .with_description("Messages dead-lettered, by reason")
                .with_unit("{message}")
                .build(),
            settlements: meter
                .u64_counter(SETTLEMENTS)
                .with_description("Settlements the consumer runtime made, by action and result")
                .with_unit("{message}")
                .build(),
        }
    }
}

pub(crate) struct Shared {
    pub(crate) tracer: BoxedTracer,
    pub(crate) meter: Meter,
    propagator: Propagator,
    pub(crate) parent_mode: ParentMode,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) payload_log: Option<usize>,
    pub(crate) detect_skips: AtomicBool,
    pub(crate) instruments: Instruments,
}

impl Shared {
    pub(crate) fn inject(&self, cx: &Context, headers: &mut tidings_core::message::Headers) {
        self.propagator
            .inject(cx, &mut propagation::HeaderInjector(headers));
    }

    pub(crate) fn extract(
        &self,
        base: &Context,
        headers: &tidings_core::message::Headers,
    ) -> Context {
        self.propagator.extract(base, headers)
    }
}

/// Tracing and metrics configuration shared by the layers it makes; cheap to clone.
///
/// Build it with [`Telemetry::builder`], then add
/// [`publish_layer`](Telemetry::publish_layer) to publishers and
/// [`process_layer`](Telemetry::process_layer) to consumers.
#[derive(Clone)]
pub struct Telemetry {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("parent_mode", &self.shared.parent_mode)
            .field("max_attempts", &self.shared.max_attempts)
            .field("payload_log", &self.shared.payload_log)
            .finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::builder().build()
    }
}

impl Telemetry {
    /// A builder with the defaults: the global tracer and meter providers
    /// (scope [`SCOPE`]), the W3C propagator, [`ParentMode::Parent`], retries
    /// and dead letters told apart on attempt 5 (the runtime's default
    /// [`RetryPolicy`](tidings_core::RetryPolicy)), no payload logging.
    pub fn builder() -> TelemetryBuilder {
        TelemetryBuilder {
            tracer: None,
            meter: None,
            propagator: Propagator::W3c,
            parent_mode: ParentMode::Parent,
            max_attempts: Some(tidings_core::RetryPolicy::default().max_attempts),
            payload_log: None,
        }
    }

    /// The publish-path layer for an adapter (its `Subscriber::name()`:
    /// `memory`, `redis`, `amqp`, `nats`, `kafka`), which names `messaging.system`.
    pub fn publish_layer(&self, adapter: &'static str) -> OtelPublish {
        OtelPublish::new(self.clone(), messaging_system(adapter))
    }

    /// The handle-path layer for an adapter (its `Subscriber::name()`).
    /// Add it first (outermost) so that it sees every attempt and the final result.
    pub fn process_layer(&self, adapter: &'static str) -> OtelProcess {
        OtelProcess::new(self.clone(), messaging_system(adapter))
    }

    /// A marker layer to add **last** (right before the handler) so that the
    /// process layer can tell a delivery that some layer in between settled
    /// without calling the handler (a duplicate skipped by idempotency) from
    /// an acked one: such deliveries are counted with outcome `duplicate_skipped`.
    /// Without it, they count as `ack`.
    pub fn handler_reached(&self) -> HandlerReached {
        self.shared
            .detect_skips
            .store(true, std::sync::atomic::Ordering::Relaxed);
        HandlerReached
    }

    /// A settlement observer for [`ConsumerBuilder::on_settle`](tidings_core::ConsumerBuilder::on_settle)
    /// (the adapter is its `Subscriber::name()`): counts every settlement in
    /// `tidings.consumer.settlements`, labelled with the action
    /// (`tidings.settle.action`: `ack`, `nack`, `dead_letter`) and the result
    /// (`tidings.settle.result`: `ok`, or `failed` with `error.type`). The
    /// process layer sees the handler's result; this sees what the broker
    /// was asked and whether it took it: a failed settlement means the
    /// message comes back.
    ///
    /// ```
    /// # async fn f(subscriber: std::sync::Arc<dyn tidings_core::Subscriber>) -> tidings_core::Result<()> {
    /// use tidings_core::{Consumer, Event, HandlerError};
    /// let telemetry = tidings_otel::Telemetry::default();
    /// let consumer = Consumer::group(subscriber.clone(), "billing")
    ///     .layer(telemetry.process_layer(subscriber.name()))
    ///     .on_settle(telemetry.settle_observer(subscriber.name()))
    ///     .handle("order.placed", |_: Event<String>| async { Ok::<_, HandlerError>(()) })
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn settle_observer(
        &self,
        adapter: &'static str,
    ) -> impl Fn(&tidings_core::Settlement<'_>) + Send + Sync + 'static {
        let shared = self.shared.clone();
        let system = messaging_system(adapter);
        move |settlement| {
            let delivery = settlement.delivery;
            let mut labels = Vec::with_capacity(6);
            labels.push(KeyValue::new(names::attr::MESSAGING_SYSTEM, system));
            labels.push(KeyValue::new(
                names::attr::DESTINATION_NAME,
                delivery.shared_topic().clone(),
            ));
            if let Some(group) = delivery.group() {
                labels.push(KeyValue::new(names::attr::CONSUMER_GROUP, group.to_owned()));
            }
            labels.push(KeyValue::new(
                names::attr::SETTLE_ACTION,
                settlement.action.as_str(),
            ));
            match settlement.result {
                Ok(()) => labels.push(KeyValue::new(names::attr::SETTLE_RESULT, "ok")),
                Err(error) => {
                    labels.push(KeyValue::new(names::attr::SETTLE_RESULT, "failed"));
                    labels.push(KeyValue::new(
                        names::attr::ERROR_TYPE,
                        publish::error_type(error),
                    ));
                }
            }
            shared.instruments.settlements.add(1, &labels);
        }
    }

    /// Exposes a circuit breaker's state as the gauge
    /// `tidings.circuit_breaker.state` (0 closed, 1 half-open, 2 open),
    /// labelled `tidings.circuit_breaker.name = name`. Keep the returned
    /// handle as long as the gauge should be reported.
    pub fn observe_breaker(
        &self,
        name: impl Into<String>,
        breaker: &tidings_middleware::CircuitBreaker,
    ) -> BreakerGauge {
        BreakerGauge::new(&self.shared.meter, name.into(), breaker)
    }
}

/// Builds a [`Telemetry`].
#[must_use]
pub struct TelemetryBuilder {
    tracer: Option<BoxedTracer>,
    meter: Option<Meter>,
    propagator: Propagator,
    parent_mode: ParentMode,
    max_attempts: Option<u32>,
    payload_log: Option<usize>,
}

impl fmt::Debug for TelemetryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryBuilder")
            .field("parent_mode", &self.parent_mode)
            .field("max_attempts", &self.max_attempts)
            .field("payload_log", &self.payload_log)
            .finish_non_exhaustive()
    }
}

impl TelemetryBuilder {
    /// The tracer spans are made with, e.g. `provider.tracer("my-service")`
    /// (default: the global provider's tracer named [`SCOPE`]).
    pub fn tracer<T, S>(mut self, tracer: T) -> Self
    where
        T: Tracer<Span = S> + Send + Sync + 'static,
        S: Span + Send + Sync + 'static,
    {
        self.tracer = Some(BoxedTracer::new(Box::new(tracer)));
        self
    }

    /// The meter instruments are made with (default: the global provider's meter named [`SCOPE`]).
    pub fn meter(mut self, meter: Meter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Uses this propagator instead of the built-in W3C Trace Context one.
    pub fn propagator(
        mut self,
        propagator: impl TextMapPropagator + Send + Sync + 'static,
    ) -> Self {
        self.propagator = Propagator::Custom(Arc::new(propagator));
        self
    }

    /// Uses the global propagator (`opentelemetry::global::set_text_map_propagator`)
    /// instead of the built-in W3C one. Note that the global default is a no-op:
    /// nothing is propagated unless the application set one.
    pub fn global_propagator(mut self) -> Self {
        self.propagator = Propagator::Global;
        self
    }

    /// Parent (default) or link; see [`ParentMode`].
    pub fn parent_mode(mut self, mode: ParentMode) -> Self {
        self.parent_mode = mode;
        self
    }

    /// The attempt limit assumed when the delivery does not carry one, so
    /// that a retryable failure on the last attempt is counted as
    /// `dead_letter` (reason `attempts-exhausted`) rather than `retry`.
    /// Under the consumer runtime the delivery carries the runtime's own
    /// `RetryPolicy::max_attempts` ([`Delivery::max_attempts`](tidings_core::Delivery::max_attempts)),
    /// which wins; this matters only for deliveries handled some other way.
    /// Default 5, the runtime's default.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = Some(max_attempts.max(1));
        self
    }

    /// Do not guess the last attempt for deliveries that carry no limit
    /// (handled outside the consumer runtime): count their retryable failures
    /// as `failed`.
    pub fn unknown_max_attempts(mut self) -> Self {
        self.max_attempts = None;
        self
    }

    /// Logs payloads (up to `max_bytes`, lossy UTF-8) in the `payload` field
    /// of the `tracing` span and events. Off by default: payloads may hold
    /// personal data.
    pub fn log_payloads(mut self, max_bytes: usize) -> Self {
        self.payload_log = Some(max_bytes);
        self
    }

    /// Makes the instruments and the [`Telemetry`].
    pub fn build(self) -> Telemetry {
        let meter = self.meter.unwrap_or_else(|| {
            global::meter_with_scope(InstrumentationScope::builder(SCOPE).build())
        });
        let tracer = self.tracer.unwrap_or_else(|| global::tracer(SCOPE));
        Telemetry {
            shared: Arc::new(Shared {
                tracer,
                instruments: Instruments::new(&meter),
                meter,
                propagator: self.propagator,
                parent_mode: self.parent_mode,
                max_attempts: self.max_attempts,
                payload_log: self.payload_log,
                detect_skips: AtomicBool::new(false),
            }),
        }
    }
}

/// The payload as a log field, when payload logging is on.
pub(crate) fn payload_field(max: Option<usize>, payload: &[u8]) -> Option<String> {
    max.map(|max| {
        let cut = &payload[..payload.len().min(max)];
        String::from_utf8_lossy(cut).into_owned()
    })
}

/// The metadata attributes both spans carry.
pub(crate) fn metadata_attributes(
    attrs: &mut Vec<opentelemetry::KeyValue>,
    system: &'static str,
    message: &tidings_core::Message,
) {
    use names::attr;
    use opentelemetry::KeyValue;
    let m = &message.metadata;
    if let Some(v) = &m.correlation_id {
        attrs.push(KeyValue::new(attr::CONVERSATION_ID, v.clone()));
    }
    if let Some(v) = &m.causation_id {
        attrs.push(KeyValue::new(attr::CAUSATION_ID, v.clone()));
    }
    if let Some(v) = &m.event_type {
        attrs.push(KeyValue::new(attr::EVENT_TYPE, v.clone()));
    }
    if let Some(v) = &m.source {
        attrs.push(KeyValue::new(attr::EVENT_SOURCE, v.clone()));
    }
    if system == "kafka"
        && let Some(key) = &message.key
    {
        attrs.push(KeyValue::new(attr::KAFKA_KEY, key.clone()));
    }
}

/// The attributes of a broker position (a publish receipt or a delivery's
/// position): the conventions' Kafka partition and offset, and `tidings.*`
/// ones where the conventions have none.
pub(crate) fn position_attributes(
    attrs: &mut Vec<opentelemetry::KeyValue>,
    position: &tidings_core::Receipt,
) {
    use names::attr;
    use opentelemetry::KeyValue;
    use tidings_core::Receipt;
    match position {
        Receipt::Offset { partition, offset } => {
            attrs.push(KeyValue::new(attr::PARTITION_ID, partition.to_string()));
            attrs.push(KeyValue::new(attr::KAFKA_OFFSET, *offset));
        }
        Receipt::EntryId(id) => attrs.push(KeyValue::new(attr::REDIS_ENTRY_ID, id.clone())),
        Receipt::Sequence {
            stream, sequence, ..
        } => {
            attrs.push(KeyValue::new(attr::NATS_STREAM, stream.clone()));
            // Attribute integers are i64; a sequence above i64::MAX is out of reach in practice.
            attrs.push(KeyValue::new(
                attr::NATS_STREAM_SEQUENCE,
                i64::try_from(*sequence).unwrap_or(i64::MAX),
            ));
        }
        _ => {}
    }
}
