//! Typed events: a user's data plus the message envelope around it.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::codec::{Codec, CodecError, Json};
use crate::message::{Headers, Message, Metadata};

/// A typed event: the data of type `T`, and the envelope (id, key, headers,
/// metadata) of the message that carries it. `C` is the codec, JSON by default.
///
/// The same type is published and handled:
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tidings_core::Event;
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { order_id: u64 }
///
/// let placed = Event::new(OrderPlaced { order_id: 7 }).with_key("customer-3");
/// // In a handler of `order.placed`, chain the next event to it:
/// let invoiced = Event::new(OrderPlaced { order_id: 8 }).caused_by(&placed);
/// assert_eq!(invoiced.metadata().causation_id.as_deref(), Some(placed.id()));
/// ```
pub struct Event<T, C = Json> {
    /// The event's data.
    pub data: T,
    envelope: Arc<Message>,
    topic: Option<Arc<str>>,
    attempt: u32,
    codec: PhantomData<fn() -> C>,
}

impl<T> Event<T> {
    /// A new event with a fresh id and the current time, encoded as JSON.
    pub fn new(data: T) -> Self {
        Event::with_codec(data)
    }

    /// A new event whose type and schema version are the ones `T` declares
    /// ([`EventType`]), encoded as JSON.
    pub fn typed(data: T) -> Self
    where
        T: EventType,
    {
        let event = Event::new(data).with_type(T::TYPE);
        match T::VERSION {
            Some(version) => event.with_schema_version(version),
            None => event,
        }
    }
}

/// The event type (CloudEvents `type`) and schema version a Rust type is
/// published as, declared once with the type. Publishing through a typed
/// topic ([`PublisherExt::topic`](crate::PublisherExt::topic)) or
/// [`Event::typed`] writes them; a consumer routes by them
/// ([`ConsumerBuilder::on`](crate::ConsumerBuilder::on)).
///
/// ```
/// use tidings_core::event::EventType;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct UserRegistered { email: String }
/// impl EventType for UserRegistered {
///     const TYPE: &'static str = "user.registered";
///     const VERSION: Option<&'static str> = Some("2");
/// }
/// ```
pub trait EventType {
    /// The type name on the wire, e.g. `user.registered`.
    const TYPE: &'static str;
    /// The schema version, if the type has one.
    const VERSION: Option<&'static str> = None;

    /// The payload's JSON schema, for the AsyncAPI document
    /// ([`asyncapi`](crate::asyncapi)); none by default. With the
    /// `schemars` feature: `Some(tidings_core::asyncapi::schema_of::<Self>())`.
    fn schema() -> Option<serde_json::Value> {
        None
    }
}

impl Event<bytes::Bytes, crate::codec::Raw> {
    /// A new event whose payload is `payload` as it is.
    pub fn raw(payload: impl Into<bytes::Bytes>) -> Self {
        Event::with_codec(payload.into())
    }
}

impl<T, C> Event<T, C> {
    /// A new event encoded with the codec `C`: `Event::<_, MyCodec>::with_codec(data)`.
    pub fn with_codec(data: T) -> Self {
        Event {
            data,
            envelope: Arc::new(Message::default()),
            topic: None,
            attempt: 0,
            codec: PhantomData,
        }
    }

    /// An event received in a delivery (used by the runtime's extractors).
    pub fn received(data: T, envelope: Arc<Message>, topic: Arc<str>, attempt: u32) -> Self {
        Event {
            data,
            envelope,
            topic: Some(topic),
            attempt,
            codec: PhantomData,
        }
    }
}

impl<T, C: Codec<T>> Event<T, C> {
    /// Encodes the data and returns the message to publish.
    ///
    /// The content type is set from the codec unless already set.
    pub fn into_message(self) -> Result<Message, CodecError> {
        let payload = C::encode(&self.data)?;
        let mut message = Arc::unwrap_or_clone(self.envelope);
        message.payload = payload;
        message
            .metadata
            .content_type
            .get_or_insert_with(|| C::CONTENT_TYPE.to_owned());
        Ok(message)
    }
}

impl<T, C> Event<T, C> {
    fn envelope_mut(&mut self) -> &mut Message {
        Arc::make_mut(&mut self.envelope)
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.envelope.id
    }

    /// The ordering key.
    pub fn key(&self) -> Option<&str> {
        self.envelope.key.as_deref()
    }

    /// The application headers.
    pub fn headers(&self) -> &Headers {
        &self.envelope.headers
    }

    /// The event metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.envelope.metadata
    }

    /// The whole message this event arrived in (its payload is the encoded data).
    pub fn message(&self) -> &Message {
        &self.envelope
    }

    /// The topic the event was received from; `None` for an event not yet published.
    pub fn topic(&self) -> Option<&str> {
        self.topic.as_deref()
    }

    /// The delivery attempt, 1 on first delivery; 0 for an event not yet published.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Sets the ordering key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.envelope_mut().key = Some(key.into());
        self
    }

    /// Sets the id (a UUID v7 is generated by default).
    #[must_use]
    pub fn with_id(mut self, id: impl Into<crate::MessageId>) -> Self {
        self.envelope_mut().id = id.into();
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.envelope_mut()
            .headers
            .insert(name.into(), value.into());
        self
    }

    /// Sets the event type (the topic is used when none is set).
    #[must_use]
    pub fn with_type(mut self, event_type: impl Into<String>) -> Self {
        self.envelope_mut().metadata.event_type = Some(event_type.into());
        self
    }

    /// Sets the event source.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.envelope_mut().metadata.source = Some(source.into());
        self
    }

    /// Sets the schema version of the data.
    #[must_use]
    pub fn with_schema_version(mut self, version: impl Into<String>) -> Self {
        self.envelope_mut().metadata.schema_version = Some(version.into());
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.envelope_mut().metadata.correlation_id = Some(id.into());
        self
    }

    /// Marks this event as caused by `parent`; see [`Message::caused_by`].
    #[must_use]
    pub fn caused_by<P, D>(mut self, parent: &Event<P, D>) -> Self {
        self.envelope_mut().set_cause(parent.message());
        self
    }

    /// Replaces the data, keeping the envelope (for upcasting a schema version).
    pub fn map<U, D>(self, f: impl FnOnce(T) -> U) -> Event<U, D> {
        Event {
            data: f(self.data),
            envelope: self.envelope,
            topic: self.topic,
            attempt: self.attempt,
            codec: PhantomData,
        }
    }
}

impl<T: fmt::Debug, C> fmt::Debug for Event<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("id", &self.envelope.id)
            .field("topic", &self.topic)
            .field("attempt", &self.attempt)
            .field("metadata", &self.envelope.metadata)
            .field("data", &self.data)
            .finish()
    }
}

impl<T: Clone, C> Clone for Event<T, C> {
    fn clone(&self) -> Self {
        Event {
            data: self.data.clone(),
            envelope: self.envelope.clone(),
            topic: self.topic.clone(),
            attempt: self.attempt,
            codec: PhantomData,
        }
    }
}
