//! The host a service's `main` is made of: many consumers and background
//! tasks under one signal, one phased shutdown and one report, with health
//! as data ([`ServiceHealth`]) and, behind the `http` feature, `/healthz`,
//! `/readyz` and `/metrics` endpoints.
//!
//! ```no_run
//! use std::time::Duration;
//! use tidings::prelude::*;
//! use tidings::App;
//!
//! # async fn run() -> tidings::Result<()> {
//! let bus = tidings::connect(tidings::Config::load("tidings.toml")?).await?;
//! let report = App::new()
//!     .consumer("email", bus.consumer("email").handle("user.registered", |e: Event<String>| async move {
//!         println!("welcome {}", e.data);
//!         Ok::<_, HandlerError>(())
//!     }))
//!     .consumer("audit", bus.consumer("audit").handle("user.registered", |_: Event<String>| async {
//!         Ok::<_, HandlerError>(())
//!     }))
//!     .bus(&bus) // its health on /readyz; closed (drained) last
//!     .deadline(Duration::from_secs(30))
//!     .run()
//!     .await?; // SIGINT or SIGTERM, then the phased shutdown
//! println!("{report}");
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, select_all};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use tidings_core::health::{Always, HealthCheck, State};
use tidings_core::{
    Consumer, ConsumerBuilder, Error, Publisher, Result, ShutdownReport, shutdown_signal,
};

use crate::Bus;

mod health;
#[cfg(feature = "http")]
mod http;
mod report;

pub use health::{Component, HealthReport, Kind, Phase, ServiceHealth};
pub use report::{AppReport, StopCause};

/// Starts consumers and tasks, waits for SIGINT / SIGTERM (or a
/// [`ShutdownHandle`]), then shuts everything down in phases; see the
/// [module docs](self).
#[must_use = "an app does nothing until run"]
pub struct App {
    consumers: Vec<(String, ConsumerBuilder)>,
    tasks: Vec<(String, BoxFuture<'static, Result<()>>)>,
    publishers: Vec<Arc<dyn Publisher>>,
    buses: Vec<Bus>,
    deadline: Duration,
    restart: Restart,
    stop: watch::Sender<bool>,
    health: ServiceHealth,
    on_signal: bool,
    #[cfg(feature = "http")]
    http: Option<std::net::SocketAddr>,
}

/// What an [`App`] does when a consumer's subscription ends on its own
/// (the adapter gave up on it): stop the service (the default: the
/// platform restarts the process, and the report says why), or start the
/// consumer again a bounded number of times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restart {
    times: u32,
    backoff: Duration,
}

impl Restart {
    /// Never: the app stops with [`StopCause::ConsumerEnded`] and an error.
    pub const fn never() -> Self {
        Restart {
            times: 0,
            backoff: Duration::ZERO,
        }
    }

    /// Starts an ended consumer again after `backoff`, at most `times`
    /// times per consumer over the app's life; the next end stops the app.
    pub const fn up_to(times: u32, backoff: Duration) -> Self {
        Restart { times, backoff }
    }
}

impl Default for Restart {
    fn default() -> Self {
        Restart::never()
    }
}

/// Asks a running [`App`] to shut down, as a signal would.
#[derive(Clone, Debug)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    /// Starts the shutdown.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

impl Default for App {
    fn default() -> Self {
        App::new()
    }
}

/// One consumer of a running app: how to start it again, and its runs.
struct Slot {
    name: String,
    builder: ConsumerBuilder,
    consumer: Option<Consumer>,
    restarts: u32,
}

impl App {
    /// An app with nothing in it, a 30 s shutdown deadline, stopping on
    /// SIGINT / SIGTERM.
    pub fn new() -> Self {
        App {
            consumers: Vec::new(),
            tasks: Vec::new(),
            publishers: Vec::new(),
            buses: Vec::new(),
            deadline: Duration::from_secs(30),
            restart: Restart::never(),
            stop: watch::channel(false).0,
            health: ServiceHealth::new(),
            on_signal: true,
            #[cfg(feature = "http")]
            http: None,
        }
    }

    /// Adds a consumer, started by [`run`](App::run) and reported as `name`
    /// (also its name in the health report).
    pub fn consumer(mut self, name: impl Into<String>, consumer: ConsumerBuilder) -> Self {
        let name = name.into();
        self.health
            .set(&name, Kind::Consumer, Arc::new(Always(State::Starting)));
        self.consumers.push((name, consumer));
        self
    }

