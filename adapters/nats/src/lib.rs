//! NATS adapter for Tidings: JetStream and core NATS, on async-nats.
//!
//! Work in progress: this crate is a placeholder until its adapter lands.
