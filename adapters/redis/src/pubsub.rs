//! Pub/Sub mode: `SUBSCRIBE`/`PSUBSCRIBE`, at most once.
//!
//! Groups are emulated: every member of a group receives every message and
//! takes it only if its `SET <claim key> NX PX <claim_ttl>` succeeds, so one
//! member of each group handles it. Nothing is kept for absent subscribers.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use redis::{RedisResult, Value};
use tidings_core::{DeliveryStream, Error, Message, Result};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::subscriber::{Origin, RedisAcker, RedisStream, Shared};
use crate::{Connector, NAME, headers};

/// Whether a topic is a channel pattern (`PSUBSCRIBE`).
pub(crate) fn is_pattern(topic: &str) -> bool {
    topic.contains(['*', '?', '['])
}

/// Subscribes through the connector's Pub/Sub client (see
/// [`Connector::pubsub_client`]), and through the next one after a
/// connection is lost.
pub(crate) async fn subscribe(
    connector: Connector,
    shared: Arc<Shared>,
) -> Result<Box<dyn DeliveryStream>> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let stream = RedisStream::new(shared.clone());
    tokio::spawn(read_loop(connector, shared.clone(), ready_tx));
    match ready_rx.await {
        Ok(Ok(())) => Ok(Box::new(stream)),
        Ok(Err(e)) => Err(Error::Subscribe {
            topic: shared.topic.to_string(),
            source: Box::new(e),
        }),
        Err(_) => Err(Error::Closed("subscription")),
    }
}

async fn connect(
    connector: &Connector,
    attempt: usize,
    topic: &str,
) -> RedisResult<redis::aio::PubSub> {
    let mut pubsub = connector
        .pubsub_client(attempt)
        .await?
        .get_async_pubsub()
        .await?;
    if is_pattern(topic) {
        pubsub.psubscribe(topic).await?;
    } else {
        pubsub.subscribe(topic).await?;
    }
    Ok(pubsub)
}

async fn read_loop(
    connector: Connector,
    shared: Arc<Shared>,
    ready: oneshot::Sender<RedisResult<()>>,
) {
    let mut ready = Some(ready);
    let pattern = is_pattern(&shared.topic);
    let mut backoff = Duration::from_millis(20);
    let mut attempt = 0;
    while !shared.is_closed() {
        let pubsub = tokio::select! {
            biased;
            _ = shared.wait_closed() => return,
            c = connect(&connector, attempt, &shared.topic) => c,
        };
        attempt += 1;
        let pubsub = match pubsub {
            Ok(p) => p,
            Err(error) => {
                // At start, every node is tried once before the error is the caller's.
                if attempt < connector.pubsub_nodes() {
                    continue;
                }
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(error));
                    return;
                }
                debug!(%error, topic = %shared.topic, "re-subscribing failed; retrying");
                if !shared.sleep(backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(shared.config.max_backoff);
                continue;
            }
        };
        backoff = Duration::from_millis(20);
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        let mut messages = pubsub.into_on_message();
        loop {
            let msg = tokio::select! {
                biased;
                _ = shared.wait_closed() => return,
                m = messages.next() => m,
            };
            let Some(msg) = msg else {
                warn!(topic = %shared.topic, "Pub/Sub connection lost; messages published until it is back are lost (at most once)");
                shared.report(Error::Connection {
                    broker: NAME,
                    source: "Pub/Sub connection lost".into(),
                });
                break;
            };
            let channel = msg.get_channel_name().to_owned();
            let body = Bytes::copy_from_slice(msg.get_payload_bytes());
            drop(msg);
            // A corrupt frame goes to the runtime as a rejected delivery of
            // the raw body, to be dead-lettered where everything is observed.
            // Messages with an id of their own are claimed by it; the others
            // by their content, briefly (see `content_id`).
            let (message, own_id, corrupt) = match headers::decode_body(
                &shared.layout,
                &channel,
                body.clone(),
            ) {
                Ok((m, own_id)) => (m, own_id, None),
                Err(e) => {
                    warn!(topic = %shared.topic, error = %e, "dead-lettering a corrupt Pub/Sub frame");
                    (Message::new(body.clone()), false, Some(e))
                }
            };
            let Some(slot) = shared.slot().await else {
                return;
            };
            if let Some(group) = &shared.group {
                let (key, ttl) = if own_id {
                    (Cow::Borrowed(message.id.as_str()), shared.config.claim_ttl)
                } else {
                    (
                        Cow::Owned(headers::content_id(&channel, &body)),
                        CONTENT_CLAIM_TTL.min(shared.config.claim_ttl),
                    )
                };
                if !claim(&shared, group, &channel, &key, ttl).await {
                    continue;
                }
            }
            let topic: Arc<str> = if pattern {
                Arc::from(channel.as_str())
            } else {
                shared.topic.clone()
            };
            let mut d = RedisAcker::delivery_shared(
                &shared,
                Origin::Local,
                Arc::new(message),
                topic,
                1,
                slot,
            );
            if let Some(corrupt) = corrupt {
                d = d.rejected(corrupt);
            }
            shared.send(d);
        }
    }
}

/// Takes the message for this member of the group; `false` if another took it.
/// How long a claim by content is kept (see `headers::content_id`).
const CONTENT_CLAIM_TTL: Duration = Duration::from_secs(1);

async fn claim(shared: &Shared, group: &str, channel: &str, id: &str, ttl: Duration) -> bool {
    let key = format!("tidings:claim:{group}:{channel}:{id}");
    let ttl = ttl.as_millis().max(1) as u64;
    let reply: RedisResult<Value> = redis::cmd("SET")
        .arg(&key)
        .arg(&shared.consumer)
        .arg("NX")
        .arg("PX")
        .arg(ttl)
        .query_async(&mut shared.control.clone())
        .await;
    match reply {
        Ok(Value::Nil) => false,
        Ok(_) => true,
        Err(error) => {
            // At most once: without the claim another member may take it too,
            // but dropping it would lose it for the whole group.
            warn!(%error, key, "claiming a Pub/Sub message failed; handling it anyway");
            true
        }
    }
}
