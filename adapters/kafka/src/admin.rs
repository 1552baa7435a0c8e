//! Topic administration: create topics (with their retry and dead-letter
//! topics) and read a group's committed offsets. Every call has a time limit.

use std::sync::Arc;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use tidings_core::{Error, Result};

use crate::config::KafkaConfig;
use crate::subscriber::{dead_letter_topic, retry_topic, run_blocking};

/// Creates topics and inspects consumer groups.
///
/// Brokers without the Admin API (librdkafka's mock cluster) never answer
/// `create_topics`: the call then fails with [`Error::Timeout`] after the
/// configured `operation_timeout`.
#[derive(Debug, Clone)]
pub struct KafkaAdmin {
    config: Arc<KafkaConfig>,
}

impl KafkaAdmin {
    /// An admin helper with the bus's configuration.
    pub fn new(config: Arc<KafkaConfig>) -> Self {
        KafkaAdmin { config }
    }

    /// Creates `topics` with `partitions` partitions and `replication`
    /// replicas each; topics that exist already are left as they are.
    pub async fn create_topics(
        &self,
        topics: &[&str],
        partitions: i32,
        replication: i32,
    ) -> Result<()> {
        let config = self.config.clone();
        let names: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        let limit = config.operation_timeout;
        run_blocking("creating topics", limit + limit / 2, move || {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            create_topics_blocking(&config, &names, partitions, replication, limit)
        })
        .await
    }

    /// Creates `topic` with the retry and dead-letter topics of `group`
    /// (`<topic>.retry.<group>`, `<topic>.<group>.dlq`), with the configured
    /// partitions and replication.
    pub async fn create_group_topics(&self, topic: &str, group: &str) -> Result<()> {
        let retry = retry_topic(topic, group);
        let dlq = dead_letter_topic(topic, group);
        self.create_topics(
            &[topic, &retry, &dlq],
            self.config.partitions,
            self.config.replication,
        )
        .await
    }

    /// The committed offset of `group` for each partition of `topic`
    /// (`None` where the group committed nothing).
    pub async fn committed(&self, topic: &str, group: &str) -> Result<Vec<(i32, Option<i64>)>> {
        let positions = self.positions(topic, group).await?;
        Ok(positions
            .iter()
            .map(|p| (p.partition, p.committed))
            .collect())
    }

    /// Where `group` stands on each partition of `topic`: its committed
    /// offset beside the partition's watermarks.
    pub async fn positions(&self, topic: &str, group: &str) -> Result<Vec<Position>> {
        let config = self.config.clone();
        let (topic, group) = (topic.to_owned(), group.to_owned());
        let limit = config.operation_timeout;
        // A metadata call, an offset fetch and a watermark call per partition.
        run_blocking("reading committed offsets", limit * 4, move || {
            positions_blocking(&config, &topic, &group, limit)
        })
        .await
    }
}

/// One partition as a group sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The partition.
    pub partition: i32,
    /// The group's committed offset, if it committed one.
    pub committed: Option<i64>,
    /// The oldest offset the partition still holds.
    pub low: i64,
    /// The offset the next message will get.
    pub high: i64,
}

impl Position {
    /// Messages after the committed offset (every message held when the
    /// group committed nothing).
    pub fn behind(&self) -> u64 {
        (self.high - self.committed.unwrap_or(self.low).max(self.low)).max(0) as u64
    }
}

/// Reads the group's positions on `topic`, blocking the calling thread.
fn positions_blocking(
    config: &KafkaConfig,
    topic: &str,
    group: &str,
    limit: std::time::Duration,
) -> Result<Vec<Position>> {
    let consumer: BaseConsumer =
        config
            .consumer(Some(group))
            .create()
            .map_err(|e| Error::Connection {
                broker: "kafka",
                source: Box::new(e),
            })?;
    let broker = |e: rdkafka::error::KafkaError| Error::Broker {
        broker: "kafka",
        source: Box::new(e),
    };
    let metadata = consumer
        .fetch_metadata(Some(topic), limit)
        .map_err(broker)?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
    }
    // Never `committed()`: dropping a consumer after it can hang.
    let committed = consumer.committed_offsets(tpl, limit).map_err(broker)?;
    let mut out = Vec::new();
    for e in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(topic, e.partition(), limit)
            .map_err(broker)?;
        out.push(Position {
            partition: e.partition(),
            committed: match e.offset() {
                Offset::Offset(n) if n >= 0 => Some(n),
                _ => None,
            },
            low,
            high,
        });
    }
    out.sort_unstable_by_key(|p| p.partition);
    Ok(out)
}

/// Creates `topics` through the Admin API within `limit`, blocking the
/// calling thread (not an async one); topics that exist already are left as
/// they are. `-1` partitions or replicas: the broker's defaults.
pub(crate) fn create_topics_blocking(
    config: &KafkaConfig,
    topics: &[&str],
    partitions: i32,
    replication: i32,
    limit: std::time::Duration,
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        config.client().create().map_err(|e| Error::Connection {
            broker: "kafka",
            source: Box::new(e),
        })?;
    let specs: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(limit))
        .request_timeout(Some(limit));
    let results =
        futures::executor::block_on(admin.create_topics(&specs, &options)).map_err(|e| {
            Error::Broker {
                broker: "kafka",
                source: Box::new(e),
            }
        })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Broker {
                    broker: "kafka",
                    source: format!("creating topic `{topic}` failed: {code}").into(),
                });
            }
        }
    }
    Ok(())
}
