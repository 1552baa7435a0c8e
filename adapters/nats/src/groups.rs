//! `Subscriber::groups` on JetStream: the durable consumers that filter the
//! topic's subject, and the dead-letter tooling's consumer of each group's
//! dead-letter topic.

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::Stream;
use futures::TryStreamExt;
use tidings_core::delivery::DEAD_LETTER_GROUP;
use tidings_core::{GroupStats, Result};

use crate::{Shared, broker_error};

/// The groups of `topic` (or the `named` ones) with their figures.
pub(crate) async fn report(
    shared: &Shared,
    topic: &str,
    named: &[String],
) -> Result<Vec<GroupStats>> {
    let subject = shared.topology.subject(topic)?;
    let consumers = match stream_of(shared, topic).await? {
        Some(stream) => {
            let all: Vec<consumer::Info> = stream
                .consumers()
                .try_collect()
                .await
                .map_err(broker_error)?;
            all.into_iter()
                .filter(|c| c.config.filter_subject == subject)
                .collect()
        }
        None => Vec::new(),
    };
    let group_of = |c: &consumer::Info| {
        c.config
            .description
            .as_deref()
            .and_then(group_in_description)
            .unwrap_or(&c.name)
            .to_owned()
    };
    let wanted: Vec<String> = if named.is_empty() {
        consumers.iter().map(group_of).collect()
    } else {
        named.to_vec()
    };
    let mut out = Vec::new();
    for name in wanted {
        let mut stats = GroupStats::new(name.as_str());
        if let Some(c) = consumers.iter().find(|c| group_of(c) == name) {
            // JetStream does not count a pull consumer's members (only
            // the pull requests waiting at this instant), so none is given.
            stats.pending = Some(c.num_ack_pending as u64);
            stats.lag = Some(c.num_pending);
        }
        stats.dead_letters = Some(dead_letters(shared, topic, &name).await?);
        out.push(stats);
    }
    Ok(out)
}

/// The letters of `group` on `topic` not replayed or purged yet: what the
/// dead-letter tooling's consumer has not acknowledged, or every letter of
/// the subject while no inbox has read it.
async fn dead_letters(shared: &Shared, topic: &str, group: &str) -> Result<u64> {
    let letters = shared.topology.dead_letter_topic(topic, group);
    let Some(stream) = stream_of(shared, &letters).await? else {
        return Ok(0);
    };
    let durable = shared.topology.durable(&letters, DEAD_LETTER_GROUP);
    if let Ok(inbox) = stream.consumer_info(&durable).await {
        return Ok(inbox.num_pending + inbox.num_ack_pending as u64);
    }
    let subject = shared.topology.subject(&letters)?;
    let counts: Vec<(String, usize)> = stream
        .info_with_subjects(&subject)
        .await
        .map_err(broker_error)?
        .try_collect()
        .await
        .map_err(broker_error)?;
    Ok(counts.iter().map(|(_, n)| *n as u64).sum())
}

/// The stream that holds `topic`, without creating it.
async fn stream_of(shared: &Shared, topic: &str) -> Result<Option<Stream>> {
    let (name, _) = shared.topology.stream(topic)?;
    match shared.js.get_stream(&name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e)
            if matches!(e.kind(), GetStreamErrorKind::JetStream(js)
                if js.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            Ok(None)
        }
        Err(e) => Err(broker_error(e)),
    }
}

/// The group in a consumer description the adapter wrote:
/// ``tidings group `billing` on `orders` ``.
fn group_in_description(description: &str) -> Option<&str> {
    description
        .strip_prefix("tidings group `")?
        .split_once('`')
        .map(|(group, _)| group)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_group_is_read_back_from_the_description() {
        assert_eq!(
            super::group_in_description("tidings group `billing` on `orders.placed`"),
            Some("billing")
        );
        assert_eq!(super::group_in_description("made by hand"), None);
    }
}
