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

/// Takes a cluster's node list out of a URL's authority
/// (`scheme://user:pass@h1:6379,h2:6379,[::1]/tail`): the URL with its first
/// node only, and every node as `host:port` (`default_port` where a node
/// names none). A URL naming one node comes back as it is, with no list.
///
/// ```
/// use tidings_core::params::split_hosts;
/// let (url, nodes) = split_hosts("amqp://u:p@n1,n2:5673/v", 5672)?;
/// assert_eq!(url, "amqp://u:p@n1:5672/v");
/// assert_eq!(nodes, ["n1:5672", "n2:5673"]);
/// assert!(split_hosts("redis://h1,,h2", 6379).is_err());
/// let (url, nodes) = split_hosts("rediss://h1,h2#insecure", 6379)?;
/// assert_eq!((url.as_str(), nodes.len()), ("rediss://h1:6379#insecure", 2));
/// # Ok::<(), tidings_core::Error>(())
/// ```
pub fn split_hosts(url: &str, default_port: u16) -> Result<(String, Vec<String>)> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (credentials, nodes) = match authority.rsplit_once('@') {
        Some((c, n)) => (Some(c), n),
        None => (None, authority),
    };
    if !nodes.contains(',') {
        return Ok((url.to_owned(), Vec::new()));
    }
    let has_port = |n: &str| match n.strip_prefix('[') {
        // An IPv6 address: `[::1]:5672` has a port, `[::1]` none.
        Some(v6) => v6.contains("]:"),
        None => n.contains(':'),
    };
    let hosts: Vec<String> = nodes
        .split(',')
        .map(|n| {
            if has_port(n) {
                n.to_owned()
            } else {
                format!("{n}:{default_port}")
            }
        })
        .collect();
    for host in &hosts {
        let valid = !host.starts_with(':')
            && url::Url::parse(&format!("{scheme}://{host}/")).is_ok_and(|u| u.host().is_some());
        if !valid {
            return Err(invalid(
                "url",
                format!("`{host}` in the node list is not a host:port"),
            ));
        }
    }
    let first = &hosts[0];
    let authority = match credentials {
        Some(c) => format!("{c}@{first}"),
        None => first.clone(),
    };
    Ok((format!("{scheme}://{authority}{tail}"), hosts))
}

/// `url` once for each of `hosts` (`host:port`), with that node as its
/// host: the URLs to connect to, in order. `url` alone when `hosts` names
/// fewer than two nodes.
///
/// ```
/// use tidings_core::params::node_urls;
/// let nodes = ["n1:6379".to_owned(), "[::2]:6380".to_owned()];
/// assert_eq!(
///     node_urls("redis://u:p@n1:6379/0", &nodes),
///     ["redis://u:p@n1:6379/0", "redis://u:p@[::2]:6380/0"]
/// );
/// ```
pub fn node_urls(url: &str, hosts: &[String]) -> Vec<String> {
    if hosts.len() < 2 {
        return vec![url.to_owned()];
    }
    let Ok(parsed) = url::Url::parse(url) else {
        return vec![url.to_owned()];
    };
    hosts
        .iter()
        .map(|host| {
            let mut node = parsed.clone();
            let (name, port) = host.rsplit_once(':').unwrap_or((host, ""));
            let _ = node.set_host(Some(name));
            let _ = node.set_port(port.parse().ok());
            node.to_string()
        })
        .collect()
}

/// A URL's percent-encoded part (a user name, a password) decoded; bytes
/// that are not UTF-8 once decoded become U+FFFD.
///
/// ```
/// assert_eq!(tidings_core::params::percent_decode("p%40ss%2Fw"), "p@ss/w");
/// ```
pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}
