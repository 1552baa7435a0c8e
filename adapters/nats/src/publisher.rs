//! Publishing to JetStream (waiting for PubAcks) or core NATS (flushed).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use futures::future::join_all;
use tidings_core::Dialect;
use tidings_core::{Error, Message, Publisher, Receipt, Result};

use crate::config::Mode;
use crate::{Shared, connection_error, headers, publish_error};

/// Publishes to NATS. Made by [`NatsBus::publisher`](crate::NatsBus::publisher).
///
/// JetStream: `publish` returns the stream and sequence from the server's
/// PubAck; the message id is the `Nats-Msg-Id`, so publishing the same
/// message again inside the stream's duplicate window stores it once and
/// returns `duplicate: true`. Core NATS: `publish` returns once the server
/// has received the message (a flush round trip); it is not stored.
pub struct NatsPublisher {
    shared: Arc<Shared>,
    dialect: Dialect,
    closed: AtomicBool,
}

impl NatsPublisher {
    pub(crate) fn new(shared: Arc<Shared>, dialect: Dialect) -> Self {
        NatsPublisher {
            shared,
            dialect,
            closed: AtomicBool::new(false),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("publisher"));
        }
        Ok(())
    }

    async fn core_send(&self, subject: &str, topic: &str, message: &Message) -> Result<()> {
        let (headers, body) = headers::encode(&self.dialect, message, None);
        self.shared
            .client
            .publish_with_headers(subject.to_owned(), headers, body)
            .await
            .map_err(|e| {
                let transient =
                    e.kind() != async_nats::client::PublishErrorKind::MaxPayloadExceeded;
                Error::Publish {
                    topic: topic.to_owned(),
                    source: Box::new(e),
                    transient,
                }
            })
    }

    async fn flush(&self, topic: &str) -> Result<()> {
        self.shared
            .client
            .flush()
            .await
            .map_err(|e| Error::Publish {
                topic: topic.to_owned(),
                source: Box::new(e),
                transient: true,
            })
    }
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        self.check_open()?;
        match self.shared.config.mode {
            Mode::JetStream => {
                self.shared
                    .js_publish(&self.dialect, topic, &message, &message.publish_dedup_key())
                    .await
            }
            Mode::Core => {
                let subject = self.shared.topology.subject(topic)?;
                self.core_send(&subject, topic, &message).await?;
                self.flush(topic).await?;
                Ok(Receipt::Accepted)
            }
        }
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<Receipt>> {
        let all = |e: Error| {
            let text = e.to_string();
            let transient = e.is_transient();
            let mut first = Some(e);
            (0..messages.len())
                .map(|_| {
                    Err(first.take().unwrap_or_else(|| Error::Publish {
                        topic: topic.to_owned(),
                        source: text.clone().into(),
                        transient,
                    }))
                })
                .collect::<Vec<_>>()
        };
        if let Err(e) = self.check_open() {
            return all(e);
        }
        let subject = match self.shared.topology.subject(topic) {
            Ok(s) => s,
            Err(e) => return all(e),
        };
        match self.shared.config.mode {
            Mode::JetStream => {
                if let Err(e) = self.shared.ensure_stream(topic).await {
                    return all(e);
                }
                // Send everything first (the client pipelines them), then
                // collect the PubAcks in order.
                let mut pending = Vec::with_capacity(messages.len());
                for message in &messages {
                    let (headers, body) =
                        headers::encode(&self.dialect, message, Some(&message.publish_dedup_key()));
                    let publish = async_nats::jetstream::message::PublishMessage::build()
                        .payload(body)
                        .headers(headers);
                    pending.push(self.shared.js.send_publish(subject.clone(), publish).await);
                }
                let acks = join_all(pending.into_iter().map(|sent| async move {
                    match sent {
                        Ok(ack) => ack.await,
                        Err(e) => Err(e),
                    }
                }))
                .await;
                acks.into_iter()
                    .map(|r| match r {
                        Ok(ack) => Ok(Receipt::Sequence {
                            stream: ack.stream,
                            sequence: ack.sequence,
                            duplicate: ack.duplicate,
                        }),
                        Err(e) => {
                            if e.kind()
                                == async_nats::jetstream::context::PublishErrorKind::StreamNotFound
                            {
                                self.shared.forget_stream(topic);
                            }
                            Err(publish_error(topic, e))
                        }
                    })
                    .collect()
            }
            Mode::Core => {
                let mut results = Vec::with_capacity(messages.len());
                for message in &messages {
                    results.push(self.core_send(&subject, topic, message).await);
                }
                let flushed = self.flush(topic).await;
                results
                    .into_iter()
                    .map(|r| match (r, &flushed) {
                        (Ok(()), Ok(())) => Ok(Receipt::Accepted),
                        (Err(e), _) => Err(e),
                        (Ok(()), Err(e)) => Err(Error::Publish {
                            topic: topic.to_owned(),
                            source: e.to_string().into(),
                            transient: true,
                        }),
                    })
                    .collect()
            }
        }
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.shared.client.flush().await.map_err(connection_error)
    }
}