    /// Adds a bus: its connection's health joins the report (named after
    /// its broker), and it is closed last, after every consumer drained and
    /// every publisher closed, as its adapter's own `close` does (RabbitMQ
    /// waits for confirms, NATS drains). The configuration's `[http]`
    /// address and Prometheus metrics, if any, are served.
    pub fn bus(mut self, bus: &Bus) -> Self {
        let broker = bus.subscriber().name();
        let name = match self.buses.len() {
            0 => broker.to_owned(),
            n => format!("{broker}-{}", n + 1),
        };
        self.health
            .set(&name, Kind::Connection, Arc::new(bus.clone()));
        #[cfg(feature = "http")]
        if self.http.is_none() {
            self.http = bus.http_address();
        }
        self.buses.push(bus.clone());
        self
    }

    /// Adds a health check of the service's own (a circuit breaker, a
    /// database ping), reported as `name`; an unready answer makes the
    /// service unready.
    pub fn check(self, name: impl Into<String>, check: impl HealthCheck + 'static) -> Self {
        self.health.set(&name.into(), Kind::Check, Arc::new(check));
        self
    }

    /// Adds a background task. Its end (error or not) stops the app: a
    /// service's tasks are meant to run as long as it does.
    pub fn task(
        mut self,
        name: impl Into<String>,
        task: impl Future<Output = Result<()>> + Send + 'static,
    ) -> Self {
        self.tasks.push((name.into(), Box::pin(task)));
        self
    }

    /// Adds a publisher, closed (flushed) after every consumer drained:
    /// handlers may publish until then. (A [`bus`](App::bus)'s own
    /// publisher is closed with it.)
    pub fn publisher(mut self, publisher: Arc<dyn Publisher>) -> Self {
        self.publishers.push(publisher);
        self
    }

    /// The deadline for draining in-flight handlers (default 30 s).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// What to do when a consumer's subscription ends on its own (default
    /// [`Restart::never`]: stop the app).
    pub fn restart(mut self, policy: Restart) -> Self {
        self.restart = policy;
        self
    }

    /// Serves `/healthz`, `/readyz` and (with Prometheus metrics on a bus)
    /// `/metrics` on `address` while the app runs; port 0 picks a free port
    /// ([`ServiceHealth::http_address`] tells which). Overrides a bus's
    /// `[http]` address.
    #[cfg(feature = "http")]
    pub fn serve(mut self, address: std::net::SocketAddr) -> Self {
        self.http = Some(address);
        self
    }

    /// Stops only through a [`ShutdownHandle`], not on signals (tests, or a
    /// service whose runtime handles signals itself).
    pub fn without_signals(mut self) -> Self {
        self.on_signal = false;
        self
    }

    /// An AsyncAPI 3.0 document of the service's consumers (every handler
    /// of every consumer added so far); add what it publishes with
    /// [`publishes`](tidings_core::asyncapi::AsyncApi::publishes).
    pub fn asyncapi(
        &self,
        title: impl Into<String>,
        version: impl Into<String>,
    ) -> tidings_core::asyncapi::AsyncApi {
        self.consumers.iter().fold(
            tidings_core::asyncapi::AsyncApi::new(title, version),
            |document, (_, consumer)| document.consumer(consumer),
        )
    }

    /// The app's health as it runs: each part's state, liveness and
    /// readiness, as data.
    pub fn health(&self) -> ServiceHealth {
        self.health.clone()
    }

