//! Mapping between [`Message`] and AMQP properties and header tables.
//!
//! Metadata travels as CloudEvents AMQP attributes ([`wire::AMQP`]:
//! `cloudEvents:id`, `cloudEvents:type`, ...) in the header table, as long
//! strings. The message id, the time (seconds) and the content type are also
//! set as the AMQP `message-id`, `timestamp` and `content-type` properties, so
//! plain AMQP tools show them; messages from plain clients get their metadata
//! from those properties where the headers have none.

use std::borrow::Cow;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tidings_core::delivery::header;
use tidings_core::dialect::{Native, Undecodable};
use tidings_core::{Dialect, Message, wire};

/// Header carrying the original topic on copies that travel through retry
/// queues (their routing key is the queue's name, not the topic).
pub const TOPIC: &str = "tidings-topic";

/// Where an AMQP `timestamp` property that is no representable time is kept
/// (as the number it was), so nothing the sender wrote is lost.
pub const TIMESTAMP: &str = "amqp-timestamp";

/// The broker's delivery counter on quorum queues.
pub const DELIVERY_COUNT: &str = "x-delivery-count";

/// Why a header or property could not be written.
#[derive(Debug)]
pub struct TooLong(pub String);

impl std::fmt::Display for TooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` is longer than 255 bytes", self.0)
    }
}

impl std::error::Error for TooLong {}

pub(crate) fn short(s: &str) -> Result<ShortString, TooLong> {
    ShortString::try_new(s).map_err(|_| TooLong(s.chars().take(40).collect()))
}

/// The properties a message is published with in the default dialect;
/// see [`encode`].
pub fn properties(message: &Message, extra: &[(&str, &str)]) -> Result<BasicProperties, TooLong> {
    encode(&Dialect::CloudEventsBinary, message, extra).map(|(props, _)| props)
}

/// The properties and body a message is published with in `dialect`:
/// persistent, message id, timestamp, content type, and every header the
/// dialect writes (CloudEvents attributes in the default one) as a long
/// string, plus `extra` headers (attempt, topic) that replace same-named ones.
pub fn encode(
    dialect: &Dialect,
    message: &Message,
    extra: &[(&str, &str)],
) -> Result<(BasicProperties, Bytes), TooLong> {
    let mut table = FieldTable::default();
    let mut error = None;
    let mut content_type = None;
    let body = dialect.encode(message, &wire::AMQP, |k, v| {
        if extra.iter().any(|(name, _)| *name == k) {
            return;
        }
        if k.eq_ignore_ascii_case(wire::AMQP.content_type) {
            content_type = Some(v.to_owned());
        }
        match short(k) {
            Ok(k) => {
                table.insert(k, AMQPValue::LongString(LongString::from(v)));
            }
            Err(e) => error = Some(e),
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    for (k, v) in extra {
        table.insert(short(k)?, AMQPValue::LongString(LongString::from(*v)));
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    if let Ok(id) = short(&message.id) {
        props = props.with_message_id(id);
    }
    if let Some(time) = message.metadata.time
        && let Ok(since) = time.duration_since(UNIX_EPOCH)
    {
        props = props.with_timestamp(since.as_secs());
    }
    if let Some(ct) = &content_type {
        props = props.with_content_type(short(ct)?);
    }
    Ok((props, body))
}

/// A message read back from a delivery, with what the adapter keeps beside it.
#[derive(Debug)]
pub struct Received {
    /// The message; when the dialect could not read the body, what could
    /// be salvaged of it (the body as payload, the headers as headers).
    pub message: Message,
    /// Why the dialect could not read it, if it could not.
    pub undecodable: Option<Undecodable>,
    /// The attempt header written by the adapter on republished copies.
    pub attempt: Option<u32>,
    /// The original topic of a copy that came through a retry queue.
    pub topic: Option<String>,
    /// The quorum queue's delivery count (earlier deliveries that were returned).
    pub delivery_count: Option<u64>,
}

/// A header's value as text: borrowed from the frame where it is text
/// already, so the message copies only the headers it keeps.
fn text(value: &AMQPValue) -> Option<Cow<'_, str>> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()),
        AMQPValue::ShortString(s) => s.as_str().into(),
        AMQPValue::Boolean(b) => b.to_string().into(),
        AMQPValue::ShortShortInt(n) => n.to_string().into(),
        AMQPValue::ShortShortUInt(n) => n.to_string().into(),
        AMQPValue::ShortInt(n) => n.to_string().into(),
        AMQPValue::ShortUInt(n) => n.to_string().into(),
        AMQPValue::LongInt(n) => n.to_string().into(),
        AMQPValue::LongUInt(n) => n.to_string().into(),
        AMQPValue::LongLongInt(n) => n.to_string().into(),
        AMQPValue::Float(n) => n.to_string().into(),
        AMQPValue::Double(n) => n.to_string().into(),
        AMQPValue::Timestamp(n) => n.to_string().into(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()),
        // Arrays and tables (such as the broker's `x-death`) and decimals are
        // not string headers: they are left out of the message's headers.
        _ => return None,
    })
}

fn count(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => Some(*n),
        other => text(other).and_then(|s| s.parse().ok()),
    }
}

/// Rebuilds the message from a delivery's properties and body in the
/// default dialect; see [`decode`].
pub fn received(props: &BasicProperties, payload: Bytes) -> Received {
    decode(&Dialect::CloudEventsBinary, props, payload, None)
}

/// Rebuilds the message from a delivery's properties and body in
/// `dialect`. What the message does not say is taken from the properties
/// (`message-id`, `timestamp` in seconds or milliseconds, `content-type`)
/// and the topic (`topic`: the routing key, or the original topic of a
/// retried copy) as the type.
pub fn decode(
    dialect: &Dialect,
    props: &BasicProperties,
    payload: Bytes,
    topic: Option<&str>,
) -> Received {
    let mut attempt = None;
    let mut copy_topic = None;
    let mut delivery_count = None;
    let mut pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::new();
    if let Some(table) = props.headers() {
        for (name, value) in table {
            let name = name.as_str();
            match name {
                header::ATTEMPT => attempt = text(value).and_then(|s| s.parse().ok()),
                TOPIC => copy_topic = text(value).map(Cow::into_owned),
                DELIVERY_COUNT => delivery_count = count(value),
                _ if name.starts_with("x-death")
                    || name.starts_with("x-first-death")
                    || name.starts_with("x-last-death") => {}
                _ => {
                    if let Some(v) = text(value) {
                        pairs.push((name.into(), v));
                    }
                }
            }
        }
    }
    let stamp = *props.timestamp();
    let time = stamp.and_then(tidings_core::time::from_unix_secs_or_millis);
    let native = Native {
        id: props.message_id().as_ref().map(|s| s.as_str()),
        event_type: copy_topic.as_deref().or(topic),
        // The spec says seconds; Node.js clients send `Date.now()`, milliseconds.
        time,
        content_type: props.content_type().as_ref().map(|s| s.as_str()),
    };
    let (mut message, undecodable) = match dialect.decode(&wire::AMQP, pairs, payload, native) {
        Ok(message) => (message, None),
        Err(rejected) => (rejected.salvaged, Some(rejected.why)),
    };
    if let (Some(stamp), None) = (stamp, time) {
        // Nothing the sender wrote is lost: an unrepresentable time stays as the number.
        message
            .headers
            .insert(TIMESTAMP.to_owned(), stamp.to_string());
    }
    Received {
        message,
        undecodable,
        attempt,
        topic: copy_topic,
        delivery_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trips_through_properties() {
        let m = Message::new(Bytes::from_static(&[0, 255]))
            .with_key("k-ä")
            .with_header("grüße", "✓")
            .with_type("order.placed")
            .with_source("/shop")
            .with_content_type("application/json");
        let props = properties(&m, &[]).unwrap();
        let table = props.headers().clone().unwrap();
        assert!(table.contains_key("cloudEvents:id"));
        assert!(table.contains_key("cloudEvents:type"));
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), m.id);
        assert_eq!(props.delivery_mode(), &Some(2));
        let back = received(&props, m.payload.clone());
        assert_eq!(back.message, m);
        assert_eq!(back.attempt, None);
    }

    #[test]
    fn adapter_headers_are_read_and_removed() {
        let m = Message::new("x").with_header(header::ATTEMPT, "9");
        let props = properties(&m, &[(header::ATTEMPT, "3"), (TOPIC, "a.b")]).unwrap();
        let mut table = props.headers().clone().unwrap();
        table.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(2));
        table.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        let props = props.with_headers(table);
        let back = received(&props, Bytes::new());
        assert_eq!(back.attempt, Some(3));
        assert_eq!(back.topic.as_deref(), Some("a.b"));
        assert_eq!(back.delivery_count, Some(2));
        assert!(
            back.message.headers.is_empty(),
            "{:?}",
            back.message.headers
        );
        assert_eq!(back.message.id, m.id);
    }

    #[test]
    fn plain_client_message_gets_defaults_from_properties() {
        let table: FieldTable = [(ShortString::from("x-app"), AMQPValue::LongInt(7))]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into();
        let props = BasicProperties::default()
            .with_message_id("plain-1".into())
            .with_content_type("text/plain".into())
            .with_timestamp(1_700_000_000)
            .with_headers(table);
        let r = received(&props, Bytes::from_static(b"hi"));
        assert_eq!(r.message.id, "plain-1");
        assert_eq!(r.message.headers["x-app"], "7");
        assert_eq!(
            r.message.metadata.content_type.as_deref(),
            Some("text/plain")
        );
        assert_eq!(
            r.message.metadata.time,
            Some(UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000))
        );
        let bare = received(&BasicProperties::default(), Bytes::new());
        assert_eq!(bare.message.id.len(), 36);
    }

    #[test]
    fn millisecond_and_absurd_timestamps() {
        let ms = BasicProperties::default().with_timestamp(1_700_000_000_123);
        let r = received(&ms, Bytes::new());
        assert_eq!(
            r.message.metadata.time,
            Some(UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123))
        );
        // Dead-lettering or republishing it writes headers again: no panic.
        assert!(properties(&r.message, &[]).is_ok());
        let absurd = BasicProperties::default().with_timestamp(u64::MAX);
        let r = received(&absurd, Bytes::new());
        assert_eq!(r.message.metadata.time, None);
        assert_eq!(r.message.headers[TIMESTAMP], u64::MAX.to_string());
        assert!(properties(&r.message, &[]).is_ok());
    }

    #[test]
    fn overlong_header_name_is_an_error() {
        let m = Message::new("x").with_header("n".repeat(300), "v");
        assert!(properties(&m, &[]).is_err());
    }
}
