//! Every decode path from a broker's bytes to a `Message` (and back to
//! headers, as dead-lettering and republishing do) never panics, whatever
//! the input: property tests over arbitrary and near-valid inputs, run in
//! every test run so a regression fails CI.

use std::time::Duration;

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use proptest::prelude::*;
use rdkafka::message::{Header, OwnedHeaders};
use redis::Value;
use tidings::delivery::header;
use tidings::{DeadLetter, Message, time, wire};

/// Inputs per property: 2,000 in every test run (seconds); set
/// `TIDINGS_DECODER_CASES` for a long run (see docs/robustness.md).
fn cases() -> u32 {
    std::env::var("TIDINGS_DECODER_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

/// Header names: ours, CloudEvents', the brokers' own, and anything.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("ce_time".to_owned()),
        Just("ce_id".to_owned()),
        Just("ce_type".to_owned()),
        Just("cloudEvents:time".to_owned()),
        Just("content-type".to_owned()),
        Just(header::ATTEMPT.to_owned()),
        Just(header::CHAIN_DEPTH.to_owned()),
        Just(header::FIRST_FAILURE.to_owned()),
        Just(header::DLQ_REASON.to_owned()),
        Just(header::DLQ_LAST_FAILURE.to_owned()),
        Just(header::DLQ_TOPIC.to_owned()),
        Just("payload".to_owned()),
        Just("\\payload".to_owned()),
        Just("tidings-enc-%ZZ".to_owned()),
        Just("Nats-Msg-Id".to_owned()),
        ".{0,24}",
    ]
}

/// Values: times of every shape, numbers, and anything.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9+-]{1,7}-[0-9]{1,2}-[0-9]{1,2}T[0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}(\\.[0-9]{0,12})?(Z|[+-][0-9]{1,2}:[0-9]{1,2})?",
        "[0-9]{0,25}",
        Just("permanent-error".to_owned()),
        "%[0-9A-Fa-f]{0,2}.{0,8}",
        ".{0,40}",
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((name(), value()), 0..12)
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..64)
}

