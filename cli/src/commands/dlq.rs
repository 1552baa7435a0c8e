//! `tidings dlq`: a group's dead letters — list, show, replay, purge —
//! through the `DeadLetterInbox`, on every broker.
//!
//! The inbox holds what it fetched while the command runs; what the
//! command did not replay or purge goes back to the broker when it ends.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tidings::layers::dead_letters::{DeadLetterInbox, Filter, ReplayTo};
use tidings::{Bus, DeadLetter, Message};

use super::{bounded, failed};
use crate::output::message_json;
use crate::{Cli, Failure};

/// Letters replayed or purged between two progress lines.
const CHUNK: usize = 1000;

/// `tidings dlq <action>`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand, Debug)]
enum Action {
    /// Lists the group's dead letters, oldest first.
    Ls(Target),
    /// Shows one letter: why it failed and the message itself.
    Show(Target),
    /// Replays letters to their topic, for the failed group only (or
    /// every group with --to all-groups); replayed letters leave the
    /// dead-letter destination.
    Replay(Target),
    /// Deletes letters (bulk purges need --yes).
    Purge(Target),
}

/// Which letters.
#[derive(clap::Args, Debug)]
struct Target {
    /// The topic the letters failed on.
    #[arg(long)]
    topic: String,
    /// The group that failed them.
    #[arg(long)]
    group: String,
    /// One letter, by message id.
    #[arg(long, conflicts_with_all = ["since", "all"])]
    id: Option<String>,
    /// Letters whose last failure is this recent: RFC 3339 or a duration ago (`1h`).
    #[arg(long, conflicts_with = "all")]
    since: Option<String>,
    /// Every letter.
    #[arg(long)]
    all: bool,
    /// Replay to every group of the topic instead of the failed one.
    #[arg(long = "to", value_parser = ["failed-group", "all-groups"], default_value = "failed-group")]
    to: String,
    /// Confirms a bulk purge.
    #[arg(long)]
    yes: bool,
    /// The most letters held at once (bulk replays and purges go window
    /// by window; `ls` shows at most this many).
    #[arg(long, default_value_t = 10_000)]
    limit: usize,
    /// How long to wait for more letters after the last one; 500ms, and
    /// 12s on Kafka, where each command joins the group `dead-letters` and
    /// the partitions come only once the group rebalanced (JetStream:
    /// letters another reader handed back a moment ago can take up to its
    /// `ack_wait` to come back).
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
}

impl Target {
    /// `--wait`, or the broker's default.
    fn wait(&self, bus: &Bus) -> Duration {
        self.wait.unwrap_or(match bus.subscriber().name() {
            "kafka" => Duration::from_secs(12),
            _ => Duration::from_millis(500),
        })
    }
}

impl Target {
    fn filter(&self) -> Result<Filter, Failure> {
        Ok(Filter {
            since: self
                .since
                .as_deref()
                .map(super::tail::since_time)
                .transpose()?,
            ..Filter::default()
        })
    }

    fn picks_some(&self) -> bool {
        self.id.is_some() || self.since.is_some() || self.all
    }
}

pub(crate) async fn run(cli: &Cli, bus: &Bus, args: &Args) -> Result<(), Failure> {
    let target = match &args.action {
        Action::Ls(t) | Action::Show(t) | Action::Replay(t) | Action::Purge(t) => t,
    };
    let dlq = bus
        .subscriber()
        .dead_letter_topic(&target.topic, &target.group);
    let mut inbox = bounded(
        cli.timeout,
        "opening the dead letters",
        DeadLetterInbox::open(
            &**bus.subscriber(),
            bus.publisher().clone(),
            &dlq,
            target.limit,
        ),
    )
    .await?
    .map_err(|e| failed(&format!("opening {dlq} failed"), e))?;
    // Everything the destination holds now (until nothing came for --wait,
    // up to --limit); bounded, and what came by then is worked on.
    let wait = target.wait(bus);
    let _ = tokio::time::timeout(cli.timeout + wait, inbox.fetch(wait)).await;
    let result = act(cli, &mut inbox, &args.action, target, wait).await;
    let closed = bounded(cli.timeout, "closing the dead letters", inbox.close()).await;
    result?;
    closed?.map_err(|e| failed("closing the dead letters failed", e))
}

