//! What a subscription's reader, stream and ackers share: the ack
//! batcher, the entries held, and the heartbeat that keeps them held.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{RedisResult, Value};
use tidings_core::in_flight::{InFlight, Slot};
use tidings_core::{Delivery, Error, Result};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use crate::Conn;
use crate::config::RedisConfig;
use crate::headers;

use super::MAX_BATCH;

/// What one subscription's reader, its stream and its ackers share.
pub(crate) struct Shared {
    pub(crate) topic: Arc<str>,
    pub(crate) group: Option<Arc<str>>,
    pub(crate) consumer: String,
    pub(crate) dead_letters: String,
    pub(crate) control: Conn,
    /// Where dead letters are written (see [`RedisSubscriber`]'s `writes`).
    pub(super) writes: Conn,
    pub(crate) config: Arc<RedisConfig>,
    /// Free in-flight slots (prefetch); a delivery holds one until settled.
    pub(crate) in_flight: InFlight,
    /// The subscription's prefetch.
    pub(super) prefetch: usize,
    pub(crate) closed: watch::Sender<bool>,
    pub(crate) tx: mpsc::UnboundedSender<Result<Delivery>>,
    pub(super) rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Result<Delivery>>>>,
    /// The ack batcher of a consumer group subscription.
    pub(super) acks: Option<mpsc::UnboundedSender<AckRequest>>,
    /// How this subscription's messages are read.
    pub(crate) layout: headers::Layout,
    /// Entries handed out and not yet settled (consumer groups): kept
    /// from being reclaimed by the heartbeat while a handler runs.
    pub(super) held: Held,
}

/// Entries handed out and not yet acked for sure, kept alive by the heartbeat.
pub(super) type Held = Arc<std::sync::Mutex<HashSet<String>>>;

/// One entry to `XACK` (none: a flush, answered once every ack queued
/// before it went out), and where to report the result if the caller waits.
pub(super) struct AckRequest {
    pub(super) entry_id: Option<String>,
    pub(super) done: Option<oneshot::Sender<RedisResult<()>>>,
}

