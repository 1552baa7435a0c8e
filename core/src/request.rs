//! Request/reply over any broker: publish a request and await its reply.
//!
//! A [`Requester`] owns a private reply topic, subscribed without a group
//! (only this process reads it). Each request carries the reply topic in the
//! [`REPLY_TO`] header and its own id; the responder publishes the reply to
//! that topic with the request's id as its correlation id, and the requester
//! hands it to the caller waiting for it. A handler registered with
//! [`ConsumerBuilder::handle_request`](crate::ConsumerBuilder::handle_request)
//! is such a responder: it returns the reply, and the runtime publishes it
//! before the request is acked.
//!
//! The same mechanism runs on every broker; it needs no broker feature
//! beyond topics and private subscriptions. A reply that arrives after its
//! request timed out, or twice (a redelivered request answered again), is
//! dropped with a debug log.
//!
//! ```
//! use std::time::Duration;
//! use tidings_core::request::{Replies, Requester};
//! use tidings_core::{Consumer, Event, HandlerError};
//! use tidings_memory::MemoryBus;
//! # #[tokio::main] async fn main() -> tidings_core::Result<()> {
//! let bus = MemoryBus::new();
//! let prices = Consumer::group(bus.subscriber(), "pricing")
//!     .state(Replies::new(bus.publisher()))
//!     .handle_request("price.quote", |e: Event<String>| async move {
//!         Ok::<_, HandlerError>(format!("{} costs 7", e.data))
//!     })
//!     .start()
//!     .await?;
//! let requester = Requester::start(bus.publisher(), bus.subscriber(), "replies.checkout-1").await?;
//! let reply: Event<String> = requester
//!     .request("price.quote", Event::new("tea".to_owned()), Duration::from_secs(5))
//!     .await?;
//! assert_eq!(reply.data, "tea costs 7");
//! requester.close().await;
//! prices.shutdown(Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::codec::Codec;
use crate::consumer::Consumer;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::extract::{Meta, State};
use crate::handler::{HandlerError, HandlerResult};
use crate::message::Message;
use crate::publisher::Publisher;
use crate::subscriber::Subscriber;

/// The header naming the topic a request's reply goes to.
pub const REPLY_TO: &str = "tidings-reply-to";
/// The header on a reply whose request failed for good: the error's text.
pub const REPLY_ERROR: &str = "tidings-reply-error";

/// Waiting callers, by the id of their request.
type Waiting = Arc<Mutex<HashMap<crate::MessageId, oneshot::Sender<Arc<Message>>>>>;

/// Sends requests and awaits their replies on its own reply topic.
pub struct Requester {
    publisher: Arc<dyn Publisher>,
    reply_topic: String,
    waiting: Waiting,
    consumer: Consumer,
}

