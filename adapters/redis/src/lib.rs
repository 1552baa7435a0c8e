//! Redis Streams (consumer groups) and Pub/Sub adapter for Tidings.
//!
//! Work in progress: this crate is a placeholder until its adapter lands.
