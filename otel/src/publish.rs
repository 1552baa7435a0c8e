//! The publish-path layer.

use std::time::Instant;

use async_trait::async_trait;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{Span as _, SpanBuilder, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use tidings_core::middleware::{PublishMiddleware, PublishNext};
use tidings_core::{Error, Message, Receipt, Result};

use crate::Telemetry;
use crate::names::attr;

/// What became of a publish, as the `tidings.outcome` attribute of
/// `messaging.client.sent.messages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// The broker accepted the message.
    Ok,
    /// Publishing failed (the error is returned to the caller).
    Error,
}

impl SendOutcome {
    /// The attribute value: `ok` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            SendOutcome::Ok => "ok",
            SendOutcome::Error => "error",
        }
    }
}

/// The publish-path layer: a `PRODUCER` span `send <topic>`, the trace
/// context injected into the headers, publish metrics and a log event.
/// Make it with [`Telemetry::publish_layer`]; add it to a
/// [`LayeredPublisher`](tidings_core::middleware::LayeredPublisher) as the
/// first layer, so that the injected context is the one that travels and
/// retries below it are inside its span.
///
/// The span's parent is [`Context::current()`]: inside a handler wrapped by
/// [`OtelProcess`](crate::OtelProcess), that is the `process` span, so the
/// chained message continues the trace.
#[derive(Clone, Debug)]
pub struct OtelPublish {
    telemetry: Telemetry,
    system: &'static str,
}

impl OtelPublish {
    pub(crate) fn new(telemetry: Telemetry, system: &'static str) -> Self {
        OtelPublish { telemetry, system }
    }
}

/// The `error.type` of a core error: its variant, in snake case.
pub(crate) fn error_type(error: &Error) -> &'static str {
    match error {
        Error::Connection { .. } => "connection",
        Error::Publish { .. } => "publish",
        Error::Unroutable { .. } => "unroutable",
        Error::Closed(_) => "closed",
        Error::AlreadySettled { .. } => "already_settled",
        Error::Settle { .. } => "settle",
        Error::Subscribe { .. } => "subscribe",
        Error::Unsupported { .. } => "unsupported",
        Error::Config { .. } => "config",
        Error::Codec(_) => "codec",
        Error::Timeout { .. } => "timeout",
        Error::Broker { .. } => "broker",
        _ => "_OTHER",
    }
}

#[async_trait]
impl PublishMiddleware for OtelPublish {
    async fn publish(
        &self,
        topic: &str,
        mut message: Message,
        next: PublishNext<'_>,
    ) -> Result<Receipt> {
        let shared = &*self.telemetry.shared;
        let start = Instant::now();
        let topic_value: std::sync::Arc<str> = topic.into();

        let parent = Context::current();
        let mut span = shared.tracer.build_with_context(
            SpanBuilder::from_name(format!("send {topic}")).with_kind(SpanKind::Producer),
            &parent,
        );
        // Attributes cost allocations: only for spans that record.
        let recording = span.is_recording();
        if recording {
            span.set_attributes(send_attributes(self.system, &topic_value, &message));
        }
        let cx = parent.with_span(span);
        shared.inject(&cx, &mut message.headers);

        // DEBUG enabled implies WARN enabled.
        let log = tracing::enabled!(tracing::Level::WARN);
        let logged = log.then(|| {
            (
                message.id.clone(),
                message.metadata.event_type.clone(),
                message.metadata.correlation_id.clone(),
                crate::payload_field(shared.payload_log, &message.payload),
            )
        });

        let result = next.run(topic, message).with_context(cx.clone()).await;
        let elapsed = start.elapsed().as_secs_f64();

        let span = cx.span();
        let outcome = match &result {
            Ok(receipt) => {
                if recording {
                    let mut attrs = Vec::new();
                    crate::position_attributes(&mut attrs, receipt);
                    if !attrs.is_empty() {
                        span.set_attributes(attrs);
                    }
                }
                SendOutcome::Ok
            }
            Err(error) => {
                if recording {
                    span.set_attribute(KeyValue::new(attr::ERROR_TYPE, error_type(error)));
                    span.set_status(Status::error(error.to_string()));
                }
                SendOutcome::Error
            }
        };
        span.end();

        let mut labels = Vec::with_capacity(5);
        labels.push(KeyValue::new(attr::MESSAGING_SYSTEM, self.system));
        labels.push(KeyValue::new(attr::DESTINATION_NAME, topic_value));
        labels.push(KeyValue::new(attr::OPERATION_NAME, "send"));
        labels.push(KeyValue::new(attr::OUTCOME, outcome.as_str()));
        if let Err(error) = &result {
            labels.push(KeyValue::new(attr::ERROR_TYPE, error_type(error)));
        }
        shared.instruments.sent.add(1, &labels);
        shared.instruments.publish_duration.record(elapsed, &labels);

        if let Some((id, event_type, correlation_id, payload)) = logged {
            let trace_id = span.span_context().trace_id();
            match &result {
                Ok(_) => tracing::debug!(
                    message_id = %id,
                    event_type,
                    topic,
                    correlation_id,
                    %trace_id,
                    outcome = outcome.as_str(),
                    elapsed_s = elapsed,
                    payload,
                    "message published"
                ),
                Err(error) => tracing::warn!(
                    message_id = %id,
                    event_type,
                    topic,
                    correlation_id,
                    %trace_id,
                    outcome = outcome.as_str(),
                    elapsed_s = elapsed,
                    payload,
                    %error,
                    "publishing failed"
                ),
            }
        }
        result
    }
}

/// The `send` span's attributes.
fn send_attributes(
    system: &'static str,
    topic: &std::sync::Arc<str>,
    message: &Message,
) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(12);
    attrs.push(KeyValue::new(attr::MESSAGING_SYSTEM, system));
    attrs.push(KeyValue::new(attr::DESTINATION_NAME, topic.clone()));
    attrs.push(KeyValue::new(attr::OPERATION_TYPE, "send"));
    attrs.push(KeyValue::new(attr::OPERATION_NAME, "send"));
    attrs.push(KeyValue::new(attr::MESSAGE_ID, String::from(&message.id)));
    attrs.push(KeyValue::new(attr::BODY_SIZE, message.payload.len() as i64));
    crate::metadata_attributes(&mut attrs, system, message);
    attrs
}
