#![allow(dead_code)]
//! Shared by the targets: splitting raw bytes into header pairs, and what
//! the runtime does with a decoded message (write it back for a republish
//! or a dead letter, read a dead letter back).

use tidings_core::{DeadLetter, Message, wire};

/// Pairs from `name\0value\0name\0value...`, lossily UTF-8.
pub fn pairs(data: &[u8]) -> Vec<(String, String)> {
    let mut parts = data.split(|b| *b == 0);
    let mut out = Vec::new();
    while let (Some(n), Some(v)) = (parts.next(), parts.next()) {
        out.push((
            String::from_utf8_lossy(n).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        ));
    }
    out
}

pub fn use_message(m: &Message) {
    for names in [wire::BINARY, wire::AMQP] {
        let _ = m.to_header_map(&names);
    }
    let _ = m.chain_depth();
    let _ = m.publish_dedup_key();
    if let Some(letter) = DeadLetter::from_message(m) {
        let _ = letter.letter_for(m);
    }
    let _ = tidings_amqp::headers::properties(m, &[]);
    let _ = tidings_nats::headers::to_nats(m, Some(&m.id));
    let _ = tidings_redis::headers::encode_frame(m);
}
