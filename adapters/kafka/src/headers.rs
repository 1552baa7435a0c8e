//! Mapping messages to Kafka record headers and back.
//!
//! Metadata travels as CloudEvents attributes in binary mode ([`wire::BINARY`]):
//! `ce_id`, `ce_type`, `ce_source`, ..., and `content-type`. Retried copies
//! carry the attempt number ([`header::ATTEMPT`]) and the time before which
//! they must not be handled ([`NOT_BEFORE`]).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use tidings_core::delivery::header;
use tidings_core::dialect::{Native, Undecodable};
use tidings_core::{Dialect, Message, MessageId, wire};

/// Header on retry-topic copies: the time (milliseconds since the Unix epoch)
/// before which the copy is not handled.
pub const NOT_BEFORE: &str = "tidings-not-before";

/// Writes a message's headers as Kafka record headers (default dialect).
pub fn to_kafka(message: &Message) -> OwnedHeaders {
    encode(&Dialect::CloudEventsBinary, message).0
}

/// The record headers and value of `message` in `dialect`.
pub fn encode(dialect: &Dialect, message: &Message) -> (OwnedHeaders, Bytes) {
    let mut slot = Some(OwnedHeaders::new_with_capacity(message.headers.len() + 8));
    let body = dialect.encode(message, &wire::BINARY, |key, value| {
        slot = slot.take().map(|h| {
            h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        });
    });
    (slot.unwrap_or_default(), body)
}

/// What a record's headers say besides the message itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The attempt number (1 unless the record is a retried copy).
    pub attempt: u32,
    /// Not to be handled before this time (retried copies).
    pub not_before: Option<SystemTime>,
}

/// Rebuilds a message from a record. `retried` tells whether the record came
/// from a retry topic: only there are the attempt and not-before headers read
/// (and removed from the message).
pub fn from_kafka<H: Headers>(
    headers: Option<&H>,
    key: Option<&[u8]>,
    payload: Bytes,
    fallback_id: MessageId,
    retried: bool,
) -> (Message, Received) {
    let (message, received, _) = decode(
        &Dialect::CloudEventsBinary,
        headers,
        key,
        payload,
        fallback_id,
        retried,
        None,
    );
    (message, received)
}

/// [`from_kafka`] in `dialect`, with the record's topic as the type of a
/// message that says none (and is not a CloudEvent). When the dialect
/// cannot read the value: what could be read, and why.
pub fn decode<H: Headers>(
    dialect: &Dialect,
    headers: Option<&H>,
    key: Option<&[u8]>,
    payload: Bytes,
    fallback_id: MessageId,
    retried: bool,
    topic: Option<&str>,
) -> (Message, Received, Option<Undecodable>) {
    // Borrowed: the message copies only the headers it keeps.
    let pairs = headers.into_iter().flat_map(|h| h.iter()).map(|h| {
        let value = h.value.unwrap_or_default();
        (h.key, String::from_utf8_lossy(value))
    });
    let native = Native {
        id: Some(&fallback_id),
        event_type: topic,
        ..Native::default()
    };
    let (mut message, undecodable) = match dialect.decode(&wire::BINARY, pairs, payload, native) {
        Ok(message) => (message, None),
        Err(rejected) => (rejected.salvaged, Some(rejected.why)),
    };
    if message.key.is_none() {
        message.key = key.map(|k| String::from_utf8_lossy(k).into_owned());
    }
    let mut received = Received {
        attempt: 1,
        not_before: None,
    };
    if retried {
        if let Some(a) = message.headers.remove(header::ATTEMPT) {
            received.attempt = a.parse().unwrap_or(1).max(1);
        }
        if let Some(t) = message.headers.remove(NOT_BEFORE) {
            received.not_before = t
                .parse::<u64>()
                .ok()
                .and_then(tidings_core::time::from_unix_millis);
        }
    }
    (message, received, undecodable)
}

/// The copy of `message` published to a retry topic.
pub fn retry_copy(message: &Message, attempt: u32, not_before: SystemTime) -> Message {
    let mut copy = message.clone();
    copy.headers
        .insert(header::ATTEMPT.into(), attempt.to_string());
    copy.headers
        .entry(header::FIRST_FAILURE.into())
        .or_insert_with(tidings_core::time::now_rfc3339);
    let ms = not_before
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    copy.headers.insert(NOT_BEFORE.into(), ms.to_string());
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn message_round_trips_through_record_headers() {
        let m = Message::new(Bytes::from_static(&[0, 255]))
            .with_key("kunde-ä")
            .with_header("grüße", "✓")
            .with_type("order.placed")
            .with_content_type("application/json");
        let h = to_kafka(&m);
        let names: Vec<String> = h.iter().map(|h| h.key.to_owned()).collect();
        assert!(names.contains(&"ce_id".to_owned()));
        assert!(names.contains(&"content-type".to_owned()));
        let (back, received) = from_kafka(Some(&h), None, m.payload.clone(), "x".into(), false);
        assert_eq!(back, m);
        assert_eq!(received.attempt, 1);
    }

    #[test]
    fn retry_headers_are_read_on_retry_topics_only() {
        let m = Message::new("x");
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let copy = retry_copy(&m, 3, at);
        let h = to_kafka(&copy);
        let (back, r) = from_kafka(Some(&h), None, copy.payload.clone(), "x".into(), true);
        assert_eq!(r.attempt, 3);
        assert_eq!(r.not_before, Some(at));
        assert!(!back.headers.contains_key(header::ATTEMPT));
        assert!(back.headers.contains_key(header::FIRST_FAILURE));
        assert_eq!(back.id, m.id);
        let (_, r) = from_kafka(Some(&h), None, copy.payload.clone(), "x".into(), false);
        assert_eq!(r.attempt, 1);
    }

    #[test]
    fn plain_records_get_the_kafka_key_and_fallback_id() {
        let (m, _) =
            from_kafka::<OwnedHeaders>(None, Some(b"k1"), Bytes::new(), "t/0/5".into(), false);
        assert_eq!(m.key.as_deref(), Some("k1"));
        assert_eq!(m.id, "t/0/5");
    }
}
