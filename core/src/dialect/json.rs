//! Reading and writing JSON fields by path, for the dialects that put the
//! event in the body.

use std::time::SystemTime;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::time;

/// A JSON value at a dot-separated path.
pub(super) fn get<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(root, |v, key| v.get(key))
}

/// Sets a JSON value at a dot-separated path, making objects on the way.
pub(super) fn set(root: &mut Map<String, Value>, path: &str, value: Value) {
    let mut keys = path.split('.').peekable();
    let mut node = root;
    while let Some(key) = keys.next() {
        if keys.peek().is_none() {
            node.insert(key.to_owned(), value);
            return;
        }
        let next = node
            .entry(key.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if !next.is_object() {
            *next = Value::Object(Map::new());
        }
        node = match next {
            Value::Object(map) => map,
            _ => return,
        };
    }
}

/// A string field: strings as they are, numbers as written.
pub(super) fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A time field: RFC 3339 text, or a number of seconds or milliseconds.
pub(super) fn read_time(value: &Value) -> Option<SystemTime> {
    match value {
        Value::String(s) => time::parse_rfc3339(s).or_else(|| {
            s.parse::<u64>()
                .ok()
                .and_then(time::from_unix_secs_or_millis)
        }),
        Value::Number(n) => n.as_u64().and_then(time::from_unix_secs_or_millis),
        _ => None,
    }
}

/// The payload as a JSON value: itself when it is JSON, else a string.
pub(super) fn payload_value(payload: &Bytes) -> Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()))
}
