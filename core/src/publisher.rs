//! Publishing: the [`Publisher`] trait and its typed extension.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;

use std::marker::PhantomData;

use crate::codec::{Codec, Json};
use crate::error::Result;
use crate::event::{Event, EventType};
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

// Written out rather than with `#[async_trait]`, which would box a second
// future around the inner one on every publish through an `Arc`.
impl<P: Publisher + ?Sized> Publisher for Arc<P> {
    fn publish<'life0, 'life1, 'async_trait>(
        &'life0 self,
        topic: &'life1 str,
        message: Message,
    ) -> BoxFuture<'async_trait, Result<Receipt>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        (**self).publish(topic, message)
    }

    fn publish_batch<'life0, 'life1, 'async_trait>(
        &'life0 self,
        topic: &'life1 str,
        messages: Vec<Message>,
    ) -> BoxFuture<'async_trait, Vec<Result<Receipt>>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        (**self).publish_batch(topic, messages)
    }

    fn close<'life0, 'async_trait>(&'life0 self) -> BoxFuture<'async_trait, Result<()>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        (**self).close()
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

    /// This publisher bound to `topic` and the event type `T`
    /// ([`TypedTopic`]): `bus.topic::<OrderPlaced>("orders")`.
    fn topic<T: EventType>(&self, topic: &str) -> TypedTopic<T>
    where
        Self: Clone + Sized + 'static,
        Json: Codec<T>,
    {
        TypedTopic::new(Arc::new(self.clone()), topic)
    }
}

impl<P: Publisher + ?Sized> PublisherExt for P {}

/// A publisher bound to one topic and one event type, so the topic's name
/// is written once: `let orders = TypedTopic::<OrderPlaced>::new(publisher, "orders")`.
/// Every event it publishes carries the type and schema version `T`
/// declares ([`EventType`]).
///
/// ```
/// # use std::sync::Arc;
/// use tidings_core::event::EventType;
/// use tidings_core::publisher::TypedTopic;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct OrderPlaced { order_id: u64 }
/// impl EventType for OrderPlaced {
///     const TYPE: &'static str = "order.placed";
/// }
/// # async fn f(publisher: Arc<dyn tidings_core::Publisher>) -> tidings_core::Result<()> {
/// let orders = TypedTopic::<OrderPlaced>::new(publisher, "orders");
/// orders.publish(OrderPlaced { order_id: 7 }).await?;
/// # Ok(()) }
/// ```
pub struct TypedTopic<T, C = Json> {
    publisher: Arc<dyn Publisher>,
    name: Arc<str>,
    event: PhantomData<fn(T) -> C>,
}

impl<T, C> Clone for TypedTopic<T, C> {
    fn clone(&self) -> Self {
        TypedTopic {
            publisher: self.publisher.clone(),
            name: self.name.clone(),
            event: PhantomData,
        }
    }
}

impl<T, C> std::fmt::Debug for TypedTopic<T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedTopic")
            .field("name", &self.name)
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T: EventType, C: Codec<T>> TypedTopic<T, C> {
    /// `T`'s events on `topic`, published through `publisher`.
    pub fn new(publisher: Arc<dyn Publisher>, topic: impl Into<Arc<str>>) -> Self {
        TypedTopic {
            publisher,
            name: topic.into(),
            event: PhantomData,
        }
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Publishes `data` as a new event.
    pub async fn publish(&self, data: T) -> Result<Receipt> {
        self.publish_event(Event::with_codec(data)).await
    }

    /// Publishes `event` (its key, headers, correlation…), with `T`'s type
    /// and schema version unless the event names others.
    pub async fn publish_event(&self, event: Event<T, C>) -> Result<Receipt> {
        let mut message = event.into_message()?;
        let metadata = &mut message.metadata;
        metadata
            .event_type
            .get_or_insert_with(|| T::TYPE.to_owned());
        if let Some(version) = T::VERSION {
            metadata
                .schema_version
                .get_or_insert_with(|| version.to_owned());
        }
        self.publisher.publish(&self.name, message).await
    }
}
