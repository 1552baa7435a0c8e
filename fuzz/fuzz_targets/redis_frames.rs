#![no_main]
//! Redis Pub/Sub bodies, framed or not, to a Message.

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mut framed = b"TDG1".to_vec();
    framed.extend_from_slice(data);
    for body in [data.to_vec(), framed] {
        if let Ok(m) = tidings_redis::headers::decode_frame("c", Bytes::from(body)) {
            common::use_message(&m);
        }
    }
});
