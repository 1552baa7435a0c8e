//! Middleware for Tidings handlers and publishers.
//!
//! The layer traits live in `tidings_core::middleware` ([`Middleware`] around
//! handlers, [`PublishMiddleware`] around publishers) so adapters and users can
//! write their own without this crate. This crate holds the ready-made layers:
//! retry, dead letters, circuit breaking, idempotency, limits, tracing and
//! metrics, added as they are built.

pub use tidings_core::middleware::{Middleware, PublishMiddleware};
