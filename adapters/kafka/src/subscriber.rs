//! Subscribing: a consumer per subscription, manual offsets, retry topics.
//!
//! Each subscription runs one librdkafka consumer on its own thread (the
//! "engine"). The engine polls, turns records into deliveries and hands them
//! to the [`DeliveryStream`] through a channel; it pauses partitions when the
//! channel is full or when a retried copy must wait. The stream passes each
//! record through a gate that holds it back while an earlier record of its
//! lane (its partition, or its key in the partition, per
//! [`PartitionOrder`]) is unsettled; the acker releases the lane. Settlements update a
//! per-partition ledger behind a mutex; the engine commits, for each
//! partition, the lowest offset that is not settled yet (everything below it
//! is settled), never past an unsettled message, whatever order handlers
//! finish in.
//!
//! Rebalances run on the engine thread (librdkafka calls back from `poll`):
//! on revoke the ledger entries of the revoked partitions are retired (the
//! stream discards their buffered records), the callback waits up to
//! `revoke_timeout` for their in-flight deliveries (settlements never need the
//! engine thread, so this cannot deadlock), commits and releases them; on
//! assign it resumes from the committed offsets, or from the start position
//! recorded when the subscription was made for partitions without one.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use futures::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList as Tpl};
use tidings_core::delivery::DEAD_LETTER_GROUP;
use tidings_core::dialect::Undecodable;
use tidings_core::in_flight::{InFlight, PollInFlight, Slot};
use tidings_core::{
    Acker, Capabilities, DeadLetter, Delivery, DeliveryStream, Dialect, Error, Message, MessageId,
    Receipt, Result, StartFrom, Subscriber, Subscription,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::config::{KafkaConfig, PartitionOrder};
use crate::headers;
use crate::publisher::KafkaPublisher;

const NAME: &str = "kafka";

/// The retry topic of `group` on `topic`: `<topic>.retry.<group>`.
pub fn retry_topic(topic: &str, group: &str) -> String {
    format!("{topic}.retry.{group}")
}

/// The dead-letter topic of `group` on `topic`: `<topic>.<group>.dlq`.
pub fn dead_letter_topic(topic: &str, group: &str) -> String {
    format!("{topic}.{group}.dlq")
}

/// Subscribes to Kafka topics: a consumer group per Tidings group, a
/// group-less assignment for private subscriptions.
#[derive(Clone)]
pub struct KafkaSubscriber {
    config: Arc<KafkaConfig>,
    sender: KafkaPublisher,
}

impl KafkaSubscriber {
    pub(crate) fn new(config: Arc<KafkaConfig>, sender: KafkaPublisher) -> Self {
        KafkaSubscriber { config, sender }
    }
}

/// The capabilities of the Kafka adapter.
pub const CAPABILITIES: Capabilities = Capabilities::at_least_once();

#[async_trait]
impl Subscriber for KafkaSubscriber {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        subscription.check(self.name(), self.capabilities())?;
        let config = self.config.clone();
        let (ready_tx, ready_rx) = oneshot::channel();
        // The dead-letter tooling holds the letters it lists until an
        // operator replays or purges them: one held letter per partition
        // would hide the rest, and no handler's order is at stake.
        let ordering = if subscription.group.as_deref() == Some(DEAD_LETTER_GROUP) {
            PartitionOrder::None
        } else {
            config.ordering
        };
        let shared = Arc::new(Shared::new(subscription.prefetch, ordering));
        let (tx, rx) = mpsc::unbounded_channel();
        let setup = Setup {
            config: config.clone(),
            subscription: subscription.clone(),
            shared: shared.clone(),
            tx: tx.clone(),
        };
        std::thread::Builder::new()
            .name(format!("tidings-kafka-{}", subscription.topic))
            .spawn(move || engine(setup, ready_tx))
            .map_err(|e| Error::Subscribe {
                topic: subscription.topic.clone(),
                source: Box::new(e),
            })?;
        let limit = config.operation_timeout * 3;
        match tokio::time::timeout(limit, ready_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) => {
                return Err(Error::Subscribe {
                    topic: subscription.topic.clone(),
                    source: "the consumer thread ended during setup".into(),
                });
            }
            Err(_) => {
                shared.closing.store(true, Ordering::Release);
                return Err(Error::Timeout {
                    operation: "subscribing",
                    after: limit,
                });
            }
        }
        let group: Option<Arc<str>> = subscription.group.as_deref().map(Arc::from);
        let topic: Arc<str> = subscription.topic.as_str().into();
        let dialect = subscription
            .dialect
            .clone()
            .unwrap_or_else(|| config.dialect.clone());
        let ctx = Arc::new(StreamCtx {
            retry_topic: group.as_deref().map(|g| retry_topic(&topic, g)),
            dlq_topic: dead_letter_topic(&topic, group.as_deref().unwrap_or("private")),
            topic,
            group,
            shared: shared.clone(),
            // Retried copies are read back by this subscription: its dialect.
            sender: self.sender.in_dialect(dialect.clone()),
            tx,
            // The engine waits up to close_timeout for settlements, then the
            // consumer's close makes a revoke commit and leaves the group.
            close_wait: config
                .close_timeout
                .saturating_add(config.revoke_timeout)
                .saturating_add(config.operation_timeout.saturating_mul(2)),
        });
        Ok(Box::new(KafkaStream {
            rx,
            in_flight: PollInFlight::new(shared.in_flight.clone()),
            slot: None,
            ctx,
            closed: false,
        }))
    }

    async fn declare_group(&self, topic: &str, group: &str) -> Result<()> {
        let config = self.config.clone();
        let (topic, group) = (topic.to_owned(), group.to_owned());
        let limit = config.operation_timeout * 3;
        run_blocking("declaring the group", limit, move || {
            declare(&config, &topic, &group)
        })
        .await
    }

    fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        dead_letter_topic(topic, group)
    }

    /// Lag from committed offsets and watermarks. Kafka lists groups only
    /// through its admin API (ListGroups), which not every deployment
    /// allows, so the groups must be named.
    async fn groups(&self, topic: &str, named: &[String]) -> Result<Vec<tidings_core::GroupStats>> {
        if named.is_empty() {
            return Err(Error::Unsupported {
                adapter: NAME,
                what: "listing a topic's groups; name them (`--group billing`)".into(),
            });
        }
        let admin = crate::KafkaAdmin::new(self.config.clone());
        let mut out = Vec::new();
        for group in named {
            let mut stats = tidings_core::GroupStats::new(group.as_str());
            let positions = admin.positions(topic, group).await?;
            if positions.iter().any(|p| p.committed.is_some()) {
                stats.lag = Some(positions.iter().map(|p| p.behind()).sum());
            }
            let letters = admin
                .positions(&dead_letter_topic(topic, group), DEAD_LETTER_GROUP)
                .await?;
            stats.dead_letters = Some(letters.iter().map(|p| p.behind()).sum());
            out.push(stats);
        }
        Ok(out)
    }
}

