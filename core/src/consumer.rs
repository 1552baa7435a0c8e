//! The consumer runtime: handlers registered per topic for one group,
//! bounded concurrency, per-key order, settlement and graceful shutdown.
//!
//! For each topic the runtime runs one intake task, which reads the
//! subscription, and `concurrency` workers, which run the middleware stack
//! and the handler and settle the delivery by the result:
//!
//! | result | settlement |
//! |---|---|
//! | `Ok(())` | ack |
//! | retryable error, attempts left | nack, redelivered after the backoff (or the error's `retry_after`) |
//! | retryable error, last attempt | dead-letter (`attempts-exhausted`), then ack |
//! | permanent error | dead-letter (`permanent-error`), then ack |
//! | undecodable payload | dead-letter (`undecodable`), then ack |
//! | panic | a retryable error; the runtime keeps running |
//!
//! On brokers without redelivery (at-most-once), retries happen in process.
//! Intake waits whenever every worker is busy and the subscription's
//! prefetch is used up, so a slow handler slows intake; memory does not grow.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, warn};

use crate::delivery::{DeadLetter, DeadLetterReason, Delivery, header};
use crate::error::{Error, Result};
use crate::handler::{Endpoint, Erased, Handler, HandlerError, HandlerResult};
use crate::middleware::{Middleware, Next};
use crate::retry::RetryPolicy;
use crate::subscriber::{Capabilities, DeliveryStream, StartFrom, Subscriber, Subscription};

/// Builds a [`Consumer`]: the group, its handlers, its middleware and limits.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # use std::sync::Arc;
/// use tidings_core::{Consumer, Event, HandlerError};
/// # #[derive(Serialize, Deserialize)] struct UserRegistered { email: String }
/// # async fn f(subscriber: Arc<dyn tidings_core::Subscriber>) -> tidings_core::Result<()> {
/// let consumer = Consumer::group(subscriber, "email-service")
///     .concurrency(8)
///     .handle("user.registered", |e: Event<UserRegistered>| async move {
///         println!("welcome {}", e.data.email);
///         Ok::<_, HandlerError>(())
///     })
///     .start()
///     .await?;
/// consumer.shutdown(std::time::Duration::from_secs(10)).await;
/// # Ok(()) }
/// ```
#[must_use = "a consumer does nothing until started"]
pub struct ConsumerBuilder {
    subscriber: Arc<dyn Subscriber>,
    group: Option<String>,
    routes: Vec<(String, Arc<dyn Endpoint>)>,
    stack: Vec<Arc<dyn Middleware>>,
    concurrency: usize,
    prefetch: Option<usize>,
    ordered_by_key: bool,
    retry: RetryPolicy,
    start: StartFrom,
    observers: Vec<Observer>,
}

/// A settlement observer: see [`ConsumerBuilder::on_settle`].
type Observer = Arc<dyn Fn(&Settlement<'_>) + Send + Sync>;

/// What the runtime did with a delivery once its handler was done, and
/// whether the adapter took it: given to the observers of
/// [`ConsumerBuilder::on_settle`].
///
/// Retries made in process (on brokers without redelivery) are not
/// settlements: only the final ack or dead letter is observed there.
#[derive(Debug)]
#[non_exhaustive]
pub struct Settlement<'a> {
    /// The delivery, as settled ([`is_settled`](Delivery::is_settled) is
    /// true even when `result` is an error).
    pub delivery: &'a Delivery,
    /// What the runtime asked of the adapter.
    pub action: SettleAction,
    /// `Err` when settling failed (the connection dropped, the broker
    /// refused). On brokers with redelivery the message then comes back; on
    /// at-most-once ones (core NATS, Redis Pub/Sub) a failed dead letter is
    /// lost. Adapters that settle asynchronously report only what they
    /// know at once: Kafka records an ack and commits it later, so its acks
    /// do not fail here.
    pub result: std::result::Result<(), &'a Error>,
}

impl<'a> Settlement<'a> {
    /// A settlement, for tests of observers.
    pub fn new(
        delivery: &'a Delivery,
        action: SettleAction,
        result: std::result::Result<(), &'a Error>,
    ) -> Self {
        Settlement {
            delivery,
            action,
            result,
        }
    }
}

/// How the runtime settled a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SettleAction {
    /// Acked: handled.
    Ack,
    /// Nacked, to be delivered again after `delay`.
    Nack {
        /// The backoff before the next attempt.
        delay: Duration,
    },
    /// Sent to the dead-letter destination, then removed.
    DeadLetter {
        /// Why.
        reason: DeadLetterReason,
    },
}

impl SettleAction {
    /// `ack`, `nack` or `dead_letter`, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SettleAction::Ack => "ack",
            SettleAction::Nack { .. } => "nack",
            SettleAction::DeadLetter { .. } => "dead_letter",
        }
    }
}

