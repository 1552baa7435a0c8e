//! Pub/Sub bodies: a message framed as one binary string (or written by
//! the configured dialect), and reading bodies back.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tidings_core::dialect::Native;
use tidings_core::{Dialect, Message};

use super::{Layout, NAMES, PUBSUB_MAGIC};

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
    use crate::headers::tests::full;

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
