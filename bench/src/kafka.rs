//! Kafka cases: Tidings and the bare client, same work, same run.

use crate::Args;

/// Runs the selected cases on Kafka.
pub async fn run(args: &Args) {
    let _ = args;
    eprintln!("no Kafka cases yet");
}
