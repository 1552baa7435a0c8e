use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use futures::future::BoxFuture;

use crate::delivery::{Acker, DeadLetter, Delivery};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::subscriber::{Capabilities, DeliveryStream, Subscriber, Subscription};

/// A subscriber for unit tests, with no broker: a subscription hands out the
/// messages queued for its topic, the subscriber records how each was
/// settled, and settling chosen messages fails as on a dropped connection.
/// It reports full capabilities (redelivery included) but never delivers a
/// nacked message again: a test sees the nack, not a second attempt.
///
/// ```
/// use std::time::Duration;
/// use tidings_core::testkit::ScriptedSubscriber;
/// use tidings_core::{Consumer, Event, HandlerError, Message};
/// # #[tokio::main] async fn main() {
/// let refused = Message::new("\"b\"");
/// let subscriber = ScriptedSubscriber::new()
///     .with("t", Message::new("\"a\""))
///     .with("t", refused.clone())
///     .refusing(&refused.id);
/// let consumer = Consumer::group(subscriber.clone().into_arc(), "g")
///     .concurrency(1) // settled in the order queued
///     .handle("t", |_: Event<String>| async { Ok::<_, HandlerError>(()) })
///     .start()
///     .await
///     .unwrap();
/// subscriber.wait_settled(2, Duration::from_secs(5)).await;
/// consumer.shutdown(Duration::from_secs(5)).await;
/// let outcomes: Vec<_> = subscriber.settlements().into_iter().map(|(_, s, ok)| (s, ok)).collect();
/// assert_eq!(outcomes, [("ack", true), ("ack", false)]);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct ScriptedSubscriber {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    queued: Mutex<HashMap<String, Vec<Message>>>,
    refused: Mutex<HashSet<String>>,
    panicking: Mutex<HashSet<String>>,
    rejected: Mutex<HashSet<String>>,
    settled: Mutex<Vec<(String, &'static str, bool)>>,
    changed: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for ScriptedSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedSubscriber")
            .field("settled", &lock(&self.inner.settled).len())
            .finish_non_exhaustive()
    }
}

impl ScriptedSubscriber {
    /// A subscriber with nothing queued.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `message` for the next subscription to `topic`.
    #[must_use]
    pub fn with(self, topic: &str, message: Message) -> Self {
        lock(&self.inner.queued)
            .entry(topic.to_owned())
            .or_default()
            .push(message);
        self
    }

    /// Settling the message with this id fails with [`Error::Connection`].
    #[must_use]
    pub fn refusing(self, id: &str) -> Self {
        lock(&self.inner.refused).insert(id.to_owned());
        self
    }

    /// Settling the message with this id panics, as a buggy adapter would.
    #[must_use]
    pub fn panicking(self, id: &str) -> Self {
        lock(&self.inner.panicking).insert(id.to_owned());
        self
    }

    /// The message with this id is handed out as a delivery the adapter
    /// could not read ([`Delivery::rejected`]).
    #[must_use]
    pub fn rejecting(self, id: &str) -> Self {
        lock(&self.inner.rejected).insert(id.to_owned());
        self
    }

    /// The subscriber as the trait object consumers take.
    pub fn into_arc(self) -> Arc<dyn Subscriber> {
        Arc::new(self)
    }

    /// Every settlement so far, in order: the message id, `ack`, `nack` or
    /// `dead_letter`, and whether it succeeded.
    pub fn settlements(&self) -> Vec<(String, &'static str, bool)> {
        lock(&self.inner.settled).clone()
    }

    /// Waits until `n` settlements were made.
    ///
    /// # Panics
    /// When `within` passes first: in a test, that is the failure to report.
    pub async fn wait_settled(&self, n: usize, within: Duration) {
        let wait = async {
            loop {
                let changed = self.inner.changed.notified();
                if lock(&self.inner.settled).len() >= n {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(within, wait).await.is_err() {
            panic!(
                "{} of {n} settlements after {within:?}",
                lock(&self.inner.settled).len()
            );
        }
    }
}

#[async_trait]
impl Subscriber for ScriptedSubscriber {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::full()
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        let messages = lock(&self.inner.queued)
            .remove(&subscription.topic)
            .unwrap_or_default();
        let topic: Arc<str> = Arc::from(subscription.topic.as_str());
        let group: Option<Arc<str>> = subscription.group.as_deref().map(Arc::from);
        let deliveries = messages
            .into_iter()
            .map(|message| {
                let acker = ScriptedAcker {
                    id: message.id.to_string(),
                    inner: self.inner.clone(),
                };
                let rejected = lock(&self.inner.rejected).contains(message.id.as_str());
                let delivery = Delivery::new(
                    Arc::new(message),
                    topic.clone(),
                    group.clone(),
                    1,
                    Box::new(acker),
                );
                if rejected {
                    delivery.rejected("rejected by the script")
                } else {
                    delivery
                }
            })
            .collect::<Vec<_>>()
            .into_iter();
        Ok(Box::new(ScriptedStream { deliveries }))
    }

    fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        format!("{topic}.{group}.dlq")
    }
}

struct ScriptedStream {
    deliveries: std::vec::IntoIter<Delivery>,
}

impl Stream for ScriptedStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // After the script, nothing more arrives until the stream is closed.
        match self.deliveries.next() {
            Some(delivery) => Poll::Ready(Some(Ok(delivery))),
            None => Poll::Pending,
        }
    }
}

impl DeliveryStream for ScriptedStream {
    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

struct ScriptedAcker {
    id: String,
    inner: Arc<Inner>,
}

impl ScriptedAcker {
    fn settle(self, action: &'static str) -> Result<()> {
        if lock(&self.inner.panicking).contains(&self.id) {
            lock(&self.inner.settled).push((self.id.clone(), action, false));
            self.inner.changed.notify_waiters();
            panic!("settling {} panicked, as scripted", self.id);
        }
        let refused = lock(&self.inner.refused).contains(&self.id);
        lock(&self.inner.settled).push((self.id, action, !refused));
        self.inner.changed.notify_waiters();
        if refused {
            return Err(Error::Connection {
                broker: "scripted",
                source: "settlement refused by the script".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Acker for ScriptedAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.settle("ack")
    }

    async fn nack(self: Box<Self>, _: Option<Duration>) -> Result<()> {
        self.settle("nack")
    }

    async fn dead_letter(self: Box<Self>, _: DeadLetter) -> Result<()> {
        self.settle("dead_letter")
    }
}
