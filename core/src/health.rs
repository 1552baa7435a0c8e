//! Health as data: what each part of a service (a broker connection, a
//! consumer, a circuit breaker) says about itself when asked.
//!
//! Every adapter's bus, every [`Consumer`](crate::Consumer) (through
//! [`Consumer::health`](crate::Consumer::health)) and the circuit breaker
//! implement [`HealthCheck`]. The service host (`tidings::App`) asks them
//! all for its `/readyz` answer; a service can ask them directly too.
//!
//! Checks are answered on demand rather than pushed: a probe sees the state
//! at the moment it asks (a broker connection is tried, not remembered), and
//! nothing runs between probes.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;

/// The state of one part of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum State {
    /// A broker connection that answers.
    Connected,
    /// A broker connection that is down and being re-established.
    Reconnecting,
    /// A consumer being started.
    Starting,
    /// A consumer receiving and handling messages.
    Running,
    /// A consumer that stopped intake and is finishing its in-flight handlers.
    Draining,
    /// A consumer or connection that stopped (asked to, or on its own).
    Stopped,
    /// A circuit breaker that is open: handlers are not called until it
    /// probes again.
    BreakerOpen,
    /// A circuit breaker letting probe calls through.
    BreakerHalfOpen,
    /// A circuit breaker that is closed: calls go through.
    BreakerClosed,
}

impl State {
    /// Whether a part in this state lets the service do its work: a
    /// connected broker, a running consumer, a closed (or probing) breaker.
    pub fn is_ready(self) -> bool {
        matches!(
            self,
            State::Connected | State::Running | State::BreakerClosed | State::BreakerHalfOpen
        )
    }

    /// The state's name as in the JSON of a health report (`"connected"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connected => "connected",
            State::Reconnecting => "reconnecting",
            State::Starting => "starting",
            State::Running => "running",
            State::Draining => "draining",
            State::Stopped => "stopped",
            State::BreakerOpen => "breaker_open",
            State::BreakerHalfOpen => "breaker_half_open",
            State::BreakerClosed => "breaker_closed",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a [`HealthCheck`] answered: a state and, when there is something to
/// say (the connection error, why a consumer stopped), a detail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Health {
    /// The state.
    pub state: State,
    /// Why, when the state alone does not say (for example the error a
    /// reconnecting connection last saw).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Health {
    /// A state with nothing more to say.
    pub fn new(state: State) -> Self {
        Health {
            state,
            detail: None,
        }
    }

    /// A state and why.
    pub fn because(state: State, detail: impl fmt::Display) -> Self {
        Health {
            state,
            detail: Some(detail.to_string()),
        }
    }

    /// Whether the state lets the service do its work ([`State::is_ready`]).
    pub fn is_ready(&self) -> bool {
        self.state.is_ready()
    }
}

impl From<State> for Health {
    fn from(state: State) -> Self {
        Health::new(state)
    }
}

/// Something that can say how it is: a broker connection, a consumer, a
/// circuit breaker.
///
/// A check should answer within about a second (the adapters bound their
/// broker round trips by that); a host asking many parts at once bounds
/// each check anyway.
pub trait HealthCheck: Send + Sync {
    /// The current health.
    fn check(&self) -> BoxFuture<'_, Health>;
}

impl<T: HealthCheck + ?Sized> HealthCheck for std::sync::Arc<T> {
    fn check(&self) -> BoxFuture<'_, Health> {
        (**self).check()
    }
}

/// How long a connection check waits for the broker's answer.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection check by a round trip to the broker (a `PING`, a metadata
/// request): [`State::Connected`] when it answered within
/// [`CHECK_TIMEOUT`], [`State::Reconnecting`] with the error or the timeout
/// otherwise. The adapters' checks share it.
pub async fn round_trip<T, E: fmt::Display>(trip: impl Future<Output = Result<T, E>>) -> Health {
    match tokio::time::timeout(CHECK_TIMEOUT, trip).await {
        Ok(Ok(_)) => Health::new(State::Connected),
        Ok(Err(e)) => Health::because(State::Reconnecting, e),
        Err(_) => Health::because(
            State::Reconnecting,
            format_args!("no answer within {CHECK_TIMEOUT:?}"),
        ),
    }
}

/// A check that always answers the same (the in-process bus is always
/// connected; tests use it for a part that never changes).
#[derive(Clone, Debug)]
pub struct Always(pub State);

impl HealthCheck for Always {
    fn check(&self) -> BoxFuture<'_, Health> {
        let state = self.0;
        Box::pin(async move { Health::new(state) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_states() {
        let ready: Vec<State> = [
            State::Connected,
            State::Reconnecting,
            State::Starting,
            State::Running,
            State::Draining,
            State::Stopped,
            State::BreakerOpen,
            State::BreakerHalfOpen,
            State::BreakerClosed,
        ]
        .into_iter()
        .filter(|s| s.is_ready())
        .collect();
        assert_eq!(
            ready,
            [
                State::Connected,
                State::Running,
                State::BreakerHalfOpen,
                State::BreakerClosed
            ]
        );
    }

    #[tokio::test]
    async fn round_trips_are_bounded() {
        let ok = round_trip(async { Ok::<_, String>(()) }).await;
        assert_eq!(ok, Health::new(State::Connected));
        let refused = round_trip(async { Err::<(), _>("refused") }).await;
        assert_eq!(refused, Health::because(State::Reconnecting, "refused"));
        let silent = round_trip(std::future::pending::<Result<(), String>>()).await;
        assert_eq!(silent.state, State::Reconnecting);
        assert!(silent.detail.unwrap().contains("no answer"));
    }

    #[test]
    fn json_names_match_as_str() {
        for s in [State::Connected, State::BreakerHalfOpen, State::Draining] {
            let json = serde_json::to_string(&Health::new(s)).unwrap();
            assert_eq!(json, format!("{{\"state\":\"{}\"}}", s.as_str()));
        }
        let json = serde_json::to_string(&Health::because(State::Reconnecting, "refused")).unwrap();
        assert_eq!(json, r#"{"state":"reconnecting","detail":"refused"}"#);
    }
}
