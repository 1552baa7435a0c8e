//! The host a service's `main` is made of: many consumers and background
//! tasks under one signal, one phased shutdown and one report.
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
//!     .publisher(bus.publisher().clone())
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
use tracing::{error, info, warn};

use tidings_core::{
    Consumer, ConsumerBuilder, Error, Publisher, Result, ShutdownReport, shutdown_signal,
};

/// Starts consumers and tasks, waits for SIGINT / SIGTERM (or a
/// [`ShutdownHandle`]), then shuts everything down in phases; see the
/// [module docs](self).
#[must_use = "an app does nothing until run"]
pub struct App {
    consumers: Vec<(String, ConsumerBuilder)>,
    tasks: Vec<(String, BoxFuture<'static, Result<()>>)>,
    publishers: Vec<Arc<dyn Publisher>>,
    deadline: Duration,
    stop: watch::Sender<bool>,
    ready: watch::Sender<bool>,
    on_signal: bool,
}

/// Whether a running [`App`] is ready: every consumer started and no
/// shutdown begun.
#[derive(Clone, Debug)]
pub struct Readiness(watch::Receiver<bool>);

impl Readiness {
    /// Ready now.
    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until ready (every consumer started).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|ready| *ready).await;
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

/// How an [`App`] ended: why it stopped and how each consumer shut down.
#[derive(Debug, Clone)]
pub struct AppReport {
    /// Why the app stopped.
    pub cause: StopCause,
    /// Each consumer's shutdown, by name.
    pub consumers: Vec<(String, ShutdownReport)>,
    /// Publishers that failed to close (flush) cleanly, with the error.
    pub publisher_errors: Vec<String>,
}

/// Why an [`App`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopCause {
    /// SIGINT or SIGTERM.
    Signal,
    /// A [`ShutdownHandle`].
    Requested,
    /// A consumer's subscription ended on its own (named).
    ConsumerEnded(String),
    /// A background task ended (named), with its error if it failed.
    TaskEnded(String, Option<String>),
}

impl AppReport {
    /// Whether everything drained and closed cleanly after a requested stop
    /// (a signal or a handle).
    pub fn is_clean(&self) -> bool {
        matches!(self.cause, StopCause::Signal | StopCause::Requested)
            && self.consumers.iter().all(|(_, r)| r.is_clean())
            && self.publisher_errors.is_empty()
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
        for e in &self.publisher_errors {
            write!(f, "; publisher: {e}")?;
        }
        Ok(())
    }
}

impl Default for App {
    fn default() -> Self {
        App::new()
    }
}

impl App {
    /// An app with nothing in it, a 30 s shutdown deadline, stopping on
    /// SIGINT / SIGTERM.
    pub fn new() -> Self {
        App {
            consumers: Vec::new(),
            tasks: Vec::new(),
            publishers: Vec::new(),
            deadline: Duration::from_secs(30),
            stop: watch::channel(false).0,
            ready: watch::channel(false).0,
            on_signal: true,
        }
    }

    /// Adds a consumer, started by [`run`](App::run) and reported as `name`.
    pub fn consumer(mut self, name: impl Into<String>, consumer: ConsumerBuilder) -> Self {
        self.consumers.push((name.into(), consumer));
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
    /// handlers may publish until then.
    pub fn publisher(mut self, publisher: Arc<dyn Publisher>) -> Self {
        self.publishers.push(publisher);
        self
    }

    /// The deadline for draining in-flight handlers (default 30 s).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Stops only through a [`ShutdownHandle`], not on signals (tests, or a
    /// service whose runtime handles signals itself).
    pub fn without_signals(mut self) -> Self {
        self.on_signal = false;
        self
    }

    /// Whether the app is ready, as it runs.
    pub fn readiness(&self) -> Readiness {
        Readiness(self.ready.subscribe())
    }

    /// A handle that stops the app when it runs.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.stop.clone())
    }

    /// Starts every consumer (failing, after stopping those already
    /// started, if one cannot start), runs the tasks, waits for a signal, a
    /// handle, a consumer whose subscription ended on its own or a task
    /// that ended, then shuts down in phases: intake stops everywhere at
    /// once, in-flight handlers drain within one deadline, then publishers
    /// close. Returns the report; `Err` when something failed to start, or
    /// when the app stopped because a consumer or task died.
    pub async fn run(self) -> Result<AppReport> {
        let App {
            consumers,
            tasks,
            publishers,
            deadline,
            stop,
            ready,
            on_signal,
        } = self;
        let mut started: Vec<(String, Consumer)> = Vec::with_capacity(consumers.len());
        for (name, builder) in consumers {
            match builder.start().await {
                Ok(consumer) => started.push((name, consumer)),
                Err(e) => {
                    error!(consumer = %name, error = %e, "a consumer failed to start; stopping the others");
                    shutdown_all(started, deadline).await;
                    return Err(e);
                }
            }
        }
        info!(
            consumers = started.len(),
            tasks = tasks.len(),
            "service running"
        );
        ready.send_replace(true);
        let task_names: Vec<String> = tasks.iter().map(|(n, _)| n.clone()).collect();
        let mut running_tasks: Vec<_> = tasks
            .into_iter()
            .map(|(_, task)| tokio::spawn(task))
            .collect();
        let cause = {
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
            let consumer_ended = async {
                if started.is_empty() {
                    return std::future::pending::<String>().await;
                }
                let ends = started.iter().map(|(name, c)| {
                    Box::pin(async move {
                        c.ended().await;
                        name.clone()
                    })
                });
                select_all(ends).await.0
            };
            let task_ended = async {
                if running_tasks.is_empty() {
                    return std::future::pending::<(usize, Option<String>)>().await;
                }
                let (result, i, _) = select_all(running_tasks.iter_mut()).await;
                let error = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(format!("panicked or was cancelled: {e}")),
                };
                (i, error)
            };
            tokio::select! {
                _ = signal => StopCause::Signal,
                _ = requested => StopCause::Requested,
                name = consumer_ended => StopCause::ConsumerEnded(name),
                (i, error) = task_ended => StopCause::TaskEnded(task_names[i].clone(), error),
            }
        };
        match &cause {
            StopCause::Signal | StopCause::Requested => info!(?cause, "shutting down"),
            other => error!(cause = ?other, "shutting down because a part of the service stopped"),
        }
        ready.send_replace(false);
        for task in &running_tasks {
            task.abort();
        }
        let consumers = shutdown_all(started, deadline).await;
        let mut publisher_errors = Vec::new();
        for publisher in publishers {
            if let Err(e) = publisher.close().await {
                warn!(error = %e, "closing a publisher failed");
                publisher_errors.push(e.to_string());
            }
        }
        let report = AppReport {
            cause,
            consumers,
            publisher_errors,
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
            _ => Ok(report),
        }
    }
}

/// Shuts every consumer down at once (intake stops everywhere before any
/// drain is awaited), all within one deadline.
async fn shutdown_all(
    consumers: Vec<(String, Consumer)>,
    deadline: Duration,
) -> Vec<(String, ShutdownReport)> {
    let shutdowns = consumers.into_iter().map(|(name, c)| async move {
        let report = c.shutdown(deadline).await;
        (name, report)
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
            .field("deadline", &self.deadline)
            .finish()
    }
}
