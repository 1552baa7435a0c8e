//! The in-process bus: Tidings without a broker.
//!
//! It keeps the semantics of the brokers so that a service tested on it
//! behaves the same on Redis, RabbitMQ, Kafka or NATS: groups (each group
//! gets every message, members of a group compete), private subscriptions,
//! nack with redelivery and a rising attempt count, delayed nack, dead
//! letters to `<group>.dlq`, a bound on unsettled deliveries per
//! subscription and a bound on queued messages per group.
//!
//! What it does not have: persistence. Messages live as long as the process;
//! a group keeps messages published after it was declared (by its first
//! subscription or [`declare_group`](Subscriber::declare_group)). With
//! [`MemoryConfig::history`] set it keeps the last messages of each topic, and a
//! new group or private subscription can start from the beginning or a time.
//!
//! [`Publisher::publish`] on this bus queues the message for every group
//! that has room when it is called, not when its future is first polled; the
//! future then only waits for room in a group that is full (up to
//! [`MemoryConfig::publish_timeout`]), so while no group is full messages
//! are queued in the order of the calls. (A property of this bus, not of
//! the `Publisher` trait: `publish_event` and publish layers start their
//! work when polled. As on a broker, a publish whose future is dropped may
//! have been published.)
//!
//! ```
//! use tidings_core::{Consumer, Event, HandlerError, PublisherExt};
//! use tidings_memory::MemoryBus;
//! # #[tokio::main] async fn main() -> tidings_core::Result<()> {
//! let bus = MemoryBus::new();
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let consumer = Consumer::group(bus.subscriber(), "greeter")
//!     .handle("user.registered", move |e: Event<String>| {
//!         let tx = tx.clone();
//!         async move { tx.send(e.data).map_err(HandlerError::permanent) }
//!     })
//!     .start()
//!     .await?;
//! bus.publish_event("user.registered", Event::new("ada".to_owned())).await?;
//! assert_eq!(rx.recv().await.as_deref(), Some("ada"));
//! consumer.shutdown(std::time::Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;

use tidings_core::health::{Health, HealthCheck, State};
use tidings_core::{
    Capabilities, DeliveryStream, Error, GroupStats, Message, Publisher, Receipt, Result,
    StartFrom, Subscriber, Subscription,
};

pub use tidings_core::delivery::DEAD_LETTER_GROUP;

mod queue;
mod stream;

use queue::{Body, Queue};
use stream::MemoryStream;

/// Settings of the in-process bus.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Most messages queued per group; publishing waits for room beyond that.
    ///
    /// A group's queue keeps the buffer it grew to, about 300 bytes per
    /// message it once held (messages are queued by value), for as long as
    /// the group exists: a group that once filled the default capacity
    /// keeps about 30 MB.
    pub group_capacity: usize,
    /// How long a publish waits for room before it fails with a timeout.
    pub publish_timeout: Duration,
    /// Messages kept per topic for replay (`StartFrom::Earliest` or a time);
    /// 0, the default, keeps none and replay is not offered.
    pub history: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            group_capacity: 100_000,
            publish_timeout: Duration::from_secs(30),
            history: 0,
        }
    }
}

impl MemoryConfig {
    /// Parses `memory://[?history=N&group_capacity=N&publish_timeout=30s]`.
    ///
    /// ```
    /// let config = tidings_memory::MemoryConfig::from_url("memory://?history=1000")?;
    /// assert_eq!(config.history, 1000);
    /// # Ok::<(), tidings_core::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        use tidings_core::params::{duration, invalid, number};
        let mut config = MemoryConfig::default();
        let query = url.split_once('?').map_or("", |(_, q)| q);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "history" => config.history = number(key, value)?,
                "group_capacity" => config.group_capacity = number::<usize>(key, value)?.max(1),
                "publish_timeout" => config.publish_timeout = duration(key, value)?,
                other => {
                    return Err(invalid(
                        other,
                        "unknown option; the in-process bus knows history, group_capacity, publish_timeout",
                    ));
                }
            }
        }
        Ok(config)
    }
}

/// The in-process bus: a [`Publisher`] and a [`Subscriber`] in one value.
///
/// Clones share the same bus.
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    config: MemoryConfig,
    topics: Mutex<Topics>,
    closed: AtomicBool,
}

