//! RabbitMQ cases: Tidings and the bare client, same work, same run.

use crate::Args;

/// Runs the selected cases on RabbitMQ.
pub async fn run(args: &Args) {
    let _ = args;
    eprintln!("no RabbitMQ cases yet");
}
