//! NATS cases: Tidings and the bare client, same work, same run.

use crate::Args;

/// Runs the selected cases on NATS.
pub async fn run(args: &Args) {
    let _ = args;
    eprintln!("no NATS cases yet");
}