    /// A handle that stops the app when it runs.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.stop.clone())
    }

    /// Starts every consumer (failing, after stopping those already
    /// started, if one cannot start), runs the tasks, waits for a signal, a
    /// handle, a consumer whose subscription ended on its own (restarted
    /// if the [`Restart`] policy allows) or a task that ended, then shuts
    /// down in phases: intake stops everywhere at once, in-flight handlers
    /// drain within one deadline, publishers close, then buses close.
    /// Returns the report; `Err` (its text holding the report) when
    /// something failed to start, when the app stopped because a consumer, a
    /// task or the HTTP endpoint died, or when the shutdown was not clean (a
    /// consumer did not drain within the deadline, a publisher or bus did
    /// not close).
    pub async fn run(self) -> Result<AppReport> {
        let App {
            consumers,
            tasks,
            publishers,
            buses,
            deadline,
            restart,
            stop,
            health,
            on_signal,
            #[cfg(feature = "http")]
            http,
        } = self;
        let (http_stop, http_stopped) = watch::channel(false);
        #[cfg(feature = "http")]
        let mut http = start_http(http, &health, &buses, http_stopped).await?;
        #[cfg(not(feature = "http"))]
        let mut http: Option<JoinHandle<std::io::Result<()>>> = {
            drop(http_stopped);
            None
        };
        let mut slots: Vec<Slot> = Vec::with_capacity(consumers.len());
        for (name, builder) in consumers {
            match builder.clone().start().await {
                Ok(consumer) => {
                    health.set(&name, Kind::Consumer, Arc::new(consumer.health()));
                    slots.push(Slot {
                        name,
                        builder,
                        consumer: Some(consumer),
                        restarts: 0,
                    });
                }
                Err(e) => {
                    error!(consumer = %name, error = %e, "a consumer failed to start; stopping the others");
                    health.set_phase(Phase::Stopping);
                    shutdown_all(&mut slots, deadline).await;
                    health.set_phase(Phase::Stopped);
                    http_stop.send_replace(true);
                    return Err(e);
                }
            }
        }
        info!(
            consumers = slots.len(),
            tasks = tasks.len(),
            "service running"
        );
        health.set_phase(Phase::Running);
        let task_names: Vec<String> = tasks.iter().map(|(n, _)| n.clone()).collect();
        let mut running_tasks: Vec<_> = tasks
            .into_iter()
            .map(|(_, task)| tokio::spawn(task))
            .collect();
        let mut restarted = Vec::new();
        let mut stopped = stop.subscribe();
        let requested = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let signal = async {
            if on_signal {
                shutdown_signal().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(requested, signal);
        let cause = loop {
            let ended = tokio::select! {
                _ = &mut signal => break StopCause::Signal,
                _ = &mut requested => break StopCause::Requested,
                i = first_ended(&slots) => i,
                (i, error) = task_ended(&mut running_tasks) => {
                    break StopCause::TaskEnded(task_names[i].clone(), error)
                }
                served = http_ended(&mut http) => {
                    let why = match served {
                        Ok(Ok(())) => "stopped serving".to_owned(),
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => format!("panicked: {e}"),
                    };
                    break StopCause::HttpFailed(why)
                }
            };
            let slot = &mut slots[ended];
            if slot.restarts >= restart.times {
                break StopCause::ConsumerEnded(slot.name.clone());
            }
            slot.restarts += 1;
            warn!(consumer = %slot.name, restart = slot.restarts, of = restart.times,
                "a consumer's subscription ended on its own; starting it again");
            if let Some(consumer) = slot.consumer.take() {
                restarted.push((slot.name.clone(), consumer.shutdown(deadline).await));
            }
            tokio::select! {
                _ = tokio::time::sleep(restart.backoff) => {}
                _ = &mut signal => break StopCause::Signal,
                _ = &mut requested => break StopCause::Requested,
            }
            match slot.builder.clone().start().await {
                Ok(consumer) => {
                    health.set(&slot.name, Kind::Consumer, Arc::new(consumer.health()));
                    slot.consumer = Some(consumer);
                }
                Err(e) => {
                    error!(consumer = %slot.name, error = %e, "the consumer could not start again");
                    break StopCause::ConsumerEnded(slot.name.clone());
                }
            }
        };
        if matches!(cause, StopCause::HttpFailed(_)) {
            http = None;
        }
        match &cause {
            StopCause::Signal | StopCause::Requested => info!(?cause, "shutting down"),
            other => error!(cause = ?other, "shutting down because a part of the service stopped"),
        }
        health.set_phase(Phase::Stopping);
        for task in &running_tasks {
            task.abort();
        }
        let consumers = shutdown_all(&mut slots, deadline).await;
        let mut close_errors = Vec::new();
        for publisher in publishers {
            if let Err(e) = publisher.close().await {
                warn!(error = %e, "closing a publisher failed");
                close_errors.push(e.to_string());
            }
        }
        for bus in buses {
            if let Err(e) = bus.close().await {
                warn!(error = %e, "closing a bus failed");
                close_errors.push(format!("{}: {e}", bus.subscriber().name()));
            }
        }
        health.set_phase(Phase::Stopped);
        http_stop.send_replace(true);
        if let Some(server) = http {
            // Requests in progress finish; a scrape that hangs does not hold
            // the process.
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
        let report = AppReport {
            cause,
            consumers,
            restarted,
            close_errors,
        };
        match &report.cause {
            StopCause::ConsumerEnded(name) => Err(Error::Subscribe {
                topic: name.clone(),
                source: format!("consumer `{name}` stopped receiving; {report}").into(),
            }),
            StopCause::TaskEnded(name, error) => Err(Error::Broker {
                broker: "app",
                source: format!(
                    "task `{name}` ended{}; {report}",
                    error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
                )
                .into(),
            }),
            StopCause::HttpFailed(why) => Err(Error::Broker {
                broker: "app",
                source: format!("the HTTP endpoint failed: {why}; {report}").into(),
            }),
            // Asked to stop, but something did not drain or close in time:
            // the process should exit non-zero, and the log says what.
            _ if !report.is_clean() => Err(Error::Broker {
                broker: "app",
                source: format!("the shutdown was not clean: {report}").into(),
            }),
            _ => Ok(report),
        }
    }
}

/// Binds the HTTP endpoint (before anything starts, so a taken port fails
/// the start) and serves it until `stopped` says so.
#[cfg(feature = "http")]
async fn start_http(
    address: Option<std::net::SocketAddr>,
    health: &ServiceHealth,
    buses: &[Bus],
    stopped: watch::Receiver<bool>,
) -> Result<Option<JoinHandle<std::io::Result<()>>>> {
    let Some(address) = address else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| Error::Config {
            key: "http.address".into(),
            message: format!("cannot listen on {address}: {e}"),
        })?;
    if let Ok(bound) = listener.local_addr() {
        health.set_http_address(bound);
        info!(address = %bound, "serving /healthz, /readyz and /metrics");
    }
    #[cfg(not(feature = "prometheus"))]
    let _ = buses;
    let endpoint = http::Endpoint {
        health: health.clone(),
        #[cfg(feature = "prometheus")]
        metrics: buses.iter().find_map(|b| b.metrics().cloned()),
    };
    let mut stopped = stopped;
    let stop = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    Ok(Some(tokio::spawn(http::serve(listener, endpoint, stop))))
}

/// The index of the first consumer whose subscription ended on its own.
async fn first_ended(slots: &[Slot]) -> usize {
    let ends: Vec<_> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.consumer.as_ref().map(|c| (i, c)))
        .map(|(i, c)| {
            Box::pin(async move {
                c.ended().await;
                i
            })
        })
        .collect();
    if ends.is_empty() {
        return std::future::pending().await;
    }
    select_all(ends).await.0
}

