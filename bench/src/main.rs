//! The benchmark harness: throughput and latency of Tidings against the bare
//! client of each broker, in the same run.
//!
//! ```text
//! cargo run --release -p tidings-bench -- --broker memory --case e2e --count 1000000 --handlers 1,8
//! ```
//!
//! Prints one line per case for scripts, `RESULT <library> <broker> <case> <msgs_per_s> msg/s`,
//! followed by details (latency percentiles from publish to handler, resident memory).
//! Cases: `publish` (one at a time, awaiting each), `publish-batch` (batches of 1,000),
//! `e2e` (publish → runtime → handler → ack), `allocs` (allocations per
//! message, counted by the bench's allocator). The in-process bus runs on a
//! single-threaded runtime (one core) unless `--workers N` asks for a
//! multi-thread runtime, as `#[tokio::main]` gives a service.

mod alloc;
mod amqp;
mod common;
mod kafka;
mod memory;
mod nats;
mod pg_broker;
mod postgres;
mod redis;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

/// Command-line arguments.
#[derive(Parser, Debug)]
pub struct Args {
    /// Brokers to run: memory, redis, amqp, nats, kafka, postgres (the
    /// event store: cases append, append-batch, read, catch-up; the broker
    /// and the outbox: broker-e2e, outbox).
    #[arg(long, value_delimiter = ',', default_value = "memory")]
    pub broker: Vec<String>,
    /// Cases to run: publish, publish-batch, e2e; on the in-process bus also
    /// e2e-stack, e2e-otel and allocs (allocations per message).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "publish,publish-batch,e2e"
    )]
    pub case: Vec<String>,
    /// Messages per case.
    #[arg(long, default_value_t = 1_000_000)]
    pub count: u64,
    /// Payload size in bytes (at least 8: the first 8 carry the send time).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Handler concurrency for e2e, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub handlers: Vec<usize>,
    /// Worker threads of a multi-thread runtime for every broker, the
    /// in-process bus included (the shape `#[tokio::main]` gives a service);
    /// without it the in-process bus runs on one thread, brokers on two.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Publishes e2e messages at this rate (msg/s, in 1 ms ticks) instead
    /// of as fast as possible, for latency at a given load (in-process bus).
    #[arg(long)]
    pub rate: Option<u64>,
}

fn main() {
    let args = Args::parse();
    for broker in &args.broker {
        let rt = common::runtime(broker, args.workers);
        match broker.as_str() {
            "memory" => rt.block_on(memory::run(&args)),
            "redis" => rt.block_on(redis::run(&args)),
            "amqp" => rt.block_on(amqp::run(&args)),
            "nats" => rt.block_on(nats::run(&args)),
            "kafka" => rt.block_on(kafka::run(&args)),
            "postgres" => rt.block_on(postgres::run(&args)),
            other => eprintln!(
                "unknown broker `{other}`; known: memory, redis, amqp, nats, kafka, postgres"
            ),
        }
    }
}
