//! The names of every span attribute, metric and metric attribute this crate
//! writes, in one place (see `docs/observability.md` for their meaning).
//!
//! Names under `messaging.`, `error.` and `cloudevents.` are from the
//! OpenTelemetry semantic conventions; names under `tidings.` are ours.

/// Span and metric attribute names.
pub mod attr {
    /// The broker: `kafka`, `rabbitmq`, `nats`, `redis`, or `tidings` for the in-process bus.
    pub const MESSAGING_SYSTEM: &str = "messaging.system";
    /// The topic.
    pub const DESTINATION_NAME: &str = "messaging.destination.name";
    /// `send` on the publish path, `process` on the handle path.
    pub const OPERATION_TYPE: &str = "messaging.operation.type";
    /// The operation's name: `send` or `process`.
    pub const OPERATION_NAME: &str = "messaging.operation.name";
    /// The message id (stable across redeliveries).
    pub const MESSAGE_ID: &str = "messaging.message.id";
    /// The payload size in bytes.
    pub const BODY_SIZE: &str = "messaging.message.body.size";
    /// The correlation id (the conventions' conversation id).
    pub const CONVERSATION_ID: &str = "messaging.message.conversation_id";
    /// The consumer group.
    pub const CONSUMER_GROUP: &str = "messaging.consumer.group.name";
    /// The Kafka partition (from the publish receipt on `send`, the delivery's position on `process`).
    pub const PARTITION_ID: &str = "messaging.destination.partition.id";
    /// The Kafka offset (from the publish receipt on `send`, the delivery's position on `process`).
    pub const KAFKA_OFFSET: &str = "messaging.kafka.offset";
    /// The Redis stream entry id of a delivery (`1700000000000-0`). The
    /// conventions define no Redis attribute, hence the `tidings.` namespace.
    pub const REDIS_ENTRY_ID: &str = "tidings.redis.stream.entry_id";
    /// The JetStream stream a delivery was read from. The conventions define
    /// no NATS attribute, hence the `tidings.` namespace.
    pub const NATS_STREAM: &str = "tidings.nats.stream.name";
    /// The delivery's sequence in its JetStream stream (the counterpart of the Kafka offset).
    pub const NATS_STREAM_SEQUENCE: &str = "tidings.nats.stream.sequence";
    /// The Kafka message key.
    pub const KAFKA_KEY: &str = "messaging.kafka.message.key";
    /// The class of the error: the failure kind on the handle path, the error variant on the publish path.
    pub const ERROR_TYPE: &str = "error.type";
    /// The CloudEvents event type (`ce_type`).
    pub const EVENT_TYPE: &str = "cloudevents.event_type";
    /// The CloudEvents event source (`ce_source`).
    pub const EVENT_SOURCE: &str = "cloudevents.event_source";
    /// The id of the message that caused this one.
    pub const CAUSATION_ID: &str = "tidings.causation_id";
    /// The delivery attempt, 1 on first delivery.
    pub const ATTEMPT: &str = "tidings.delivery.attempt";
    /// What became of the message; see [`Outcome`](crate::Outcome) and [`SendOutcome`](crate::SendOutcome).
    pub const OUTCOME: &str = "tidings.outcome";
    /// Why a message was dead-lettered (`permanent-error`, `undecodable`, `attempts-exhausted`).
    pub const DEAD_LETTER_REASON: &str = "tidings.dead_letter.reason";
    /// The name a circuit breaker was registered under.
    pub const BREAKER_NAME: &str = "tidings.circuit_breaker.name";
    /// How the runtime settled a delivery: `ack`, `nack`, `dead_letter`.
    pub const SETTLE_ACTION: &str = "tidings.settle.action";
    /// Whether the broker took the settlement: `ok` or `failed`.
    pub const SETTLE_RESULT: &str = "tidings.settle.result";
}

/// Metric names.
pub mod metric {
    /// Counter of messages the publisher tried to send, by outcome (`ok`, `error`).
    pub const SENT_MESSAGES: &str = "messaging.client.sent.messages";
    /// Histogram of the publish duration, seconds.
    pub const OPERATION_DURATION: &str = "messaging.client.operation.duration";
    /// Counter of handled deliveries, by outcome (`ack`, `retry`, `dead_letter`, `duplicate_skipped`, `aborted`).
    pub const CONSUMED_MESSAGES: &str = "messaging.client.consumed.messages";
    /// Histogram of the handling duration (middleware below this layer and the handler), seconds.
    pub const PROCESS_DURATION: &str = "messaging.process.duration";
    /// Histogram of the lag: the time the handling started minus the event time, seconds.
    pub const LAG: &str = "tidings.consumer.lag";
    /// Up-down counter of deliveries being handled now.
    pub const IN_FLIGHT: &str = "tidings.consumer.in_flight";
    /// Counter of dead-lettered messages, by reason.
    pub const DEAD_LETTERS: &str = "tidings.consumer.dead_letters";
    /// Counter of settlements the runtime made, by action and result
    /// (see [`Telemetry::settle_observer`](crate::Telemetry::settle_observer)).
    pub const SETTLEMENTS: &str = "tidings.consumer.settlements";
    /// Gauge of a circuit breaker's state: 0 closed, 1 half-open, 2 open.
    pub const BREAKER_STATE: &str = "tidings.circuit_breaker.state";
}

/// Header names the trace context travels in (W3C Trace Context).
pub mod header {
    /// `version-traceid-spanid-flags`.
    pub const TRACEPARENT: &str = "traceparent";
    /// Vendor trace state; never written when empty.
    pub const TRACESTATE: &str = "tracestate";
}

/// The `messaging.system` value for an adapter name (`Subscriber::name()`):
/// `amqp` is `rabbitmq`, `memory` is `tidings`, the others keep their name.
pub fn messaging_system(adapter: &'static str) -> &'static str {
    match adapter {
        "amqp" | "rabbitmq" => "rabbitmq",
        "memory" => "tidings",
        other => other,
    }
}