/// Topics by name. Looked up on every publish: foldhash hashes a name in a
/// fraction of the default SipHash's time (names are the service's own, and
/// the map is seeded anyway).
type Topics = HashMap<String, Topic, foldhash::fast::RandomState>;

struct Topic {
    name: Arc<str>,
    groups: HashMap<String, Arc<Queue>>,
    private: Vec<Arc<Queue>>,
    /// The last messages published, for replay (bounded by `MemoryConfig::history`).
    history: VecDeque<Arc<Message>>,
}

impl Topic {
    fn new(name: &str) -> Topic {
        Topic {
            name: name.into(),
            groups: HashMap::new(),
            private: Vec::new(),
            history: VecDeque::new(),
        }
    }
}

impl MemoryBus {
    /// A new, empty bus with the default settings.
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A new, empty bus.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryBus {
            inner: Arc::new(Inner {
                config,
                topics: Mutex::default(),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// This bus as a shared publisher.
    pub fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.clone())
    }

    /// This bus as a shared subscriber.
    pub fn subscriber(&self) -> Arc<dyn Subscriber> {
        Arc::new(self.clone())
    }

    /// How many messages are queued (not yet handed out) for `group` on `topic`.
    pub fn queued(&self, topic: &str, group: &str) -> usize {
        self.inner
            .topics()
            .get(topic)
            .and_then(|t| t.groups.get(group))
            .map_or(0, |q| q.entries.len())
    }
}

impl Inner {
    fn topics(&self) -> MutexGuard<'_, Topics> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every update is a single insert or retain), so poisoning is ignored.
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queue of `group` (or a new private one), created if needed; a
    /// queue created now starts with the history `start` asks for.
    fn queue(&self, topic: &str, group: Option<&str>, start: StartFrom) -> (Arc<Queue>, Arc<str>) {
        let mut topics = self.topics();
        let t = topics
            .entry(topic.to_owned())
            .or_insert_with(|| Topic::new(topic));
        let capacity = self.config.group_capacity;
        let existing = group.and_then(|g| t.groups.get(g)).cloned();
        if let Some(queue) = existing {
            return (queue, t.name.clone());
        }
        let queue = Queue::new(capacity, t.name.clone(), group.map(Into::into));
        let replay = t.history.iter().filter(|m| match start {
            StartFrom::Latest => false,
            StartFrom::Earliest => true,
            StartFrom::Time(from) => m.metadata.time.is_some_and(|at| at >= from),
        });
        for message in replay {
            if !queue.try_push(message) {
                break;
            }
        }
        match group {
            Some(g) => {
                t.groups.insert(g.to_owned(), queue.clone());
            }
            None => t.private.push(queue.clone()),
        }
        (queue, t.name.clone())
    }

    fn remove_private(&self, topic: &str, queue: &Arc<Queue>) {
        if let Some(t) = self.topics().get_mut(topic) {
            t.private.retain(|q| !Arc::ptr_eq(q, queue));
        }
    }

    /// Queues `message` for every group and private subscription of
    /// `topic` that has room, at once; the queues that are full (rare) are
    /// waited for by the returned future, boxed only then, so the common
    /// publish carries no waiting machinery in its future.
    fn offer(
        &self,
        topic: &str,
        message: Message,
    ) -> Result<Option<BoxFuture<'static, Result<()>>>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("publisher"));
        }
        let (full, message) = {
            let mut topics = self.topics();
            let history = self.config.history;
            let t = match topics.get_mut(topic) {
                Some(t) => t,
                None if history > 0 => topics
                    .entry(topic.to_owned())
                    .or_insert_with(|| Topic::new(topic)),
                None => return Ok(None),
            };
            // The common case, one group with room and no history: the
            // message moves into its queue (see `Body`).
            if history == 0
                && t.groups.len() + t.private.len() == 1
                && let Some(only) = t.groups.values().chain(&t.private).next()
                && only.room.try_take_new()
            {
                only.push_taken(Body::Owned(message));
                return Ok(None);
            }
            let message = Arc::new(message);
            if history > 0 {
                if t.history.len() == history {
                    t.history.pop_front();
                }
                t.history.push_back(message.clone());
            }
            let full: Vec<Arc<Queue>> = t
                .groups
                .values()
                .chain(&t.private)
                .filter(|q| !q.try_push(&message))
                .cloned()
                .collect();
            if full.is_empty() {
                return Ok(None);
            }
            (full, message)
        };
        let wait = self.config.publish_timeout;
        Ok(Some(Box::pin(async move {
            for queue in full {
                queue.push(&message, wait).await?;
            }
            Ok(())
        })))
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        publishing(self.offer(topic, message)).await
    }
}

