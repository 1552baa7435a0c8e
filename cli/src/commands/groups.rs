//! `tidings groups <topic>`: the groups of a topic with their members,
//! pending, lag and dead-letter counts, as far as the broker can tell.

use tidings::{Bus, GroupStats};

use super::{bounded, failed};
use crate::{Cli, Failure};

/// `tidings groups`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The topic.
    topic: String,
    /// A group to report (repeatable). Without it, every group the broker
    /// can list: Redis Streams, JetStream and the in-process bus can;
    /// RabbitMQ and Kafka need the groups named.
    #[arg(long = "group")]
    groups: Vec<String>,
}

pub(crate) async fn run(cli: &Cli, bus: &Bus, args: &Args) -> Result<(), Failure> {
    let groups = bounded(
        cli.timeout,
        "reading the groups",
        bus.subscriber().groups(&args.topic, &args.groups),
    )
    .await?
    .map_err(|e| failed(&format!("reading the groups of {}", args.topic), e))?;
    if cli.json {
        for g in &groups {
            println!("{}", serde_json::to_string(g).unwrap_or_default());
        }
    } else {
        print!("{}", table(&args.topic, &groups));
    }
    Ok(())
}

/// The groups as an aligned table; `-` where the broker cannot tell.
fn table(topic: &str, groups: &[GroupStats]) -> String {
    if groups.is_empty() {
        return format!("{topic} has no groups\n");
    }
    let n = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let rows: Vec<[String; 5]> = groups
        .iter()
        .map(|g| {
            [
                g.group.clone(),
                n(g.members),
                n(g.pending),
                n(g.lag),
                n(g.dead_letters),
            ]
        })
        .collect();
    let header = ["GROUP", "MEMBERS", "PENDING", "LAG", "DEAD LETTERS"];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..5).map(width).collect();
    let mut out = String::new();
    for row in std::iter::once(header.map(str::to_owned)).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i == 0 {
                    format!("{cell:<w$}", w = widths[i])
                } else {
                    format!("{cell:>w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_figures_are_dashes_and_columns_align() {
        let mut billing = GroupStats::new("billing");
        billing.lag = Some(12);
        billing.dead_letters = Some(3);
        let text = table("orders", &[billing, GroupStats::new("audit")]);
        assert_eq!(
            text,
            "GROUP    MEMBERS  PENDING  LAG  DEAD LETTERS\n\
             billing        -        -   12             3\n\
             audit          -        -    -             -\n"
        );
        assert_eq!(table("orders", &[]), "orders has no groups\n");
    }
}