/// How long a revoke waits for the letters a dead-letter inbox holds.
const DEAD_LETTER_REVOKE_TIMEOUT: Duration = Duration::from_secs(240);

/// Runs a blocking librdkafka call on its own thread (never a runtime
/// thread: client drops can block), bounded by `limit`.
pub(crate) async fn run_blocking<T: Send + 'static>(
    operation: &'static str,
    limit: Duration,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("tidings-kafka-op".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| Error::Broker {
            broker: NAME,
            source: Box::new(e),
        })?;
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(Error::Broker {
            broker: NAME,
            source: format!("{operation}: the worker thread ended").into(),
        }),
        Err(_) => Err(Error::Timeout {
            operation,
            after: limit,
        }),
    }
}

fn broker_err(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Broker {
        broker: NAME,
        source: Box::new(e),
    }
}

/// Makes sure the topic (and, for groups, its retry and dead-letter topics)
/// exists: asks for its metadata, which creates it where the broker creates
/// topics on request; where it does not (`auto.create.topics.enable=false`,
/// common in production, or brokers without it), creates it through the
/// Admin API with the configured partitions and replication, when
/// `auto_create_topics` is on. Returns the partition count.
fn ensure_topic<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    config: &KafkaConfig,
    topic: &str,
) -> Result<i32> {
    let deadline = Instant::now() + config.operation_timeout;
    let mut missing = 0;
    loop {
        let metadata = consumer
            .fetch_metadata(Some(topic), config.operation_timeout)
            .map_err(|e| Error::Connection {
                broker: NAME,
                source: Box::new(e),
            })?;
        let listed = metadata.topics().iter().find(|t| t.name() == topic);
        let found = listed
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32);
        // Unknown (rather than, say, without a leader yet): the broker did
        // not create it on request.
        let unknown = listed.is_none_or(|t| {
            t.error()
                == Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
        });
        match found {
            Some(n) => return Ok(n),
            None if !config.auto_create_topics => {
                return Err(Error::Subscribe {
                    topic: topic.to_owned(),
                    source: format!(
                        "topic `{topic}` does not exist; create it (KafkaAdmin::create_group_topics \
                         creates a topic with its retry and dead-letter topics) or enable auto_create_topics"
                    )
                    .into(),
                });
            }
            None if Instant::now() >= deadline => {
                return Err(Error::Timeout {
                    operation: "creating a topic",
                    after: config.operation_timeout,
                });
            }
            None => {
                if unknown {
                    missing += 1;
                }
                // Unknown twice: the broker does not create topics on a
                // metadata request (one that does answers the second one).
                // Created with the broker's default partitions and
                // replication, so the operator's settings hold; a refusal
                // (policy, authorization) is the error to report.
                if missing == 2 {
                    info!(topic, "creating the topic through the Admin API");
                    let left = deadline.saturating_duration_since(Instant::now());
                    crate::admin::create_topics_blocking(config, &[topic], -1, -1, left).map_err(
                        |e| Error::Subscribe {
                            topic: topic.to_owned(),
                            source: Box::new(e),
                        },
                    )?;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Start offsets per partition of `topic` for `start`.
fn start_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    config: &KafkaConfig,
    topic: &str,
    partitions: i32,
    start: StartFrom,
) -> Result<HashMap<(String, i32), Offset>> {
    let mut out = HashMap::new();
    match start {
        StartFrom::Earliest => {
            for p in 0..partitions {
                out.insert((topic.to_owned(), p), Offset::Beginning);
            }
        }
        StartFrom::Latest => {
            for p in 0..partitions {
                let (_, high) = consumer
                    .fetch_watermarks(topic, p, config.operation_timeout)
                    .map_err(broker_err)?;
                out.insert((topic.to_owned(), p), Offset::Offset(high));
            }
        }
        StartFrom::Time(t) => {
            let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64;
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition_offset(topic, p, Offset::Offset(ms))
                    .map_err(broker_err)?;
            }
            let found = consumer
                .offsets_for_times(tpl, config.operation_timeout)
                .map_err(broker_err)?;
            for e in found.elements() {
                let offset = match e.offset() {
                    Offset::Offset(n) if n >= 0 => Offset::Offset(n),
                    _ => Offset::End,
                };
                out.insert((topic.to_owned(), e.partition()), offset);
            }
        }
    }
    Ok(out)
}

/// Declares a group: its topics exist and it has a committed offset at the
/// end of every partition that had none, so later messages are kept for it.
fn declare(config: &KafkaConfig, topic: &str, group: &str) -> Result<()> {
    let consumer: BaseConsumer = config.consumer(Some(group)).create().map_err(broker_err)?;
    let result = (|| {
        let retry = retry_topic(topic, group);
        let mut tpl = TopicPartitionList::new();
        let mut starts = HashMap::new();
        for (t, start) in [
            (topic, StartFrom::Latest),
            (retry.as_str(), StartFrom::Earliest),
        ] {
            let n = ensure_topic(&consumer, config, t)?;
            for p in 0..n {
                tpl.add_partition(t, p);
            }
            if start == StartFrom::Latest {
                starts.extend(start_offsets(&consumer, config, t, n, start)?);
            } else {
                for p in 0..n {
                    let (low, _) = consumer
                        .fetch_watermarks(t, p, config.operation_timeout)
                        .map_err(broker_err)?;
                    starts.insert((t.to_owned(), p), Offset::Offset(low));
                }
            }
        }
        ensure_topic(&consumer, config, &dead_letter_topic(topic, group))?;
        let committed = consumer
            .committed_offsets(tpl, config.operation_timeout)
            .map_err(broker_err)?;
        let mut commit = TopicPartitionList::new();
        for e in committed.elements() {
            if !matches!(e.offset(), Offset::Offset(n) if n >= 0)
                && let Some(o) = starts.get(&(e.topic().to_owned(), e.partition()))
            {
                commit
                    .add_partition_offset(e.topic(), e.partition(), *o)
                    .map_err(broker_err)?;
            }
        }
        if commit.count() > 0
            && let Err(e) = consumer.commit(&commit, CommitMode::Sync)
        {
            // A group with members rejects commits from outside; it has state already.
            debug!(%e, group, "declaring: the group exists already");
        }
        Ok(())
    })();
    drop(consumer);
    result
}

/// Per-partition settlement ledger.
struct Part {
    generation: u64,
    /// Yielded and not settled yet.
    pending: BTreeSet<i64>,
    /// Dropped unsettled: never committed past.
    abandoned: BTreeSet<i64>,
    /// One past the highest offset yielded; -1 before the first.
    next: i64,
    /// The last committed position; -1 when unknown.
    committed: i64,
}

impl Part {
    /// The offset to commit: everything below it is settled.
    fn position(&self) -> Option<i64> {
        let floor = [self.pending.first(), self.abandoned.first()]
            .into_iter()
            .flatten()
            .min()
            .copied();
        let pos = floor.unwrap_or(self.next);
        (pos >= 0 && pos > self.committed).then_some(pos)
    }
}

#[derive(Default)]
struct State {
    parts: HashMap<(Arc<str>, i32), Part>,
    generation: u64,
    dirty: bool,
    /// Bumped on every assignment change, so the engine re-applies pauses.
    assignment: u64,
    /// The settled prefix this member last reached per partition. A broker
    /// may reject the commit made on revoke (a group in rebalance); when the
    /// partition comes back, the higher of this and the committed offset wins.
    known: HashMap<(Arc<str>, i32), i64>,
}

struct Shared {
    state: Mutex<State>,
    settled: Condvar,
    in_flight: InFlight,
    /// Deliveries handed out and not settled or dropped yet.
    live: AtomicUsize,
    /// Records in the channel, not yet taken by the stream.
    queued: AtomicUsize,
    /// The stream was closed or dropped.
    closing: AtomicBool,
    /// Past the close deadline: revokes no longer wait.
    abandon: AtomicBool,
    buffer: usize,
    /// Holds back records whose lane has an unsettled delivery.
    gate: Gate,
    /// Set when the engine thread ended: final commit made, consumer
    /// closed, group left.
    done: tokio::sync::watch::Sender<bool>,
}

/// Sets [`Shared::done`] when dropped, after everything else of the engine thread.
struct Done(Arc<Shared>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.done.send_replace(true);
    }
}

impl Shared {
    fn new(prefetch: usize, order: PartitionOrder) -> Self {
        Shared {
            state: Mutex::default(),
            settled: Condvar::new(),
            in_flight: InFlight::new(prefetch),
            live: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            // Records fetched but not yet handed out. Pausing is costly
            // (librdkafka drops a paused partition's prefetched records and
            // fetches them again on resume), so the buffer is kept well above
            // the prefetch: measured, a buffer equal to a prefetch of 1,000
            // stalled intake to 0.3 of bare rdkafka, 4,096 reached parity.
            buffer: (prefetch * 4).clamp(4096, 16384),
            gate: Gate {
                order,
                state: Mutex::default(),
            },
            done: tokio::sync::watch::channel(false).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few field writes; a panic cannot leave it half done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn assign(&self, tpl: &Tpl) {
        let mut st = self.lock();
        st.generation += 1;
        st.assignment += 1;
        let generation = st.generation;
        for e in tpl.elements() {
            st.parts.insert(
                (Arc::from(e.topic()), e.partition()),
                Part {
                    generation,
                    pending: BTreeSet::new(),
                    abandoned: BTreeSet::new(),
                    next: -1,
                    committed: match e.offset() {
                        Offset::Offset(n) => n,
                        _ => -1,
                    },
                },
            );
        }
    }

    /// Waits (bounded) for the in-flight deliveries of `keys`, then retires
    /// them and returns what to commit.
    fn retire(&self, keys: &[(Arc<str>, i32)], wait: Duration) -> TopicPartitionList {
        let deadline = Instant::now() + wait;
        let mut st = self.lock();
        loop {
            let busy = keys
                .iter()
                .any(|k| st.parts.get(k).is_some_and(|p| !p.pending.is_empty()));
            let now = Instant::now();
            if !busy || now >= deadline || self.abandon.load(Ordering::Acquire) {
                if busy {
                    warn!(
                        "revoke: in-flight deliveries did not settle in time; they will be redelivered"
                    );
                }
                break;
            }
            st = match self.settled.wait_timeout(st, deadline - now) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
        let mut commit = TopicPartitionList::new();
        for k in keys {
            // The full position, even if an async commit already sent it:
            // that one may have failed in the rebalance.
            if let Some(mut p) = st.parts.remove(k)
                && let Some(pos) = {
                    p.committed = -1;
                    p.position()
                }
            {
                let _ = commit.add_partition_offset(&k.0, k.1, Offset::Offset(pos));
                st.known.insert(k.clone(), pos);
            }
        }
        st.assignment += 1;
        commit
    }

    /// Positions to commit now, marked as committed.
    fn due(&self) -> Option<TopicPartitionList> {
        let mut st = self.lock();
        if !st.dirty {
            return None;
        }
        st.dirty = false;
        let mut tpl = TopicPartitionList::new();
        let mut known = Vec::new();
        for ((topic, partition), part) in st.parts.iter_mut() {
            if let Some(pos) = part.position() {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(pos));
                part.committed = pos;
                known.push(((topic.clone(), *partition), pos));
            }
        }
        st.known.extend(known);
        (tpl.count() > 0).then_some(tpl)
    }

    /// Makes the next [`due`](Shared::due) send every settled position again.
    fn recommit(&self) {
        let mut st = self.lock();
        for p in st.parts.values_mut() {
            p.committed = -1;
        }
        st.dirty = true;
    }

    /// Whether the partition is still assigned in the same generation as
    /// when a record of it was handed out.
    fn owns(&self, key: &(Arc<str>, i32), generation: u64) -> bool {
        self.lock()
            .parts
            .get(key)
            .is_some_and(|p| p.generation == generation)
    }

    fn settle(&self, key: &(Arc<str>, i32), generation: u64, offset: i64, abandoned: bool) {
        let mut st = self.lock();
        if let Some(p) = st.parts.get_mut(key)
            && p.generation == generation
        {
            p.pending.remove(&offset);
            if abandoned {
                p.abandoned.insert(offset);
            }
            st.dirty = true;
        }
        drop(st);
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.settled.notify_all();
    }
}

/// An ordering lane: a partition, or a key inside a partition (by hash: a
/// collision only makes two keys wait for each other).
type Lane = ((Arc<str>, i32), Option<u64>);

/// Per-partition ordering ([`PartitionOrder`]): a record whose lane has an
/// unsettled delivery is parked here (still counted in `Shared::queued`, so
/// intake back-pressure covers it) until the acker of that delivery releases
/// the lane; records of other lanes pass. Only the stream reserves a lane;
/// only the acker (or the stream, for a record it discards) releases it.
struct Gate {
    order: PartitionOrder,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    /// Lanes with a delivery out, or with a record released to `ready`.
    busy: HashSet<Lane>,
    /// Records waiting for their lane, in fetch order. Non-empty only for busy lanes.
    parked: HashMap<Lane, VecDeque<Item>>,
    /// Records whose lane was released to them, for the stream to take.
    ready: VecDeque<Item>,
    /// The stream's waker, woken when `ready` gains a record.
    waker: Option<Waker>,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lane of a record of partition `key` with message key `message_key`.
    fn lane(&self, key: &(Arc<str>, i32), message_key: Option<&str>) -> Option<Lane> {
        match self.order {
            PartitionOrder::None => None,
            PartitionOrder::Partition => Some((key.clone(), None)),
            PartitionOrder::Key => message_key.map(|k| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                k.hash(&mut h);
                (key.clone(), Some(h.finish()))
            }),
        }
    }

    /// A record released to the stream (its lane is reserved for it), or
    /// none, with the stream's waker registered under the same lock.
    fn ready(&self, waker: &Waker) -> Option<Item> {
        let mut st = self.lock();
        let item = st.ready.pop_front();
        if item.is_none() && !st.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            st.waker = Some(waker.clone());
        }
        item
    }

    /// A record from the channel: returned with its lane reserved if the lane
    /// is free (or it has none), parked otherwise.
    fn enter(&self, item: Item) -> Option<Item> {
        let Some(lane) = &item.lane else {
            return Some(item);
        };
        let mut st = self.lock();
        if st.busy.contains(lane) {
            let lane = lane.clone();
            st.parked.entry(lane).or_default().push_back(item);
            None
        } else {
            st.busy.insert(lane.clone());
            Some(item)
        }
    }

    /// The delivery holding `lane` was settled or dropped: the lane's next
    /// parked record is released to the stream, or the lane becomes free.
    fn release(&self, lane: &Lane) {
        let mut st = self.lock();
        let next = match st.parked.get_mut(lane) {
            Some(queue) => {
                let next = queue.pop_front();
                if queue.is_empty() {
                    st.parked.remove(lane);
                }
                next
            }
            None => None,
        };
        let waker = match next {
            Some(item) => {
                st.ready.push_back(item);
                st.waker.take()
            }
            None => {
                st.busy.remove(lane);
                None
            }
        };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The consumer context: rebalances on the engine thread.
struct Ctx {
    shared: Arc<Shared>,
    starts: Mutex<HashMap<(String, i32), Offset>>,
    revoke_timeout: Duration,
    operation_timeout: Duration,
}

impl ClientContext for Ctx {}

impl Ctx {
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &Tpl) {
        let keys: Vec<(Arc<str>, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (Arc::from(e.topic()), e.partition()))
            .collect();
        let commit = self.shared.retire(&keys, self.revoke_timeout);
        if commit.count() > 0
            && let Err(e) = consumer.commit(&commit, CommitMode::Sync)
        {
            warn!(%e, "commit on revoke failed; the new owner may see settled messages again");
        }
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut Tpl) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut assign = tpl.clone();
                let starts = self
                    .starts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let known = self.shared.lock().known.clone();
                match consumer.committed_offsets(tpl.clone(), self.operation_timeout) {
                    Ok(committed) => {
                        for e in committed.elements() {
                            let ours = known.get(&(Arc::from(e.topic()), e.partition())).copied();
                            let offset = match (e.offset(), ours) {
                                (Offset::Offset(n), Some(k)) if n >= 0 => Offset::Offset(n.max(k)),
                                (_, Some(k)) => Offset::Offset(k),
                                (Offset::Offset(n), None) if n >= 0 => Offset::Offset(n),
                                _ => starts
                                    .get(&(e.topic().to_owned(), e.partition()))
                                    .copied()
                                    .unwrap_or(Offset::Invalid),
                            };
                            let _ = assign.set_partition_offset(e.topic(), e.partition(), offset);
                        }
                    }
                    Err(e) => {
                        warn!(%e, "reading committed offsets on assign failed; using the stored ones")
                    }
                }
                self.shared.assign(&assign);
                if let Err(e) = consumer.assign(&assign) {
                    warn!(%e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoke(consumer, tpl);
                if let Err(e) = consumer.unassign() {
                    warn!(%e, "unassign failed");
                }
            }
            other => {
                warn!(?other, "rebalance error; releasing the assignment");
                if let Ok(current) = consumer.assignment() {
                    self.revoke(consumer, &current);
                }
                let _ = consumer.unassign();
            }
        }
    }
}

struct Setup {
    config: Arc<KafkaConfig>,
    subscription: Subscription,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Item>,
}

/// A record on its way to the stream.
struct Item {
    /// Why the dialect could not read the record, if it could not.
    undecodable: Option<Undecodable>,
    key: (Arc<str>, i32),
    /// Its ordering lane; none when nothing needs to wait for it.
    lane: Option<Lane>,
    generation: u64,
    offset: i64,
    message: Message,
    attempt: u32,
    not_before: Option<SystemTime>,
}

/// The engine thread: setup, then the poll loop, then a bounded close.
fn engine(setup: Setup, ready: oneshot::Sender<Result<()>>) {
    let Setup {
        config,
        subscription,
        shared,
        tx,
    } = setup;
    let setup_dialect = subscription
        .dialect
        .clone()
        .unwrap_or_else(|| config.dialect.clone());
    // Declared first, so dropped last: after the consumer's drop has made
    // the revoke commit and left the group.
    let _done = Done(shared.clone());
    let topic = subscription.topic.clone();
    let group = subscription.group.clone();
    let retry = group.as_deref().map(|g| retry_topic(&topic, g));
    // The dead-letter tooling holds letters while an operator decides. A
    // second inbox joining the group must not be handed letters the first
    // still holds (both would replay them): its revoke waits for them to be
    // replayed, purged or handed back, within librdkafka's default
    // `max.poll.interval.ms` (300 s) so the holder stays in the group.
    let revoke_timeout = if group.as_deref() == Some(DEAD_LETTER_GROUP) {
        DEAD_LETTER_REVOKE_TIMEOUT.max(config.revoke_timeout)
    } else {
        config.revoke_timeout
    };
    let ctx = Ctx {
        shared: shared.clone(),
        starts: Mutex::default(),
        revoke_timeout,
        operation_timeout: config.operation_timeout,
    };
    // A private subscription needs a group id for `assign`, but never joins
    // or commits: a throwaway one.
    let group_id = group
        .clone()
        .unwrap_or_else(|| format!("tidings-private-{}", tidings_core::message::new_id()));
    let consumer: BaseConsumer<Ctx> =
        match config.consumer(Some(&group_id)).create_with_context(ctx) {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(Error::Subscribe {
                    topic,
                    source: Box::new(e),
                }));
                return;
            }
        };
    let setup = (|| -> Result<()> {
        let n = ensure_topic(&consumer, &config, &topic)?;
        let mut starts = start_offsets(&consumer, &config, &topic, n, subscription.start)?;
        match (&group, &retry) {
            (Some(group), Some(retry)) => {
                let rn = ensure_topic(&consumer, &config, retry)?;
                for p in 0..rn {
                    starts.insert((retry.clone(), p), Offset::Beginning);
                }
                ensure_topic(&consumer, &config, &dead_letter_topic(&topic, group))?;
                *consumer
                    .context()
                    .starts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = starts;
                consumer
                    .subscribe(&[topic.as_str(), retry.as_str()])
                    .map_err(|e| Error::Subscribe {
                        topic: topic.clone(),
                        source: Box::new(e),
                    })?;
            }
            _ => {
                let mut tpl = TopicPartitionList::new();
                for ((t, p), o) in &starts {
                    tpl.add_partition_offset(t, *p, *o).map_err(broker_err)?;
                }
                shared.assign(&tpl);
                consumer.assign(&tpl).map_err(|e| Error::Subscribe {
                    topic: topic.clone(),
                    source: Box::new(e),
                })?;
            }
        }
        Ok(())
    })();
    let failed = setup.is_err();
    let _ = ready.send(setup);
    if failed {
        drop(consumer);
        return;
    }
    let mut engine = Engine {
        consumer: Arc::new(consumer),
        shared,
        tx,
        retry,
        dialect: setup_dialect,
        delayed: HashMap::new(),
        paused: HashSet::new(),
        paused_all: false,
        seen_assignment: 0,
        last_commit: Instant::now(),
        commit_interval: config.commit_interval,
        last_refresh: Instant::now(),
        refresh_every: config
            .commit_interval
            .saturating_mul(10)
            .max(Duration::from_secs(1)),
    };
    engine.run(config.close_timeout);
    // Closes the consumer: the revoke callback commits once more, then the
    // member leaves the group; `_done` is set after that.
    drop(engine);
}