/// Starts the task that acks entries in batches: every ack queued while the
/// previous `XACK` was in flight goes out in the next one. It ends when the
/// subscription and all its deliveries are gone.
pub(super) fn spawn_acker(
    mut conn: Conn,
    topic: String,
    group: String,
    config: Arc<RedisConfig>,
    held: Held,
) -> mpsc::UnboundedSender<AckRequest> {
    let (tx, mut rx) = mpsc::unbounded_channel::<AckRequest>();
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let ids: Vec<&str> = batch.iter().filter_map(|r| r.entry_id.as_deref()).collect();
            if ids.is_empty() {
                // Only flushes: everything before them went out already.
                for request in batch.drain(..) {
                    if let Some(done) = request.done {
                        let _ = done.send(Ok(()));
                    }
                }
                continue;
            }
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&topic).arg(&group).arg(&ids);
            // An ack lost to a connection fault is sent again once the
            // connection is back, rather than leaving handled entries to be
            // reclaimed and handled again after the visibility timeout.
            let mut backoff = Duration::from_millis(20);
            let started = Instant::now();
            let result = loop {
                let result: RedisResult<Value> = cmd.query_async(&mut conn).await;
                match result {
                    Err(e)
                        if crate::is_connection_error(&e)
                            && started.elapsed() < config.visibility_timeout =>
                    {
                        debug!(error = %e, topic, group, "XACK failed; sending it again");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(config.max_backoff);
                    }
                    other => break other,
                }
            };
            if let Err(error) = &result {
                warn!(%error, topic, group, entries = batch.len(), "XACK failed; the entries are reclaimed after the visibility timeout");
            }
            // Kept alive until the XACK went through (or was given up): an
            // ack waiting out a connection fault must not let another member
            // reclaim an entry that was handled.
            {
                let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
                for request in &batch {
                    if let Some(id) = &request.entry_id {
                        held.remove(id);
                    }
                }
            }
            for request in batch.drain(..) {
                if let Some(done) = request.done {
                    let _ = done.send(match &result {
                        Ok(_) => Ok(()),
                        Err(e) => Err(e.clone()),
                    });
                }
            }
        }
    });
    tx
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves once the subscription is closed.
    pub(crate) async fn wait_closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    pub(super) fn close(&self) {
        self.closed.send_replace(true);
        self.in_flight.close();
    }

    /// One in-flight slot, or `None` once closed.
    pub(crate) async fn slot(&self) -> Option<Slot> {
        tokio::select! {
            biased;
            _ = self.wait_closed() => None,
            slot = self.in_flight.take() => slot,
        }
    }

    /// Sleeps, returning `false` if the subscription closed meanwhile.
    pub(crate) async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.wait_closed() => false,
            _ = tokio::time::sleep(d) => !self.is_closed(),
        }
    }

    pub(crate) fn report(&self, error: Error) {
        let _ = self.tx.send(Err(error));
    }

    pub(crate) fn send(&self, delivery: Delivery) {
        // If the stream is gone the delivery is dropped here, and its acker
        // leaves the entry to be reclaimed.
        let _ = self.tx.send(Ok(delivery));
    }

    pub(super) fn held_lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn group_name(&self) -> &str {
        self.group.as_deref().unwrap_or_default()
    }

    pub(super) fn millis(d: Duration) -> u64 {
        d.as_millis().min(u64::MAX as u128) as u64
    }

    /// Makes a pending entry available to every member at once: idle for the
    /// full visibility timeout, delivery count set to `count`.
    pub(super) async fn release(&self, entry_id: &str, count: u32) {
        let result: RedisResult<Value> = redis::cmd("XCLAIM")
            .arg(&*self.topic)
            .arg(self.group_name())
            .arg(&self.consumer)
            .arg(0)
            .arg(entry_id)
            .arg("IDLE")
            .arg(Self::millis(self.config.visibility_timeout))
            .arg("RETRYCOUNT")
            .arg(count)
            .arg("JUSTID")
            .query_async(&mut self.control.clone())
            .await;
        if let Err(error) = result {
            debug!(%error, entry_id, "releasing a pending entry failed; it is reclaimed after the visibility timeout");
        }
    }

    /// Resets the idle time of a pending entry we hold, so nobody reclaims it.
    pub(super) async fn touch(&self, entry_id: &str) {
        let _: RedisResult<Value> = redis::cmd("XCLAIM")
            .arg(&*self.topic)
            .arg(self.group_name())
            .arg(&self.consumer)
            .arg(0)
            .arg(entry_id)
            .arg("JUSTID")
            .query_async(&mut self.control.clone())
            .await;
    }
}

/// Keeps the entries this subscription holds from being reclaimed while
/// their handlers run: every third of the visibility timeout, one `XCLAIM
/// ... JUSTID` of all of them resets their idle time (without counting a
/// delivery). So the visibility timeout only has to outlast a dead member,
/// not the longest handler. Runs on while a closed subscription drains (its
/// deliveries keep the shared state alive) and ends when all are gone.
pub(super) async fn heartbeat(shared: std::sync::Weak<Shared>) {
    let Some(every) = shared.upgrade().map(|s| s.config.visibility_timeout / 3) else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let held: Vec<String> = shared.held_lock().iter().cloned().collect();
        if held.is_empty() {
            continue;
        }
        // In chunks, one command each: a single XCLAIM of every held entry
        // (tens of thousands for a dead-letter inbox) would hold Redis, and
        // every client of it, for the whole command.
        for chunk in held.chunks(HEARTBEAT_CHUNK) {
            let mut cmd = redis::cmd("XCLAIM");
            // Only entries idle for a while: one another member reclaimed a
            // moment ago (after a stall of ours) is not taken back.
            cmd.arg(&*shared.topic)
                .arg(shared.group_name())
                .arg(&shared.consumer)
                .arg(Shared::millis(every / 2));
            for id in chunk {
                cmd.arg(id);
            }
            cmd.arg("JUSTID");
            let result: RedisResult<Value> = cmd.query_async(&mut shared.control.clone()).await;
            if let Err(error) = result {
                debug!(%error, topic = %shared.topic, "heartbeat of held entries failed");
                break;
            }
        }
    }
}

/// Entries per heartbeat command.
pub(super) const HEARTBEAT_CHUNK: usize = 1000;