/// A running consumer. Stop it with [`shutdown`](Consumer::shutdown) or
/// [`shutdown_on_signal`](Consumer::shutdown_on_signal); dropping it stops
/// intake too, but without waiting for in-flight handlers.
#[must_use = "dropping a consumer stops it"]
pub struct Consumer {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    aborts: Vec<AbortHandle>,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether every in-flight handler finished and was settled before the deadline.
    /// When not, the unsettled messages are redelivered later.
    pub drained: bool,
}

impl Consumer {
    /// Starts building a consumer for `group`: every group receives every
    /// message of its topics; inside a group each message goes to one member.
    pub fn group(subscriber: Arc<dyn Subscriber>, group: impl Into<String>) -> ConsumerBuilder {
        ConsumerBuilder::new(subscriber, Some(group.into()))
    }

    /// Starts building a consumer with private subscriptions (no group), where the broker allows.
    pub fn private(subscriber: Arc<dyn Subscriber>) -> ConsumerBuilder {
        ConsumerBuilder::new(subscriber, None)
    }

    /// Phased shutdown: stops intake, lets in-flight handlers finish and
    /// settle, and waits for the adapter to finish closing
    /// ([`DeliveryStream::closed`]: Kafka's
    /// final commit and leaving the group), all within `deadline`. Past it,
    /// what is left unsettled is dropped (the broker redelivers it later) and
    /// the report says `drained: false`.
    pub async fn shutdown(mut self, deadline: Duration) -> ShutdownReport {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut self.tasks);
        let drained = tokio::time::timeout(deadline, futures::future::join_all(tasks))
            .await
            .is_ok();
        if !drained {
            warn!(
                ?deadline,
                "shutdown deadline passed; unsettled messages will be redelivered"
            );
            for abort in &self.aborts {
                abort.abort();
            }
        }
        ShutdownReport { drained }
    }

    /// Waits for Ctrl-C or SIGTERM, then shuts down with `deadline`.
    pub async fn shutdown_on_signal(self, deadline: Duration) -> ShutdownReport {
        wait_for_signal().await;
        self.shutdown(deadline).await
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("tasks", &self.tasks.len())
            .finish()
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

impl ConsumerBuilder {
    fn new(subscriber: Arc<dyn Subscriber>, group: Option<String>) -> Self {
        ConsumerBuilder {
            subscriber,
            group,
            routes: Vec::new(),
            stack: Vec::new(),
            concurrency: 16,
            prefetch: None,
            ordered_by_key: false,
            retry: RetryPolicy::default(),
            start: StartFrom::Latest,
            observers: Vec::new(),
        }
    }

    /// Registers `handler` for `topic`.
    pub fn handle<H, Args>(mut self, topic: impl Into<String>, handler: H) -> Self
    where
        H: Handler<Args>,
        Args: 'static,
    {
        self.routes
            .push((topic.into(), Arc::new(Erased::new(handler))));
        self
    }

    /// Adds a middleware around every handler of this consumer. The first
    /// layer added is the outermost: it sees the delivery first.
    pub fn layer(mut self, middleware: impl Middleware) -> Self {
        self.stack.push(Arc::new(middleware));
        self
    }

    /// How many messages of each topic are handled at once (default 16).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The bound on unsettled messages per topic taken from the broker
    /// (default: twice the concurrency, at least 32).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = Some(n.max(1));
        self
    }

    /// Handles messages with the same key one after the other, in the order
    /// received; messages with different keys still run concurrently.
    /// A redelivered message comes back after the ones received meanwhile.
    pub fn ordered_by_key(mut self) -> Self {
        self.ordered_by_key = true;
        self
    }

    /// How often a failing message is attempted and how long between attempts.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Calls `observer` after every settlement the runtime makes, with what
    /// it did and the broker's answer, so metrics and logs can count what a
    /// middleware layer cannot see: the settlement itself, and settlements
    /// that failed (the message then comes back). Observers run on the
    /// worker, between two messages: keep them quick and never blocking; a
    /// panicking observer is logged and the worker goes on.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::sync::atomic::{AtomicU64, Ordering};
    /// use tidings_core::{Consumer, Event, HandlerError};
    /// # async fn f(subscriber: Arc<dyn tidings_core::Subscriber>) -> tidings_core::Result<()> {
    /// let failed = Arc::new(AtomicU64::new(0));
    /// let count = failed.clone();
    /// let consumer = Consumer::group(subscriber, "billing")
    ///     .handle("order.placed", |_: Event<String>| async { Ok::<_, HandlerError>(()) })
    ///     .on_settle(move |s| {
    ///         if s.result.is_err() {
    ///             count.fetch_add(1, Ordering::Relaxed);
    ///         }
    ///     })
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn on_settle(mut self, observer: impl Fn(&Settlement<'_>) + Send + Sync + 'static) -> Self {
        self.observers.push(Arc::new(observer));
        self
    }

    /// Where subscriptions start (replay). Applies when the group is created.
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Subscribes to every topic and starts handling. Returns once every
    /// subscription is in place: messages published afterwards reach it.
    pub async fn start(self) -> Result<Consumer> {
        if self.routes.is_empty() {
            return Err(Error::Config {
                key: "handle".into(),
                message: "a consumer needs at least one handler".into(),
            });
        }
        let name = self.subscriber.name();
        let caps = self.subscriber.capabilities();
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| (self.concurrency * 2).max(32));
        let mut subscriptions = Vec::with_capacity(self.routes.len());
        for (topic, _) in &self.routes {
            let subscription = Subscription {
                topic: topic.clone(),
                group: self.group.clone(),
                prefetch,
                start: self.start,
            };
            subscription.check(name, caps)?;
            subscriptions.push(subscription);
        }
        let stack: Arc<[Arc<dyn Middleware>]> = self.stack.into();
        let observers: Arc<[Observer]> = self.observers.into();
        let (stop, _) = watch::channel(false);
        let mut tasks = Vec::new();
        for ((_, endpoint), subscription) in self.routes.into_iter().zip(subscriptions) {
            let stream = self.subscriber.subscribe(subscription).await?;
            let route = Arc::new(Route {
                stack: stack.clone(),
                endpoint,
                retry: self.retry,
                caps,
                observers: observers.clone(),
            });
            let (dispatch, receivers) =
                Dispatch::new(self.concurrency, prefetch, self.ordered_by_key);
            for rx in receivers {
                let route = route.clone();
                tasks.push(tokio::spawn(worker(rx, route)));
            }
            tasks.push(tokio::spawn(intake(stream, dispatch, stop.subscribe())));
        }
        let aborts = tasks.iter().map(JoinHandle::abort_handle).collect();
        Ok(Consumer {
            stop,
            tasks,
            aborts,
        })
    }
}

