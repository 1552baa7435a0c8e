//! The core of Tidings: the vocabulary every adapter and middleware shares.
//!
//! - [`Message`]: id, key, headers, payload ([`Bytes`](bytes::Bytes)) and event [`Metadata`],
//!   carried on every broker as CloudEvents headers ([`wire`]).
//! - [`Event<T>`]: typed data in a message, encoded by a [`Codec`] (JSON by default).
//! - [`Publisher`] and [`Subscriber`]: the object-safe traits adapters implement.
//! - [`Delivery`]: a received message, its attempt number, and ack / nack / dead-letter.
//! - [`Consumer`]: the runtime that runs handlers (plain async functions) per
//!   topic for a group, with bounded concurrency, per-key order, retries,
//!   dead letters and graceful shutdown.
//! - [`middleware`]: layers around handlers and around publishers.
//! - [`health`]: what a connection, a consumer or a breaker says about itself, for probes.
//!
//! Delivery is at least once on every persistent broker: a handler can see a
//! message again after a crash or a lost ack, so handlers should be
//! idempotent (or use the idempotency middleware).
//!
//! # Feature flags
//! - `testkit`: the conformance suite every adapter runs, a `RecordingPublisher`
//!   for users' unit tests, and a TCP `FaultProxy` for connection faults.
//! - `tls`: [`TlsOptions::client_config`](tls::TlsOptions), the TLS settings
//!   the adapters share (CA file, client certificate, server name) as rustls
//!   configuration.
//! - `testkit-tls`: `testkit::Pki`, certificates made for a test.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod asyncapi;
pub mod batch;
pub mod codec;
pub mod consumer;
pub mod delivery;
pub mod dialect;
pub mod error;
pub mod event;
pub mod extract;
pub mod groups;
pub mod handler;
pub mod health;
pub mod in_flight;
pub mod message;
pub mod middleware;
pub mod params;
pub mod publisher;
pub mod request;
pub mod retry;
pub mod subscriber;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod time;
pub mod tls;

pub use codec::{Codec, CodecError, Json, Raw};
pub use consumer::{
    Consumer, ConsumerBuilder, ConsumerHealth, SettleAction, Settlement, ShutdownReport, Unhandled,
    shutdown_signal,
};
pub use delivery::{Acker, DeadLetter, DeadLetterReason, Delivery};
pub use dialect::Dialect;
pub use error::{BoxError, Error, Result};
pub use event::{Event, EventType};
pub use extract::State;
pub use groups::GroupStats;
pub use handler::{
    Failure, FromDelivery, Handler, HandlerError, HandlerResult, Panicked, ResultExt,
};
pub use health::{Health, HealthCheck};
pub use message::{Headers, Message, MessageId, Metadata, StableHash, wire};
pub use middleware::{Middleware, PublishMiddleware};
pub use publisher::{Publisher, PublisherExt, Receipt, TypedTopic};
pub use retry::{Backoff, RetryPolicy};
pub use subscriber::{Capabilities, DeliveryStream, StartFrom, Subscriber, Subscription};
