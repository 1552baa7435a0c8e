//! Reading: the read loop that turns stream entries into deliveries (new
//! ones, and ones reclaimed from dead members), and the stream the consumer
//! reads them from.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use redis::{RedisResult, Value};
use tidings_core::in_flight::Slot;
use tidings_core::{Delivery, DeliveryStream, Receipt, Result};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::headers;
use crate::{Conn, broker_error};

use super::acker::{Origin, RedisAcker};
use super::shared::{AckRequest, Shared};
use super::{GATHER, MAX_BATCH, create_group};

/// The stream of deliveries handed to the caller.
pub(crate) struct RedisStream {
    shared: Arc<Shared>,
    rx: Option<mpsc::UnboundedReceiver<Result<Delivery>>>,
}

impl RedisStream {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let rx = shared.rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        RedisStream { shared, rx }
    }

    fn shut(&mut self) {
        self.shared.close();
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            // Deliveries never handed out: their ackers release them.
            while rx.try_recv().is_ok() {}
        }
    }
}

impl futures::Stream for RedisStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        }
    }
}

impl DeliveryStream for RedisStream {
    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        self.shut();
        Box::pin(std::future::ready(Ok(())))
    }

    /// Waits until the acks queued so far went out (acks are batched in
    /// the background), within the visibility timeout: a process that
    /// exits next (a command-line tool) must not leave handled entries to
    /// be reclaimed and handled again.
    fn closed(&mut self) -> BoxFuture<'_, ()> {
        let flushed = self.shared.acks.as_ref().and_then(|acks| {
            let (done, flushed) = oneshot::channel();
            acks.send(AckRequest {
                entry_id: None,
                done: Some(done),
            })
            .ok()
            .map(|()| flushed)
        });
        let limit = self.shared.config.visibility_timeout;
        Box::pin(async move {
            if let Some(flushed) = flushed
                && tokio::time::timeout(limit, flushed).await.is_err()
            {
                warn!("acks were still going out when the subscription closed");
            }
        })
    }
}

impl Drop for RedisStream {
    fn drop(&mut self) {
        self.shut();
    }
}

/// `(entry id, fields)` pairs from a reply holding a list of entries
/// (`XRANGE`, `XCLAIM`, one stream of `XREADGROUP`).
pub(crate) fn entries(reply: Value) -> Vec<(String, Vec<Value>)> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let mut pair = pair.into_iter();
            let id = match pair.next()? {
                Value::BulkString(b) => String::from_utf8(b).ok()?,
                Value::SimpleString(s) => s,
                _ => return None,
            };
            match pair.next() {
                Some(Value::Array(fields)) => Some((id, fields)),
                Some(Value::Map(map)) => {
                    Some((id, map.into_iter().flat_map(|(k, v)| [k, v]).collect()))
                }
                _ => None,
            }
        })
        .collect()
}

