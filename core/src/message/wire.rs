//! How messages map to broker headers, the same way in every adapter.
//!
//! Metadata is written as CloudEvents attributes in binary content mode, so
//! a consumer written in another language with a CloudEvents SDK, or with a
//! plain client, can read our messages: `ce_id`, `ce_type`, ... for Kafka,
//! NATS and Redis ([`BINARY`]), `cloudEvents:id`, ... for AMQP ([`AMQP`]).
//! Headers that are neither metadata nor ours pass through untouched.

use super::{Headers, Message, MessageId, Metadata};
use bytes::Bytes;

/// The header names one broker family uses for the CloudEvents attributes.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    /// Message id.
    pub id: &'static str,
    /// CloudEvents spec version, always `1.0`.
    pub spec_version: &'static str,
    /// Event type.
    pub event_type: &'static str,
    /// Event source.
    pub source: &'static str,
    /// Event time (RFC 3339).
    pub time: &'static str,
    /// Schema version (extension attribute).
    pub schema_version: &'static str,
    /// Correlation id (extension attribute).
    pub correlation_id: &'static str,
    /// Causation id (extension attribute).
    pub causation_id: &'static str,
    /// Content type.
    pub content_type: &'static str,
    /// Ordering key (the `partitionkey` extension).
    pub key: &'static str,
}

/// Kafka, NATS and Redis style: `ce_` prefixed attributes.
pub const BINARY: Names = Names {
    id: "ce_id",
    spec_version: "ce_specversion",
    event_type: "ce_type",
    source: "ce_source",
    time: "ce_time",
    schema_version: "ce_schemaversion",
    correlation_id: "ce_correlationid",
    causation_id: "ce_causationid",
    content_type: "content-type",
    key: "ce_partitionkey",
};

/// AMQP style: `cloudEvents:` prefixed attributes.
pub const AMQP: Names = Names {
    id: "cloudEvents:id",
    spec_version: "cloudEvents:specversion",
    event_type: "cloudEvents:type",
    source: "cloudEvents:source",
    time: "cloudEvents:time",
    schema_version: "cloudEvents:schemaversion",
    correlation_id: "cloudEvents:correlationid",
    causation_id: "cloudEvents:causationid",
    content_type: "content-type",
    key: "cloudEvents:partitionkey",
};

/// The CloudEvents spec version written with every message.
pub const SPEC_VERSION: &str = "1.0";

/// The default event source when a message names none.
pub const DEFAULT_SOURCE: &str = "/tidings";

impl Message {
    /// Calls `f` with every header this message is written with:
    /// the CloudEvents attributes named by `names`, then the application headers.
    ///
    /// Takes a callback so that adapters write straight into their own
    /// header type without an intermediate collection.
    pub fn write_headers(&self, names: &Names, mut f: impl FnMut(&str, &str)) {
        let m = &self.metadata;
        f(names.id, &self.id);
        f(names.spec_version, SPEC_VERSION);
        f(names.source, m.source.as_deref().unwrap_or(DEFAULT_SOURCE));
        let optional = [
            (names.event_type, &m.event_type),
            (names.schema_version, &m.schema_version),
            (names.correlation_id, &m.correlation_id),
            (names.causation_id, &m.causation_id),
            (names.content_type, &m.content_type),
            (names.key, &self.key),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                f(name, value);
            }
        }
        // A time outside what RFC 3339 can say (before 1970, after 9999)
        // is left out: writing headers cannot fail.
        if let Some(time) = m.time.and_then(crate::time::format_rfc3339) {
            f(names.time, &time);
        }
        for (name, value) in &self.headers {
            f(name, value);
        }
    }

    /// Rebuilds a message from broker headers and payload.
    ///
    /// Missing metadata gets defaults: a message from a plain client with no
    /// `ce_id` gets a fresh id (pass the broker's own message id as
    /// `fallback_id` where it has one, so redeliveries keep the same id).
    /// A `ce_time` that does not parse stays in the headers.
    pub fn from_headers<K, V>(
        names: &Names,
        headers: impl IntoIterator<Item = (K, V)>,
        payload: Bytes,
        fallback_id: Option<MessageId>,
    ) -> Message
    where
        K: Into<String> + AsRef<str>,
        V: Into<String> + AsRef<str>,
    {
        let mut id = None;
        let mut key = None;
        let mut metadata = Metadata::default();
        let mut rest = Headers::new();
        for (name, value) in headers {
            let n = name.as_ref();
            let slot = if n == names.id {
                // Straight into the id's own storage, without a `String`.
                id = Some(MessageId::from(value.as_ref()));
                continue;
            } else if n == names.event_type {
                &mut metadata.event_type
            } else if n == names.source {
                // The default source is no source: not even copied.
                metadata.source = (value.as_ref() != DEFAULT_SOURCE).then(|| value.into());
                continue;
            } else if n == names.schema_version {
                &mut metadata.schema_version
            } else if n == names.correlation_id {
                &mut metadata.correlation_id
            } else if n == names.causation_id {
                &mut metadata.causation_id
            } else if n == names.content_type {
                &mut metadata.content_type
            } else if n == names.key {
                &mut key
            } else if n == names.spec_version {
                continue;
            } else if n == names.time {
                match crate::time::parse_rfc3339(value.as_ref()) {
                    Some(time) => metadata.time = Some(time),
                    None => {
                        rest.insert(name.into(), value.into());
                    }
                }
                continue;
            } else {
                rest.insert(name.into(), value.into());
                continue;
            };
            *slot = Some(value.into());
        }
        Message {
            id: id.or(fallback_id).unwrap_or_else(super::new_id),
            key,
            headers: rest,
            payload,
            metadata,
        }
    }

    /// All headers as a map, as [`Message::write_headers`] would write them.
    pub fn to_header_map(&self, names: &Names) -> Headers {
        let mut map = Headers::with_capacity(self.headers.len() + 8);
        self.write_headers(names, |k, v| {
            map.insert(k.to_owned(), v.to_owned());
        });
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Message {
        Message::new(Bytes::from_static(&[0, 159, 146, 150, 255]))
            .with_key("kunde-ä")
            .with_header("grüße", "✓ ünïcödé")
            .with_type("order.placed")
            .with_source("/shop")
            .with_schema_version("2")
            .with_correlation_id("c-1")
            .with_content_type("application/json")
            .caused_by(&Message::new("parent").with_correlation_id("c-0"))
    }

    #[test]
    fn every_field_round_trips_in_both_styles() {
        for names in [BINARY, AMQP] {
            let m = full();
            let headers = m.to_header_map(&names);
            assert_eq!(headers[names.spec_version], "1.0");
            let back = Message::from_headers(&names, headers, m.payload.clone(), None);
            assert_eq!(back, m);
        }
    }

    #[test]
    fn plain_client_message_gets_defaults() {
        let fallback = Some("broker-id-1".into());
        let m = Message::from_headers(
            &BINARY,
            [("x-app", "1"), ("ce_time", "not a time")],
            Bytes::from_static(b"raw"),
            fallback,
        );
        assert_eq!(m.id, "broker-id-1");
        assert_eq!(m.metadata, Metadata::default());
        assert_eq!(m.headers["x-app"], "1");
        assert_eq!(m.headers["ce_time"], "not a time");
    }

    #[test]
    fn missing_id_without_fallback_is_generated() {
        let m = Message::from_headers(&AMQP, Vec::<(String, String)>::new(), Bytes::new(), None);
        assert_eq!(m.id.len(), 36);
    }
}
