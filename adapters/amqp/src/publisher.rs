//! Publishing with publisher confirms and the mandatory flag.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use tidings_core::{Dialect, Error, Message, Publisher, Receipt, Result};

use crate::conn::Connector;
use crate::headers;

/// Publishes to the topic exchange: the topic is the routing key.
///
/// Every message is persistent and mandatory; `publish` returns once the
/// broker confirmed it. A topic no queue is bound to is an
/// [`Error::Unroutable`]. Publishes share one confirm-mode channel, so
/// concurrent publishes from many tasks are pipelined; `publish_batch` keeps
/// up to `confirm_window` confirms outstanding.
pub struct AmqpPublisher {
    connector: Arc<Connector>,
    dialect: Dialect,
    closed: AtomicBool,
}

impl AmqpPublisher {
    pub(crate) fn new(connector: Arc<Connector>, dialect: Dialect) -> Self {
        AmqpPublisher {
            connector,
            dialect,
            closed: AtomicBool::new(false),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Closed("publisher"))
        } else {
            Ok(())
        }
    }

    fn encode(&self, topic: &str, message: &Message) -> Result<(lapin::BasicProperties, Bytes)> {
        headers::encode(&self.dialect, message, &[]).map_err(|e| Error::Publish {
            topic: topic.to_owned(),
            source: e.into(),
            transient: false,
        })
    }
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        self.check_open()?;
        let (props, body) = self.encode(topic, &message)?;
        let c = &self.connector;
        c.publish(&c.config.exchange, topic, &body, props).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<Receipt>> {
        let c = &self.connector;
        let window = c.config.confirm_window.max(1);
        let mut results: Vec<Option<Result<Receipt>>> = Vec::with_capacity(messages.len());
        let mut pending = VecDeque::with_capacity(window.min(messages.len()));
        let mut channel = None;
        for (i, message) in messages.into_iter().enumerate() {
            let sent = match self.check_open() {
                Err(e) => Err(e),
                Ok(()) => match self.encode(topic, &message) {
                    Err(e) => Err(e),
                    Ok((props, body)) => {
                        c.send_kept(&mut channel, &c.config.exchange, topic, &body, props)
                            .await
                    }
                },
            };
            match sent {
                Ok(confirm) => {
                    results.push(None);
                    pending.push_back((i, confirm));
                }
                Err(e) => results.push(Some(Err(e))),
            }
            if pending.len() >= window
                && let Some((j, confirm)) = pending.pop_front()
            {
                results[j] = Some(c.confirm(confirm, topic).await);
            }
        }
        while let Some((j, confirm)) = pending.pop_front() {
            results[j] = Some(c.confirm(confirm, topic).await);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Closed("publisher"))))
            .collect()
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}
