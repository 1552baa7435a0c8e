//! Publishing: the [`Publisher`] trait and its typed extension.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use crate::codec::Codec;
use crate::error::Result;
use crate::event::Event;
use crate::message::Message;

/// Where the broker stored a published message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Receipt {
    /// Accepted; the broker gives no position (in-process bus, AMQP confirms, core NATS).
    Accepted,
    /// A Kafka partition and offset.
    Offset {
        /// The partition.
        partition: i32,
        /// The offset in the partition.
        offset: i64,
    },
    /// A Redis stream entry id.
    EntryId(String),
    /// A JetStream stream and sequence number.
    Sequence {
        /// The stream.
        stream: String,
        /// The sequence in the stream.
        sequence: u64,
        /// Whether the broker recognised the message id as a duplicate and did not store it again.
        duplicate: bool,
    },
}

/// Publishes messages to topics.
///
/// `publish` returns once the broker accepted the message as durably as the
/// adapter is configured for (publisher confirm, delivery report, PubAck, XADD
/// reply); failures are returned, never swallowed. The trait is object safe,
/// so the broker can be chosen at run time as an `Arc<dyn Publisher>`.
///
/// Typed events are published through [`PublisherExt::publish_event`].
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes one message and waits for the broker's acceptance.
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt>;

    /// Publishes many messages to one topic, keeping them in flight together
    /// where the broker allows (pipelining, confirm windows), and reports each
    /// result in order. The default publishes one after the other.
    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<Receipt>> {
        let mut results = Vec::with_capacity(messages.len());
        for message in messages {
            results.push(self.publish(topic, message).await);
        }
        results
    }

    /// Flushes what is pending and closes. Publishing afterwards is an
    /// [`Error::Closed`](crate::Error::Closed).
    async fn close(&self) -> Result<()>;
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for Arc<P> {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        (**self).publish(topic, message).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<Receipt>> {
        (**self).publish_batch(topic, messages).await
    }

    async fn close(&self) -> Result<()> {
        (**self).close().await
    }
}

/// Typed publishing on any [`Publisher`].
pub trait PublisherExt: Publisher {
    /// Encodes the event with its codec and publishes it. The event type
    /// defaults to the topic when the event names none.
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use tidings_core::{Event, PublisherExt};
    /// # #[derive(Serialize, Deserialize)] struct UserRegistered { email: String }
    /// # async fn f(bus: &dyn tidings_core::Publisher) -> tidings_core::Result<()> {
    /// bus.publish_event("user.registered", Event::new(UserRegistered { email: "a@b.c".into() }))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    fn publish_event<'a, T, C>(
        &'a self,
        topic: &'a str,
        event: Event<T, C>,
    ) -> impl Future<Output = Result<Receipt>> + Send + 'a
    where
        C: Codec<T>,
    {
        let message = event.into_message().map(|mut m| {
            m.metadata
                .event_type
                .get_or_insert_with(|| topic.to_owned());
            m
        });
        async move { self.publish(topic, message?).await }
    }
}

impl<P: Publisher + ?Sized> PublisherExt for P {}
