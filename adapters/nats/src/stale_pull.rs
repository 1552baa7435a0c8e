//! A nak must not meet a pull request that outlived its subscription, on
//! servers before 2.10.
//!
//! A pull request waits on the server until it is filled or expires; the
//! client cannot cancel it. nats-server 2.9 sends a message handed back
//! (nak) to such a request even when nobody listens on its reply subject
//! any more, and then mixes up the consumer's state: measured, an inbox
//! that handed back two letters made the next reader get the second twice
//! (as a redelivery and again as a first delivery) and the first not at
//! all until `ack_wait`. 2.10 and later skip requests without interest
//! (the same test passes on 2.15). So on older servers a subscription's
//! requests expire soon, and once its pull stream is gone, its naks wait
//! until the last request it made has expired.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// How long a pull request waits on a server before 2.10 (30 s on others).
pub(crate) const EXPIRES_ON_OLD_SERVERS: Duration = Duration::from_secs(3);

/// Whether a server of `version` ("2.9.10") needs naks to wait.
pub(crate) fn needs_waiting(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) < (2, 10)
}

/// When the last pull request of a subscription's ended pull stream has
/// expired on the server; unset while the stream runs.
#[derive(Debug, Default)]
pub(crate) struct PullEnd(OnceLock<Instant>);

impl PullEnd {
    /// The pull stream was dropped now: its requests expire within
    /// [`EXPIRES_ON_OLD_SERVERS`] (and a little for the clocks).
    pub fn ended(&self) {
        let margin = Duration::from_millis(250);
        let _ = self.0.set(Instant::now() + EXPIRES_ON_OLD_SERVERS + margin);
    }

    /// Waits until no request of the ended stream can still be waiting;
    /// returns at once while the stream runs.
    pub async fn wait(&self) {
        if let Some(at) = self.0.get() {
            tokio::time::sleep_until(*at).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::needs_waiting;

    #[test]
    fn servers_before_2_10_need_it() {
        assert!(needs_waiting("2.9.10"));
        assert!(needs_waiting("2.2.0"));
        assert!(!needs_waiting("2.10.0"));
        assert!(!needs_waiting("2.15.1"));
        assert!(!needs_waiting("3.0.0"));
    }
}
