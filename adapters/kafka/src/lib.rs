//! Kafka adapter for Tidings, on rdkafka.
//!
//! Work in progress: this crate is a placeholder until its adapter lands.