impl Requester {
    /// Subscribes privately to `reply_topic` (unique to this process: a
    /// service name plus an instance id) and returns once replies published
    /// from now on reach it.
    pub async fn start(
        publisher: Arc<dyn Publisher>,
        subscriber: Arc<dyn Subscriber>,
        reply_topic: impl Into<String>,
    ) -> Result<Self> {
        let reply_topic = reply_topic.into();
        let waiting: Waiting = Arc::default();
        let deliver = waiting.clone();
        let consumer = Consumer::private(subscriber)
            .handle(&reply_topic, move |Meta(reply): Meta| {
                let waiter = reply
                    .metadata
                    .correlation_id
                    .as_deref()
                    .and_then(|id| lock(&deliver).remove(id));
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(reply);
                    }
                    None => tracing::debug!(id = %reply.id, "a reply nobody waits for (late or repeated)"),
                }
                std::future::ready(Ok(()))
            })
            .start()
            .await?;
        Ok(Requester {
            publisher,
            reply_topic,
            waiting,
            consumer,
        })
    }

    /// The topic replies come back on.
    pub fn reply_topic(&self) -> &str {
        &self.reply_topic
    }

    /// Publishes `request` to `topic` and waits up to `timeout` for its
    /// reply, decoded as `Resp`. A responder whose handler failed for good
    /// answers with its error (`Error::Broker` with the text); one that
    /// never answers is an [`Error::Timeout`].
    pub async fn request<Req, Resp, C>(
        &self,
        topic: &str,
        request: Event<Req, C>,
        timeout: Duration,
    ) -> Result<Event<Resp, C>>
    where
        C: Codec<Req> + Codec<Resp>,
        Resp: Send + 'static,
    {
        let message = request.into_message()?;
        let reply = self.request_message(topic, message, timeout).await?;
        let data = <C as Codec<Resp>>::decode(&reply.payload)?;
        Ok(Event::received(
            data,
            reply,
            Arc::from(self.reply_topic.as_str()),
            1,
        ))
    }

    /// [`request`](Self::request) for a message as it is: the reply
    /// message, undecoded.
    pub async fn request_message(
        &self,
        topic: &str,
        message: Message,
        timeout: Duration,
    ) -> Result<Arc<Message>> {
        let message = message.with_header(REPLY_TO, self.reply_topic.clone());
        let id = message.id.clone();
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(id.clone(), tx);
        // Removed however this ends, so an abandoned request leaves nothing.
        let _waiting = Forget(&self.waiting, &id);
        self.publisher.publish(topic, message).await?;
        let reply = tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| Error::Timeout {
                operation: "waiting for a reply",
                after: timeout,
            })?
            .map_err(|_| Error::Closed("requester"))?;
        match reply.headers.get(REPLY_ERROR) {
            Some(error) => Err(Error::Broker {
                broker: "responder",
                source: error.clone().into(),
            }),
            None => Ok(reply),
        }
    }

    /// Stops reading replies; requests still waiting fail as closed.
    pub async fn close(self) {
        self.consumer.shutdown(Duration::from_secs(5)).await;
    }
}

struct Forget<'a>(&'a Waiting, &'a str);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.0).remove(self.1);
    }
}

fn lock(
    waiting: &Waiting,
) -> std::sync::MutexGuard<'_, HashMap<crate::MessageId, oneshot::Sender<Arc<Message>>>> {
    // Every operation is one insert or remove: a poisoned map is consistent.
    waiting.lock().unwrap_or_else(|e| e.into_inner())
}

/// The publisher a consumer's request handlers reply through, registered
/// as state (`.state(Replies::new(publisher))`; `Bus::consumer` does it).
#[derive(Clone)]
pub struct Replies(Arc<dyn Publisher>);

impl Replies {
    /// Replies go out through `publisher`.
    pub fn new(publisher: Arc<dyn Publisher>) -> Self {
        Replies(publisher)
    }
}

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Replies")
    }
}

/// Runs a request handler and publishes what it returns as the reply
/// (or, when it failed for good, the error), before the request is settled.
pub(crate) async fn respond<Req, Resp, C, F, Fut>(
    handler: &F,
    request: Event<Req, C>,
    meta: Meta,
    replies: State<Replies>,
) -> HandlerResult
where
    C: Codec<Req> + Codec<Resp>,
    F: Fn(Event<Req, C>) -> Fut,
    Fut: Future<Output = Result<Resp, HandlerError>>,
{
    let Some(reply_to) = meta.headers.get(REPLY_TO).cloned() else {
        return Err(HandlerError::permanent(format!(
            "a request without the {REPLY_TO} header: nowhere to reply"
        )));
    };
    let (reply, outcome) = match handler(request).await {
        Ok(response) => {
            let payload = <C as Codec<Resp>>::encode(&response).map_err(HandlerError::permanent)?;
            (Message::new(payload), Ok(()))
        }
        Err(error) if error.is_permanent() => (
            Message::new(bytes::Bytes::new()).with_header(REPLY_ERROR, error.to_string()),
            Err(error),
        ),
        // Retried: the reply comes from a later attempt (or the caller times out).
        Err(error) => return Err(error),
    };
    let mut reply = reply;
    reply.metadata.correlation_id = Some(String::from(&meta.id));
    reply.metadata.causation_id = Some(String::from(&meta.id));
    replies
        .0
        .0
        .publish(&reply_to, reply)
        .await
        .map_err(HandlerError::retryable)?;
    outcome
}
