#![no_main]
//! Every adapter's URL parser on any text.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let url = String::from_utf8_lossy(data);
    let _ = tidings_redis::RedisConfig::from_url(&url);
    let _ = tidings_amqp::AmqpConfig::from_url(&url);
    let _ = tidings_nats::NatsConfig::from_url(&url);
});
