//! Stream entries: a message as field/value pairs, and reading entries
//! back (those of plain clients too), or saying why an entry is foreign.

use std::fmt;

use bytes::Bytes;
use redis::Value;
use tidings_core::Message;
use tidings_core::dialect::Native;

use super::{Layout, NAMES, PAYLOAD_FIELD};

/// A stream entry that Tidings cannot read as a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignEntry {
    /// The entry id.
    pub entry_id: String,
    /// What is wrong with it.
    pub problem: ForeignProblem,
}

/// What makes an entry foreign.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForeignProblem {
    /// There is no `payload` field.
    MissingPayload,
    /// A field name or a header value is not UTF-8.
    NotUtf8 {
        /// The field, lossily decoded.
        field: String,
    },
    /// The entry is not a list of field/value pairs.
    Malformed,
    /// The configured dialect cannot read its body.
    Undecodable(tidings_core::dialect::Undecodable),
}

impl fmt::Display for ForeignEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = &self.entry_id;
        match &self.problem {
            ForeignProblem::MissingPayload => write!(
                f,
                "stream entry {id} is not a Tidings message: it has no `{PAYLOAD_FIELD}` field"
            ),
            ForeignProblem::NotUtf8 { field } => write!(
                f,
                "stream entry {id} is not a Tidings message: field `{field}` is not UTF-8"
            ),
            ForeignProblem::Malformed => write!(
                f,
                "stream entry {id} is not a Tidings message: its fields are not name/value pairs"
            ),
            ForeignProblem::Undecodable(e) => write!(f, "stream entry {id}: {e}"),
        }
    }
}

impl std::error::Error for ForeignEntry {}

/// Calls `f` with every field/value pair the message is written with in
/// `layout`, the body first.
pub fn write_fields(layout: &Layout, message: &Message, mut f: impl FnMut(&[u8], &[u8])) {
    if !layout.is_default() {
        // Another dialect or field names: the body is known only after the headers.
        let mut pairs: Vec<(String, String)> = Vec::with_capacity(message.headers.len() + 8);
        let body = layout.dialect.encode(message, &NAMES, |name, value| {
            pairs.push((layout.field_for(name).to_owned(), value.to_owned()));
        });
        f(layout.payload_field.as_bytes(), &body);
        let mut escaped = String::new();
        for (name, value) in &pairs {
            if name == &layout.payload_field || name.starts_with('\\') {
                escaped.clear();
                escaped.push('\\');
                escaped.push_str(name);
                f(escaped.as_bytes(), value.as_bytes());
            } else {
                f(name.as_bytes(), value.as_bytes());
            }
        }
        return;
    }
    f(PAYLOAD_FIELD.as_bytes(), &message.payload);
    let mut escaped = String::new();
    message.write_headers(&NAMES, |name, value| {
        if needs_escape(name) {
            escaped.clear();
            escaped.push('\\');
            escaped.push_str(name);
            f(escaped.as_bytes(), value.as_bytes());
        } else {
            f(name.as_bytes(), value.as_bytes());
        }
    });
}

fn needs_escape(name: &str) -> bool {
    name == PAYLOAD_FIELD || name.starts_with('\\')
}

/// Appends the message's fields in `layout` as arguments to an `XADD` command.
pub fn add_fields(cmd: &mut redis::Cmd, layout: &Layout, message: &Message) {
    write_fields(layout, message, |name, value| {
        cmd.arg(name).arg(value);
    });
}

/// Checks that the fields of a stream entry (`[name, value, name, value, ...]`
/// as Redis returns them) are one of our messages.
pub fn check_fields(entry_id: &str, fields: &[Value]) -> Result<(), ForeignEntry> {
    check_fields_in(PAYLOAD_FIELD, entry_id, fields)
}

