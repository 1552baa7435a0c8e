#![no_main]
//! Redis stream entries (any fields, any bytes) to a Message, or salvaged.

use libfuzzer_sys::fuzz_target;
use redis::Value;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let fields: Vec<Value> = data
        .split(|b| *b == 0)
        .map(|part| match part.first() {
            Some(1) => Value::Nil,
            Some(2) => Value::Int(part.len() as i64),
            _ => Value::BulkString(part.to_vec()),
        })
        .collect();
    if let Ok(m) = tidings_redis::headers::read_fields("1-0", fields.clone()) {
        common::use_message(&m);
    }
    common::use_message(&tidings_redis::headers::salvage("1-0", &fields));
});