/// What the runtime and the adapters do with a decoded message.
fn use_message(m: &Message) {
    for names in [wire::BINARY, wire::AMQP] {
        let _ = m.to_header_map(&names);
    }
    let _ = DeadLetter::from_message(m);
    let _ = m.chain_depth();
    let _ = m.publish_dedup_key();
    if let Some(letter) = DeadLetter::from_message(m) {
        let _ = letter.letter_for(m);
    }
    let _ = tidings::amqp::headers::properties(m, &[]);
    let _ = tidings::nats::headers::to_nats(m, Some(&m.id));
    let _ = tidings::kafka::headers::to_kafka(m);
    let _ = tidings::redis::headers::encode_frame(m);
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(cases()) })]

    #[test]
    fn wire_headers(h in headers(), payload in bytes()) {
        for names in [wire::BINARY, wire::AMQP] {
            let m = Message::from_headers(&names, h.clone(), Bytes::from(payload.clone()), None);
            use_message(&m);
        }
    }

    #[test]
    fn dialects(h in headers(), body in prop_oneof![
        bytes(),
        Just(br#"{"specversion":"1.0","id":"x","type":"t","data":{"a":1}}"#.to_vec()),
        Just(br#"{"specversion":"1.0","data_base64":"!!"}"#.to_vec()),
        Just(br#"{"id":1,"type":["x"],"timestamp":99999999999999999999,"payload":null,"metadata":"m"}"#.to_vec()),
        value().prop_map(|v| format!(r#"{{"id":"i","timestamp":"{v}","payload":{{"k":"{v}"}}}}"#).into_bytes()),
    ], native_id in prop::option::of(".{0,8}"), native_time in prop::option::of(any::<u64>())) {
        let mut envelope = tidings::Dialect::CloudEventsBinary;
        envelope.set_envelope_option("data", "payload").expect("an envelope");
        for dialect in [tidings::Dialect::CloudEventsBinary, tidings::Dialect::CloudEventsStructured, envelope] {
            for names in [wire::BINARY, wire::AMQP] {
                let native = tidings::dialect::Native {
                    id: native_id.as_deref(),
                    event_type: Some("t"),
                    time: native_time.and_then(time::from_unix_secs_or_millis),
                    content_type: None,
                };
                if let Ok(m) = dialect.decode(&names, h.clone(), Bytes::from(body.clone()), native) {
                    use_message(&m);
                    let _ = dialect.encode(&m, &names, |_, _| {});
                }
            }
        }
    }

    #[test]
    fn times(text in value(), n in any::<u64>(), secs in any::<i64>()) {
        if let Some(t) = time::parse_rfc3339(&text) {
            prop_assert!(time::format_rfc3339(t).is_some());
        }
        for t in [time::from_unix_secs(n), time::from_unix_millis(n), time::from_unix_secs_or_millis(n)]
            .into_iter()
            .flatten()
        {
            prop_assert!(time::format_rfc3339(t).is_some());
        }
        let far = if secs >= 0 {
            std::time::UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
        } else {
            std::time::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
        };
        if let Some(t) = far {
            let m = Message { metadata: tidings::Metadata { time: Some(t), ..Default::default() }, ..Message::default() };
            use_message(&m);
        }
    }

    #[test]
    fn amqp_properties(
        h in prop::collection::vec((name(), prop::collection::vec(any::<u8>(), 0..24), 0u8..8), 0..10),
        stamp in any::<u64>(),
        id in ".{0,40}",
        payload in bytes(),
    ) {
        let mut table = FieldTable::default();
        for (k, v, kind) in h {
            let Ok(k) = ShortString::try_new(k) else { continue };
            let v = match kind {
                0 => AMQPValue::LongString(LongString::from(v)),
                1 => AMQPValue::LongLongInt(i64::from_le_bytes({ let mut b = [0; 8]; b[..v.len().min(8)].copy_from_slice(&v[..v.len().min(8)]); b })),
                2 => AMQPValue::Timestamp(stamp),
                3 => AMQPValue::FieldArray(FieldArray::default()),
                4 => AMQPValue::FieldTable(FieldTable::default()),
                5 => AMQPValue::Boolean(v.is_empty()),
                6 => AMQPValue::Double(f64::from_bits(stamp)),
                _ => AMQPValue::Void,
            };
            table.insert(k, v);
        }
        let mut props = BasicProperties::default().with_headers(table).with_timestamp(stamp);
        if let Ok(id) = ShortString::try_new(id) {
            props = props.with_message_id(id);
        }
        let received = tidings::amqp::headers::received(&props, Bytes::from(payload));
        use_message(&received.message);
    }

    #[test]
    fn redis_stream_entries(fields in prop::collection::vec(prop_oneof![
        name().prop_map(|n| Value::BulkString(n.into_bytes())),
        value().prop_map(|v| Value::BulkString(v.into_bytes())),
        bytes().prop_map(Value::BulkString),
        Just(Value::Nil),
        any::<i64>().prop_map(Value::Int),
    ], 0..12), id in ".{0,20}") {
        if let Ok(m) = tidings::redis::headers::read_fields(&id, fields.clone()) {
            use_message(&m);
        }
        use_message(&tidings::redis::headers::salvage(&id, &fields));
    }

    #[test]
    fn redis_pubsub_frames(body in bytes(), framed in any::<bool>(), h in headers()) {
        let body = if framed {
            // A real frame, cut or extended at a random place.
            let m = Message::from_headers(&wire::BINARY, h, Bytes::from(body.clone()), None);
            let mut frame = tidings::redis::headers::encode_frame(&m);
            let cut = body.first().map_or(frame.len(), |b| usize::from(*b) % (frame.len() + 1));
            frame.truncate(cut);
            frame
        } else {
            let mut raw = b"TDG1".to_vec();
            raw.extend(body);
            raw
        };
        if let Ok(m) = tidings::redis::headers::decode_frame("c", Bytes::from(body)) {
            use_message(&m);
        }
    }

    #[test]
    fn nats_headers(h in headers(), payload in bytes()) {
        let mut map = async_nats::HeaderMap::new();
        for (k, v) in &h {
            if let (Ok(k), Ok(v)) = (async_nats::HeaderName::try_from(k.as_str()), v.parse::<async_nats::HeaderValue>()) {
                map.insert(k, v);
            }
        }
        let m = tidings::nats::headers::from_nats(Some(&map), Bytes::from(payload), Some("S:1".into()));
        use_message(&m);
    }

    #[test]
    fn configuration_urls(
        scheme in prop_oneof![
            prop::sample::select(vec!["redis", "rediss", "amqp", "amqps", "nats", "tls", "kafka", "memory"])
                .prop_map(String::from),
            ".{0,6}",
        ],
        rest in ".{0,30}",
        key in prop_oneof![
            prop::sample::select(vec![
                "mode", "visibility_timeout", "maxlen", "maxlen.t", "queue_type", "exchange", "ack_wait",
                "max_deliver", "servers", "stream", "progress_interval", "tls_ca_file", "heartbeat", "ordering",
            ])
            .prop_map(String::from),
            ".{0,12}",
        ],
        value in prop_oneof![value(), "%[0-9A-Fa-f]{0,2}.{0,6}"],
    ) {
        let url = format!("{scheme}://{rest}?{key}={value}&{key}");
        let _ = tidings::redis::RedisConfig::from_url(&url);
        let _ = tidings::amqp::AmqpConfig::from_url(&url);
        let _ = tidings::nats::NatsConfig::from_url(&url);
        let _ = tidings::kafka::KafkaConfig::from_url(&url);
        let _ = tidings::Config::from_url(url.clone()).check();
    }

    #[test]
    fn kafka_headers(h in prop::collection::vec((name(), prop::option::of(bytes())), 0..10), key in prop::option::of(bytes()), retried in any::<bool>()) {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &h {
            headers = headers.insert(Header { key: k, value: v.as_deref() });
        }
        let (m, _) = tidings::kafka::headers::from_kafka(Some(&headers), key.as_deref(), Bytes::new(), "t/0/1".into(), retried);
        use_message(&m);
    }
}