struct Engine {
    consumer: Arc<BaseConsumer<Ctx>>,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Item>,
    retry: Option<String>,
    dialect: Dialect,
    delayed: HashMap<(Arc<str>, i32), VecDeque<Item>>,
    paused: HashSet<(Arc<str>, i32)>,
    paused_all: bool,
    seen_assignment: u64,
    last_commit: Instant,
    commit_interval: Duration,
    last_refresh: Instant,
    refresh_every: Duration,
}

impl Engine {
    fn run(&mut self, close_timeout: Duration) {
        let mut close_deadline: Option<Instant> = None;
        loop {
            if self.shared.closing.load(Ordering::Acquire) || self.tx.is_closed() {
                let deadline =
                    *close_deadline.get_or_insert_with(|| Instant::now() + close_timeout);
                if self.shared.live.load(Ordering::Acquire) == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    warn!(
                        "close: deliveries still held after the close timeout; they will be redelivered"
                    );
                    self.shared.abandon.store(true, Ordering::Release);
                    break;
                }
            }
            self.release_delayed();
            self.reconcile_pauses();
            let mut budget = 512;
            let mut timeout = Duration::from_millis(50);
            let consumer = self.consumer.clone();
            while budget > 0 {
                match consumer.poll(timeout) {
                    Some(Ok(m)) => self.take(&m),
                    Some(Err(e)) => {
                        debug!(%e, "consumer error; librdkafka recovers");
                        break;
                    }
                    None => break,
                }
                timeout = Duration::ZERO;
                budget -= 1;
            }
            if self.last_commit.elapsed() >= self.commit_interval {
                self.commit(CommitMode::Async);
            }
        }
        self.commit(CommitMode::Sync);
    }

    fn commit(&mut self, mode: CommitMode) {
        self.last_commit = Instant::now();
        // An asynchronous commit the broker rejects (a group in rebalance, a
        // coordinator moving) is not reported back here: rdkafka enables
        // offset-commit events, but `ConsumerContext::commit_callback` was
        // never called for these commits (checked with librdkafka 2.12.1).
        // So the settled positions are sent again now and then, whether or
        // not they changed: a lost commit is repaired within `refresh_every`.
        if self.last_refresh.elapsed() >= self.refresh_every {
            self.last_refresh = Instant::now();
            self.shared.recommit();
        }
        if let Some(tpl) = self.shared.due()
            && let Err(e) = self.consumer.commit(&tpl, mode)
        {
            debug!(%e, "commit failed; retried with the next one");
            self.shared.recommit();
        }
    }

    fn take(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) {
        if self.shared.closing.load(Ordering::Acquire) {
            return;
        }
        let key: (Arc<str>, i32) = (Arc::from(m.topic()), m.partition());
        let Some(generation) = self.shared.lock().parts.get(&key).map(|p| p.generation) else {
            return;
        };
        let retried = self.retry.as_deref() == Some(m.topic());
        let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
        let fallback = MessageId::from_fmt(format_args!(
            "{}-{}-{}",
            m.topic(),
            m.partition(),
            m.offset()
        ));
        let (message, received, undecodable) = headers::decode(
            &self.dialect,
            m.headers(),
            m.key(),
            payload,
            fallback,
            retried,
            Some(m.topic()),
        );
        let lane = self.shared.gate.lane(&key, message.key.as_deref());
        let item = Item {
            undecodable,
            key: key.clone(),
            lane,
            generation,
            offset: m.offset(),
            message,
            attempt: received.attempt,
            not_before: received.not_before,
        };
        let queue = self.delayed.entry(key.clone()).or_default();
        let wait = item.not_before.is_some_and(|t| t > SystemTime::now());
        if wait || !queue.is_empty() {
            queue.push_back(item);
        } else {
            self.send(item);
        }
    }

    fn send(&self, item: Item) {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(item).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn release_delayed(&mut self) {
        let now = SystemTime::now();
        let current: HashMap<(Arc<str>, i32), u64> = {
            let st = self.shared.lock();
            self.delayed
                .keys()
                .filter_map(|k| st.parts.get(k).map(|p| (k.clone(), p.generation)))
                .collect()
        };
        let mut ready = Vec::new();
        self.delayed.retain(|k, queue| {
            // Revoked partitions: their records come again to the new owner.
            queue.retain(|i| current.get(k) == Some(&i.generation));
            while queue
                .front()
                .is_some_and(|i| i.not_before.is_none_or(|t| t <= now))
            {
                if let Some(i) = queue.pop_front() {
                    ready.push(i);
                }
            }
            !queue.is_empty()
        });
        for item in ready {
            self.send(item);
        }
    }

    /// Pauses every assigned partition while the stream's buffer is full and
    /// the partitions whose head record must still wait; resumes the rest.
    fn reconcile_pauses(&mut self) {
        let queued = self.shared.queued.load(Ordering::Acquire);
        let full = if self.paused_all {
            queued >= self.shared.buffer / 2
        } else {
            queued >= self.shared.buffer
        };
        let (assigned, assignment): (Vec<(Arc<str>, i32)>, u64) = {
            let st = self.shared.lock();
            (st.parts.keys().cloned().collect(), st.assignment)
        };
        if full == self.paused_all
            && assignment == self.seen_assignment
            && self.delayed.keys().all(|k| self.paused.contains(k))
            && self
                .paused
                .iter()
                .all(|k| full || self.delayed.contains_key(k))
        {
            return;
        }
        self.paused_all = full;
        self.seen_assignment = assignment;
        let want: HashSet<(Arc<str>, i32)> = assigned
            .into_iter()
            .filter(|k| full || self.delayed.contains_key(k))
            .collect();
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for k in want.difference(&self.paused) {
            pause.add_partition(&k.0, k.1);
        }
        for k in self.paused.difference(&want) {
            resume.add_partition(&k.0, k.1);
        }
        if pause.count() > 0
            && let Err(e) = self.consumer.pause(&pause)
        {
            debug!(%e, "pause failed");
        }
        if resume.count() > 0
            && let Err(e) = self.consumer.resume(&resume)
        {
            debug!(%e, "resume failed");
        }
        self.paused = want;
    }
}

