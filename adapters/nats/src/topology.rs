//! How topics and groups map to subjects, streams and durable consumers.

use tidings_core::{Error, Result};

use crate::config::{NatsConfig, StreamLayout};

/// Whether `name` may name a stream or a consumer.
pub(crate) fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>' | b'/' | b'\\'))
}

/// Checks that `subject` is a literal subject (no wildcards, no empty tokens, no spaces).
pub(crate) fn check_subject(key: &str, subject: &str) -> Result<()> {
    let bad = subject.is_empty()
        || subject.split('.').any(|token| {
            token.is_empty()
                || token == "*"
                || token == ">"
                || token.chars().any(|c| c.is_whitespace() || c.is_control())
        });
    if bad {
        return Err(Error::Config {
            key: key.into(),
            message: format!(
                "`{subject}` is not a valid NATS subject: dot-separated non-empty tokens, \
                 without spaces and without the wildcards `*` and `>`"
            ),
        });
    }
    Ok(())
}

/// A hash stable across builds and processes (unlike `DefaultHasher`).
fn fnv1a(s: &str) -> u64 {
    tidings_core::StableHash::default()
        .write(s.as_bytes())
        .finish()
}

/// `s` with characters that names cannot hold replaced by `_`; when anything
/// was replaced (or the name was too long), a hash of `s` is appended so that
/// distinct inputs keep distinct names.
pub(crate) fn name_for(s: &str) -> String {
    let mut changed = false;
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                changed = true;
                '_'
            }
        })
        .collect();
    if out.len() > 120 {
        out.truncate(120);
        changed = true;
    }
    if changed || out.is_empty() {
        out.push_str(&format!("-{:08x}", fnv1a(s) as u32));
    }
    out
}

/// The mapping for one configuration.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    subject_prefix: Option<String>,
    stream_prefix: String,
    shared: Option<String>,
    dead_letters: String,
}

impl Topology {
    pub(crate) fn new(config: &NatsConfig) -> Self {
        Topology {
            subject_prefix: config.subject_prefix.clone().filter(|p| !p.is_empty()),
            stream_prefix: config.stream_prefix.clone(),
            shared: match &config.layout {
                StreamLayout::PerTopic => None,
                StreamLayout::Shared { stream } => Some(stream.clone()),
            },
            dead_letters: config.dead_letters.clone(),
        }
    }

    /// The subject of `topic`, checked.
    pub(crate) fn subject(&self, topic: &str) -> Result<String> {
        check_subject("topic", topic)?;
        Ok(match &self.subject_prefix {
            Some(prefix) => format!("{prefix}.{topic}"),
            None => topic.to_owned(),
        })
    }

    /// The stream that holds `topic`, and the subjects it captures when the
    /// adapter creates it. (A stream that exists already may capture more,
    /// or capture the topic through other subjects: see [`captures`].)
    pub(crate) fn stream(&self, topic: &str) -> Result<(String, Vec<String>)> {
        match &self.shared {
            Some(name) => {
                let prefix = self.subject_prefix.as_deref().unwrap_or("tidings");
                Ok((name.clone(), vec![format!("{prefix}.>")]))
            }
            None => {
                let subject = self.subject(topic)?;
                Ok((
                    format!("{}{}", self.stream_prefix, name_for(topic)),
                    vec![subject],
                ))
            }
        }
    }

    /// Whether every topic lives in one stream.
    pub(crate) fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The durable consumer of `group` on `topic`.
    pub(crate) fn durable(&self, topic: &str, group: &str) -> String {
        if self.is_shared() {
            name_for(&format!("{group}.{topic}"))
        } else {
            name_for(group)
        }
    }

    /// The topic of the dead letters of `group` on `topic`, by the
    /// `dead_letters` template (default `<topic>.<group>.dlq`).
    pub(crate) fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        self.dead_letters
            .replace("{topic}", topic)
            .replace("{group}", group)
    }
}

/// Whether a stream with these subjects (wildcards allowed) captures the
/// literal `subject`, by NATS's matching rules: `*` is one token, `>` one
/// or more trailing tokens.
pub(crate) fn captures(subjects: &[String], subject: &str) -> bool {
    subjects.iter().any(|pattern| matches(pattern, subject))
}

fn matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for p in pattern.split('.') {
        match (p, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_and_distinct() {
        assert_eq!(name_for("orders"), "orders");
        let a = name_for("a.b");
        let b = name_for("a_b");
        assert_ne!(a, b);
        assert!(valid_stream_name(&a) && valid_stream_name(&b));
        assert!(valid_stream_name(&name_for(
            "tk-round-trip-1a2b3c4d.dl.dlq"
        )));
        assert!(valid_stream_name(&name_for(&"x".repeat(500))));
    }

    #[test]
    fn wildcards_capture_as_nats_does() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(captures(&s(&["orders.*"]), "orders.created"));
        assert!(!captures(&s(&["orders.*"]), "orders.created.eu"));
        assert!(!captures(&s(&["orders.*"]), "orders"));
        assert!(captures(&s(&["orders.>"]), "orders.created.eu"));
        assert!(!captures(&s(&["orders.>"]), "orders"));
        assert!(captures(&s(&["users.*", "*.created"]), "orders.created"));
        assert!(captures(&s(&["a.b.c"]), "a.b.c"));
        assert!(!captures(&s(&["a.b.c"]), "a.b"));
        assert!(!captures(&s(&[]), "a"));
    }

    #[test]
    fn dead_letters_follow_the_template() {
        let t = Topology::new(&NatsConfig::default());
        assert_eq!(
            t.dead_letter_topic("orders.created", "billing"),
            "orders.created.billing.dlq"
        );
        let t = Topology::new(&NatsConfig {
            dead_letters: "dlq.{group}.{topic}".into(),
            ..NatsConfig::default()
        });
        assert_eq!(
            t.dead_letter_topic("orders.created", "billing"),
            "dlq.billing.orders.created"
        );
    }

    #[test]
    fn subjects() {
        let t = Topology::new(&NatsConfig::default());
        assert_eq!(t.subject("order.placed").unwrap(), "order.placed");
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a"] {
            assert!(t.subject(bad).is_err(), "{bad:?}");
        }
        let (stream, subjects) = t.stream("order.placed").unwrap();
        assert!(stream.starts_with("TIDINGS_order_placed-"));
        assert_eq!(subjects, ["order.placed"]);
        let shared = Topology::new(&NatsConfig::default().with_shared_stream("EVENTS"));
        assert_eq!(shared.subject("o").unwrap(), "tidings.o");
        assert_eq!(
            shared.stream("o").unwrap(),
            ("EVENTS".into(), vec!["tidings.>".into()])
        );
        assert_ne!(shared.durable("a", "g"), shared.durable("b", "g"));
    }
}