/// Hands deliveries from intake to workers: one shared queue, or one queue
/// per worker chosen by key so that a key is always handled by one worker.
enum Dispatch {
    Shared(async_channel::Sender<Delivery>),
    Keyed {
        lanes: Vec<async_channel::Sender<Delivery>>,
        next: AtomicUsize,
    },
}

impl Dispatch {
    /// `buffer` is the subscription's prefetch: deliveries waiting here are
    /// already counted against it, so the buffer adds no memory beyond that bound.
    fn new(
        workers: usize,
        buffer: usize,
        keyed: bool,
    ) -> (Dispatch, Vec<async_channel::Receiver<Delivery>>) {
        if keyed {
            let lane = (buffer / workers).max(1);
            let (lanes, receivers) = (0..workers).map(|_| async_channel::bounded(lane)).unzip();
            (
                Dispatch::Keyed {
                    lanes,
                    next: AtomicUsize::new(0),
                },
                receivers,
            )
        } else {
            let (tx, rx) = async_channel::bounded(buffer.max(1));
            (Dispatch::Shared(tx), vec![rx; workers])
        }
    }

    async fn send(&self, delivery: Delivery) -> bool {
        let lane = match self {
            Dispatch::Shared(tx) => tx,
            Dispatch::Keyed { lanes, next } => {
                let index = match &delivery.message().key {
                    Some(key) => {
                        let mut h = DefaultHasher::new();
                        key.hash(&mut h);
                        h.finish() as usize
                    }
                    None => next.fetch_add(1, Ordering::Relaxed),
                };
                &lanes[index % lanes.len()]
            }
        };
        lane.send(delivery).await.is_ok()
    }
}

