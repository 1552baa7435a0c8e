//! RabbitMQ (AMQP 0-9-1) adapter for Tidings, on lapin.
//!
//! Work in progress: this crate is a placeholder until its adapter lands.
