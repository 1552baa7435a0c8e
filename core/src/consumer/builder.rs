//! Building a consumer: its handlers, layers, limits, and starting it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::dispatch::{self, Source, Stop};
use super::routing::{self, Registration, Unhandled};
use super::settle::{Handling, Observer, Route, WorkerCounts};
use super::{Consumer, Counts, Settlement};
use crate::asyncapi::Described;
use crate::batch::{BatchEndpoint, BatchHandler, BatchOptions, ErasedBatch};
use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::extract::{self, Meta, StateMap};
use crate::handler::{Erased, Handler, HandlerError};
use crate::middleware::Middleware;
use crate::request::Replies;
use crate::retry::RetryPolicy;
use crate::subscriber::{StartFrom, Subscriber, Subscription};

/// One `handle_batch` call of the builder.
#[derive(Clone)]
struct BatchRegistration {
    topic: String,
    endpoint: Arc<dyn BatchEndpoint>,
    options: BatchOptions,
    name: &'static str,
}

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
///
/// A builder clones cheaply (its handlers and layers are shared), which is
/// how a host starts a consumer again after its subscription ended.
#[derive(Clone)]
#[must_use = "a consumer does nothing until started"]
pub struct ConsumerBuilder {
    subscriber: Arc<dyn Subscriber>,
    group: Option<String>,
    registrations: Vec<Registration>,
    batches: Vec<BatchRegistration>,
    state: StateMap,
    unhandled: Unhandled,
    stack: Vec<Arc<dyn Middleware>>,
    concurrency: usize,
    prefetch: Option<usize>,
    ordered_by_key: bool,
    retry: RetryPolicy,
    start: StartFrom,
    observers: Vec<Observer>,
    dialect: Option<crate::Dialect>,
}

impl ConsumerBuilder {
    pub(super) fn new(subscriber: Arc<dyn Subscriber>, group: Option<String>) -> Self {
        ConsumerBuilder {
            subscriber,
            group,
            registrations: Vec::new(),
            batches: Vec::new(),
            state: StateMap::default(),
            unhandled: Unhandled::default(),
            stack: Vec::new(),
            concurrency: 16,
            prefetch: None,
            ordered_by_key: false,
            retry: RetryPolicy::default(),
            start: StartFrom::Latest,
            observers: Vec::new(),
            dialect: None,
        }
    }

    /// Registers `handler` for `topic`: it takes every message of the topic
    /// that no handler registered for its event type takes
    /// ([`handle_type`](Self::handle_type)). A second untyped handler for
    /// the same topic is refused at [`start`](Self::start).
    pub fn handle<H, Args>(self, topic: impl Into<String>, handler: H) -> Self
    where
        H: Handler<Args>,
        Args: 'static,
    {
        self.register(topic.into(), Described::default(), handler)
    }

    /// Registers `handler` for the messages of `topic` whose event type is
    /// `event_type`. Messages of a type no handler takes go to the topic's
    /// untyped handler if it has one, else where [`unhandled`](Self::unhandled)
    /// says (dead-lettered by default). Two handlers for the same topic and
    /// type are refused at [`start`](Self::start), naming both.
    pub fn handle_type<H, Args>(
        self,
        topic: impl Into<String>,
        event_type: impl Into<String>,
        handler: H,
    ) -> Self
    where
        H: Handler<Args>,
        Args: 'static,
    {
        let described = Described {
            event_type: Some(event_type.into()),
            ..Described::default()
        };
        self.register(topic.into(), described, handler)
    }

    /// Registers `handler` for the messages of `topic` of the event type `T`
    /// declares ([`EventType`](crate::event::EventType)):
    /// `.on::<UserRegistered, _, _>("users", welcome)`.
    pub fn on<T, H, Args>(self, topic: impl Into<String>, handler: H) -> Self
    where
        T: crate::event::EventType,
        H: Handler<Args>,
        Args: 'static,
    {
        self.register(topic.into(), Described::of::<T>(), handler)
    }

    fn register<H, Args>(mut self, topic: String, described: Described, handler: H) -> Self
    where
        H: Handler<Args>,
        Args: 'static,
    {
        self.registrations.push(Registration {
            topic,
            event_type: described.event_type.clone(),
            endpoint: Arc::new(Erased::new(handler)),
            name: std::any::type_name::<H>(),
            described,
        });
        self
    }

