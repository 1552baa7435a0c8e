//! The handle-path layer.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{
    Link, Span as _, SpanBuilder, SpanKind, Status, TraceContextExt, Tracer,
};
use opentelemetry::{Context, KeyValue};
use tidings_core::middleware::{Middleware, Next};
use tidings_core::{DeadLetterReason, Delivery, Failure, HandlerResult, RetryPolicy, SettleAction};
use tracing::Instrument as _;

use crate::names::attr;
use crate::{ParentMode, Shared, Telemetry};

tokio::task_local! {
    /// Set by [`HandlerReached`] when the delivery got through every layer.
    static REACHED: Cell<bool>;
}

/// What became of one handling attempt, as the `tidings.outcome` attribute
/// of `messaging.client.consumed.messages`, `messaging.process.duration` and
/// the `process` span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded: the runtime acks.
    Ack,
    /// A retryable failure before the last attempt: the runtime redelivers.
    Retry,
    /// The runtime dead-letters the message: a permanent, undecodable or
    /// exhausted failure, or a retryable one on the last attempt.
    DeadLetter(DeadLetterReason),
    /// A layer below settled the delivery without calling the handler (a
    /// duplicate skipped by idempotency); needs [`Telemetry::handler_reached`].
    DuplicateSkipped,
    /// A retryable failure when the layer was told not to guess the last
    /// attempt ([`TelemetryBuilder::unknown_max_attempts`](crate::TelemetryBuilder::unknown_max_attempts)).
    Failed,
    /// The handler panicked or was cancelled (shutdown deadline): the runtime
    /// treats a panic as a retryable failure; a cancelled delivery is redelivered.
    Aborted,
}

impl Outcome {
    /// The attribute value: `ack`, `retry`, `dead_letter`, `duplicate_skipped`, `failed`, `aborted`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Retry => "retry",
            Outcome::DeadLetter(_) => "dead_letter",
            Outcome::DuplicateSkipped => "duplicate_skipped",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
        }
    }
}

fn failure_type(kind: Failure) -> &'static str {
    match kind {
        Failure::Retryable => "retryable",
        Failure::Permanent => "permanent",
        Failure::Undecodable => "undecodable",
        Failure::Exhausted => "exhausted",
        Failure::UnhandledType => "unhandled_type",
    }
}

/// The handle-path layer: extracts the trace context from the headers, runs
/// the rest of the stack and the handler inside a `CONSUMER` span
/// `process <topic>` (and a `tracing` span with the message's fields), and
/// records the outcome metrics. Make it with [`Telemetry::process_layer`] and
/// add it first (outermost).
///
/// The handler runs with the `process` span's context as
/// [`Context::current()`], so messages it publishes through an
/// [`OtelPublish`](crate::OtelPublish) layer continue the trace. Work the
/// handler spawns onto other tasks must carry the context itself
/// (`opentelemetry::context::FutureExt::with_current_context`).
#[derive(Clone, Debug)]
pub struct OtelProcess {
    telemetry: Telemetry,
    system: &'static str,
}

impl OtelProcess {
    pub(crate) fn new(telemetry: Telemetry, system: &'static str) -> Self {
        OtelProcess { telemetry, system }
    }
}

/// The marker layer from [`Telemetry::handler_reached`]: add it last, right
/// before the handler.
#[derive(Debug, Clone, Copy)]
pub struct HandlerReached;

#[async_trait]
impl Middleware for HandlerReached {
    async fn handle(&self, delivery: &Delivery, next: Next<'_>) -> HandlerResult {
        // Outside an `OtelProcess` scope there is nothing to mark.
        let _ = REACHED.try_with(|r| r.set(true));
        next.run(delivery).await
    }
}

/// Counts the delivery in flight until dropped; a drop before `finish`
/// (panic, cancellation) is recorded as `aborted`.
struct InFlight<'a> {
    shared: &'a Shared,
    labels: Vec<KeyValue>,
    cx: Context,
    start: Instant,
    recording: bool,
    finished: bool,
}

impl InFlight<'_> {
    fn record(&mut self, outcome: Outcome, error_type: Option<&'static str>) {
        self.finished = true;
        let elapsed = self.start.elapsed().as_secs_f64();
        let i = &self.shared.instruments;
        let base = self.labels.len();
        self.labels
            .push(KeyValue::new(attr::OPERATION_NAME, "process"));
        self.labels
            .push(KeyValue::new(attr::OUTCOME, outcome.as_str()));
        if let Some(t) = error_type {
            self.labels.push(KeyValue::new(attr::ERROR_TYPE, t));
        }
        i.consumed.add(1, &self.labels);
        i.process_duration.record(elapsed, &self.labels);
        self.labels.truncate(base);
        if let Outcome::DeadLetter(reason) = outcome {
            self.labels
                .push(KeyValue::new(attr::DEAD_LETTER_REASON, reason.as_str()));
            i.dead_letters.add(1, &self.labels);
            self.labels.truncate(base);
        }
        if self.recording {
            self.cx
                .span()
                .set_attribute(KeyValue::new(attr::OUTCOME, outcome.as_str()));
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.record(Outcome::Aborted, Some("aborted"));
            let span = self.cx.span();
            span.set_status(Status::error("handler panicked or was cancelled"));
            span.end();
        }
        self.shared.instruments.in_flight.add(-1, &self.labels);
    }
}

