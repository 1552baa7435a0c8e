//! An AsyncAPI 3.0 document of a service, generated from what it registered:
//! the topics its consumers read (with the event types their handlers
//! take) and the typed topics it publishes to.
//!
//! Payload schemas come from [`EventType::schema`]: with the `schemars`
//! feature, `asyncapi::schema_of::<Self>()` derives one from the serde type.
//!
//! ```
//! use tidings_core::asyncapi::AsyncApi;
//! use tidings_core::{Consumer, Event, EventType, HandlerError};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct UserRegistered { email: String }
//! impl EventType for UserRegistered {
//!     const TYPE: &'static str = "user.registered";
//! }
//! let bus = tidings_memory::MemoryBus::new();
//! let email = Consumer::group(bus.subscriber(), "email")
//!     .on::<UserRegistered, _, _>("users", |_: Event<UserRegistered>| async { Ok::<_, HandlerError>(()) });
//! let document = AsyncApi::new("email service", "1.0.0")
//!     .consumer(&email)
//!     .publishes::<UserRegistered>("users")
//!     .to_json();
//! assert_eq!(document["asyncapi"], "3.0.0");
//! assert!(document["operations"]["email.receive.users.user.registered"].is_object());
//! ```

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::consumer::ConsumerBuilder;
use crate::event::EventType;

/// What a registration says about the events it takes or sends.
#[derive(Debug, Clone, Default)]
pub(crate) struct Described {
    /// The event type on the wire; `None` for a handler of every type.
    pub event_type: Option<String>,
    /// The schema version the type declares.
    pub version: Option<&'static str>,
    /// The Rust type, when known.
    pub rust_type: Option<&'static str>,
    /// The payload's JSON schema, when the type provides one.
    pub schema: Option<Value>,
}

impl Described {
    pub(crate) fn of<T: EventType>() -> Self {
        Described {
            event_type: Some(T::TYPE.to_owned()),
            version: T::VERSION,
            rust_type: Some(std::any::type_name::<T>()),
            schema: T::schema(),
        }
    }
}

/// One operation of the document: a group receiving, or the service
/// sending, on a topic.
#[derive(Debug, Clone)]
struct Operation {
    action: &'static str,
    /// The group, for receive operations.
    group: Option<String>,
    topic: String,
    event: Described,
}

/// Builds an AsyncAPI 3.0 document; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct AsyncApi {
    title: String,
    version: String,
    description: Option<String>,
    operations: Vec<Operation>,
}

impl AsyncApi {
    /// A document for the service `title`, at `version` (the service's).
    pub fn new(title: impl Into<String>, version: impl Into<String>) -> Self {
        AsyncApi {
            title: title.into(),
            version: version.into(),
            description: None,
            operations: Vec::new(),
        }
    }

    /// What the service is, in a sentence or two.
    #[must_use]
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Adds a receive operation for every handler of `consumer`.
    #[must_use]
    pub fn consumer(mut self, consumer: &ConsumerBuilder) -> Self {
        let group = consumer.group_name().map(str::to_owned);
        for (topic, event) in consumer.described() {
            self.operations.push(Operation {
                action: "receive",
                group: group.clone(),
                topic,
                event,
            });
        }
        self
    }

    /// Adds a send operation: the service publishes `T` to `topic` (as a
    /// [`TypedTopic`](crate::TypedTopic) does).
    #[must_use]
    pub fn publishes<T: EventType>(mut self, topic: impl Into<String>) -> Self {
        self.operations.push(Operation {
            action: "send",
            group: None,
            topic: topic.into(),
            event: Described::of::<T>(),
        });
        self
    }

    /// The document, as JSON (serialize it to YAML with any serde YAML
    /// crate if you prefer).
    pub fn to_json(&self) -> Value {
        let mut channels: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
        let mut messages: BTreeMap<String, Value> = BTreeMap::new();
        let mut operations = Map::new();
        for op in &self.operations {
            let channel = id(&op.topic);
            let message = id(op.event.event_type.as_deref().unwrap_or("any"));
            let component = format!("{channel}.{message}");
            channels.entry(channel.clone()).or_default().insert(
                message.clone(),
                json!({ "$ref": format!("#/components/messages/{component}") }),
            );
            messages
                .entry(component)
                .or_insert_with(|| message_object(&op.event));
            let name = match &op.group {
                Some(group) => format!("{}.{}.{channel}.{message}", id(group), op.action),
                None => format!("{}.{channel}.{message}", op.action),
            };
            let mut operation = json!({
                "action": op.action,
                "channel": { "$ref": format!("#/channels/{channel}") },
                "messages": [{ "$ref": format!("#/channels/{channel}/messages/{message}") }],
            });
            if let Some(group) = &op.group {
                operation["summary"] = json!(format!("group `{group}` handles it"));
            }
            operations.insert(name, operation);
        }
        let topics: BTreeMap<&str, &str> = self
            .operations
            .iter()
            .map(|op| (op.topic.as_str(), op.topic.as_str()))
            .collect();
        let channels: Map<String, Value> = channels
            .into_iter()
            .map(|(channel, messages)| {
                let address = topics
                    .values()
                    .find(|t| id(t) == channel)
                    .copied()
                    .unwrap_or(channel.as_str())
                    .to_owned();
                (
                    channel,
                    json!({ "address": address, "messages": Value::Object(messages) }),
                )
            })
            .collect();
        let mut info = json!({ "title": self.title, "version": self.version });
        if let Some(description) = &self.description {
            info["description"] = json!(description);
        }
        json!({
            "asyncapi": "3.0.0",
            "info": info,
            "defaultContentType": "application/json",
            "channels": channels,
            "operations": operations,
            "components": { "messages": messages },
        })
    }
}

fn message_object(event: &Described) -> Value {
    let mut message = json!({
        "name": event.event_type.clone().unwrap_or_else(|| "any".to_owned()),
        "contentType": "application/json",
    });
    match &event.event_type {
        Some(event_type) => {
            message["summary"] = json!(format!("`{event_type}` events (the `type` metadata)"));
        }
        None => message["summary"] = json!("every event type of the topic"),
    }
    if let Some(rust_type) = event.rust_type {
        message["title"] = json!(rust_type);
    }
    if let Some(schema) = &event.schema {
        message["payload"] = schema.clone();
    }
    if let Some(version) = event.version {
        message["x-schema-version"] = json!(version);
    }
    message
}

/// A name as an AsyncAPI component key (`^[a-zA-Z0-9.\-_]+$`).
fn id(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The JSON schema of a serde type, for [`EventType::schema`].
#[cfg(feature = "schemars")]
pub fn schema_of<T: schemars::JsonSchema>() -> Value {
    // Draft 7 is what AsyncAPI's schema object extends; subschemas are
    // inlined because a `$ref` would resolve against the whole document.
    let schema = schemars::generate::SchemaSettings::draft07()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<T>();
    let mut value = serde_json::to_value(schema).unwrap_or(Value::Null);
    if let Some(object) = value.as_object_mut() {
        object.remove("$schema");
    }
    value
}
