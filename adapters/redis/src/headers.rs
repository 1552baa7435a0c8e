//! How a [`Message`] is written to Redis and read back.
//!
//! **Streams.** An entry is a flat list of field/value pairs. Tidings writes
//! the payload under the field [`PAYLOAD_FIELD`] (binary-safe) and every header
//! as one field named after it: the CloudEvents attributes of
//! [`wire::BINARY`] (`ce_id`, `ce_type`, `ce_time`, ...) and the application
//! headers. A header whose name is `payload` or starts with `\` is written
//! with one `\` in front, so no header can shadow the payload. A plain client
//! can therefore write `XADD orders * payload '{...}' ce_type order.placed`
//! and a Tidings consumer reads it as a message (its id falls back to the
//! entry id when there is no `ce_id`).
//!
//! An entry without a `payload` field, or with a field name or header value
//! that is not UTF-8, is not one of ours: reading it gives a
//! [`ForeignEntry`] error; the subscriber dead-letters it and keeps going.
//!
//! **Pub/Sub.** A channel message is one binary string, so headers and
//! payload are framed: the magic `TDG1`, a big-endian `u32` header count, then
//! per header a `u32` length and the name, a `u32` length and the value, then
//! the payload to the end. A message without the magic is a plain client's:
//! its whole body is the payload.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use redis::Value;
use tidings_core::dialect::Native;
use tidings_core::{Dialect, Message, wire};

/// The stream field that carries the payload.
pub const PAYLOAD_FIELD: &str = "payload";

/// The first bytes of a framed Pub/Sub message.
pub const PUBSUB_MAGIC: &[u8; 4] = b"TDG1";

/// The names the adapter uses for the CloudEvents attributes.
pub const NAMES: wire::Names = wire::BINARY;

/// How messages map to stream entries and channel bodies: the dialect, the
/// field that carries the body, and fields named otherwise than the
/// dialect's headers (`XADD s * type t data {...} timestamp ...` is the
/// binary dialect with the body in `data`, `ce_type` named `type` and
/// `ce_time` named `timestamp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The dialect (`dialect`, `envelope.<field>`).
    pub dialect: Dialect,
    /// The field that carries the body (`payload_field`, default `payload`).
    pub payload_field: String,
    /// Headers written and read under another field name
    /// (`field.<attribute>=<name>`, attribute one of id, type, time, source,
    /// correlation_id, causation_id, content_type, key): `(header, field)`.
    pub renames: Vec<(&'static str, String)>,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            dialect: Dialect::CloudEventsBinary,
            payload_field: PAYLOAD_FIELD.to_owned(),
            renames: Vec::new(),
        }
    }
}

impl Layout {
    /// Whether this is Tidings' own layout, written without a detour.
    fn is_default(&self) -> bool {
        self.dialect == Dialect::CloudEventsBinary
            && self.payload_field == PAYLOAD_FIELD
            && self.renames.is_empty()
    }

    /// Applies a `field.<attribute>=<name>` option; `Ok(false)` when `key` is not one.
    pub fn apply_option(&mut self, key: &str, value: &str) -> tidings_core::Result<bool> {
        let Some(attribute) = key.strip_prefix("field.") else {
            return Ok(false);
        };
        let header = match attribute {
            "id" => NAMES.id,
            "type" => NAMES.event_type,
            "time" => NAMES.time,
            "source" => NAMES.source,
            "correlation_id" => NAMES.correlation_id,
            "causation_id" => NAMES.causation_id,
            "content_type" => NAMES.content_type,
            "key" => NAMES.key,
            other => {
                return Err(tidings_core::Error::Config {
                    key: key.to_owned(),
                    message: format!(
                        "`{other}` is no attribute; known: id, type, time, source, \
                         correlation_id, causation_id, content_type, key"
                    ),
                });
            }
        };
        if value.is_empty() {
            return Err(tidings_core::Error::Config {
                key: key.to_owned(),
                message: "needs a field name".into(),
            });
        }
        self.renames.retain(|(h, _)| *h != header);
        self.renames.push((header, value.to_owned()));
        Ok(true)
    }

    fn field_for<'a>(&'a self, header: &'a str) -> &'a str {
        self.renames
            .iter()
            .find(|(h, _)| *h == header)
            .map_or(header, |(_, f)| f.as_str())
    }

    fn header_for(&self, field: String) -> String {
        match self.renames.iter().find(|(_, f)| *f == field) {
            Some((h, _)) => (*h).to_owned(),
            None => field,
        }
    }
}

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

/// Frames a message as one Pub/Sub body.
pub fn encode_frame(message: &Message) -> Vec<u8> {
    let mut count = 0u32;
    let mut buf = BytesMut::with_capacity(message.payload.len() + 256);
    buf.put_slice(PUBSUB_MAGIC);
    buf.put_u32(0);
    message.write_headers(&NAMES, |name, value| {
        count += 1;
        buf.put_u32(name.len() as u32);
        buf.put_slice(name.as_bytes());
        buf.put_u32(value.len() as u32);
        buf.put_slice(value.as_bytes());
    });
    buf[4..8].copy_from_slice(&count.to_be_bytes());
    buf.put_slice(&message.payload);
    buf.to_vec()
}