/// What every acker of one subscription shares.
struct StreamCtx {
    topic: Arc<str>,
    group: Option<Arc<str>>,
    retry_topic: Option<String>,
    dlq_topic: String,
    shared: Arc<Shared>,
    sender: KafkaPublisher,
    tx: mpsc::UnboundedSender<Item>,
    /// The longest [`DeliveryStream::closed`] waits for the engine thread.
    close_wait: Duration,
}

/// The stream of one subscription.
struct KafkaStream {
    rx: mpsc::UnboundedReceiver<Item>,
    in_flight: PollInFlight,
    slot: Option<Slot>,
    ctx: Arc<StreamCtx>,
    closed: bool,
}

impl Stream for KafkaStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.closed {
            return Poll::Ready(None);
        }
        if this.slot.is_none() {
            match this.in_flight.poll_take(cx) {
                Poll::Ready(Some(slot)) => this.slot = Some(slot),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
        let gate = &this.ctx.shared.gate;
        loop {
            // Records released by a settlement first, then the channel; a
            // record whose lane is busy is parked in the gate.
            let item = match gate.ready(cx.waker()) {
                Some(item) => item,
                None => match this.rx.poll_recv(cx) {
                    Poll::Ready(Some(item)) => match gate.enter(item) {
                        Some(item) => item,
                        None => continue,
                    },
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => return Poll::Pending,
                },
            };
            // The item's lane (if any) is reserved for it now.
            this.ctx.shared.queued.fetch_sub(1, Ordering::AcqRel);
            let Some(slot) = this.slot.take() else {
                // Unreachable: the slot was taken above.
                if let Some(lane) = &item.lane {
                    gate.release(lane);
                }
                continue;
            };
            if !admit(&this.ctx, &item) {
                // Its partition was revoked meanwhile: discarded.
                this.slot = Some(slot);
                if let Some(lane) = &item.lane {
                    gate.release(lane);
                }
                continue;
            }
            let message = Arc::new(item.message);
            // For a retried message: the copy's place in the retry topic.
            let position = Receipt::Offset {
                partition: item.key.1,
                offset: item.offset,
            };
            let acker = KafkaAcker {
                ctx: this.ctx.clone(),
                lane: item.lane,
                key: item.key,
                generation: item.generation,
                offset: item.offset,
                attempt: item.attempt,
                message: message.clone(),
                settled: false,
                _slot: slot,
            };
            let delivery = Delivery::new(
                message,
                this.ctx.topic.clone(),
                this.ctx.group.clone(),
                item.attempt,
                Box::new(acker),
            )
            .with_position(position);
            return Poll::Ready(Some(Ok(match item.undecodable {
                Some(why) => delivery.rejected(why),
                None => delivery,
            })));
        }
    }
}

