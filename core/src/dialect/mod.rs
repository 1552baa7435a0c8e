//! Dialects: how a [`Message`] is written to one broker message (headers
//! and body) and read back, so a Tidings service can join services that
//! already exist and speak their format.
//!
//! - [`Dialect::CloudEventsBinary`], the default: metadata as CloudEvents
//!   headers (`ce_id`, ... or `cloudEvents:id`, ... on AMQP), the payload as
//!   the body, unchanged. What every earlier Tidings version wrote.
//! - [`Dialect::CloudEventsStructured`]: the whole event as
//!   `application/cloudevents+json` in the body (CloudEvents 1.0, JSON
//!   format): `data` when the payload is JSON, `data_base64` otherwise.
//! - [`Dialect::Envelope`]: a JSON envelope whose field paths are
//!   configurable ([`Envelope`]); [`Envelope::default`] is the shape most
//!   event-driven Node.js services use:
//!   `{ "id", "type", "timestamp", "payload": {...}, "metadata": { "correlationId", "causationId" } }`.
//!
//! Reading is lenient in every dialect, because the other side is whatever
//! it is: the id, type, time and content type fall back to what the broker
//! itself carries ([`Native`]: AMQP `message-id` and `timestamp`,
//! `Nats-Msg-Id`, the routing key or subject); common header spellings
//! (`correlationId`, `eventType`, any case of `Content-Type`) fill the
//! metadata they name when the dialect's own field is absent. A body the
//! dialect cannot read is a [`Undecodable`] error, which adapters hand on as
//! a rejected delivery: dead-lettered with the reason where settlement
//! observers see it, never a panic.

use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::message::wire::Names;
use crate::message::{Headers, Message, MessageId};

mod envelope;
mod json;
mod structured;

pub use envelope::{Envelope, TimeFormat};

/// How messages map to broker messages; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Dialect {
    /// CloudEvents binary content mode: metadata in headers, payload as body.
    #[default]
    CloudEventsBinary,
    /// CloudEvents structured content mode: `application/cloudevents+json`.
    CloudEventsStructured,
    /// A JSON envelope with configurable field paths.
    Envelope(Envelope),
}

/// What the broker itself carries beside headers and body, used where the
/// message does not say: each adapter fills what its broker has.
#[derive(Debug, Clone, Copy, Default)]
pub struct Native<'a> {
    /// The broker's own id of the message (AMQP `message-id`,
    /// `Nats-Msg-Id`, a Redis entry id, a JetStream `STREAM:seq`); stable
    /// across redeliveries, so the idempotency layer recognises them.
    pub id: Option<&'a str>,
    /// The routing key or subject, taken as the event type when none is given.
    pub event_type: Option<&'a str>,
    /// The broker's time of the message (AMQP `timestamp`).
    pub time: Option<SystemTime>,
    /// The broker's content type (AMQP `content-type` property).
    pub content_type: Option<&'a str>,
}

/// A body the dialect cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a {dialect} message: {problem}")]
pub struct Undecodable {
    /// The dialect that tried.
    pub dialect: &'static str,
    /// What is wrong.
    pub problem: String,
}

/// The header a body's media type is written under by the dialects that
/// put the event in the body, spelled as HTTP and most clients spell it
/// (read in any case).
pub const CONTENT_TYPE: &str = "Content-Type";

/// A message a dialect could not read: why, and what could be kept of it
/// (its headers as headers, its body as payload, the broker's id), so it
/// can be dead-lettered as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Why.
    pub why: Undecodable,
    /// What could be kept.
    pub salvaged: Message,
}

/// The media type of a structured CloudEvent in JSON.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// Header spellings other services use, read when the dialect's own
/// field is absent (compared without case).
const CORRELATION_ALIASES: [&str; 3] = ["correlationid", "correlation-id", "x-correlation-id"];
const CAUSATION_ALIASES: [&str; 2] = ["causationid", "causation-id"];
const TYPE_ALIASES: [&str; 3] = ["eventtype", "event-type", "x-event-type"];

impl Dialect {
    /// The dialect named `name`: `cloudevents-binary` (or `binary`),
    /// `cloudevents-structured` (or `structured`), `envelope`.
    pub fn parse(name: &str) -> Result<Dialect> {
        match name {
            "cloudevents-binary" | "binary" | "" => Ok(Dialect::CloudEventsBinary),
            "cloudevents-structured" | "structured" => Ok(Dialect::CloudEventsStructured),
            "envelope" => Ok(Dialect::Envelope(Envelope::default())),
            other => Err(Error::Config {
                key: "dialect".into(),
                message: format!(
                    "unknown dialect `{other}`; known: cloudevents-binary, cloudevents-structured, envelope"
                ),
            }),
        }
    }

