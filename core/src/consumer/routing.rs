//! Which handler takes a delivery: handlers registered per topic, and per
//! event type within a topic.
//!
//! One topic often carries several event types (`user.registered` and
//! `user.deleted` on `users`). Handlers registered for a type take the
//! messages whose `type` metadata names it; a handler registered for the
//! topic without a type takes the rest; what neither takes goes where
//! [`Unhandled`] says. A topic with a single untyped handler calls it
//! directly, with no routing in between.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::asyncapi::Described;
use crate::delivery::Delivery;
use crate::error::{Error, Result};
use crate::handler::{Endpoint, HandlerError, HandlerResult, HandlerSlot};

/// What becomes of a message whose event type no handler of its topic takes
/// (and that no untyped handler of the topic takes either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Unhandled {
    /// Dead-lettered as [`UnhandledType`](crate::DeadLetterReason::UnhandledType),
    /// so nothing is lost without a trace: the default.
    #[default]
    DeadLetter,
    /// Acked and skipped: for topics shared with event types this service
    /// does not care about.
    Ack,
}

/// One `handle` call of the builder.
#[derive(Clone)]
pub(crate) struct Registration {
    pub topic: String,
    pub event_type: Option<String>,
    pub endpoint: Arc<dyn Endpoint>,
    /// The handler's type name, for errors that name it.
    pub name: &'static str,
    /// What it takes, for the AsyncAPI document.
    pub described: Described,
}

/// The endpoint of each topic, in the order topics were first registered.
/// Two handlers for the same topic and type (or two untyped handlers of one
/// topic) are an error naming both.
pub(crate) fn by_topic(
    registrations: Vec<Registration>,
    unhandled: Unhandled,
) -> Result<Vec<(String, Arc<dyn Endpoint>)>> {
    let mut topics: Vec<(String, Vec<Registration>)> = Vec::new();
    for r in registrations {
        match topics.iter_mut().find(|(topic, _)| *topic == r.topic) {
            Some((_, same)) => same.push(r),
            None => topics.push((r.topic.clone(), vec![r])),
        }
    }
    topics
        .into_iter()
        .map(|(topic, registrations)| {
            let endpoint = router(&topic, registrations, unhandled)?;
            Ok((topic, endpoint))
        })
        .collect()
}

fn router(
    topic: &str,
    registrations: Vec<Registration>,
    unhandled: Unhandled,
) -> Result<Arc<dyn Endpoint>> {
    let mut by_type: HashMap<String, Registration> = HashMap::new();
    let mut fallback: Option<Registration> = None;
    for r in registrations {
        let taken = match &r.event_type {
            Some(event_type) => match by_type.entry(event_type.clone()) {
                Entry::Occupied(first) => Some(first.get().name),
                Entry::Vacant(slot) => {
                    slot.insert(r.clone());
                    None
                }
            },
            None => match &fallback {
                Some(first) => Some(first.name),
                None => {
                    fallback = Some(r.clone());
                    None
                }
            },
        };
        if let Some(first) = taken {
            let what = r
                .event_type
                .as_deref()
                .map_or("every event type".to_owned(), |t| {
                    format!("event type `{t}`")
                });
            return Err(Error::Config {
                key: "handle".into(),
                message: format!(
                    "topic `{topic}` has two handlers for {what}: `{first}` and `{}`",
                    r.name
                ),
            });
        }
    }
    if by_type.is_empty()
        && let Some(only) = fallback
    {
        return Ok(only.endpoint);
    }
    Ok(Arc::new(Router {
        by_type: by_type.into_iter().map(|(t, r)| (t, r.endpoint)).collect(),
        fallback: fallback.map(|r| r.endpoint),
        unhandled,
    }))
}

/// Dispatches a topic's deliveries by their event type.
struct Router {
    by_type: HashMap<String, Arc<dyn Endpoint>>,
    fallback: Option<Arc<dyn Endpoint>>,
    unhandled: Unhandled,
}

impl Router {
    /// The endpoint taking `delivery`'s event type, or what becomes of a
    /// delivery no handler takes.
    fn pick(&self, delivery: &Delivery) -> Result<&dyn Endpoint, HandlerResult> {
        let event_type = delivery.message().metadata.event_type.as_deref();
        let endpoint = event_type
            .and_then(|t| self.by_type.get(t))
            .or(self.fallback.as_ref());
        match (endpoint, self.unhandled) {
            (Some(endpoint), _) => Ok(&**endpoint),
            (None, Unhandled::Ack) => Err(Ok(())),
            (None, Unhandled::DeadLetter) => Err(Err(HandlerError::unhandled_type(format!(
                "no handler of topic `{}` takes event type `{}`",
                delivery.topic(),
                event_type.unwrap_or("(none)")
            )))),
        }
    }
}

impl Endpoint for Router {
    fn call(&self, delivery: &Delivery) -> BoxFuture<'static, HandlerResult> {
        match self.pick(delivery) {
            Ok(endpoint) => endpoint.call(delivery),
            Err(result) => Box::pin(std::future::ready(result)),
        }
    }

    fn call_in(&self, delivery: &Delivery, slot: &mut HandlerSlot) {
        match self.pick(delivery) {
            Ok(endpoint) => endpoint.call_in(delivery, slot),
            Err(result) => slot.set(std::future::ready(result)),
        }
    }

    fn needs_state(&self) -> Vec<(std::any::TypeId, &'static str)> {
        self.by_type
            .values()
            .chain(&self.fallback)
            .flat_map(|e| e.needs_state())
            .collect()
    }
}