async fn intake(
    mut stream: Box<dyn DeliveryStream>,
    dispatch: Dispatch,
    mut stop: watch::Receiver<bool>,
) {
    // The stop signal is checked with a cheap read on every turn and only
    // raced (which registers a waker) while intake actually waits.
    while !*stop.borrow() {
        let item = tokio::select! {
            biased;
            item = stream.next() => item,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        match item {
            Some(Ok(delivery)) => {
                tokio::select! {
                    biased;
                    sent = dispatch.send(delivery) => if !sent { break },
                    // An undispatched delivery is dropped unsettled: redelivered later.
                    _ = stop.wait_for(|stop| *stop) => break,
                }
            }
            Some(Err(error)) => warn!(%error, "subscription error; the adapter recovers"),
            None => break,
        }
    }
    if let Err(error) = stream.close().await {
        warn!(%error, "closing the subscription failed");
    }
    // Workers drain their queues and end once `dispatch` is gone; the
    // adapter then finishes its close (Kafka's final commit and leaving the
    // group), so that when `shutdown` returns the next member of the group
    // starts after what this one settled, not before.
    drop(dispatch);
    stream.closed().await;
}

struct Route {
    stack: Arc<[Arc<dyn Middleware>]>,
    endpoint: Arc<dyn Endpoint>,
    retry: RetryPolicy,
    caps: Capabilities,
    observers: Arc<[Observer]>,
}

async fn worker(rx: async_channel::Receiver<Delivery>, route: Arc<Route>) {
    while let Ok(mut delivery) = rx.recv().await {
        route.process(&mut delivery).await;
    }
}

/// What to do with a delivery after an attempt.
enum Verdict {
    Ack,
    Nack(Duration),
    DeadLetter(DeadLetterReason, HandlerError),
}

impl Route {
    async fn run_once(&self, delivery: &Delivery) -> HandlerResult {
        let next = Next::new(&self.stack, &*self.endpoint);
        AssertUnwindSafe(next.run(delivery))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(HandlerError::retryable(Panicked::from(panic))))
    }

    fn verdict(&self, attempt: u32, result: HandlerResult) -> Verdict {
        match result {
            Ok(()) => Verdict::Ack,
            Err(error) => match error.dead_letter_reason() {
                Some(reason) => Verdict::DeadLetter(reason, error),
                None if attempt >= self.retry.max_attempts => {
                    Verdict::DeadLetter(DeadLetterReason::AttemptsExhausted, error)
                }
                None => {
                    let delay = error
                        .retry_after()
                        .unwrap_or_else(|| self.retry.backoff.delay(attempt));
                    Verdict::Nack(delay)
                }
            },
        }
    }

    async fn process(&self, delivery: &mut Delivery) {
        delivery.set_max_attempts(self.retry.max_attempts);
        let mut first_failure = first_failure_of(delivery);
        loop {
            let result = self.run_once(delivery).await;
            let attempt = delivery.attempt();
            let verdict = self.verdict(attempt, result);
            let (action, settled) = match verdict {
                Verdict::Ack => (SettleAction::Ack, delivery.ack().await),
                Verdict::Nack(delay) if self.caps.redelivery => {
                    debug!(
                        id = %delivery.message().id,
                        topic = delivery.topic(),
                        group = delivery.group(),
                        attempt,
                        ?delay,
                        "handler failed; redelivering"
                    );
                    (
                        SettleAction::Nack { delay },
                        delivery.nack(Some(delay)).await,
                    )
                }
                Verdict::Nack(delay) => {
                    // No redelivery from the broker: retry here.
                    first_failure.get_or_insert_with(SystemTime::now);
                    tokio::time::sleep(delay).await;
                    delivery.next_attempt();
                    continue;
                }
                Verdict::DeadLetter(reason, error) => {
                    let now = SystemTime::now();
                    let m = delivery.message();
                    warn!(
                        id = %m.id,
                        event_type = m.metadata.event_type.as_deref(),
                        correlation_id = m.metadata.correlation_id.as_deref(),
                        topic = delivery.topic(),
                        group = delivery.group(),
                        attempt,
                        %reason,
                        %error,
                        "dead-lettering message"
                    );
                    let letter = DeadLetter {
                        reason,
                        error: error.to_string(),
                        attempts: attempt,
                        first_failure: first_failure.or(Some(now)),
                        last_failure: now,
                        topic: delivery.topic().to_owned(),
                        group: delivery.group().map(str::to_owned),
                    };
                    (
                        SettleAction::DeadLetter { reason },
                        delivery.dead_letter(letter).await,
                    )
                }
            };
            if let Err(error) = &settled {
                warn!(id = %delivery.message().id, %error, "settling failed; the broker will redeliver");
            }
            if !self.observers.is_empty() {
                let settlement = Settlement {
                    delivery,
                    action,
                    result: settled.as_ref().map(|_| ()),
                };
                for observe in self.observers.iter() {
                    // An observer's panic must not take the worker with it.
                    if std::panic::catch_unwind(AssertUnwindSafe(|| observe(&settlement))).is_err()
                    {
                        warn!(
                            id = %delivery.message().id,
                            topic = delivery.topic(),
                            "a settlement observer panicked"
                        );
                    }
                }
            }
            return;
        }
    }
}

/// When the first attempt failed, from the header adapters carry on
/// redelivered copies; unknown when the broker redelivers the original.
fn first_failure_of(delivery: &Delivery) -> Option<SystemTime> {
    delivery
        .message()
        .headers
        .get(header::FIRST_FAILURE)
        .and_then(|v| humantime::parse_rfc3339_weak(v).ok())
}

/// A handler panicked; treated as a retryable failure.
#[derive(Debug, thiserror::Error)]
#[error("handler panicked: {0}")]
pub struct Panicked(String);

impl From<Box<dyn std::any::Any + Send>> for Panicked {
    fn from(panic: Box<dyn std::any::Any + Send>) -> Self {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        Panicked(text)
    }
}