/// Records the item as yielded; false if its partition was revoked meanwhile.
fn admit(ctx: &StreamCtx, item: &Item) -> bool {
    let mut st = ctx.shared.lock();
    if ctx.group.is_some() {
        match st.parts.get_mut(&item.key) {
            Some(p) if p.generation == item.generation => {
                p.pending.insert(item.offset);
                p.next = p.next.max(item.offset + 1);
            }
            _ => return false,
        }
    }
    drop(st);
    ctx.shared.live.fetch_add(1, Ordering::AcqRel);
    true
}

impl DeliveryStream for KafkaStream {
    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        self.closed = true;
        self.ctx.shared.closing.store(true, Ordering::Release);
        self.rx.close();
        Box::pin(async { Ok(()) })
    }

    fn closed(&mut self) -> BoxFuture<'_, ()> {
        let mut done = self.ctx.shared.done.subscribe();
        let limit = self.ctx.close_wait;
        Box::pin(async move {
            if tokio::time::timeout(limit, done.wait_for(|done| *done))
                .await
                .is_err()
            {
                warn!(?limit, "the consumer did not finish closing in time");
            }
        })
    }
}

impl Drop for KafkaStream {
    fn drop(&mut self) {
        self.ctx.shared.closing.store(true, Ordering::Release);
    }
}

