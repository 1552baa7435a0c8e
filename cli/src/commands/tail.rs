//! `tidings tail`: messages of a topic as they arrive. By default on a
//! private subscription, which takes nothing from any group; with
//! `--group`, as a member of that group (what it prints, it acks).

use std::io::Write as _;
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use tidings::{Bus, Consumer, Event, HandlerError, Raw, StartFrom};

use super::{bounded, failed};
use crate::output::{message_json, message_text};
use crate::{Cli, Failure};

/// `tidings tail <topic>`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The topic.
    topic: String,
    /// Everything the broker still holds first (Redis Streams, JetStream,
    /// Kafka, the in-process bus with history).
    #[arg(long, conflicts_with = "since")]
    from_beginning: bool,
    /// From this time on: RFC 3339 (`2026-12-06T10:00:00Z`) or a duration
    /// ago (`15m`).
    #[arg(long)]
    since: Option<String>,
    /// Stop after this many messages (default: until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// Read as a member of this group: takes its share of the group's
    /// messages and acks what it printed (messages past --count go back).
    #[arg(long)]
    group: Option<String>,
}

/// One received message, to print, and the answer whether it was.
type Printed = (String, oneshot::Sender<bool>);

pub(crate) async fn run(cli: &Cli, bus: &Bus, args: &Args) -> Result<(), Failure> {
    let start = match (&args.since, args.from_beginning) {
        (Some(since), _) => StartFrom::Time(since_time(since)?),
        (None, true) => StartFrom::Earliest,
        (None, false) => StartFrom::Latest,
    };
    let builder = match &args.group {
        Some(group) => bus.consumer(group.clone()),
        None => Consumer::private(bus.subscriber().clone()),
    };
    let (lines, mut received) = mpsc::channel::<Printed>(64);
    let json = cli.json;
    let topic = args.topic.clone();
    // Handled one at a time, so lines come out in the order received. A
    // private subscription takes nothing from anyone, so it reads ahead at
    // the broker's speed; a member reads one at a time, so that nothing of
    // the group's share is held past what is printed.
    let prefetch = if args.group.is_some() { 1 } else { 512 };
    let consumer = builder
        .concurrency(1)
        .prefetch(prefetch)
        .start_from(start)
        .handle(args.topic.clone(), move |e: Event<Bytes, Raw>| {
            let lines = lines.clone();
            let topic = topic.clone();
            async move {
                let line = if json {
                    message_json(&topic, e.message(), e.attempt()).to_string()
                } else {
                    message_text(&topic, e.message(), e.attempt())
                };
                let (printed, answer) = oneshot::channel();
                if lines.send((line, printed)).await.is_ok() && answer.await == Ok(true) {
                    return Ok(());
                }
                Err(HandlerError::retryable(
                    "tidings tail stopped before printing it",
                ))
            }
        });
    let consumer = bounded(cli.timeout, "subscribing", consumer.start())
        .await?
        .map_err(|e| failed(&format!("subscribing to {} failed", args.topic), e))?;
    eprintln!(
        "tailing {} on {}{} (Ctrl-C to stop)",
        args.topic,
        bus.subscriber().name(),
        args.group
            .as_ref()
            .map(|g| format!(" as a member of {g}"))
            .unwrap_or_default()
    );
    // Buffered, and flushed whenever nothing more is waiting: a million
    // lines are not a million writes, and an idle tail still shows each
    // line at once.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut printed = 0u64;
    let interrupted = tidings::shutdown_signal();
    tokio::pin!(interrupted);
    while args.count.is_none_or(|n| printed < n) {
        tokio::select! {
            next = received.recv() => match next {
                Some((line, answer)) => {
                    let written = writeln!(out, "{line}")
                        .and_then(|()| if received.is_empty() { out.flush() } else { Ok(()) });
                    if let Err(e) = written {
                        // A closed pipe (`| head`): stop, and what was not
                        // printed goes back.
                        let _ = answer.send(false);
                        if e.kind() != std::io::ErrorKind::BrokenPipe {
                            eprintln!("error: writing to stdout: {e}");
                        }
                        break;
                    }
                    let _ = answer.send(true);
                    printed += 1;
                }
                None => break,
            },
            _ = &mut interrupted => break,
            _ = consumer.ended() => break,
        }
    }
    let _ = out.flush();
    drop(out);
    let ended = consumer.has_ended();
    // What arrives now goes back unprinted (and, in a group, unacked).
    received.close();
    while let Ok((_, answer)) = received.try_recv() {
        let _ = answer.send(false);
    }
    bounded(cli.timeout, "unsubscribing", consumer.shutdown(cli.timeout)).await?;
    if ended {
        return Err(Failure::Broker(
            "the subscription ended: the broker went away or removed the topic".into(),
        ));
    }
    Ok(())
}

/// `--since`: an RFC 3339 time, or a duration ago.
pub(crate) fn since_time(text: &str) -> Result<SystemTime, Failure> {
    if let Some(time) = tidings::time::parse_rfc3339(text) {
        return Ok(time);
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        Failure::Usage(format!(
            "--since `{text}` is neither an RFC 3339 time nor a duration like 15m"
        ))
    })?;
    SystemTime::now()
        .checked_sub(ago)
        .ok_or_else(|| Failure::Usage(format!("--since `{text}` is before the epoch")))
}
