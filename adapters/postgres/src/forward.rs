//! Forwarding the store's events to a broker: a projection whose effect is
//! a publish.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tidings_core::{
    Consumer, ConsumerBuilder, Event, HandlerError, Message, Publisher, Raw, StartFrom, Subscriber,
};

use crate::event_store::EventStore;

/// The longest wait between two tries of one publish.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A consumer (not started yet) that publishes every event of `from` (a
/// category, or [`ALL`](crate::ALL)) through `publisher`, on the topic
/// `to(&event)` names, as the group `group`.
///
/// Each event goes out unchanged — the same id, type, time, correlation and
/// headers, plus its stream and version ([`STREAM_HEADER`](crate::STREAM_HEADER),
/// [`VERSION_HEADER`](crate::VERSION_HEADER)) — one at a time in the store's
/// order, so no stream's events are reordered; the checkpoint moves once the
/// broker has confirmed the publish. A publish that fails is tried again
/// in place (backing off up to 5 s) rather than redelivered, which would
/// reorder; while the broker is down the forwarder waits. A process that dies between the
/// publish and the checkpoint publishes the event again after restarting:
/// at least once, with the same message id, which JetStream's deduplication
/// window and the idempotency layer recognise.
pub fn forwarder(
    store: &EventStore,
    group: &str,
    from: &str,
    publisher: Arc<dyn Publisher>,
    to: impl Fn(&Message) -> String + Send + Sync + 'static,
) -> ConsumerBuilder {
    let subscriber: Arc<dyn Subscriber> = Arc::new(store.subscriber());
    let to = Arc::new(to);
    Consumer::group(subscriber, group.to_owned())
        .start_from(StartFrom::Earliest)
        .concurrency(1)
        .handle(from.to_owned(), move |e: Event<Bytes, Raw>| {
            let (publisher, to) = (publisher.clone(), to.clone());
            async move {
                let message = e.message().clone();
                let topic = to(&message);
                // Retried here, not by redelivery: a redelivered event would
                // come back after the ones read meanwhile, and a stream's
                // events must reach the broker in order. The broker being
                // down holds the forwarder until it is back (or shutdown).
                let mut backoff = Duration::from_millis(50);
                loop {
                    match publisher.publish(&topic, message.clone()).await {
                        Ok(_) => return Ok::<_, HandlerError>(()),
                        Err(error) => {
                            tracing::warn!(%error, %topic, id = %message.id, "forwarding failed; trying again");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
            }
        })
}
