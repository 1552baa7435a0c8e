//! What a broker can tell an operator about the groups of a topic
//! ([`Subscriber::groups`](crate::Subscriber::groups)): how far behind each
//! group is, what it holds unsettled and how many dead letters wait for it.
//!
//! Every figure is optional: brokers know different things (RabbitMQ counts
//! ready messages but not a queue's unacknowledged ones over AMQP; Kafka's
//! lag is per partition offsets, not messages in flight), and a figure the
//! broker cannot tell is absent, never guessed.

use serde::Serialize;

/// One group of a topic, as the broker sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GroupStats {
    /// The group's name.
    pub group: String,
    /// Consumers the broker counts for the group (connections, not threads).
    pub members: Option<u64>,
    /// Messages delivered to the group and not yet settled.
    pub pending: Option<u64>,
    /// Messages the group has not received yet.
    pub lag: Option<u64>,
    /// Dead letters of the group still in its dead-letter destination.
    pub dead_letters: Option<u64>,
}

impl GroupStats {
    /// A group with no figures yet.
    pub fn new(group: impl Into<String>) -> Self {
        GroupStats {
            group: group.into(),
            ..GroupStats::default()
        }
    }
}
