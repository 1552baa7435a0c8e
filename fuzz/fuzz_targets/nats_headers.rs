#![no_main]
//! NATS headers (what async-nats accepts) to a Message.

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mut map = async_nats::HeaderMap::new();
    for (k, v) in common::pairs(data) {
        if let (Ok(k), Ok(v)) = (
            async_nats::HeaderName::try_from(k.as_str()),
            v.parse::<async_nats::HeaderValue>(),
        ) {
            map.insert(k, v);
        }
    }
    let m = tidings_nats::headers::from_nats(
        Some(&map),
        Bytes::copy_from_slice(data),
        Some("S:1".into()),
    );
    common::use_message(&m);
});
