//! The subcommands, and what they share: the configuration and a bounded
//! connection.

pub(crate) mod dlq;
pub(crate) mod groups;
pub(crate) mod ping;
pub(crate) mod publish;
pub(crate) mod tail;

use std::future::Future;
use std::time::Duration;

use tidings::{Config, Error};

use crate::{Cli, Command, Failure};

/// Runs the command the arguments name.
pub(crate) async fn run(cli: &Cli) -> Result<(), Failure> {
    let config = config(cli)?;
    let shown = tidings::params::redact_url(&config.url);
    let bus = bounded(
        cli.timeout,
        &format!("connecting to {shown}"),
        tidings::connect(config),
    )
    .await?
    .map_err(|e| failed(&format!("cannot connect to {shown}"), e))?;
    let result = match &cli.command {
        Command::Ping => ping::run(cli, &bus, &shown).await,
        Command::Publish(args) => publish::run(cli, &bus, args).await,
        Command::Tail(args) => tail::run(cli, &bus, args).await,
        Command::Dlq(args) => dlq::run(cli, &bus, args).await,
        Command::Groups(args) => groups::run(cli, &bus, args).await,
    };
    // Closing drains what the adapter holds (confirms, buffered publishes);
    // a broker that stopped answering does not hold the command.
    let closed = bounded(
        cli.timeout,
        "closing the connection",
        tidings::Publisher::close(&bus),
    )
    .await;
    result?;
    closed?.map_err(|e| failed("closing the connection failed", e))
}

/// The configuration: `--url`, else `--config`, else `TIDINGS_*` variables.
fn config(cli: &Cli) -> Result<Config, Failure> {
    let config = match (&cli.url, &cli.config) {
        (Some(url), _) => Config::from_url(url.clone()),
        (None, Some(path)) => Config::load(path).map_err(|e| Failure::Usage(e.to_string()))?,
        (None, None) => Config::from_env()
            .map_err(|e| Failure::Usage(format!("{e}; give --url, --config or TIDINGS_URL")))?,
    };
    Ok(config)
}

/// An error of the library as a failure: configuration errors and what the
/// adapter cannot do are usage errors (exit 2), everything else the
/// broker's (exit 1).
pub(crate) fn failed(doing: &str, e: Error) -> Failure {
    match e {
        Error::Config { .. } | Error::Unsupported { .. } => Failure::Usage(format!("{doing}: {e}")),
        e => Failure::Broker(format!("{doing}: {e}")),
    }
}

/// `future` within `limit`, or a failure saying what did not answer.
pub(crate) async fn bounded<T>(
    limit: Duration,
    doing: &str,
    future: impl Future<Output = T>,
) -> Result<T, Failure> {
    tokio::time::timeout(limit, future).await.map_err(|_| {
        Failure::Broker(format!(
            "{doing}: no answer within {} (--timeout)",
            humantime::format_duration(limit)
        ))
    })
}