/// The entries of the one stream in an `XREAD`/`XREADGROUP` reply (RESP2 or RESP3).
pub(super) fn read_reply(reply: Value) -> Vec<(String, Vec<Value>)> {
    match reply {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|s| match s {
                Value::Array(kv) => kv.into_iter().nth(1).map(entries).unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.into_iter().flat_map(|(_, v)| entries(v)).collect(),
        _ => Vec::new(),
    }
}

pub(super) fn bulk_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Hands one entry to the caller; one that is not ours goes as a rejected
/// delivery (what could be salvaged of it), which the consumer runtime
/// dead-letters through its observed settlement.
pub(super) async fn deliver(
    shared: &Arc<Shared>,
    entry_id: String,
    fields: Vec<Value>,
    attempt: u32,
    slot: Slot,
) {
    let (message, foreign) = headers::read_fields_in(&shared.layout, &entry_id, fields);
    if let Some(foreign) = &foreign {
        warn!(topic = %shared.topic, group = ?shared.group, %foreign, "a stream entry that is not a Tidings message; dead-lettering it");
    }
    let (origin, position) = match shared.group {
        Some(_) => (Origin::Group { entry_id }, None),
        // A private stream read: the entry id is the position, nothing to settle.
        None => (Origin::Local, Some(Receipt::EntryId(entry_id))),
    };
    let mut d = RedisAcker::delivery(shared, origin, message, attempt, slot);
    if let Some(position) = position {
        d = d.with_position(position);
    }
    if let Some(foreign) = foreign {
        d = d.rejected(foreign);
    }
    shared.send(d);
}

/// Reads a stream for one subscription until it is closed: `XREADGROUP`
/// (and reclaims with `XAUTOCLAIM`) for a group, `XREAD` after `position`
/// for a private subscription.
pub(super) async fn read_loop(shared: Arc<Shared>, mut conn: Conn, mut position: Option<String>) {
    let config = shared.config.clone();
    let reclaim_every = config.effective_reclaim_interval();
    let mut last_reclaim: Option<Instant> = None;
    let mut cursor = "0-0".to_owned();
    let mut backoff = Duration::from_millis(20);
    let mut failing = false;
    loop {
        let Some(first) = shared.slot().await else {
            break;
        };
        let mut slots = gather(&shared, first).await;
        let result = match &mut position {
            None => {
                let due = last_reclaim.is_none_or(|t| t.elapsed() >= reclaim_every);
                let reclaimed = if due {
                    match reclaim(&shared, &mut conn, &mut cursor, &mut slots).await {
                        Ok(done) => {
                            if done {
                                last_reclaim = Some(Instant::now());
                            }
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    Ok(())
                };
                match reclaimed {
                    Ok(()) if slots.is_empty() => Ok(()),
                    Ok(()) => read_group(&shared, &mut conn, &mut slots).await,
                    Err(e) => Err(e),
                }
            }
            Some(last_id) => read_private(&shared, &mut conn, last_id, &mut slots).await,
        };
        drop(slots);
        match result {
            Ok(()) => {
                if failing {
                    debug!(topic = %shared.topic, "subscription recovered");
                }
                failing = false;
                backoff = Duration::from_millis(20);
            }
            Err(e) if e.code() == Some("NOGROUP") => {
                // The stream or group vanished (a restarted server without
                // persistence, a deleted key): create it again from the start.
                let group = shared.group_name().to_owned();
                if let Err(error) = create_group(&mut conn, &shared.topic, &group, "0").await {
                    warn!(%error, topic = %shared.topic, "recreating the consumer group failed");
                    if !shared.sleep(backoff).await {
                        break;
                    }
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, topic = %shared.topic, "reading the stream failed; retrying with backoff");
                    shared.report(broker_error(e));
                }
                failing = true;
                if !shared.sleep(backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(config.max_backoff);
            }
        }
        if shared.is_closed() {
            break;
        }
    }
}

/// The free in-flight slots for one read. Under load slots come back one by
/// one; rather than reading one entry per round trip, wait up to
/// [`GATHER`] for a quarter of the prefetch to be free.
pub(super) async fn gather(shared: &Shared, first: Slot) -> Vec<Slot> {
    let mut slots = vec![first];
    let target = (shared.prefetch / 4).clamp(1, MAX_BATCH);
    let until = tokio::time::Instant::now() + GATHER;
    loop {
        while slots.len() < MAX_BATCH {
            match shared.in_flight.try_take() {
                Some(slot) => slots.push(slot),
                None => break,
            }
        }
        if slots.len() >= target {
            return slots;
        }
        match tokio::time::timeout_at(until, shared.in_flight.take()).await {
            Ok(Some(slot)) => slots.push(slot),
            _ => return slots,
        }
    }
}

pub(super) async fn read_group(
    shared: &Arc<Shared>,
    conn: &mut Conn,
    slots: &mut Vec<Slot>,
) -> RedisResult<()> {
    let block = shared
        .config
        .block
        .min(shared.config.effective_reclaim_interval());
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(shared.group_name())
        .arg(&shared.consumer)
        .arg("COUNT")
        .arg(slots.len())
        .arg("BLOCK")
        .arg(Shared::millis(block).max(1))
        .arg("STREAMS")
        .arg(&*shared.topic)
        .arg(">")
        .query_async(conn)
        .await?;
    for (id, fields) in read_reply(reply) {
        if shared.is_closed() {
            // Read after close: not handed out, so not an attempt.
            shared.release(&id, 0).await;
            continue;
        }
        match slots.pop() {
            Some(slot) => deliver(shared, id, fields, 1, slot).await,
            None => shared.release(&id, 0).await,
        }
    }
    Ok(())
}

/// `XAUTOCLAIM` entries idle for the visibility timeout; returns whether
/// the scan of the pending list is complete.
pub(super) async fn reclaim(
    shared: &Arc<Shared>,
    conn: &mut Conn,
    cursor: &mut String,
    slots: &mut Vec<Slot>,
) -> RedisResult<bool> {
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(&*shared.topic)
        .arg(shared.group_name())
        .arg(&shared.consumer)
        .arg(Shared::millis(shared.config.visibility_timeout))
        .arg(&*cursor)
        .arg("COUNT")
        .arg(slots.len())
        .query_async(conn)
        .await?;
    let Value::Array(mut parts) = reply else {
        return Ok(true);
    };
    if parts.len() < 2 {
        return Ok(true);
    }
    let claimed = entries(parts.swap_remove(1));
    let next = bulk_string(&parts[0]).unwrap_or_else(|| "0-0".to_owned());
    let done = next == "0-0";
    *cursor = next;
    if claimed.is_empty() {
        return Ok(done);
    }
    // The attempt is the entry's delivery count.
    let mut pipe = redis::pipe();
    for (id, _) in &claimed {
        pipe.cmd("XPENDING")
            .arg(&*shared.topic)
            .arg(shared.group_name())
            .arg(id)
            .arg(id)
            .arg(1)
            .arg(&shared.consumer);
    }
    let counts: Vec<Value> = pipe.query_async(conn).await?;
    for ((id, fields), count) in claimed.into_iter().zip(counts) {
        let attempt = delivery_count(count).unwrap_or(2);
        debug!(topic = %shared.topic, entry_id = %id, attempt, "reclaimed an idle pending entry");
        match slots.pop() {
            Some(slot) => deliver(shared, id, fields, attempt, slot).await,
            None => shared.release(&id, attempt.saturating_sub(1)).await,
        }
    }
    Ok(done)
}

/// The delivery count from an `XPENDING key group id id 1 consumer` reply.
pub(super) fn delivery_count(reply: Value) -> Option<u32> {
    let Value::Array(rows) = reply else {
        return None;
    };
    let Some(Value::Array(row)) = rows.into_iter().next() else {
        return None;
    };
    match row.get(3)? {
        Value::Int(n) => u32::try_from(*n).ok(),
        _ => None,
    }
}

pub(super) async fn read_private(
    shared: &Arc<Shared>,
    conn: &mut Conn,
    last_id: &mut String,
    slots: &mut Vec<Slot>,
) -> RedisResult<()> {
    let reply: Value = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(slots.len())
        .arg("BLOCK")
        .arg(Shared::millis(shared.config.block).max(1))
        .arg("STREAMS")
        .arg(&*shared.topic)
        .arg(&*last_id)
        .query_async(conn)
        .await?;
    for (id, fields) in read_reply(reply) {
        let Some(slot) = slots.pop() else { break };
        last_id.clone_from(&id);
        if shared.is_closed() {
            break;
        }
        deliver(shared, id, fields, 1, slot).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_in_resp2_and_resp3_shapes() {
        let entry = |id: &str| {
            Value::Array(vec![
                Value::BulkString(id.as_bytes().to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"payload".to_vec()),
                    Value::BulkString(b"x".to_vec()),
                ]),
            ])
        };
        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"s".to_vec()),
            Value::Array(vec![entry("1-0"), entry("2-0")]),
        ])]);
        let ids: Vec<_> = read_reply(resp2).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["1-0", "2-0"]);
        let resp3 = Value::Map(vec![(
            Value::BulkString(b"s".to_vec()),
            Value::Array(vec![entry("3-0"), Value::Nil]),
        )]);
        let ids: Vec<_> = read_reply(resp3).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["3-0"]);
        assert!(read_reply(Value::Nil).is_empty());
        let pending = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"1-0".to_vec()),
            Value::BulkString(b"c".to_vec()),
            Value::Int(5),
            Value::Int(3),
        ])]);
        assert_eq!(delivery_count(pending), Some(3));
    }
}
