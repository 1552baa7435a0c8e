//! `tidings publish`: one message from the arguments, a file or stdin (or
//! one per line), with its receipt.

use std::io::{Read, Write};
use std::path::PathBuf;

use futures::StreamExt;
use tidings::{Bus, Message, Publisher};

use super::{bounded, failed};
use crate::output::receipt_json;
use crate::{Cli, Failure};

/// `tidings publish <topic> [data]`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The topic.
    topic: String,
    /// The payload; without it, --file or stdin.
    data: Option<String>,
    /// Read the payload from this file (`-`: stdin).
    #[arg(long, conflicts_with = "data")]
    file: Option<PathBuf>,
    /// One message per non-empty line of the input.
    #[arg(long)]
    lines: bool,
    /// The event type.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// The message key (partition / ordering key).
    #[arg(long)]
    key: Option<String>,
    /// The message id (one message only; default: a fresh UUID v7).
    #[arg(long, conflicts_with = "lines")]
    id: Option<String>,
    /// A header, `name=value` (repeatable).
    #[arg(long = "header", value_parser = header)]
    headers: Vec<(String, String)>,
}

fn header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not name=value")),
    }
}

/// How many publishes of `--lines` are under way at once.
const IN_FLIGHT: usize = 64;

pub(crate) async fn run(cli: &Cli, bus: &Bus, args: &Args) -> Result<(), Failure> {
    let input = match (&args.data, &args.file) {
        (Some(data), _) => data.clone().into_bytes(),
        (None, Some(path)) if path.as_os_str() != "-" => std::fs::read(path)
            .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?,
        _ => {
            let mut input = Vec::new();
            std::io::stdin()
                .read_to_end(&mut input)
                .map_err(|e| Failure::Usage(format!("cannot read stdin: {e}")))?;
            input
        }
    };
    let payloads: Vec<Vec<u8>> = if args.lines {
        input
            .split(|b| *b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(<[u8]>::to_vec)
            .collect()
    } else {
        vec![input]
    };
    // Pipelined: up to 64 publishes under way, receipts printed in order.
    let messages = payloads.into_iter().map(|payload| {
        let mut message = Message::new(payload);
        if let Some(id) = &args.id {
            message = message.with_id(id.clone());
        }
        if let Some(t) = &args.event_type {
            message = message.with_type(t.clone());
        }
        if let Some(key) = &args.key {
            message = message.with_key(key.clone());
        }
        for (name, value) in &args.headers {
            message = message.with_header(name.clone(), value.clone());
        }
        message
    });
    let mut receipts = futures::stream::iter(messages)
        .map(|message| async move {
            let id = message.id.clone();
            let receipt = bounded(cli.timeout, "publishing", bus.publish(&args.topic, message))
                .await?
                .map_err(|e| failed(&format!("publishing to {} failed", args.topic), e))?;
            Ok::<_, Failure>((id, receipt))
        })
        .buffered(IN_FLIGHT);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    while let Some(published) = receipts.next().await {
        let (id, receipt) = published?;
        let receipt = receipt_json(&receipt);
        let line = if cli.json {
            serde_json::json!({"topic": args.topic, "id": id, "receipt": receipt}).to_string()
        } else {
            format!("published {id} to {}: {receipt}", args.topic)
        };
        writeln!(out, "{line}").map_err(|e| Failure::Usage(format!("writing to stdout: {e}")))?;
    }
    out.flush()
        .map_err(|e| Failure::Usage(format!("writing to stdout: {e}")))?;
    Ok(())
}