    /// Applies a `dialect=<name>` or `envelope.<field>=<path>` option of a
    /// broker URL or configuration table; `Ok(false)` when `key` is neither,
    /// so adapters can try it before their own options.
    pub fn apply_option(&mut self, key: &str, value: &str) -> Result<bool> {
        if key == "dialect" {
            let named = Dialect::parse(value)?;
            // `envelope.*` options given before `dialect=envelope` stay.
            if !(matches!(named, Dialect::Envelope(_)) && matches!(self, Dialect::Envelope(_))) {
                *self = named;
            }
            return Ok(true);
        }
        match key.strip_prefix("envelope.") {
            Some(field) => self.set_envelope_option(field, value).map(|()| true),
            None => Ok(false),
        }
    }

    /// Applies one `envelope.<field>=<path>` option (`envelope.data=body`,
    /// `envelope.time_format=epoch-millis`, `envelope.source=` to leave a
    /// field out); turns the dialect into an envelope if it was not one.
    pub fn set_envelope_option(&mut self, field: &str, value: &str) -> Result<()> {
        if !matches!(self, Dialect::Envelope(_)) {
            *self = Dialect::Envelope(Envelope::default());
        }
        let Dialect::Envelope(e) = self else {
            unreachable!("made an envelope above")
        };
        let path = || (!value.is_empty()).then(|| value.to_owned());
        match field {
            "id" => e.id = path(),
            "type" => e.event_type = path(),
            "time" => e.time = path(),
            "source" => e.source = path(),
            "correlation_id" => e.correlation_id = path(),
            "causation_id" => e.causation_id = path(),
            "data" if !value.is_empty() => e.data = value.to_owned(),
            "time_format" => {
                e.time_format = match value {
                    "iso" | "rfc3339" => TimeFormat::Rfc3339,
                    "epoch-seconds" | "seconds" => TimeFormat::EpochSeconds,
                    "epoch-millis" | "millis" => TimeFormat::EpochMillis,
                    other => {
                        return Err(Error::Config {
                            key: "envelope.time_format".into(),
                            message: format!(
                                "`{other}` is not one of iso, epoch-seconds, epoch-millis"
                            ),
                        });
                    }
                }
            }
            other => {
                return Err(Error::Config {
                    key: format!("envelope.{other}"),
                    message: "unknown envelope field; known: id, type, time, time_format, \
                              source, correlation_id, causation_id, data (a non-empty path)"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// The dialect's name, as [`parse`](Dialect::parse) reads it.
    pub fn name(&self) -> &'static str {
        match self {
            Dialect::CloudEventsBinary => "cloudevents-binary",
            Dialect::CloudEventsStructured => "cloudevents-structured",
            Dialect::Envelope(_) => "envelope",
        }
    }

    /// Writes `message`: calls `header` with every header to set (names in
    /// the style of `names` where the dialect uses headers) and returns the
    /// body. For the default dialect the body is the payload itself (no
    /// copy).
    pub fn encode(
        &self,
        message: &Message,
        names: &Names,
        mut header: impl FnMut(&str, &str),
    ) -> Bytes {
        match self {
            Dialect::CloudEventsBinary => {
                message.write_headers(names, header);
                message.payload.clone()
            }
            Dialect::CloudEventsStructured => {
                for (k, v) in &message.headers {
                    header(k, v);
                }
                header(CONTENT_TYPE, CLOUDEVENTS_JSON);
                Bytes::from(structured::encode(message))
            }
            Dialect::Envelope(envelope) => {
                for (k, v) in &message.headers {
                    header(k, v);
                }
                header(CONTENT_TYPE, "application/json");
                if let Some(c) = &message.metadata.correlation_id {
                    header("correlationId", c);
                }
                Bytes::from(envelope.encode(message))
            }
        }
    }

    /// Reads a message from broker headers and body. `names` are the header
    /// names of the binary dialect on this broker.
    pub fn decode<K, V>(
        &self,
        names: &Names,
        headers: impl IntoIterator<Item = (K, V)>,
        body: Bytes,
        native: Native<'_>,
    ) -> std::result::Result<Message, Box<Rejected>>
    where
        K: Into<String> + AsRef<str>,
        V: Into<String> + AsRef<str>,
    {
        // A CloudEvent without a type says it has none: the routing key or
        // subject names the type only of messages that are not CloudEvents.
        let mut cloudevent = false;
        let mut message = match self {
            // Cannot fail, and costs what reading headers always cost.
            Dialect::CloudEventsBinary => {
                let headers = headers.into_iter().inspect(|(k, _)| {
                    cloudevent |= k.as_ref() == names.spec_version;
                });
                Message::from_headers(names, headers, body, native.id.map(MessageId::from))
            }
            Dialect::CloudEventsStructured | Dialect::Envelope(_) => {
                let rest: Headers = headers
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect();
                let decoded = match self {
                    Dialect::Envelope(envelope) => envelope.decode(&body, rest.clone(), native),
                    _ => structured::decode(&body, rest.clone(), native),
                };
                match decoded {
                    Ok(message) => message,
                    Err(why) => {
                        // What can be kept of it, to be dead-lettered.
                        let salvaged = Message::from_headers(
                            names,
                            rest,
                            body,
                            native.id.map(MessageId::from),
                        );
                        return Err(Box::new(Rejected { why, salvaged }));
                    }
                }
            }
        };
        fill_from_aliases(&mut message, names);
        let m = &mut message.metadata;
        if m.event_type.is_none() && !cloudevent {
            m.event_type = native.event_type.map(str::to_owned);
        }
        if m.time.is_none() {
            m.time = native.time;
        }
        if m.content_type.is_none() {
            m.content_type = native.content_type.map(str::to_owned);
        }
        Ok(message)
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Fills metadata the message lacks from header spellings other services
/// use. The headers stay: nothing the sender wrote is lost.
fn fill_from_aliases(message: &mut Message, names: &Names) {
    let m = &mut message.metadata;
    if m.correlation_id.is_some()
        && m.causation_id.is_some()
        && m.event_type.is_some()
        && m.content_type.is_some()
    {
        return;
    }
    // One pass; most headers are ruled out by their first letter.
    for (k, v) in &message.headers {
        let slot = match k.as_bytes().first().map(u8::to_ascii_lowercase) {
            Some(b'c' | b'x')
                if CORRELATION_ALIASES
                    .iter()
                    .any(|a| k.eq_ignore_ascii_case(a)) =>
            {
                &mut m.correlation_id
            }
            Some(b'c') if CAUSATION_ALIASES.iter().any(|a| k.eq_ignore_ascii_case(a)) => {
                &mut m.causation_id
            }
            Some(b'c') if k.eq_ignore_ascii_case(names.content_type) => &mut m.content_type,
            Some(b'e' | b'x') if TYPE_ALIASES.iter().any(|a| k.eq_ignore_ascii_case(a)) => {
                &mut m.event_type
            }
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::wire;
    use serde_json::Value;
    use std::time::{Duration, UNIX_EPOCH};

    fn sample() -> Message {
        Message::new(r#"{"userId":"u-1","name":"Zoë ✓"}"#)
            .with_type("user.registered")
            .with_correlation_id("corr-1")
            .with_content_type("application/json")
            .with_header("traceparent", "00-abc-def-01")
    }

    fn round_trip(dialect: &Dialect, m: &Message) -> Message {
        let mut headers = Headers::new();
        let body = dialect.encode(m, &wire::BINARY, |k, v| {
            headers.insert(k.into(), v.into());
        });
        dialect
            .decode(&wire::BINARY, headers, body, Native::default())
            .expect("decodes")
    }

    #[test]
    fn every_dialect_round_trips_what_it_carries() {
        let m = sample();
        for dialect in [
            Dialect::CloudEventsBinary,
            Dialect::CloudEventsStructured,
            Dialect::Envelope(Envelope::default()),
        ] {
            let back = round_trip(&dialect, &m);
            assert_eq!(back.id, m.id, "{dialect}");
            assert_eq!(back.metadata.event_type, m.metadata.event_type, "{dialect}");
            assert_eq!(
                back.metadata.correlation_id, m.metadata.correlation_id,
                "{dialect}"
            );
            // Envelopes carry milliseconds: compare at that precision.
            let ms = |t: Option<SystemTime>| {
                t.map(|t| {
                    t.duration_since(UNIX_EPOCH)
                        .expect("after 1970")
                        .as_millis()
                })
            };
            assert_eq!(ms(back.metadata.time), ms(m.metadata.time), "{dialect}");
            let data: Value = serde_json::from_slice(&back.payload).expect("JSON payload");
            assert_eq!(data["name"], "Zoë ✓", "{dialect}");
            assert_eq!(back.headers["traceparent"], "00-abc-def-01", "{dialect}");
        }
    }

    #[test]
    fn the_node_articles_envelope_is_read() {
        let body = br#"{"id":"e-7","type":"order.placed","timestamp":"2024-05-01T10:00:00.123Z",
            "payload":{"orderId":42},"metadata":{"correlationId":"c-9"}}"#;
        let m = Dialect::Envelope(Envelope::default())
            .decode(
                &wire::AMQP,
                [("correlationId", "c-9")],
                Bytes::from_static(body),
                Native::default(),
            )
            .expect("decodes");
        assert_eq!(m.id, "e-7");
        assert_eq!(m.metadata.event_type.as_deref(), Some("order.placed"));
        assert_eq!(m.metadata.correlation_id.as_deref(), Some("c-9"));
        assert_eq!(
            m.metadata.time,
            Some(UNIX_EPOCH + Duration::from_millis(1_714_557_600_123))
        );
        assert_eq!(m.payload.as_ref(), br#"{"orderId":42}"#);
    }

    #[test]
    fn native_fields_and_header_aliases_fill_what_is_missing() {
        let native = Native {
            id: Some("amqp-id-1"),
            event_type: Some("user.deleted"),
            time: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            content_type: None,
        };
        let m = Dialect::CloudEventsBinary
            .decode(
                &wire::BINARY,
                [
                    ("correlationId", "c-1"),
                    ("Content-Type", "application/json"),
                ],
                Bytes::from_static(b"{}"),
                native,
            )
            .expect("decodes");
        assert_eq!(m.id, "amqp-id-1");
        assert_eq!(m.metadata.event_type.as_deref(), Some("user.deleted"));
        assert_eq!(m.metadata.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(m.metadata.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.metadata.time, native.time);
    }

    #[test]
    fn bodies_a_dialect_cannot_read_are_errors() {
        let envelope = Dialect::Envelope(Envelope::default());
        for body in [&b"not json"[..], b"[1,2]", br#"{"id":"x"}"#] {
            let e = envelope
                .decode(
                    &wire::BINARY,
                    Headers::new(),
                    Bytes::copy_from_slice(body),
                    Native::default(),
                )
                .expect_err("undecodable");
            assert_eq!(e.why.dialect, "envelope");
            assert_eq!(e.salvaged.payload.as_ref(), body);
        }
        let e = Dialect::CloudEventsStructured
            .decode(
                &wire::BINARY,
                Headers::new(),
                Bytes::from_static(b"{}"),
                Native::default(),
            )
            .expect_err("no specversion");
        assert!(e.why.problem.contains("specversion"));
    }

    #[test]
    fn structured_binary_payloads_travel_as_base64() {
        let m = Message::new(Bytes::from_static(&[0, 159, 255])).with_type("blob");
        let back = round_trip(&Dialect::CloudEventsStructured, &m);
        assert_eq!(back.payload, m.payload);
    }

    #[test]
    fn envelope_paths_and_time_formats_are_configurable() {
        let mut d = Dialect::CloudEventsBinary;
        d.set_envelope_option("data", "body.data").expect("ok");
        d.set_envelope_option("time_format", "epoch-millis")
            .expect("ok");
        d.set_envelope_option("causation_id", "").expect("ok");
        assert!(d.set_envelope_option("colour", "x").is_err());
        let m = sample();
        let mut headers = Headers::new();
        let body = d.encode(&m, &wire::BINARY, |k, v| {
            headers.insert(k.into(), v.into());
        });
        let json: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["body"]["data"]["userId"], "u-1");
        assert!(json["timestamp"].is_u64());
        let back = d
            .decode(&wire::BINARY, headers, body, Native::default())
            .expect("decodes");
        assert_eq!(back.metadata.correlation_id.as_deref(), Some("corr-1"));
        let unknown = Dialect::parse("nonsense").expect_err("unknown");
        assert!(unknown.to_string().contains("dialect"), "{unknown}");
    }
}
