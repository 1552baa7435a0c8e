//! `tidings`: a broker's operator tool, on the same configuration as the
//! services (`--url`, `--config tidings.toml`, or `TIDINGS_*` variables).
//!
//! ```text
//! tidings --url redis://127.0.0.1:6379 ping
//! tidings --url nats://127.0.0.1:4222 publish orders.placed '{"id":1}' --type order.placed
//! tidings --url nats://127.0.0.1:4222 tail orders.placed --from-beginning --count 10 --json
//! tidings --url redis://127.0.0.1:6379 groups orders.placed
//! ```
//!
//! Exit codes: 0 success, 1 the broker failed or did not answer in time,
//! 2 bad usage or configuration. Every network wait is bounded by
//! `--timeout`; credentials are never printed.
#![forbid(unsafe_code)]

mod commands;
mod output;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The broker's operator tool.
#[derive(Parser, Debug)]
#[command(name = "tidings", version, about)]
struct Cli {
    /// The broker URL (`redis://…`, `amqp://…`, `nats://…`, `kafka://…`, `memory://`).
    #[arg(long, global = true, conflicts_with = "config")]
    url: Option<String>,
    /// A configuration file (TOML), as services load it; `TIDINGS_*` variables apply over it.
    #[arg(long, global = true)]
    config: Option<std::path::PathBuf>,
    /// Output as JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Bound on every wait for the broker.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Connects, round-trips a message on a private topic and reports the
    /// latency; exits 0 only when healthy (a container health check).
    Ping,
    /// Publishes one message (or one per line with --lines) and prints the receipt.
    Publish(commands::publish::Args),
    /// Prints messages of a topic as they arrive, without joining any group's load.
    Tail(commands::tail::Args),
    /// A group's dead letters: ls, show, replay (to the failed group), purge.
    Dlq(commands::dlq::Args),
    /// The groups of a topic: members, pending, lag and dead letters.
    Groups(commands::groups::Args),
}

/// How a command failed, and so the exit code.
#[derive(Debug)]
enum Failure {
    /// Bad usage or configuration (exit 2).
    Usage(String),
    /// The broker failed or did not answer (exit 1).
    Broker(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Broker(_) => 1,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Broker(m) => f.write_str(m),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::from(failure.code())
        }
    }
}
