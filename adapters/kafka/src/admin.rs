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
        let config = self.config.clone();
        let (topic, group) = (topic.to_owned(), group.to_owned());
        let limit = config.operation_timeout;
        run_blocking("reading committed offsets", limit * 2, move || {
            let consumer: BaseConsumer =
                config
                    .consumer(Some(&group))
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
                .fetch_metadata(Some(&topic), limit)
                .map_err(broker)?;
            let mut tpl = TopicPartitionList::new();
            for t in metadata.topics().iter().filter(|t| t.name() == topic) {
                for p in t.partitions() {
                    tpl.add_partition(&topic, p.id());
                }
            }
            // Never `committed()`: dropping a consumer after it can hang.
            let committed = consumer.committed_offsets(tpl, limit).map_err(broker)?;
            let mut out: Vec<(i32, Option<i64>)> = committed
                .elements()
                .iter()
                .map(|e| {
                    let offset = match e.offset() {
                        Offset::Offset(n) if n >= 0 => Some(n),
                        _ => None,
                    };
                    (e.partition(), offset)
                })
                .collect();
            out.sort_unstable();
            Ok(out)
        })
        .await
    }
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