#[async_trait]
impl Middleware for OtelProcess {
    async fn handle(&self, delivery: &Delivery, next: Next<'_>) -> HandlerResult {
        let shared = &*self.telemetry.shared;
        let start = Instant::now();
        let message = delivery.message();
        let topic = delivery.shared_topic();
        let group = delivery.group();

        // Metric labels: low cardinality only.
        let mut labels = Vec::with_capacity(7);
        labels.push(KeyValue::new(attr::MESSAGING_SYSTEM, self.system));
        labels.push(KeyValue::new(attr::DESTINATION_NAME, topic.clone()));
        if let Some(g) = group {
            labels.push(KeyValue::new(attr::CONSUMER_GROUP, g.to_owned()));
        }
        if let Some(time) = message.metadata.time
            && let Ok(lag) = SystemTime::now().duration_since(time)
        {
            shared.instruments.lag.record(lag.as_secs_f64(), &labels);
        }

        // The span's parent (or link) from the headers.
        let current = Context::current();
        let (parent, links) = match shared.parent_mode {
            ParentMode::Parent => (shared.extract(&current, &message.headers), Vec::new()),
            ParentMode::Link => {
                let remote = shared.extract(&Context::new(), &message.headers);
                let sc = remote.span().span_context().clone();
                let links = if sc.is_valid() {
                    vec![Link::with_context(sc)]
                } else {
                    Vec::new()
                };
                (current, links)
            }
        };

        let attempt = delivery.attempt();
        let mut span = shared.tracer.build_with_context(
            SpanBuilder::from_name(format!("process {topic}"))
                .with_kind(SpanKind::Consumer)
                .with_links(links),
            &parent,
        );
        // Attributes cost allocations: only for spans that record.
        let recording = span.is_recording();
        if recording {
            let mut attrs = Vec::with_capacity(16);
            attrs.extend(labels.iter().cloned());
            attrs.push(KeyValue::new(attr::OPERATION_TYPE, "process"));
            attrs.push(KeyValue::new(attr::OPERATION_NAME, "process"));
            attrs.push(KeyValue::new(attr::MESSAGE_ID, String::from(&message.id)));
            attrs.push(KeyValue::new(attr::BODY_SIZE, message.payload.len() as i64));
            attrs.push(KeyValue::new(attr::ATTEMPT, i64::from(attempt)));
            crate::metadata_attributes(&mut attrs, self.system, message);
            if let Some(position) = delivery.position() {
                crate::position_attributes(&mut attrs, position);
            }
            span.set_attributes(attrs);
        }
        let m = &message.metadata;
        let cx = parent.with_span(span);
        let trace_id = cx.span().span_context().trace_id();

        let log_span = tracing::info_span!(
            "tidings.process",
            message_id = %message.id,
            event_type = m.event_type.as_deref(),
            topic = &**topic,
            group,
            attempt,
            correlation_id = m.correlation_id.as_deref(),
            %trace_id,
            payload = crate::payload_field(shared.payload_log, &message.payload),
        );

        shared.instruments.in_flight.add(1, &labels);
        let mut guard = InFlight {
            shared,
            labels,
            cx: cx.clone(),
            start,
            recording,
            finished: false,
        };

        let run = next.run(delivery).with_context(cx.clone());
        let detect = shared.detect_skips.load(Ordering::Relaxed);
        let (result, reached) = if detect {
            REACHED
                .scope(Cell::new(false), async {
                    let result = run.await;
                    (result, REACHED.try_with(Cell::get).unwrap_or(true))
                })
                .instrument(log_span.clone())
                .await
        } else {
            (run.instrument(log_span.clone()).await, true)
        };

        // The attempt may have risen during in-process retries below.
        let attempt = delivery.attempt();
        let outcome = match &result {
            Ok(()) if !reached => Outcome::DuplicateSkipped,
            Ok(()) => Outcome::Ack,
            // The runtime's own decision, with its limit when it handles the delivery.
            Err(error) => match delivery.max_attempts().or(shared.max_attempts) {
                Some(max) => match SettleAction::decide(&RetryPolicy::new(max), attempt, &result) {
                    SettleAction::DeadLetter { reason } => Outcome::DeadLetter(reason),
                    _ => Outcome::Retry,
                },
                None => error
                    .dead_letter_reason()
                    .map_or(Outcome::Failed, Outcome::DeadLetter),
            },
        };
        let error_type = result.as_ref().err().map(|e| failure_type(e.kind()));
        guard.record(outcome, error_type);
        let span = cx.span();
        if recording && let Err(error) = &result {
            if let Some(t) = error_type {
                span.set_attribute(KeyValue::new(attr::ERROR_TYPE, t));
            }
            span.set_status(Status::error(error.to_string()));
        }
        span.end();
        drop(guard);

        let _entered = log_span.enter();
        let elapsed_s = start.elapsed().as_secs_f64();
        match (&result, outcome) {
            (Ok(()), _) => {
                tracing::debug!(outcome = outcome.as_str(), elapsed_s, "message handled")
            }
            (Err(error), Outcome::DeadLetter(reason)) => tracing::warn!(
                outcome = outcome.as_str(),
                %reason,
                elapsed_s,
                %error,
                "handler failed; the message is dead-lettered"
            ),
            (Err(error), _) => tracing::info!(
                outcome = outcome.as_str(),
                elapsed_s,
                %error,
                "handler failed; the message will be retried"
            ),
        }
        result
    }
}