fn check_fields_in(
    payload_field: &str,
    entry_id: &str,
    fields: &[Value],
) -> Result<(), ForeignEntry> {
    let foreign = |problem| ForeignEntry {
        entry_id: entry_id.to_owned(),
        problem,
    };
    if !fields.len().is_multiple_of(2) {
        return Err(foreign(ForeignProblem::Malformed));
    }
    let mut has_payload = false;
    for pair in fields.chunks_exact(2) {
        let (Some(name), Some(value)) = (bulk_ref(&pair[0]), bulk_ref(&pair[1])) else {
            return Err(foreign(ForeignProblem::Malformed));
        };
        if name == payload_field.as_bytes() {
            has_payload = true;
            continue;
        }
        let Ok(name) = std::str::from_utf8(name) else {
            return Err(foreign(ForeignProblem::NotUtf8 {
                field: String::from_utf8_lossy(name).into_owned(),
            }));
        };
        if std::str::from_utf8(value).is_err() {
            return Err(foreign(ForeignProblem::NotUtf8 {
                field: name.to_owned(),
            }));
        }
    }
    if has_payload {
        Ok(())
    } else {
        Err(foreign(ForeignProblem::MissingPayload))
    }
}

/// Reads a message from the fields of a stream entry (`[name, value, name, value, ...]`
/// as Redis returns them). The payload is moved out of the reply, not copied.
pub fn read_fields(entry_id: &str, fields: Vec<Value>) -> Result<Message, ForeignEntry> {
    match read_fields_in(&Layout::default(), entry_id, fields) {
        (message, None) => Ok(message),
        (_, Some(foreign)) => Err(foreign),
    }
}

/// [`read_fields`] in `layout`: the body from its payload field, renamed
/// fields as the headers they stand for, then the dialect's decoding (with
/// the entry id as the fallback id). Always gives a message: when the
/// entry is not one (a [`ForeignEntry`], [`ForeignProblem::Undecodable`]
/// when the dialect cannot read its body), what could be salvaged of it,
/// so it can be dead-lettered. The payload is moved out of the reply.
pub fn read_fields_in(
    layout: &Layout,
    entry_id: &str,
    fields: Vec<Value>,
) -> (Message, Option<ForeignEntry>) {
    let foreign = |problem| {
        Some(ForeignEntry {
            entry_id: entry_id.to_owned(),
            problem,
        })
    };
    if let Err(shape) = check_shape(&layout.payload_field, &fields) {
        // Named as the full check names it (a field that is not UTF-8
        // before the shape's problem is reported as that): rare, so the
        // fields are looked at twice here.
        let problem = match check_fields_in(&layout.payload_field, entry_id, &fields) {
            Err(foreign) => foreign.problem,
            Ok(()) => shape,
        };
        return (
            salvage_in(&layout.payload_field, entry_id, &fields),
            foreign(problem),
        );
    }
    let payload_field = layout.payload_field.as_bytes();
    let mut payload = None;
    let mut headers = Vec::with_capacity(fields.len() / 2);
    let mut it = fields.into_iter();
    while let (Some(name), Some(value)) = (it.next(), it.next()) {
        let (Some(name), Some(value)) = (bulk(name), bulk(value)) else {
            continue;
        };
        if name == payload_field {
            payload = Some(Bytes::from(value));
            continue;
        }
        // UTF-8 is checked once, as each field becomes a `String`. An entry
        // that turns out not to be UTF-8 is put back together to be salvaged.
        match (String::from_utf8(name), String::from_utf8(value)) {
            (Ok(name), Ok(value)) => headers.push((name, value)),
            (name, value) => {
                let name = name.map_or_else(|e| e.into_bytes(), String::into_bytes);
                let value = value.map_or_else(|e| e.into_bytes(), String::into_bytes);
                let problem = ForeignProblem::NotUtf8 {
                    field: String::from_utf8_lossy(&name).into_owned(),
                };
                let bulk = Value::BulkString;
                let mut fields: Vec<Value> = headers
                    .into_iter()
                    .flat_map(|(n, v)| [bulk(n.into_bytes()), bulk(v.into_bytes())])
                    .collect();
                if let Some(payload) = payload {
                    fields.extend([bulk(payload_field.to_vec()), bulk(payload.into())]);
                }
                fields.extend([bulk(name), bulk(value)]);
                fields.extend(it);
                return (
                    salvage_in(&layout.payload_field, entry_id, &fields),
                    foreign(problem),
                );
            }
        }
    }
    // Renamed fields read as the headers they stand for; `\`-escaped ones as
    // themselves.
    let headers = headers.into_iter().map(|(name, value)| {
        let name = match name.strip_prefix('\\') {
            Some(unescaped) => unescaped.to_owned(),
            None => layout.header_for(name),
        };
        (name, value)
    });
    let payload = payload.unwrap_or_default();
    let plain =
        |headers, payload| Message::from_headers(&NAMES, headers, payload, Some(entry_id.into()));
    if layout.is_default() {
        return (plain(headers, payload), None);
    }
    let native = Native {
        id: Some(entry_id),
        ..Native::default()
    };
    match layout.dialect.decode(&NAMES, headers, payload, native) {
        Ok(message) => (message, None),
        Err(rejected) => (
            rejected.salvaged,
            foreign(ForeignProblem::Undecodable(rejected.why)),
        ),
    }
}

