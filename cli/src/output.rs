//! How messages and receipts are printed: JSON objects for scripts, text
//! for people. Payloads that are JSON stay JSON; UTF-8 text stays text;
//! anything else is base64.

use serde_json::{Value, json};
use tidings::{Message, Receipt};

/// A message as one JSON object.
pub(crate) fn message_json(topic: &str, message: &Message, attempt: u32) -> Value {
    let m = &message.metadata;
    let headers: serde_json::Map<String, Value> = message
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "topic": topic,
        "id": message.id,
        "type": m.event_type,
        "time": m.time.and_then(tidings::time::format_rfc3339),
        "source": m.source,
        "key": message.key,
        "correlation_id": m.correlation_id,
        "causation_id": m.causation_id,
        "attempt": attempt,
        "headers": headers,
        "payload": payload(&message.payload),
    })
}

/// A message for people: a line of what it is, its headers, its payload.
pub(crate) fn message_text(topic: &str, message: &Message, attempt: u32) -> String {
    let m = &message.metadata;
    let mut out = format!("--- {topic} id={}", message.id);
    let fields = [
        ("type", m.event_type.clone()),
        ("time", m.time.and_then(tidings::time::format_rfc3339)),
        ("key", message.key.clone()),
        ("correlation", m.correlation_id.clone()),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            out.push_str(&format!(" {name}={value}"));
        }
    }
    if attempt > 1 {
        out.push_str(&format!(" attempt={attempt}"));
    }
    let mut headers: Vec<_> = message.headers.iter().collect();
    headers.sort();
    for (name, value) in headers {
        out.push_str(&format!("\n  {name}: {value}"));
    }
    out.push('\n');
    out.push_str(&match payload(&message.payload) {
        Value::String(text) => text,
        json => serde_json::to_string_pretty(&json).unwrap_or_default(),
    });
    out
}

/// JSON as JSON, UTF-8 as a string, other bytes as `{"base64": …}`.
fn payload(bytes: &[u8]) -> Value {
    if let Ok(json) = serde_json::from_slice::<Value>(bytes) {
        return json;
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => {
            use base64::Engine as _;
            json!({ "base64": base64::engine::general_purpose::STANDARD.encode(bytes) })
        }
    }
}

/// A receipt as JSON.
pub(crate) fn receipt_json(receipt: &Receipt) -> Value {
    match receipt {
        Receipt::Accepted => json!("accepted"),
        Receipt::Offset { partition, offset } => json!({"partition": partition, "offset": offset}),
        Receipt::EntryId(entry) => json!({ "entry_id": entry }),
        Receipt::Sequence {
            stream,
            sequence,
            duplicate,
        } => json!({"stream": stream, "sequence": sequence, "duplicate": duplicate}),
        other => json!(format!("{other:?}")),
    }
}
