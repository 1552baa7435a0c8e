//! Publishing: an idempotent producer that returns after the delivery report.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tidings_core::Dialect;
use tidings_core::{Error, Message, Publisher, Receipt, Result};

use crate::headers;

/// Publishes to Kafka. Every publish waits for the delivery report (with
/// `acks=all` by default: every in-sync replica has the message) and returns
/// the partition and offset as [`Receipt::Offset`].
#[derive(Clone)]
pub struct KafkaPublisher {
    inner: Arc<Inner>,
    /// How messages are written; clones may differ.
    dialect: Dialect,
}

struct Inner {
    producer: FutureProducer,
    closed: AtomicBool,
    flush_timeout: Duration,
}

impl KafkaPublisher {
    /// The producer the clones share.
    pub(crate) fn producer(&self) -> &FutureProducer {
        &self.inner.producer
    }

    pub(crate) fn new(producer: FutureProducer, flush_timeout: Duration, dialect: Dialect) -> Self {
        KafkaPublisher {
            inner: Arc::new(Inner {
                producer,
                closed: AtomicBool::new(false),
                flush_timeout,
            }),
            dialect,
        }
    }

    /// The same producer, writing in `dialect`.
    pub(crate) fn in_dialect(&self, dialect: Dialect) -> Self {
        KafkaPublisher {
            inner: self.inner.clone(),
            dialect,
        }
    }

    /// Sends one message; used by publish, batch publish, retries and dead letters.
    pub(crate) async fn send(&self, topic: &str, message: &Message) -> Result<Receipt> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("publisher"));
        }
        self.send_unchecked(topic, message).await
    }

    /// Sends even after `close` (retry copies and dead letters of a subscriber
    /// sharing the producer must not fail because the user closed publishing).
    pub(crate) async fn send_unchecked(&self, topic: &str, message: &Message) -> Result<Receipt> {
        match self.enqueue(topic, message).await {
            Ok(report) => delivered(topic, report.await),
            Err(e) => Err(e),
        }
    }

    /// Hands one message to librdkafka's queue and returns its delivery
    /// report. While the local queue is full it waits for room, up to the
    /// publish timeout (`message.timeout.ms` bounds the rest).
    async fn enqueue(&self, topic: &str, message: &Message) -> Result<DeliveryFuture> {
        let (headers, body) = headers::encode(&self.dialect, message);
        let mut record = FutureRecord::to(topic).payload(&body[..]).headers(headers);
        if let Some(key) = &message.key {
            record = record.key(key.as_bytes());
        }
        let mut waited = Duration::ZERO;
        let mut backoff = Duration::from_millis(1);
        loop {
            match self.inner.producer.send_result(record) {
                Ok(report) => return Ok(report),
                Err((e, r))
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull)
                        && waited < self.inner.flush_timeout =>
                {
                    record = r;
                    tokio::time::sleep(backoff).await;
                    waited += backoff;
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                Err((e, _)) => return Err(publish_error(topic, e)),
            }
        }
    }
}

/// The outcome of one delivery report.
fn delivered(
    topic: &str,
    report: std::result::Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
) -> Result<Receipt> {
    match report {
        Ok(Ok(d)) => Ok(Receipt::Offset {
            partition: d.partition,
            offset: d.offset,
        }),
        Ok(Err((e, _))) => Err(publish_error(topic, e)),
        Err(_) => Err(Error::Publish {
            topic: topic.to_owned(),
            source: "the producer was dropped before the delivery report".into(),
            transient: true,
        }),
    }
}

/// Maps a producer error to a typed [`Error`].
pub(crate) fn publish_error(topic: &str, e: KafkaError) -> Error {
    let code = e.rdkafka_error_code();
    let transient = matches!(
        code,
        Some(
            RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::QueueFull
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::NotEnoughReplicas
                | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::Retry
        )
    );
    if matches!(
        code,
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
    ) {
        return Error::Publish {
            topic: topic.to_owned(),
            source: format!(
                "{e}: the topic does not exist (create it with KafkaAdmin; auto_create_topics \
                 creates it on publish only where the broker creates topics on request)"
            )
            .into(),
            transient: false,
        };
    }
    Error::Publish {
        topic: topic.to_owned(),
        source: Box::new(e),
        transient,
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        self.send(topic, &message).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<Receipt>> {
        if self.inner.closed.load(Ordering::Acquire) {
            return messages
                .iter()
                .map(|_| Err(Error::Closed("publisher")))
                .collect();
        }
        // Every message is handed to librdkafka first (in flight together,
        // batched by the producer), then the reports are awaited in order.
        // Enqueuing directly, rather than polling one send future per message
        // (join_all), keeps the batch as cheap as bare rdkafka's own loop.
        let mut reports = Vec::with_capacity(messages.len());
        for m in &messages {
            reports.push(self.enqueue(topic, m).await);
        }
        let mut out = Vec::with_capacity(reports.len());
        for report in reports {
            out.push(match report {
                Ok(report) => delivered(topic, report.await),
                Err(e) => Err(e),
            });
        }
        out
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let inner = self.inner.clone();
        let timeout = inner.flush_timeout;
        let flushed = tokio::task::spawn_blocking(move || inner.producer.flush(timeout))
            .await
            .map_err(|e| Error::Broker {
                broker: "kafka",
                source: Box::new(e),
            })?;
        flushed.map_err(|e| match e {
            KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut) => Error::Timeout {
                operation: "flushing the producer",
                after: timeout,
            },
            other => Error::Broker {
                broker: "kafka",
                source: Box::new(other),
            },
        })
    }
}
