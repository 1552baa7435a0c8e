//! CloudEvents 1.0 in the JSON event format.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::json::{read_time, text};
use super::{Native, Undecodable};
use crate::message::wire;
use crate::message::{Headers, Message, MessageId, Metadata};
use crate::time;

/// The context attributes Tidings maps to metadata.
const KNOWN: [&str; 13] = [
    "specversion",
    "id",
    "type",
    "source",
    "time",
    "datacontenttype",
    "data",
    "data_base64",
    "schemaversion",
    "correlationid",
    "causationid",
    "partitionkey",
    "subject",
];

pub(super) fn encode(message: &Message) -> Vec<u8> {
    let m = &message.metadata;
    let mut root = Map::new();
    root.insert("specversion".into(), wire::SPEC_VERSION.into());
    root.insert("id".into(), message.id.as_str().into());
    root.insert(
        "source".into(),
        m.source.as_deref().unwrap_or(wire::DEFAULT_SOURCE).into(),
    );
    // `type` is required by the spec; a message without one says what it is not.
    root.insert(
        "type".into(),
        m.event_type.as_deref().unwrap_or("tidings.message").into(),
    );
    if let Some(t) = m.time.and_then(time::format_rfc3339) {
        root.insert("time".into(), t.into());
    }
    let optional = [
        ("schemaversion", &m.schema_version),
        ("correlationid", &m.correlation_id),
        ("causationid", &m.causation_id),
        ("partitionkey", &message.key),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            root.insert(name.into(), v.clone().into());
        }
    }
    let json_content = m.content_type.as_deref().is_none_or(|c| c.contains("json"));
    match serde_json::from_slice::<Value>(&message.payload) {
        Ok(data) if json_content && !message.payload.is_empty() => {
            root.insert(
                "datacontenttype".into(),
                m.content_type
                    .as_deref()
                    .unwrap_or("application/json")
                    .into(),
            );
            root.insert("data".into(), data);
        }
        _ => {
            use base64::Engine as _;
            if let Some(c) = &m.content_type {
                root.insert("datacontenttype".into(), c.clone().into());
            }
            root.insert(
                "data_base64".into(),
                base64::engine::general_purpose::STANDARD
                    .encode(&message.payload)
                    .into(),
            );
        }
    }
    serde_json::to_vec(&Value::Object(root)).unwrap_or_default()
}

pub(super) fn decode(
    body: &[u8],
    mut headers: Headers,
    native: Native<'_>,
) -> std::result::Result<Message, Undecodable> {
    let undecodable = |problem: String| Undecodable {
        dialect: "cloudevents-structured",
        problem,
    };
    let root: Value = serde_json::from_slice(body)
        .map_err(|e| undecodable(format!("the body is not JSON ({e})")))?;
    let Value::Object(map) = root else {
        return Err(undecodable("the body is not a JSON object".into()));
    };
    if map.get("specversion").and_then(Value::as_str).is_none() {
        return Err(undecodable("it has no `specversion`".into()));
    }
    let s = |name: &str| map.get(name).and_then(text);
    let payload = match (map.get("data"), map.get("data_base64")) {
        (_, Some(Value::String(b64))) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| undecodable(format!("`data_base64` is not base64 ({e})")))?
        }
        (Some(Value::String(text)), _) => text.clone().into_bytes(),
        (Some(data), _) => serde_json::to_vec(data).unwrap_or_default(),
        (None, _) => Vec::new(),
    };
    // Extension attributes Tidings has no field for travel as headers.
    for (name, value) in &map {
        if !KNOWN.contains(&name.as_str())
            && let Some(v) = text(value)
        {
            headers.entry(name.clone()).or_insert(v);
        }
    }
    let source = s("source").filter(|s| s != wire::DEFAULT_SOURCE);
    Ok(Message {
        id: s("id")
            .map(MessageId::from)
            .or_else(|| native.id.map(MessageId::from))
            .unwrap_or_else(crate::message::new_id),
        key: s("partitionkey"),
        headers,
        payload: Bytes::from(payload),
        metadata: Metadata {
            event_type: s("type"),
            source,
            time: map.get("time").and_then(read_time),
            schema_version: s("schemaversion"),
            correlation_id: s("correlationid"),
            causation_id: s("causationid"),
            content_type: s("datacontenttype"),
        },
    })
}
