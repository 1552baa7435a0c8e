//! How a [`Message`](tidings_core::Message) is written to Redis and read back.
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

mod entry;
mod frame;

pub use entry::{
    ForeignEntry, ForeignProblem, add_fields, check_fields, read_fields, read_fields_in, salvage,
    salvage_in, write_fields,
};
pub use frame::{
    BadBody, CorruptFrame, content_id, decode_body, decode_frame, encode_body, encode_frame,
};

use tidings_core::{Dialect, wire};

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

#[cfg(test)]
pub(crate) mod tests {
    use bytes::Bytes;
    use tidings_core::Message;

    /// A message with everything a stream entry or a frame must carry.
    pub(crate) fn full() -> Message {
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
}
