//! Extractors beside [`Event<T>`](crate::Event): what else a handler can
//! take as an argument — shared state, the message's envelope, the attempt.
//!
//! A handler is an async function of up to six extractors, in any order:
//!
//! ```
//! use std::sync::Arc;
//! use tidings_core::extract::{Attempt, Meta, State};
//! use tidings_core::{Consumer, Event, HandlerError};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct UserRegistered { email: String }
//! #[derive(Clone)]
//! struct Mailer { from: Arc<str> }
//!
//! async fn welcome(
//!     event: Event<UserRegistered>,
//!     State(mailer): State<Mailer>,
//!     meta: Meta,
//!     Attempt(attempt): Attempt,
//! ) -> Result<(), HandlerError> {
//!     println!("{} -> {} ({} attempt {attempt})", mailer.from, event.data.email, meta.id);
//!     Ok(())
//! }
//! # async fn f(subscriber: Arc<dyn tidings_core::Subscriber>) -> tidings_core::Result<()> {
//! let consumer = Consumer::group(subscriber, "email")
//!     .state(Mailer { from: "hello@example.com".into() })
//!     .handle("users", welcome)
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::delivery::Delivery;
use crate::handler::{FromDelivery, HandlerError};
use crate::message::Message;

/// Shared state registered once on the consumer
/// ([`ConsumerBuilder::state`](crate::ConsumerBuilder::state)), cloned for
/// each call: keep it cheap to clone (an `Arc`, a pool handle). A handler
/// that asks for state nobody registered is refused when the consumer
/// starts, naming the type.
#[derive(Debug, Clone, Copy, Default)]
pub struct State<T>(pub T);

impl<T> Deref for State<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Clone + Send + Sync + 'static> FromDelivery for State<T> {
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError> {
        delivery
            .state::<T>()
            .cloned()
            .map(State)
            .ok_or_else(|| HandlerError::permanent(MissingState(type_name::<T>())))
    }

    fn needs_state() -> Option<(TypeId, &'static str)> {
        Some((TypeId::of::<T>(), type_name::<T>()))
    }
}

/// A handler asked for state the consumer does not have.
#[derive(Debug, thiserror::Error)]
#[error("no state of type `{0}` was registered on the consumer (ConsumerBuilder::state)")]
pub struct MissingState(pub &'static str);

/// The received message's envelope — id, key, headers, event
/// [`Metadata`](crate::Metadata) — shared, without copying it.
#[derive(Debug, Clone)]
pub struct Meta(pub Arc<Message>);

impl Deref for Meta {
    type Target = Message;
    fn deref(&self) -> &Message {
        &self.0
    }
}

impl FromDelivery for Meta {
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError> {
        Ok(Meta(delivery.shared_message().clone()))
    }
}

/// The delivery attempt: 1 the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt(pub u32);

impl FromDelivery for Attempt {
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError> {
        Ok(Attempt(delivery.attempt()))
    }
}

/// The topic the message was received from.
#[derive(Debug, Clone)]
pub struct Topic(pub Arc<str>);

impl FromDelivery for Topic {
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError> {
        Ok(Topic(delivery.shared_topic().clone()))
    }
}

/// The group the message was delivered to; `None` on a private subscription.
#[derive(Debug, Clone)]
pub struct Group(pub Option<Arc<str>>);

impl FromDelivery for Group {
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError> {
        Ok(Group(delivery.shared_group().cloned()))
    }
}

/// Where the broker stored the message, when the adapter says
/// ([`Delivery::position`]).
#[derive(Debug, Clone)]
pub struct Position(pub Option<crate::Receipt>);

impl FromDelivery for Position {
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError> {
        Ok(Position(delivery.position().cloned()))
    }
}

/// The consumer's shared state, by type.
#[derive(Default, Clone)]
pub(crate) struct StateMap(HashMap<TypeId, Arc<dyn Any + Send + Sync>>);

impl StateMap {
    pub fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) {
        self.0.insert(TypeId::of::<T>(), Arc::new(value));
    }

    pub fn get<T: 'static>(&self) -> Option<&T> {
        self.0.get(&TypeId::of::<T>())?.downcast_ref()
    }

    pub fn contains(&self, id: TypeId) -> bool {
        self.0.contains_key(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for StateMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateMap")
            .field("types", &self.0.len())
            .finish()
    }
}
