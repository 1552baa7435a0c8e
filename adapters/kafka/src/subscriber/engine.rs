//! The engine thread: the librdkafka consumer's poll loop, rebalances and
//! commits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList as Tpl};
use tidings_core::delivery::DEAD_LETTER_GROUP;
use tidings_core::dialect::Undecodable;
use tidings_core::{Dialect, Error, Message, MessageId, Result, Subscription};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::config::KafkaConfig;
use crate::headers;

use super::gate::Lane;
use super::ledger::{Done, Shared};
use super::{
    DEAD_LETTER_REVOKE_TIMEOUT, broker_err, dead_letter_topic, ensure_topic, retry_topic,
    start_offsets,
};

/// The consumer context: rebalances on the engine thread.
pub(super) struct Ctx {
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

pub(super) struct Setup {
    pub(super) config: Arc<KafkaConfig>,
    pub(super) subscription: Subscription,
    pub(super) shared: Arc<Shared>,
    pub(super) tx: mpsc::UnboundedSender<Item>,
}

/// A record on its way to the stream.
pub(super) struct Item {
    /// Why the dialect could not read the record, if it could not.
    pub(super) undecodable: Option<Undecodable>,
    pub(super) key: (Arc<str>, i32),
    /// Its ordering lane; none when nothing needs to wait for it.
    pub(super) lane: Option<Lane>,
    pub(super) generation: u64,
    pub(super) offset: i64,
    pub(super) message: Message,
    pub(super) attempt: u32,
    pub(super) not_before: Option<SystemTime>,
}

/// The engine thread: setup, then the poll loop, then a bounded close.
pub(super) fn run(setup: Setup, ready: oneshot::Sender<Result<()>>) {
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

pub(super) struct Engine {
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
