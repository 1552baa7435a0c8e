#![no_main]
//! CloudEvents headers in both styles, times among them, to a Message and back.

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tidings_core::{Message, time, wire};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (head, payload) = data.split_at(data.len() / 2);
    for names in [wire::BINARY, wire::AMQP] {
        let m = Message::from_headers(
            &names,
            common::pairs(head),
            Bytes::copy_from_slice(payload),
            None,
        );
        common::use_message(&m);
    }
    let text = String::from_utf8_lossy(data);
    if let Some(t) = time::parse_rfc3339(&text) {
        assert!(time::format_rfc3339(t).is_some());
    }
    if data.len() >= 8 {
        let n = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
        if let Some(t) = time::from_unix_secs_or_millis(n) {
            assert!(time::format_rfc3339(t).is_some());
        }
    }
});