/// A Pub/Sub body that carries the magic but does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Pub/Sub message on `{channel}` has a corrupt Tidings frame")]
pub struct CorruptFrame {
    /// The channel it came from.
    pub channel: String,
}

/// The Pub/Sub body of a message in `layout`: a Tidings frame in the
/// default dialect, else what the dialect writes (a JSON envelope or
/// structured CloudEvent, whose body carries the metadata).
pub fn encode_body(layout: &Layout, message: &Message) -> Vec<u8> {
    if layout.dialect == Dialect::CloudEventsBinary {
        return encode_frame(message);
    }
    layout.dialect.encode(message, &NAMES, |_, _| {}).to_vec()
}

/// Why a Pub/Sub body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadBody {
    /// It carries the Tidings magic but does not parse.
    #[error(transparent)]
    Corrupt(#[from] CorruptFrame),
    /// The configured dialect cannot read it.
    #[error(transparent)]
    Undecodable(#[from] tidings_core::dialect::Undecodable),
}

/// Reads a Pub/Sub body in `layout`: a Tidings frame whatever the
/// dialect; any other body through the dialect. A message that carries no
/// id of its own gets a fresh one (two identical bodies are two messages);
/// the flag says whether it carried one.
pub fn decode_body(
    layout: &Layout,
    channel: &str,
    body: Bytes,
) -> Result<(Message, bool), BadBody> {
    if body.len() >= 8 && &body[..4] == PUBSUB_MAGIC {
        return Ok((decode_frame(channel, body)?, true));
    }
    let fresh = tidings_core::message::new_id();
    let native = Native {
        id: Some(&fresh),
        ..Native::default()
    };
    let message = layout
        .dialect
        .decode(&NAMES, Vec::<(String, String)>::new(), body, native)
        .map_err(|rejected| BadBody::Undecodable(rejected.why))?;
    let own = message.id != fresh;
    Ok((message, own))
}

/// What the members of a group claim a Pub/Sub message by when it carries
/// no id of its own (a fresh one differs in every member): its channel and
/// content, the same in every member. Members receive a publish within
/// milliseconds of each other, so such a claim is kept briefly: two
/// identical bodies published within it are taken as one by the group.
pub fn content_id(channel: &str, body: &[u8]) -> String {
    let hash = tidings_core::StableHash::default()
        .write(channel.as_bytes())
        .write(&[0])
        .write(body)
        .finish();
    format!("{channel}:{hash:016x}")
}

/// Reads a Pub/Sub body. A body without the magic is a plain client's
/// message: all of it is the payload.
pub fn decode_frame(channel: &str, body: Bytes) -> Result<Message, CorruptFrame> {
    if body.len() < 8 || &body[..4] != PUBSUB_MAGIC {
        return Ok(Message::from_headers(
            &NAMES,
            Vec::<(String, String)>::new(),
            body,
            None,
        ));
    }
    let corrupt = || CorruptFrame {
        channel: channel.to_owned(),
    };
    let mut rest = body.slice(4..);
    let count = rest.get_u32();
    let mut headers = Vec::with_capacity(count.min(64) as usize);
    let take = |rest: &mut Bytes| -> Option<String> {
        if rest.remaining() < 4 {
            return None;
        }
        let len = rest.get_u32() as usize;
        if rest.remaining() < len {
            return None;
        }
        String::from_utf8(rest.split_to(len).to_vec()).ok()
    };
    for _ in 0..count {
        let name = take(&mut rest).ok_or_else(corrupt)?;
        let value = take(&mut rest).ok_or_else(corrupt)?;
        headers.push((name, value));
    }
    Ok(Message::from_headers(&NAMES, headers, rest, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Message {
        Message::new(Bytes::from_static(&[0, 0xff, 0xfe, 0x80, b'\n', 0]))
            .with_key("kunde-ä")
            .with_header("grüße", "✓ ünïcödé ☃")
            .with_header("payload", "a header named like the payload field")
            .with_header("\\odd", "a header starting with a backslash")
            .with_type("order.placed")
            .with_source("/shop")
            .with_schema_version("2")
            .with_correlation_id("c-1")
            .with_content_type("application/octet-stream")
    }

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

    #[test]
    fn pubsub_frame_round_trips() {
        let m = full();
        let body = Bytes::from(encode_frame(&m));
        assert_eq!(decode_frame("c", body).expect("frame"), m);
        let empty = Message::new(Bytes::new());
        let body = Bytes::from(encode_frame(&empty));
        assert_eq!(decode_frame("c", body).expect("frame"), empty);
    }

    #[test]
    fn plain_pubsub_body_is_the_payload_and_corrupt_frames_are_errors() {
        let m = decode_frame("c", Bytes::from_static(b"hello")).expect("plain");
        assert_eq!(m.payload, "hello");
        let mut corrupt = encode_frame(&full());
        corrupt.truncate(20);
        let err = decode_frame("c", Bytes::from(corrupt)).expect_err("corrupt");
        assert_eq!(err.channel, "c");
    }
}
