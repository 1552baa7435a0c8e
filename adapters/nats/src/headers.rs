//! Mapping between [`Message`] and NATS headers.
//!
//! Metadata travels as CloudEvents attributes ([`wire::BINARY`]: `ce_id`,
//! `ce_type`, ...), trace context as `traceparent`/`tracestate`, application
//! headers as they are. NATS header names must be printable ASCII without
//! `:`, and values cannot hold line breaks; a header that does not fit is
//! written with the name `tidings-enc-<name>` and both name and value
//! percent-encoded (UTF-8), and decoded again on receipt. Headers named
//! `Nats-*` belong to the server (message id, sequence) and are not passed
//! to the application.

use std::borrow::Cow;

use async_nats::HeaderMap;
use bytes::Bytes;
use tidings_core::dialect::{Native, Undecodable};
use tidings_core::{Dialect, Message, MessageId, wire};

/// The prefix of headers whose name and value are percent-encoded.
pub const ENCODED_PREFIX: &str = "tidings-enc-";

/// The JetStream message id header (duplicate detection).
pub const MSG_ID: &str = "Nats-Msg-Id";

fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(ENCODED_PREFIX)
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

fn plain_value(value: &str) -> bool {
    // The server's parser trims surrounding whitespace and cannot carry line breaks.
    !value.bytes().any(|b| b == b'\r' || b == b'\n') && value.trim() == value
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes; `None` if the result is not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Writes one header into `map`, encoding it where NATS cannot carry it as is.
fn put(map: &mut HeaderMap, name: &str, value: &str) {
    if plain_name(name) && plain_value(value) {
        // Both checks above are what async-nats validates, so neither conversion can fail.
        if let (Ok(n), Ok(v)) = (
            async_nats::HeaderName::try_from(name),
            value.parse::<async_nats::HeaderValue>(),
        ) {
            map.insert(n, v);
            return;
        }
    }
    let encoded_name = format!("{ENCODED_PREFIX}{}", percent_encode(name));
    if let (Ok(n), Ok(v)) = (
        async_nats::HeaderName::try_from(encoded_name),
        percent_encode(value).parse::<async_nats::HeaderValue>(),
    ) {
        map.insert(n, v);
    }
}

/// The NATS headers for `message` in the default dialect, with
/// `Nats-Msg-Id` set to `msg_id` when given.
pub fn to_nats(message: &Message, msg_id: Option<&str>) -> HeaderMap {
    encode(&Dialect::CloudEventsBinary, message, msg_id).0
}

/// The headers and body of `message` in `dialect`, with `Nats-Msg-Id` set
/// to `msg_id` when given (JetStream deduplicates on it).
pub fn encode(dialect: &Dialect, message: &Message, msg_id: Option<&str>) -> (HeaderMap, Bytes) {
    let mut map = HeaderMap::new();
    let body = dialect.encode(message, &wire::BINARY, |k, v| put(&mut map, k, v));
    if let Some(id) = msg_id {
        put(&mut map, MSG_ID, id);
    }
    (map, body)
}

/// Reads a message in `dialect`. What it does not say comes from the
/// server's own fields: `Nats-Msg-Id` (else what `fallback_id` gives,
/// asked only then) as the id, the subject as the type. When the dialect cannot read the body: what could
/// be read (the body as payload), and why.
pub fn decode(
    dialect: &Dialect,
    headers: Option<&HeaderMap>,
    payload: Bytes,
    fallback_id: impl FnOnce() -> Option<MessageId>,
    subject: Option<&str>,
) -> (Message, Option<Undecodable>) {
    let msg_id = headers
        .and_then(|h| h.get(MSG_ID))
        .map(|v| MessageId::from(v.as_str()));
    let pairs = pairs_for_message(borrowed_pairs(headers));
    let id = msg_id.or_else(fallback_id);
    let native = Native {
        id: id.as_deref(),
        event_type: subject,
        ..Native::default()
    };
    match dialect.decode(&wire::BINARY, pairs, payload, native) {
        Ok(message) => (message, None),
        Err(rejected) => (rejected.salvaged, Some(rejected.why)),
    }
}

/// Rebuilds a message from NATS headers and payload. `fallback_id` is used
/// when the message carries no `ce_id` (a plain client published it).
pub fn from_nats(
    headers: Option<&HeaderMap>,
    payload: Bytes,
    fallback_id: Option<MessageId>,
) -> Message {
    from_pairs(borrowed_pairs(headers), payload, fallback_id)
}

/// The headers' names and (last) values, borrowed: the message copies only
/// the ones it keeps, not the `Nats-*` ones, the id or the time.
fn borrowed_pairs(
    headers: Option<&HeaderMap>,
) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    headers.into_iter().flat_map(|map| {
        map.iter().filter_map(|(name, values)| {
            let name: &str = name.as_ref();
            Some((name.into(), values.last()?.as_str().into()))
        })
    })
}

