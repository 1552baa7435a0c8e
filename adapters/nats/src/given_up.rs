//! Messages the server gave up on: what reaches a durable consumer's
//! `max_deliver` is dead-lettered, never dropped.
//!
//! The common way there is a message the client cannot read. async-nats
//! drops the whole connection on a header block that is not UTF-8 (or not
//! `Name: value` lines), so the adapter never sees such a message: the
//! server redelivers it every `ack_wait` and every subscription and
//! publisher on the connection reconnects each time. With a finite
//! `max_deliver` (20 by default) the server stops and publishes the
//! max-deliveries advisory; the adapter listens for it, fetches the stored
//! message by its stream sequence through the JetStream API (whose JSON
//! reply carries the headers as base64, so nothing on the way parses them),
//! reads the headers leniently, and hands the message to the consumer
//! runtime as a rejected delivery. The runtime dead-letters it through its
//! observed settlement like every other message.
//!
//! The header block is parsed by hand here because the one parser the
//! client has is the one that fails on such input.

use std::sync::Arc;

use async_nats::Subject;
use bytes::Bytes;
use serde::Deserialize;
use tidings_core::{BoxError, Message, MessageId};

use crate::Shared;
use crate::headers;

/// The advisory subject for `durable` on `stream`.
pub(crate) fn advisory_subject(stream: &str, durable: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}")
}

/// The max-deliveries advisory.
#[derive(Debug, Deserialize)]
pub(crate) struct Advisory {
    pub stream: String,
    pub stream_seq: u64,
    pub deliveries: u64,
}

#[derive(Deserialize)]
struct GetResponse {
    message: Option<Stored>,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    description: Option<String>,
}

#[derive(Deserialize)]
struct Stored {
    hdrs: Option<String>,
    data: Option<String>,
}

/// Why a given-up message could not be read by the client.
#[derive(Debug, thiserror::Error)]
#[error(
    "the NATS client cannot read this message ({0}); the server gave up on it after {1} deliveries"
)]
pub(crate) struct Unreadable(String, u64);

/// Why a readable message was given up on.
#[derive(Debug, thiserror::Error)]
#[error("the server gave up on this message after {0} deliveries (max_deliver)")]
pub(crate) struct MaxDeliveries(u64);

/// What the adapter hands on for a given-up message.
pub(crate) struct GivenUp {
    /// What could be read of the message (its id is `STREAM:seq` unless it
    /// carries its own).
    pub message: Message,
    /// Why it is dead-lettered: undecodable when the client could not read it.
    pub unreadable: bool,
    /// The reason, for the dead letter.
    pub why: BoxError,
}

/// Reads the advisory's message from the stream.
pub(crate) async fn fetch(shared: &Arc<Shared>, advisory: &Advisory) -> Result<GivenUp, BoxError> {
    let subject = Subject::from(format!("$JS.API.STREAM.MSG.GET.{}", advisory.stream));
    let request = format!("{{\"seq\":{}}}", advisory.stream_seq);
    let reply = tokio::time::timeout(
        shared.config.request_timeout,
        shared.client.request(subject, Bytes::from(request)),
    )
    .await
    .map_err(|_| "the stored message was not returned in time")??;
    let response: GetResponse = serde_json::from_slice(&reply.payload)?;
    let stored = match (response.message, response.error) {
        (Some(stored), _) => stored,
        (None, Some(e)) => return Err(e.description.unwrap_or_default().into()),
        (None, None) => return Err("an empty reply to a message get".into()),
    };
    let decode = |field: Option<String>| -> Result<Vec<u8>, BoxError> {
        use base64::Engine as _;
        Ok(match field {
            Some(text) => base64::engine::general_purpose::STANDARD.decode(text)?,
            None => Vec::new(),
        })
    };
    let block = decode(stored.hdrs)?;
    let payload = Bytes::from(decode(stored.data)?);
    let (pairs, problem) = lenient_headers(&block);
    let fallback = Some(MessageId::from_fmt(format_args!(
        "{}:{}",
        advisory.stream, advisory.stream_seq
    )));
    let pairs = pairs.into_iter().map(|(k, v)| (k.into(), v.into()));
    let message = headers::from_pairs(pairs, payload, fallback);
    let (unreadable, why): (bool, BoxError) = match problem {
        Some(problem) => (true, Box::new(Unreadable(problem, advisory.deliveries))),
        None => (false, Box::new(MaxDeliveries(advisory.deliveries))),
    };
    Ok(GivenUp {
        message,
        unreadable,
        why,
    })
}

/// Reads a NATS header block (`NATS/1.0` then `Name: value` lines) without
/// failing: bytes that are not UTF-8 are replaced, lines without a colon
/// are skipped. Returns the headers and, when the block is one the client
/// rejects, what is wrong with it.
pub(crate) fn lenient_headers(block: &[u8]) -> (Vec<(String, String)>, Option<String>) {
    let mut problem = std::str::from_utf8(block)
        .err()
        .map(|_| "a header is not UTF-8".to_owned());
    let text = String::from_utf8_lossy(block);
    let mut pairs = Vec::new();
    for line in text.split("\r\n").skip(1) {
        if line.is_empty() {
            continue;
        }
        match line.split_once(':') {
            Some((name, value)) => pairs.push((name.trim().to_owned(), value.trim().to_owned())),
            None => {
                problem.get_or_insert_with(|| "a header line has no `:`".to_owned());
            }
        }
    }
    (pairs, problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_the_client_rejects_are_read_leniently() {
        let block = b"NATS/1.0\r\nX-Bad: \xff\xfe\r\nce_type: order.placed\r\nnonsense\r\n\r\n";
        let (pairs, problem) = lenient_headers(block);
        assert_eq!(problem.as_deref(), Some("a header is not UTF-8"));
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1], ("ce_type".to_owned(), "order.placed".to_owned()));
        let (pairs, problem) = lenient_headers(b"NATS/1.0\r\nA: 1\r\n\r\n");
        assert_eq!(problem, None);
        assert_eq!(pairs, [("A".to_owned(), "1".to_owned())]);
        assert_eq!(lenient_headers(b""), (Vec::new(), None));
    }
}
