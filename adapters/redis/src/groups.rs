//! `Subscriber::groups` on Redis Streams: `XINFO GROUPS` of the topic's
//! stream, and of each group's dead-letter stream.

use redis::streams::{StreamInfoGroup, StreamInfoGroupsReply};
use redis::{AsyncCommands, RedisResult};
use tidings_core::GroupStats;

use crate::Conn;
use tidings_core::delivery::DEAD_LETTER_GROUP;

/// The groups of the stream `topic` (or the `named` ones), with the dead
/// letters each still has in the stream `dead_letters(group)`.
pub(crate) async fn report(
    conn: &mut Conn,
    topic: &str,
    named: &[String],
    dead_letters: impl Fn(&str) -> String,
) -> RedisResult<Vec<GroupStats>> {
    let known = info(conn, topic).await?;
    let mut out = Vec::new();
    let wanted: Vec<&str> = if named.is_empty() {
        known.iter().map(|g| g.name.as_str()).collect()
    } else {
        named.iter().map(String::as_str).collect()
    };
    for name in wanted {
        let mut stats = GroupStats::new(name);
        if let Some(g) = known.iter().find(|g| g.name == name) {
            stats.members = Some(g.consumers as u64);
            stats.pending = Some(g.pending as u64);
            stats.lag = g.lag.map(|n| n as u64);
        }
        stats.dead_letters = Some(waiting(conn, &dead_letters(name)).await?);
        out.push(stats);
    }
    Ok(out)
}

/// The letters of a dead-letter stream the dead-letter tooling has not
/// replayed or purged: its group's lag and pending, or every entry while
/// no inbox has read the stream yet.
async fn waiting(conn: &mut Conn, stream: &str) -> RedisResult<u64> {
    let inbox = info(conn, stream)
        .await?
        .into_iter()
        .find(|g| g.name == DEAD_LETTER_GROUP);
    match inbox {
        Some(StreamInfoGroup {
            lag: Some(lag),
            pending,
            ..
        }) => Ok((lag + pending) as u64),
        // Redis cannot tell the lag after entries were deleted from the
        // middle of the stream; every entry is the honest upper bound.
        _ => conn.xlen(stream).await,
    }
}

/// `XINFO GROUPS`, with a stream that does not exist as no groups.
async fn info(conn: &mut Conn, stream: &str) -> RedisResult<Vec<StreamInfoGroup>> {
    match conn.xinfo_groups::<_, StreamInfoGroupsReply>(stream).await {
        Ok(reply) => Ok(reply.groups),
        Err(e) if e.to_string().contains("no such key") => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}
