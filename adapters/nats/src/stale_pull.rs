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
//! requests expire soon, and from the moment it starts closing (or a pull
//! stream is replaced after an error) its naks wait until the last request
//! of the dropped stream has expired.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How long a pull request waits on a server before 2.10 (30 s on others).
pub(crate) const EXPIRES_ON_OLD_SERVERS: Duration = Duration::from_secs(3);

/// Whether a server of `version` ("2.9.10") needs naks to wait.
pub(crate) fn needs_waiting(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) < (2, 10)
}

/// Where a subscription's pull streams stand, for its naks to wait on.
#[derive(Debug)]
pub(crate) struct PullEnd(watch::Sender<State>);

#[derive(Clone, Copy, Debug, Default)]
struct State {
    /// The subscription is closing: its stream is about to end.
    closing: bool,
    /// Its last stream has ended.
    ended: bool,
    /// When the requests of the streams dropped so far have all expired.
    quiet_at: Option<Instant>,
}

impl Default for PullEnd {
    fn default() -> Self {
        PullEnd(watch::channel(State::default()).0)
    }
}

impl PullEnd {
    /// The subscription is closing (its pump will drop the stream soon):
    /// from now on naks wait for that.
    pub fn closing(&self) {
        self.0.send_modify(|s| s.closing = true);
    }

    /// A pull stream was dropped now (`last`: the subscription's final one;
    /// otherwise one replaced after an error): its requests expire within
    /// [`EXPIRES_ON_OLD_SERVERS`], and a little for the clocks.
    pub fn dropped(&self, last: bool) {
        let quiet_at = Instant::now() + EXPIRES_ON_OLD_SERVERS + Duration::from_millis(250);
        self.0.send_modify(|s| {
            s.quiet_at = Some(quiet_at);
            s.ended |= last;
        });
    }

    /// Waits until no request of a dropped stream can still be waiting on
    /// the server; returns at once while the stream runs. Bounded: a pump
    /// that never says its stream ended is waited for one expiry at most.
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let give_up = Instant::now() + EXPIRES_ON_OLD_SERVERS + Duration::from_millis(250);
        loop {
            let state = *rx.borrow_and_update();
            if let Some(at) = state.quiet_at
                && at > Instant::now()
            {
                tokio::time::sleep_until(at).await;
                continue;
            }
            if state.closing && !state.ended {
                match tokio::time::timeout_at(give_up, rx.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => return,
                }
            }
            return;
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
