//! Adapter options from URL query parameters, parsed the same way in every
//! adapter: the same spellings accepted, the same errors naming the key and
//! what is allowed, and URLs shown without their password.

use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// A configuration error for `key`.
pub fn invalid(key: &str, message: impl Into<String>) -> Error {
    Error::Config {
        key: key.into(),
        message: message.into(),
    }
}

/// A duration such as `500ms`, `30s`, `2m`, `1h 30m`.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(tidings_core::params::duration("ack_wait", "1m 30s")?, Duration::from_secs(90));
/// assert!(tidings_core::params::duration("ack_wait", "soon").is_err());
/// # Ok::<(), tidings_core::Error>(())
/// ```
pub fn duration(key: &str, value: &str) -> Result<Duration> {
    humantime::parse_duration(value).map_err(|e| {
        invalid(
            key,
            format!("`{value}` is not a duration ({e}); use e.g. `500ms`, `30s`, `2m`"),
        )
    })
}

/// A duration, or none: `off`, `none`, `0` or empty.
pub fn optional_duration(key: &str, value: &str) -> Result<Option<Duration>> {
    match value {
        "" | "none" | "off" | "0" => Ok(None),
        v => duration(key, v).map(Some),
    }
}

/// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
pub fn boolean(key: &str, value: &str) -> Result<bool> {
    match value {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        v => Err(invalid(key, format!("`{v}` is not one of true, false"))),
    }
}

/// A number of type `T`.
pub fn number<T: FromStr>(key: &str, value: &str) -> Result<T> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("`{value}` is not a valid {}", std::any::type_name::<T>()),
        )
    })
}

/// The URL with its password replaced by `***`, for errors, logs and `Debug`.
///
/// Works on URLs a URL parser rejects (a Kafka URL lists several hosts), and
/// never echoes a password it could not parse.
///
/// ```
/// use tidings_core::params::redact_url;
/// assert_eq!(redact_url("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
/// assert_eq!(redact_url("kafka://a:9092,b:9092"), "kafka://a:9092,b:9092");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            // A lone token (`nats://token@host`) is a secret too.
            None => format!("{scheme}://***@{host}{tail}"),
        },
        None => url.to_owned(),
    }
}