struct KafkaAcker {
    ctx: Arc<StreamCtx>,
    /// The ordering lane this delivery holds; released when it is settled or dropped.
    lane: Option<Lane>,
    key: (Arc<str>, i32),
    generation: u64,
    offset: i64,
    attempt: u32,
    message: Arc<Message>,
    settled: bool,
    _slot: Slot,
}

impl KafkaAcker {
    /// Records the ack; the commit follows in the background, so acking
    /// needs no future (see `ack_now`).
    fn done(&mut self) {
        self.settled = true;
        self.ctx
            .shared
            .settle(&self.key, self.generation, self.offset, false);
    }

    fn settle_error(&self, e: Error) -> Error {
        Error::Settle {
            id: self.message.id.clone(),
            source: Box::new(e),
        }
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.done();
        Ok(())
    }

    fn ack_now(&mut self) -> Option<Result<()>> {
        self.done();
        Some(Ok(()))
    }

    fn is_held(&self) -> bool {
        self.ctx.shared.owns(&self.key, self.generation)
    }

    async fn nack(mut self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let not_before = SystemTime::now() + delay.unwrap_or_default();
        let attempt = self.attempt.saturating_add(1);
        match &self.ctx.retry_topic {
            Some(retry) => {
                let copy = headers::retry_copy(&self.message, attempt, not_before);
                self.ctx
                    .sender
                    .send_unchecked(retry, &copy)
                    .await
                    .map_err(|e| self.settle_error(e))?;
                self.done();
            }
            None => {
                // A private subscription has no retry topic: the copy is kept
                // in process and handed out again after the delay.
                let item = Item {
                    undecodable: None,
                    key: self.key.clone(),
                    lane: self.lane.clone(),
                    generation: self.generation,
                    offset: self.offset,
                    message: (*self.message).clone(),
                    attempt,
                    not_before: None,
                };
                let tx = self.ctx.tx.clone();
                let shared = self.ctx.shared.clone();
                let wait = delay.unwrap_or_default();
                self.done();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    shared.queued.fetch_add(1, Ordering::AcqRel);
                    if tx.send(item).is_err() {
                        shared.queued.fetch_sub(1, Ordering::AcqRel);
                    }
                });
            }
        }
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<()> {
        let dead = letter.letter_for(&self.message);
        // Dead letters are Tidings' own: always in the default dialect.
        self.ctx
            .sender
            .in_dialect(Dialect::CloudEventsBinary)
            .send_unchecked(&self.ctx.dlq_topic, &dead)
            .await
            .map_err(|e| self.settle_error(e))?;
        self.done();
        Ok(())
    }
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        if !self.settled {
            self.ctx
                .shared
                .settle(&self.key, self.generation, self.offset, true);
        }
        // After the ledger: the lane's next record goes out once this one counts as settled.
        if let Some(lane) = self.lane.take() {
            self.ctx.shared.gate.release(&lane);
        }
    }
}