/// The index of the first background task that ended, and its error.
async fn task_ended(tasks: &mut [JoinHandle<Result<()>>]) -> (usize, Option<String>) {
    if tasks.is_empty() {
        return std::future::pending().await;
    }
    let (result, i, _) = select_all(tasks.iter_mut()).await;
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(format!("panicked or was cancelled: {e}")),
    };
    (i, error)
}

/// The HTTP endpoint's end (it serves until the app stops it).
async fn http_ended(
    server: &mut Option<JoinHandle<std::io::Result<()>>>,
) -> std::result::Result<std::io::Result<()>, tokio::task::JoinError> {
    match server {
        Some(server) => server.await,
        None => std::future::pending().await,
    }
}

/// Shuts every consumer down at once (intake stops everywhere before any
/// drain is awaited), all within one deadline.
async fn shutdown_all(slots: &mut [Slot], deadline: Duration) -> Vec<(String, ShutdownReport)> {
    let shutdowns = slots.iter_mut().filter_map(|slot| {
        let consumer = slot.consumer.take()?;
        let name = slot.name.clone();
        Some(async move { (name, consumer.shutdown(deadline).await) })
    });
    futures::future::join_all(shutdowns).await
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field(
                "consumers",
                &self.consumers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field(
                "tasks",
                &self.tasks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("publishers", &self.publishers.len())
            .field("buses", &self.buses.len())
            .field("deadline", &self.deadline)
            .field("restart", &self.restart)
            .finish()
    }
}