/// The shape of an entry Tidings wrote: name/value pairs of strings, one of
/// them the payload. UTF-8 is checked as the fields are read.
fn check_shape(payload_field: &str, fields: &[Value]) -> Result<(), ForeignProblem> {
    if !fields.len().is_multiple_of(2) || fields.iter().any(|f| bulk_ref(f).is_none()) {
        return Err(ForeignProblem::Malformed);
    }
    let payload_field = payload_field.as_bytes();
    if fields
        .chunks_exact(2)
        .any(|pair| bulk_ref(&pair[0]) == Some(payload_field))
    {
        Ok(())
    } else {
        Err(ForeignProblem::MissingPayload)
    }
}

/// A best-effort message from a foreign entry, so it can be dead-lettered:
/// UTF-8 fields become headers (lossily), the payload is the `payload`
/// field if there is one, else empty; the id is the entry id.
pub fn salvage(entry_id: &str, fields: &[Value]) -> Message {
    salvage_in(PAYLOAD_FIELD, entry_id, fields)
}

/// [`salvage`] with the body in `payload_field`.
pub fn salvage_in(payload_field: &str, entry_id: &str, fields: &[Value]) -> Message {
    let mut payload = Bytes::new();
    let mut headers = Vec::new();
    for pair in fields.chunks(2) {
        let [name, value] = pair else { break };
        let (Some(name), Some(value)) = (bulk_ref(name), bulk_ref(value)) else {
            continue;
        };
        if name == payload_field.as_bytes() {
            payload = Bytes::copy_from_slice(value);
        } else {
            headers.push((
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ));
        }
    }
    Message::from_headers(&NAMES, headers, payload, Some(entry_id.into()))
}

