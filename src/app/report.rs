//! How an [`App`](super::App) ended.

use std::fmt;

use tidings_core::ShutdownReport;

/// How an [`App`](super::App) ended: why it stopped and how each consumer
/// shut down.
#[derive(Debug, Clone)]
pub struct AppReport {
    /// Why the app stopped.
    pub cause: StopCause,
    /// Each consumer's shutdown, by name.
    pub consumers: Vec<(String, ShutdownReport)>,
    /// Consumers whose subscription ended on their own and that were
    /// started again ([`Restart`](super::Restart)): the shutdown of each
    /// ended run, by name, in order.
    pub restarted: Vec<(String, ShutdownReport)>,
    /// Publishers and buses that failed to close (flush, drain) cleanly,
    /// with the error.
    pub close_errors: Vec<String>,
}

/// Why an [`App`](super::App) stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopCause {
    /// SIGINT or SIGTERM.
    Signal,
    /// A [`ShutdownHandle`](super::ShutdownHandle).
    Requested,
    /// A consumer's subscription ended on its own (named), and the restart
    /// policy did not (or could not) start it again.
    ConsumerEnded(String),
    /// A background task ended (named), with its error if it failed.
    TaskEnded(String, Option<String>),
    /// The HTTP endpoint failed (its error).
    HttpFailed(String),
}

impl AppReport {
    /// Whether everything drained and closed cleanly after a requested stop
    /// (a signal or a handle).
    pub fn is_clean(&self) -> bool {
        matches!(self.cause, StopCause::Signal | StopCause::Requested)
            && self.consumers.iter().all(|(_, r)| r.is_clean())
            && self.close_errors.is_empty()
    }
}

impl fmt::Display for AppReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stopped by {:?}", self.cause)?;
        for (name, r) in &self.consumers {
            write!(
                f,
                "; {name}: {} received, {} settled, {} failed settlements, {} released, {} abandoned{}",
                r.received,
                r.settled,
                r.failed_settlements,
                r.released,
                r.abandoned,
                if r.drained { "" } else { " (not drained)" }
            )?;
        }
        if !self.restarted.is_empty() {
            write!(f, "; {} consumer restart(s)", self.restarted.len())?;
        }
        for e in &self.close_errors {
            write!(f, "; closing: {e}")?;
        }
        Ok(())
    }
}
