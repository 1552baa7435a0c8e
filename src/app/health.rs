//! The service's health board: every part the [`App`](super::App) runs or
//! was given (broker connections, consumers, breakers, checks of the
//! service's own), asked together for a liveness or readiness answer.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::watch;

use tidings_core::health::{CHECK_TIMEOUT, Health, HealthCheck, State};

/// What kind of part a health component is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Kind {
    /// A broker connection (a [`Bus`](crate::Bus)).
    Connection,
    /// A consumer the app runs.
    Consumer,
    /// A check the service added ([`App::check`](super::App::check)): a
    /// circuit breaker, a database.
    Check,
}

/// Where the app is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// Starting its consumers.
    Starting,
    /// Everything started; running until a signal or a handle stops it.
    Running,
    /// Shutting down: intake stopped, draining, closing.
    Stopping,
    /// Stopped.
    Stopped,
}

/// One part's answer in a [`HealthReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Component {
    /// The name it was added under.
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Its state (and why).
    #[serde(flatten)]
    pub health: Health,
    /// Whether its state lets the service work.
    pub ready: bool,
}

/// Every part's health at one moment: the body of `/healthz` and `/readyz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// Alive: the app has not stopped (liveness).
    pub live: bool,
    /// Ready: the app is running and every part is ready (readiness).
    pub ready: bool,
    /// Where the app is in its life.
    pub phase: Phase,
    /// Every part, in the order they were added.
    pub components: Vec<Component>,
}

/// The health of a running [`App`](super::App), from
/// [`App::health`](super::App::health); clones share it.
#[derive(Clone)]
pub struct ServiceHealth {
    board: Arc<Board>,
}

struct Board {
    phase: watch::Sender<Phase>,
    parts: Mutex<Vec<Part>>,
    http: Mutex<Option<SocketAddr>>,
}

struct Part {
    name: String,
    kind: Kind,
    check: Arc<dyn HealthCheck>,
}

impl ServiceHealth {
    pub(crate) fn new() -> Self {
        ServiceHealth {
            board: Arc::new(Board {
                phase: watch::channel(Phase::Starting).0,
                parts: Mutex::new(Vec::new()),
                http: Mutex::new(None),
            }),
        }
    }

    fn parts(&self) -> MutexGuard<'_, Vec<Part>> {
        self.board.parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a part, or replaces the check of the part of that name and kind
    /// (a restarted consumer).
    pub(crate) fn set(&self, name: &str, kind: Kind, check: Arc<dyn HealthCheck>) {
        let mut parts = self.parts();
        match parts.iter_mut().find(|p| p.name == name && p.kind == kind) {
            Some(part) => part.check = check,
            None => parts.push(Part {
                name: name.to_owned(),
                kind,
                check,
            }),
        }
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.board.phase.send_replace(phase);
    }

    #[cfg(feature = "http")]
    pub(crate) fn set_http_address(&self, addr: SocketAddr) {
        *self.board.http.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
    }

    /// The address the HTTP endpoint listens on, once the app bound it.
    pub fn http_address(&self) -> Option<SocketAddr> {
        *self.board.http.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the app is in its life now.
    pub fn phase(&self) -> Phase {
        *self.board.phase.borrow()
    }

    /// Waits until every consumer started (or the app stopped trying).
    pub async fn started(&self) {
        let mut phase = self.board.phase.subscribe();
        let _ = phase.wait_for(|p| *p != Phase::Starting).await;
    }

    /// Asks every part at once (each bounded by twice
    /// [`CHECK_TIMEOUT`]: a part that does not answer is reported
    /// `reconnecting`).
    pub async fn report(&self) -> HealthReport {
        let parts: Vec<(String, Kind, Arc<dyn HealthCheck>)> = self
            .parts()
            .iter()
            .map(|p| (p.name.clone(), p.kind, p.check.clone()))
            .collect();
        let phase = self.phase();
        let checks = parts.into_iter().map(|(name, kind, check)| async move {
            let health = tokio::time::timeout(CHECK_TIMEOUT * 2, check.check())
                .await
                .unwrap_or_else(|_| {
                    Health::because(State::Reconnecting, "the check did not answer")
                });
            Component {
                name,
                kind,
                ready: health.is_ready(),
                health,
            }
        });
        let components = futures::future::join_all(checks).await;
        HealthReport {
            live: phase != Phase::Stopped,
            ready: phase == Phase::Running && components.iter().all(|c| c.ready),
            phase,
            components,
        }
    }
}

impl std::fmt::Debug for ServiceHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHealth")
            .field("phase", &self.phase())
            .field(
                "parts",
                &self
                    .parts()
                    .iter()
                    .map(|p| p.name.clone())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}