    /// The group this consumer joins; `None` for private subscriptions.
    pub fn group_name(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// Each handler's topic and what it takes, for the AsyncAPI document.
    pub(crate) fn described(&self) -> Vec<(String, Described)> {
        self.registrations
            .iter()
            .map(|r| (r.topic.clone(), r.described.clone()))
            .chain(
                self.batches
                    .iter()
                    .map(|b| (b.topic.clone(), Described::default())),
            )
            .collect()
    }

    /// Registers a request handler for `topic` ([`request`](crate::request)):
    /// it returns the reply, which the runtime publishes to the request's
    /// reply topic (with the request's id as correlation id) before the
    /// request is acked. A failed handler is settled as any other (retried,
    /// dead-lettered); when it fails with a permanent error the requester
    /// gets the error at once; when it runs out of attempts the requester
    /// times out.
    /// Replies go out through the [`Replies`]
    /// state (`Bus::consumer` registers it; refused at start without it).
    pub fn handle_request<Req, Resp, C, F, Fut>(self, topic: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Event<Req, C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Resp, HandlerError>> + Send + 'static,
        C: Codec<Req> + Codec<Resp>,
        Req: Send + 'static,
        Resp: Send + 'static,
    {
        let handler = Arc::new(handler);
        self.handle(
            topic,
            move |request: Event<Req, C>, meta: Meta, replies: extract::State<Replies>| {
                let handler = handler.clone();
                async move { crate::request::respond(&*handler, request, meta, replies).await }
            },
        )
    }

    /// Registers a batch handler for `topic` ([`batch`](crate::batch)): it
    /// gets up to `options.max` events at once and says which failed; each
    /// message is settled by its own outcome (acked, retried, dead-lettered)
    /// as a single handler's would be. The consumer's middleware does not
    /// run around batch handlers (layers see one delivery at a time), and a
    /// topic has either one batch handler or single ones.
    pub fn handle_batch<H, Args>(
        mut self,
        topic: impl Into<String>,
        options: BatchOptions,
        handler: H,
    ) -> Self
    where
        H: BatchHandler<Args>,
        Args: 'static,
    {
        self.batches.push(BatchRegistration {
            topic: topic.into(),
            endpoint: Arc::new(ErasedBatch::new(handler)),
            options,
            name: std::any::type_name::<H>(),
        });
        self
    }

    /// What becomes of a message whose event type no handler of its topic
    /// takes: dead-lettered as `unhandled-type` (the default) or acked.
    pub fn unhandled(mut self, unhandled: Unhandled) -> Self {
        self.unhandled = unhandled;
        self
    }

    /// Registers shared state, handed to handlers that take
    /// [`State<T>`](crate::extract::State) (one value per type; cloned per
    /// call, so share what is expensive behind an `Arc`).
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.state.insert(value);
        self
    }

    /// Adds a middleware around every handler of this consumer. The first
    /// layer added is the outermost: it sees the delivery first.
    pub fn layer(mut self, middleware: impl Middleware) -> Self {
        self.stack.push(Arc::new(middleware));
        self
    }

    /// How many messages of each topic are handled at once (default 16).
    /// Workers join in as handlers wait (on I/O, timers): while handlers
    /// finish without waiting, one worker reads and handles in turn, and
    /// another joins every few dozen messages to spread the work over the
    /// runtime's threads.
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
    /// received; messages with different keys still run concurrently, and a
    /// slow or failing key holds up only its own messages (they wait, within
    /// the prefetch bound, while other keys go on). A redelivered message
    /// comes back after the ones received meanwhile.
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

    /// Reads this consumer's messages in `dialect` instead of the adapter's
    /// configured one (see [`Dialect`](crate::Dialect)).
    pub fn dialect(mut self, dialect: crate::Dialect) -> Self {
        self.dialect = Some(dialect);
        self
    }

    /// Where subscriptions start (replay). Applies when the group is created.
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Subscribes to every topic and starts handling. Returns once every
    /// subscription is in place: messages published afterwards reach it.
    ///
    /// When a subscription fails, the error is returned once the topics
    /// subscribed before it have been shut down (their handlers given up to
    /// 10 s to finish what they took): nothing of this consumer runs after
    /// a failed `start`.
    pub async fn start(self) -> Result<Consumer> {
        if self.registrations.is_empty() && self.batches.is_empty() {
            return Err(Error::Config {
                key: "handle".into(),
                message: "a consumer needs at least one handler".into(),
            });
        }
        let routes = routing::by_topic(self.registrations, self.unhandled)?;
        let mut routes: Vec<(String, Handling)> = routes
            .into_iter()
            .map(|(topic, endpoint)| (topic, Handling::One(endpoint)))
            .collect();
        for batch in self.batches {
            if routes.iter().any(|(topic, _)| *topic == batch.topic) {
                return Err(Error::Config {
                    key: "handle_batch".into(),
                    message: format!(
                        "topic `{}` has a batch handler (`{}`) and another handler: a topic has one batch handler or single ones",
                        batch.topic, batch.name
                    ),
                });
            }
            if self.ordered_by_key {
                return Err(Error::Config {
                    key: "handle_batch".into(),
                    message: "batch handlers and ordered_by_key do not mix: a batch is handled at once, not key by key".into(),
                });
            }
            routes.push((batch.topic, Handling::Batch(batch.endpoint, batch.options)));
        }
        for (topic, handling) in &routes {
            let Handling::One(endpoint) = handling else {
                continue;
            };
            if let Some((_, name)) = endpoint
                .needs_state()
                .into_iter()
                .find(|(id, _)| !self.state.contains(*id))
            {
                return Err(Error::Config {
                    key: "state".into(),
                    message: format!(
                        "a handler of `{topic}` takes State<{name}>, and no state of that type was registered (ConsumerBuilder::state)"
                    ),
                });
            }
        }
        let state = (!self.state.is_empty()).then(|| Arc::new(self.state));
        let name = self.subscriber.name();
        let caps = self.subscriber.capabilities();
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| (self.concurrency * 2).max(32));
        let mut subscriptions = Vec::with_capacity(routes.len());
        for (topic, _) in &routes {
            let subscription = Subscription {
                topic: topic.clone(),
                group: self.group.clone(),
                prefetch,
                start: self.start,
                dialect: self.dialect.clone(),
            };
            subscription.check(name, caps)?;
            subscriptions.push(subscription);
        }
        let stack: Arc<[Arc<dyn Middleware>]> = self.stack.into();
        let observers: Arc<[Observer]> = self.observers.into();
        let (stop, signal) = watch::channel(false);
        let stopping = Stop::new(signal);
        let mut tasks = Vec::new();
        let mut sources = Vec::new();
        let mut counts = Counts::default();
        let ended = Arc::new(watch::channel(false).0);
        for ((_, handling), subscription) in routes.into_iter().zip(subscriptions) {
            let stream = match self.subscriber.subscribe(subscription).await {
                Ok(stream) => stream,
                Err(error) => {
                    // The routes subscribed so far already run: stop them as
                    // a shutdown would, so that nothing of this consumer
                    // handles messages once `start` has failed (and their
                    // end is not taken for a subscription ending on its own).
                    let started =
                        Consumer::from_parts(stop, stopping, tasks, sources, counts, ended);
                    started.shutdown(START_FAILED_DRAIN).await;
                    return Err(error);
                }
            };
            let source = Arc::new(Source::new(stream, self.ordered_by_key, ended.clone()));
            let route = Arc::new(Route {
                stack: stack.clone(),
                handling,
                retry: self.retry,
                caps,
                observers: observers.clone(),
                state: state.clone(),
            });
            // Every worker holds a sender; the closer sees the channel end
            // when the last one is gone.
            let (alive, workers) = mpsc::channel(1);
            for _ in 0..self.concurrency {
                let worker = Arc::new(WorkerCounts::default());
                counts.workers.push(worker.clone());
                tasks.push(tokio::spawn(dispatch::supervised_worker(
                    source.clone(),
                    route.clone(),
                    worker,
                    stopping.clone(),
                    counts.restarts.clone(),
                    alive.clone(),
                )));
            }
            drop(alive);
            tasks.push(tokio::spawn(dispatch::close(
                source.clone(),
                stopping.clone(),
                workers,
            )));
            sources.push(source);
        }
        Ok(Consumer::from_parts(
            stop, stopping, tasks, sources, counts, ended,
        ))
    }
}

/// How long a consumer whose `start` failed midway gives the routes it had
/// already started to finish what they took (a shutdown's deadline).
const START_FAILED_DRAIN: Duration = Duration::from_secs(10);