async fn act(
    cli: &Cli,
    inbox: &mut DeadLetterInbox,
    action: &Action,
    target: &Target,
    wait: Duration,
) -> Result<(), Failure> {
    let chosen = |inbox: &DeadLetterInbox| -> Result<Vec<String>, Failure> {
        let filter = target.filter()?;
        Ok(inbox
            .list()
            .filter(|(m, l)| {
                target.id.as_ref().is_none_or(|id| *id == m.id)
                    && filter.since.is_none_or(|s| l.last_failure >= s)
            })
            .map(|(m, _)| m.id.to_string())
            .collect())
    };
    match action {
        Action::Ls(_) => {
            let mut letters: Vec<_> = inbox.list().collect();
            letters.sort_by_key(|(_, l)| l.last_failure);
            if !cli.json {
                println!(
                    "{} dead letter(s) of {} on {}",
                    letters.len(),
                    target.group,
                    target.topic
                );
            }
            for (message, letter) in letters {
                print_letter(cli, message, letter, false);
            }
            Ok(())
        }
        Action::Show(_) => {
            let id = target
                .id
                .as_ref()
                .ok_or_else(|| Failure::Usage("show needs --id".into()))?;
            let (message, letter) = inbox
                .get(id)
                .ok_or_else(|| Failure::Usage(format!("no dead letter with id {id}")))?;
            print_letter(cli, message, letter, true);
            Ok(())
        }
        Action::Replay(_) | Action::Purge(_) => {
            if !target.picks_some() {
                return Err(Failure::Usage(
                    "say which letters: --id, --since or --all".into(),
                ));
            }
            let mut ids = chosen(inbox)?;
            if let Some(id) = &target.id
                && ids.is_empty()
            {
                return Err(Failure::Usage(format!("no dead letter with id {id}")));
            }
            let replay = matches!(action, Action::Replay(_));
            if !replay && target.id.is_none() && !target.yes {
                let more = if inbox.list().count() >= target.limit {
                    " or more"
                } else {
                    ""
                };
                return Err(Failure::Usage(format!(
                    "this would purge {}{more} letter(s); add --yes to do it",
                    ids.len()
                )));
            }
            if target.to == "all-groups" {
                inbox.replay_to(ReplayTo::AllGroups);
            }
            // Window by window (at most --limit letters held at once, so
            // memory stays flat however many there are), each in chunks
            // the inbox pipelines, with progress between them.
            let (mut done, mut chosen_total, mut all_ids) = (0, 0, Vec::new());
            loop {
                for chunk in ids.chunks(CHUNK) {
                    let filter = Filter {
                        ids: Some(chunk.iter().cloned().collect()),
                        ..Filter::default()
                    };
                    let result = if replay {
                        inbox.replay_all(&filter).await
                    } else {
                        inbox.purge(&filter).await
                    };
                    done += result.map_err(|e| failed(&format!("after {done} letter(s)"), e))?;
                    if !cli.json && (chosen_total > 0 || ids.len() > CHUNK) {
                        eprintln!("{done} done");
                    }
                }
                chosen_total += ids.len();
                all_ids.append(&mut ids);
                if target.id.is_some() {
                    break;
                }
                let _ = tokio::time::timeout(cli.timeout + wait, inbox.fetch(wait)).await;
                ids = chosen(inbox)?;
                if ids.is_empty() {
                    break;
                }
            }
            if done < chosen_total {
                eprintln!(
                    "{} letter(s) were handed to another reader of the dead letters meanwhile; it has them",
                    chosen_total - done
                );
            }
            let verb = if replay { "replayed" } else { "purged" };
            if cli.json {
                println!("{}", json!({ verb: done, "ids": all_ids }));
            } else {
                println!("{verb} {done} letter(s)");
            }
            Ok(())
        }
    }
}

fn letter_json(message: &Message, letter: &DeadLetter) -> Value {
    let time = |t: SystemTime| tidings::time::format_rfc3339(t);
    json!({
        "id": message.id,
        "topic": letter.topic,
        "group": letter.group,
        "reason": letter.reason.as_str(),
        "error": letter.error,
        "attempts": letter.attempts,
        "first_failure": letter.first_failure.and_then(time),
        "last_failure": time(letter.last_failure),
    })
}

fn print_letter(cli: &Cli, message: &Message, letter: &DeadLetter, full: bool) {
    let mut v = letter_json(message, letter);
    if full {
        v["message"] = message_json(&letter.topic, message, 1);
    }
    if cli.json {
        println!("{v}");
    } else if full {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "{}  {}  {} attempt(s)  {}  {}",
            message.id,
            letter.reason,
            letter.attempts,
            v["last_failure"].as_str().unwrap_or("?"),
            letter.error
        );
    }
}