fn bulk(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn bulk_ref(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::headers::tests::full;

    /// The fields as Redis returns them from XREADGROUP.
    fn as_redis(message: &Message) -> Vec<Value> {
        let mut fields = Vec::new();
        write_fields(&Layout::default(), message, |n, v| {
            fields.push(Value::BulkString(n.to_vec()));
            fields.push(Value::BulkString(v.to_vec()));
        });
        fields
    }

    #[test]
    fn stream_fields_round_trip_binary_payload_and_non_ascii_headers() {
        let m = full();
        let back = read_fields("1-1", as_redis(&m)).expect("ours");
        assert_eq!(back, m);
    }

    #[test]
    fn empty_and_large_payloads_round_trip() {
        for payload in [Bytes::new(), Bytes::from(vec![7u8; 1 << 20])] {
            let m = Message::new(payload);
            assert_eq!(read_fields("1-2", as_redis(&m)).expect("ours"), m);
        }
    }

    #[test]
    fn payload_is_the_first_field_and_headers_are_readable() {
        let m = full();
        let fields = as_redis(&m);
        assert_eq!(fields[0], Value::BulkString(b"payload".to_vec()));
        let names: Vec<_> = fields
            .iter()
            .step_by(2)
            .map(|v| match v {
                Value::BulkString(b) => String::from_utf8(b.clone()).expect("utf8"),
                _ => String::new(),
            })
            .collect();
        assert!(names.contains(&"ce_id".to_owned()));
        assert!(names.contains(&"ce_type".to_owned()));
        assert!(names.contains(&"grüße".to_owned()));
        assert!(names.contains(&"\\payload".to_owned()));
        assert!(names.contains(&"\\\\odd".to_owned()));
    }

    #[test]
    fn plain_client_entry_is_read_with_entry_id_as_fallback() {
        let fields = vec![
            Value::BulkString(b"payload".to_vec()),
            Value::BulkString(b"{}".to_vec()),
            Value::BulkString(b"ce_type".to_vec()),
            Value::BulkString(b"order.placed".to_vec()),
        ];
        let m = read_fields("1700000000000-3", fields).expect("ours");
        assert_eq!(m.id, "1700000000000-3");
        assert_eq!(m.metadata.event_type.as_deref(), Some("order.placed"));
        assert_eq!(m.payload, "{}");
    }

    #[test]
    fn entry_without_payload_is_a_typed_error() {
        let fields = vec![
            Value::BulkString(b"temperature".to_vec()),
            Value::BulkString(b"21".to_vec()),
        ];
        let err = read_fields("5-0", fields.clone()).expect_err("foreign");
        assert_eq!(err.problem, ForeignProblem::MissingPayload);
        assert_eq!(err.entry_id, "5-0");
        assert!(err.to_string().contains("no `payload` field"), "{err}");
        let salvaged = salvage("5-0", &fields);
        assert_eq!(salvaged.id, "5-0");
        assert_eq!(salvaged.headers["temperature"], "21");
        assert!(salvaged.payload.is_empty());
    }

    #[test]
    fn non_utf8_header_and_odd_fields_are_typed_errors() {
        let fields = vec![
            Value::BulkString(b"payload".to_vec()),
            Value::BulkString(b"x".to_vec()),
            Value::BulkString(b"h".to_vec()),
            Value::BulkString(vec![0xff, 0xfe]),
        ];
        let err = read_fields("6-0", fields).expect_err("foreign");
        assert_eq!(err.problem, ForeignProblem::NotUtf8 { field: "h".into() });
        let odd = vec![Value::BulkString(b"payload".to_vec())];
        let err = read_fields("7-0", odd).expect_err("foreign");
        assert_eq!(err.problem, ForeignProblem::Malformed);
    }

    #[test]
    fn a_field_found_not_utf8_while_reading_salvages_the_whole_entry() {
        let b = |v: &[u8]| Value::BulkString(v.to_vec());
        // Before and after the payload: everything readable is kept.
        for fields in [
            vec![
                b(b"ce_type"),
                b(b"t"),
                b(b"payload"),
                b(b"x"),
                b(b"h"),
                b(&[0xff]),
                b(b"after"),
                b(b"1"),
            ],
            vec![
                b(b"ce_type"),
                b(b"t"),
                b(b"h"),
                b(&[0xff]),
                b(b"payload"),
                b(b"x"),
                b(b"after"),
                b(b"1"),
            ],
        ] {
            let (m, foreign) = read_fields_in(&Layout::default(), "8-0", fields);
            let foreign = foreign.expect("foreign");
            assert_eq!(
                foreign.problem,
                ForeignProblem::NotUtf8 { field: "h".into() }
            );
            assert_eq!(foreign.entry_id, "8-0");
            assert_eq!(m.id, "8-0");
            assert_eq!(m.payload, "x");
            assert_eq!(m.metadata.event_type.as_deref(), Some("t"));
            assert_eq!(m.headers["after"], "1");
            assert_eq!(m.headers["h"], "\u{fffd}");
        }
        // Without a payload as well: still named for the field, as `check_fields` does.
        let fields = vec![b(b"h"), b(&[0xff])];
        let (_, foreign) = read_fields_in(&Layout::default(), "9-1", fields.clone());
        let problem = ForeignProblem::NotUtf8 { field: "h".into() };
        assert_eq!(foreign.expect("foreign").problem, problem);
        assert_eq!(
            check_fields("9-1", &fields).expect_err("foreign").problem,
            problem
        );
        // A name that is not UTF-8 is named as well as it can be.
        let fields = vec![b(b"payload"), b(b"x"), b(&[b'k', 0xff]), b(b"v")];
        let (m, foreign) = read_fields_in(&Layout::default(), "9-0", fields);
        assert_eq!(
            foreign.expect("foreign").problem,
            ForeignProblem::NotUtf8 {
                field: "k\u{fffd}".into()
            }
        );
        assert_eq!(m.payload, "x");
    }
}
