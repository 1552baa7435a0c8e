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

mod engine;
mod gate;
mod ledger;
mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, UNIX_EPOCH};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tidings_core::delivery::DEAD_LETTER_GROUP;
use tidings_core::in_flight::PollInFlight;
use tidings_core::{
    Capabilities, DeliveryStream, Error, Result, StartFrom, Subscriber, Subscription,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use crate::config::{KafkaConfig, PartitionOrder};
use crate::publisher::KafkaPublisher;

use engine::Setup;
use ledger::Shared;
use stream::{KafkaStream, StreamCtx};

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
            .spawn(move || engine::run(setup, ready_tx))
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
