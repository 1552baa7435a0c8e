#![no_main]
//! AMQP properties and header tables of every value type to a Message.

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&kinds, rest)) = data.split_first() else {
        return;
    };
    let stamp = rest
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    let mut table = FieldTable::default();
    for (i, (name, value)) in common::pairs(rest).into_iter().enumerate() {
        let Ok(name) = ShortString::try_new(name) else {
            continue;
        };
        let value = match (kinds >> (i % 8)) & 0b111 {
            0 => AMQPValue::LongString(LongString::from(value.into_bytes())),
            1 => AMQPValue::LongLongInt(value.len() as i64 - 7),
            2 => AMQPValue::Timestamp(stamp),
            3 => AMQPValue::FieldArray(FieldArray::default()),
            4 => AMQPValue::FieldTable(FieldTable::default()),
            5 => AMQPValue::Double(f64::from_bits(stamp)),
            6 => AMQPValue::Boolean(value.is_empty()),
            _ => AMQPValue::Void,
        };
        table.insert(name, value);
    }
    let mut props = BasicProperties::default()
        .with_headers(table)
        .with_timestamp(stamp);
    if let Ok(id) = ShortString::try_new(String::from_utf8_lossy(rest).into_owned()) {
        props = props.with_message_id(id);
    }
    let received = tidings_amqp::headers::received(&props, Bytes::copy_from_slice(rest));
    common::use_message(&received.message);
});
