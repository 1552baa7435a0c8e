//! Publish and wait: publish a message, then wait until a given group has
//! handled it — for tests, scripts and request-shaped workflows.
//!
//! The consuming group runs the [`NotifyHandled`] layer, which publishes a
//! small notice on `tidings.handled.<group>` after each successful handling
//! (carrying the handled message's id as its causation id). [`publish_and_wait`]
//! subscribes privately to that topic, publishes, and waits for the notice
//! with its message's id. Works across processes, on every broker with
//! private subscriptions.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tidings_core::middleware::Next;
use tidings_core::{
    Delivery, Error, HandlerResult, Message, Middleware, Publisher, Receipt, Result, Subscriber,
    Subscription,
};

/// The topic on which `group` announces what it handled.
pub fn handled_topic(group: &str) -> String {
    format!("tidings.handled.{group}")
}

/// Announces every successfully handled message on [`handled_topic`].
pub struct NotifyHandled {
    publisher: Arc<dyn Publisher>,
}

impl NotifyHandled {
    /// Announces through `publisher`.
    pub fn new(publisher: Arc<dyn Publisher>) -> Self {
        NotifyHandled { publisher }
    }
}

#[async_trait]
impl Middleware for NotifyHandled {
    async fn handle(&self, delivery: &Delivery, next: Next<'_>) -> HandlerResult {
        next.run(delivery).await?;
        if let Some(group) = delivery.group() {
            let notice = Message::new(String::from(&delivery.message().id))
                .with_type("tidings.handled")
                .caused_by(delivery.message());
            // The handling succeeded; a lost notice only makes a waiter time out.
            if let Err(error) = self.publisher.publish(&handled_topic(group), notice).await {
                tracing::warn!(%error, id = %delivery.message().id, "announcing a handled message failed");
            }
        }
        Ok(())
    }
}

/// Publishes `message` to `topic` and waits until `group` (running
/// [`NotifyHandled`]) handled it, for at most `timeout`.
pub async fn publish_and_wait(
    publisher: &dyn Publisher,
    subscriber: &dyn Subscriber,
    topic: &str,
    message: Message,
    group: &str,
    timeout: Duration,
) -> Result<Receipt> {
    let id = message.id.clone();
    // Subscribe first, so the notice cannot come before we listen.
    let mut notices = subscriber
        .subscribe(Subscription::private(handled_topic(group)))
        .await?;
    let receipt = publisher.publish(topic, message).await?;
    let waited = tokio::time::timeout(timeout, async {
        while let Some(item) = notices.next().await {
            let mut notice = item?;
            let done = notice.message().metadata.causation_id.as_deref() == Some(id.as_str());
            notice.ack().await?;
            if done {
                return Ok(());
            }
        }
        Err(Error::Closed("subscription"))
    })
    .await;
    let _ = notices.close().await;
    match waited {
        Ok(result) => result.map(|()| receipt),
        Err(_) => Err(Error::Timeout {
            operation: "waiting for the group to handle the message",
            after: timeout,
        }),
    }
}
