//! `Subscriber::groups` on RabbitMQ: a passive declare of each named
//! group's queue and of the queue that keeps its dead letters.
//!
//! AMQP has no call that lists the queues bound to an exchange (the
//! management plugin's HTTP API does, and is often off), so the groups
//! must be named.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tidings_core::delivery::DEAD_LETTER_GROUP;
use tidings_core::{Error, GroupStats, Result};

use crate::conn::{self, Connector, GroupNames, NAME};
use crate::headers::short;

/// The named groups of `topic`: ready messages (lag), consumers (members)
/// and dead letters. A queue that does not exist gives no figures.
pub(crate) async fn report(
    connector: &Connector,
    topic: &str,
    named: &[String],
) -> Result<Vec<GroupStats>> {
    if named.is_empty() {
        return Err(Error::Unsupported {
            adapter: NAME,
            what: "listing a topic's groups over AMQP; name them (`--group billing`), \
                   or see the queues bound to the exchange in the management UI"
                .into(),
        });
    }
    let config = &connector.config;
    let mut out = Vec::new();
    for group in named {
        let mut stats = GroupStats::new(group.as_str());
        let names = GroupNames::new(config, topic, group);
        if let Some((ready, consumers)) = depth(connector, &names.queue).await? {
            stats.lag = Some(ready);
            stats.members = Some(consumers);
        }
        // The queue the dead-letter tooling reads: the group's `.dlq`, or
        // the queue its `dead_letters` option names.
        let kept = GroupNames::new(config, &names.dlq_topic, DEAD_LETTER_GROUP);
        stats.dead_letters = Some(depth(connector, &kept.queue).await?.map_or(0, |(n, _)| n));
        out.push(stats);
    }
    Ok(out)
}

/// A queue's ready messages and consumers, or none when it does not exist.
async fn depth(connector: &Connector, queue: &str) -> Result<Option<(u64, u64)>> {
    let name = short(queue).map_err(|e| Error::Config {
        key: "group".into(),
        message: format!("queue name: {e}"),
    })?;
    // A passive declare of a missing queue closes its channel: one channel
    // per question.
    let ch = connector
        .connection()
        .await?
        .create_channel()
        .await
        .map_err(conn::connection_error)?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let answer = ch.queue_declare(name, passive, FieldTable::default()).await;
    match answer {
        Ok(q) => {
            let _ = ch.close(200, "OK".into()).await;
            Ok(Some((q.message_count() as u64, q.consumer_count() as u64)))
        }
        Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404) => {
            Ok(None)
        }
        Err(e) => Err(conn::connection_error(e)),
    }
}