/// [`from_nats`] over header name/value pairs however they were read:
/// drops the server's `Nats-*` headers and decodes `tidings-enc-` ones.
pub(crate) fn from_pairs<'a>(
    pairs: impl IntoIterator<Item = (Cow<'a, str>, Cow<'a, str>)>,
    payload: Bytes,
    fallback_id: Option<MessageId>,
) -> Message {
    Message::from_headers(
        &wire::BINARY,
        pairs_for_message(pairs),
        payload,
        fallback_id,
    )
}

/// The headers that belong to the message: the server's `Nats-*` ones
/// dropped, `tidings-enc-` ones decoded.
fn pairs_for_message<'a>(
    pairs: impl IntoIterator<Item = (Cow<'a, str>, Cow<'a, str>)>,
) -> impl Iterator<Item = (Cow<'a, str>, Cow<'a, str>)> {
    pairs.into_iter().filter_map(|(name, value)| {
        if name.len() >= 5 && name.is_char_boundary(5) && name[..5].eq_ignore_ascii_case("nats-") {
            return None;
        }
        match name.strip_prefix(ENCODED_PREFIX) {
            Some(encoded) => match (percent_decode(encoded), percent_decode(&value)) {
                (Some(n), Some(v)) => Some((n.into(), v.into())),
                _ => Some((name, value)),
            },
            None => Some((name, value)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_round_trips() {
        let m = Message::new(Bytes::from_static(&[0, 255]))
            .with_key("kunde-ä")
            .with_header("grüße", "✓ ünïcödé ☃")
            .with_header("x:colon", "line\r\nbreak")
            .with_header("padded", "  spaces ")
            .with_header("tidings-enc-looks-encoded", "x")
            .with_header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .with_header("empty", "")
            .with_type("order.placed")
            .with_source("/shop")
            .with_content_type("application/json")
            .with_correlation_id("c-1");
        let map = to_nats(&m, Some(&m.id));
        assert_eq!(map.get(MSG_ID).map(|v| v.as_str()), Some(m.id.as_str()));
        assert_eq!(map.get("ce_id").map(|v| v.as_str()), Some(m.id.as_str()));
        assert!(map.get("traceparent").is_some(), "plain headers stay plain");
        let back = from_nats(Some(&map), m.payload.clone(), None);
        assert_eq!(back, m);
    }

    #[test]
    fn plain_client_message() {
        let mut map = HeaderMap::new();
        map.insert("x-app", "1");
        map.insert("Nats-Msg-Id", "abc");
        let m = from_nats(Some(&map), Bytes::from_static(b"raw"), Some("S:7".into()));
        assert_eq!(m.id, "S:7");
        assert_eq!(m.headers.len(), 1);
        assert_eq!(m.headers["x-app"], "1");
        let m = from_nats(None, Bytes::new(), None);
        assert_eq!(m.id.len(), 36);
    }

    #[test]
    fn percent_coding() {
        assert_eq!(
            percent_decode(&percent_encode("a b:ü%")).as_deref(),
            Some("a b:ü%")
        );
        assert_eq!(percent_decode("100%").as_deref(), Some("100%"));
        assert_eq!(percent_decode("%ff"), None);
    }
}