/// What is left of a publish once the message is offered: nothing unless a
/// group was full (then waiting for its room) or the bus closed.
fn publishing(
    offered: Result<Option<BoxFuture<'static, Result<()>>>>,
) -> BoxFuture<'static, Result<Receipt>> {
    match offered {
        Ok(None) => Box::pin(Accepted),
        Ok(Some(full)) => Box::pin(async move {
            full.await?;
            Ok(Receipt::Accepted)
        }),
        Err(error) => Box::pin(std::future::ready(Err(error))),
    }
}

/// A publish every group had room for: done. Zero-sized, so boxing it
/// allocates nothing (`std::future::Ready` holds its output, which is not).
struct Accepted;

impl std::future::Future for Accepted {
    type Output = Result<Receipt>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(Receipt::Accepted))
    }
}

#[async_trait]
impl Publisher for MemoryBus {
    /// Queues the message for every group at the call, not at the first
    /// poll: the future then only waits for room in a full group, and in
    /// the common case is a zero-sized one that boxes without allocating
    /// (the boxed `async` publish was the largest allocation per message).
    fn publish<'life0, 'life1, 'async_trait>(
        &'life0 self,
        topic: &'life1 str,
        message: Message,
    ) -> BoxFuture<'async_trait, Result<Receipt>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        publishing(self.inner.offer(topic, message))
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        Ok(())
    }
}

/// Always `connected`, until the bus is closed (`stopped`).
impl HealthCheck for MemoryBus {
    fn check(&self) -> BoxFuture<'_, Health> {
        let state = if self.inner.closed.load(Ordering::Acquire) {
            State::Stopped
        } else {
            State::Connected
        };
        Box::pin(async move { Health::new(state) })
    }
}

#[async_trait]
impl Subscriber for MemoryBus {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            persistent: false,
            replay: self.inner.config.history > 0,
            ..Capabilities::full()
        }
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        subscription.check(self.name(), self.capabilities())?;
        let (queue, _) = self.inner.queue(
            &subscription.topic,
            subscription.group.as_deref(),
            subscription.start,
        );
        Ok(Box::new(MemoryStream::new(
            self.inner.clone(),
            queue,
            subscription.prefetch,
            subscription.group.is_none(),
        )))
    }

    async fn declare_group(&self, topic: &str, group: &str) -> Result<()> {
        self.inner.queue(topic, Some(group), StartFrom::Latest);
        Ok(())
    }

    fn dead_letter_topic(&self, _topic: &str, group: &str) -> String {
        format!("{group}.dlq")
    }

    async fn groups(&self, topic: &str, named: &[String]) -> Result<Vec<GroupStats>> {
        let topics = self.inner.topics();
        let groups = topics.get(topic).map(|t| &t.groups);
        let wanted: Vec<String> = if named.is_empty() {
            let mut all: Vec<String> = groups.into_iter().flat_map(|g| g.keys().cloned()).collect();
            all.sort_unstable();
            all
        } else {
            named.to_vec()
        };
        let stats = |queue: &Queue| {
            let queued = queue.entries.len() as u64;
            let held = queue.room.held() as u64;
            (queued, held.saturating_sub(queued))
        };
        Ok(wanted
            .into_iter()
            .map(|group| {
                let mut out = GroupStats::new(group.as_str());
                if let Some(queue) = groups.and_then(|g| g.get(&group)) {
                    // Members are not counted: subscriptions share the
                    // group's queue, registering only while they wait.
                    let (lag, pending) = stats(queue);
                    (out.lag, out.pending) = (Some(lag), Some(pending));
                }
                let letters = topics
                    .get(&self.dead_letter_topic(topic, &group))
                    .and_then(|t| t.groups.get(DEAD_LETTER_GROUP));
                out.dead_letters = Some(letters.map_or(0, |q| {
                    let (lag, pending) = stats(q);
                    lag + pending
                }));
                out
            })
            .collect())
    }
}
