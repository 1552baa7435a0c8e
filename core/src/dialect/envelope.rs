//! The JSON envelope dialect: fields at configurable paths.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::json::{get, payload_value, read_time, set, text};
use super::{Native, Undecodable};
use crate::message::{Headers, Message, MessageId, Metadata};
use crate::time;

/// Where the fields of a JSON envelope are, as dot-separated paths
/// (`metadata.correlationId`); `None` leaves a field out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The message id (default `id`).
    pub id: Option<String>,
    /// The event type (default `type`).
    pub event_type: Option<String>,
    /// The event time (default `timestamp`).
    pub time: Option<String>,
    /// How the time is written (default ISO 8601 / RFC 3339).
    pub time_format: TimeFormat,
    /// The event source (default none).
    pub source: Option<String>,
    /// The correlation id (default `metadata.correlationId`).
    pub correlation_id: Option<String>,
    /// The causation id (default `metadata.causationId`).
    pub causation_id: Option<String>,
    /// The payload (default `payload`): the handler's `Event<T>` gets it as `T`.
    pub data: String,
}

impl Default for Envelope {
    fn default() -> Self {
        Envelope {
            id: Some("id".into()),
            event_type: Some("type".into()),
            time: Some("timestamp".into()),
            time_format: TimeFormat::Rfc3339,
            source: None,
            correlation_id: Some("metadata.correlationId".into()),
            causation_id: Some("metadata.causationId".into()),
            data: "payload".into(),
        }
    }
}

/// How an envelope writes its time. Reading takes any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeFormat {
    /// `2024-05-01T10:00:00.123Z` (what `Date.toISOString()` writes).
    #[default]
    Rfc3339,
    /// Seconds since the Unix epoch, a number.
    EpochSeconds,
    /// Milliseconds since the Unix epoch, a number (`Date.now()`).
    EpochMillis,
}

impl Envelope {
    /// The body of `message` in this envelope.
    pub(super) fn encode(&self, message: &Message) -> Vec<u8> {
        let mut root = Map::new();
        let m = &message.metadata;
        let mut put = |path: &Option<String>, value: Option<Value>| {
            if let (Some(path), Some(value)) = (path, value) {
                set(&mut root, path, value);
            }
        };
        put(&self.id, Some(Value::String(String::from(&message.id))));
        put(&self.event_type, m.event_type.clone().map(Value::String));
        let when = m.time.and_then(|t| match self.time_format {
            TimeFormat::Rfc3339 => time::format_rfc3339(t).map(Value::String),
            TimeFormat::EpochSeconds => t
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| Value::from(d.as_secs())),
            TimeFormat::EpochMillis => t
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| Value::from(d.as_millis() as u64)),
        });
        put(&self.time, when);
        put(&self.source, m.source.clone().map(Value::String));
        put(
            &self.correlation_id,
            m.correlation_id.clone().map(Value::String),
        );
        put(
            &self.causation_id,
            m.causation_id.clone().map(Value::String),
        );
        set(&mut root, &self.data, payload_value(&message.payload));
        serde_json::to_vec(&Value::Object(root)).unwrap_or_default()
    }

    /// The message in `body`, with `headers` as they came.
    pub(super) fn decode(
        &self,
        body: &[u8],
        headers: Headers,
        native: Native<'_>,
    ) -> std::result::Result<Message, Undecodable> {
        let undecodable = |problem: String| Undecodable {
            dialect: "envelope",
            problem,
        };
        let root: Value = serde_json::from_slice(body)
            .map_err(|e| undecodable(format!("the body is not JSON ({e})")))?;
        if !root.is_object() {
            return Err(undecodable("the body is not a JSON object".into()));
        }
        let data = get(&root, &self.data)
            .ok_or_else(|| undecodable(format!("it has no `{}` field", self.data)))?;
        let field = |path: &Option<String>| path.as_deref().and_then(|p| get(&root, p));
        let payload = serde_json::to_vec(data).unwrap_or_default();
        let metadata = Metadata {
            event_type: field(&self.event_type).and_then(text),
            source: field(&self.source).and_then(text),
            time: field(&self.time).and_then(read_time),
            schema_version: None,
            correlation_id: field(&self.correlation_id).and_then(text),
            causation_id: field(&self.causation_id).and_then(text),
            content_type: Some("application/json".into()),
        };
        let id = field(&self.id)
            .and_then(text)
            .map(MessageId::from)
            .or_else(|| native.id.map(MessageId::from));
        Ok(Message {
            id: id.unwrap_or_else(crate::message::new_id),
            key: None,
            headers,
            payload: Bytes::from(payload),
            metadata,
        })
    }
}
