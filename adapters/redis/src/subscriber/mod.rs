//! Subscribing: consumer groups and private reads on streams. Reading is in
//! `read`, settling in `acker` (shared with Pub/Sub mode), and what a
//! subscription's parts share (the ack batcher, the heartbeat) in `shared`.

mod acker;
mod read;
mod shared;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use redis::{RedisResult, Value};
use tidings_core::in_flight::InFlight;
use tidings_core::{
    Capabilities, DeliveryStream, Error, GroupStats, Result, StartFrom, Subscriber, Subscription,
};
use tokio::sync::{mpsc, watch};

use crate::config::{RedisConfig, RedisMode};
use crate::headers;
use crate::{Conn, Connector, NAME, broker_error, pubsub};

pub(crate) use acker::{Origin, RedisAcker};
pub(crate) use read::RedisStream;
use read::{entries, read_loop};
pub(crate) use shared::Shared;
use shared::{Held, heartbeat, spawn_acker};

/// Most entries asked for by one read.
const MAX_BATCH: usize = 1000;

/// How long a read waits for more free in-flight slots under load.
const GATHER: Duration = Duration::from_millis(2);

/// Subscribes to Redis streams (consumer groups or private reads) or channels.
pub struct RedisSubscriber {
    connector: Connector,
    control: Conn,
    /// The publisher's connection, for dead letters: with `wait_replicas`
    /// a write blocks its connection until replicas confirm it (`WAIT`), so
    /// it must not hold up the acks and heartbeats on `control`.
    writes: Conn,
    config: Arc<RedisConfig>,
    consumer_base: String,
    counter: AtomicU64,
}

impl std::fmt::Debug for RedisSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSubscriber")
            .field("mode", &self.config.mode)
            .field("consumer", &self.consumer_base)
            .finish()
    }
}

impl RedisSubscriber {
    pub(crate) fn new(
        connector: Connector,
        control: Conn,
        writes: Conn,
        config: Arc<RedisConfig>,
    ) -> Self {
        let consumer_base = config
            .consumer_name
            .clone()
            .unwrap_or_else(|| format!("tidings-{}-{:08x}", std::process::id(), fastrand::u32(..)));
        RedisSubscriber {
            connector,
            control,
            writes,
            config,
            consumer_base,
            counter: AtomicU64::new(0),
        }
    }

    fn shared(&self, subscription: &Subscription, consumer: String) -> Arc<Shared> {
        let held: Held = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let group: Option<Arc<str>> = subscription.group.as_deref().map(Arc::from);
        let dead_letters = self.dead_letter_topic(
            &subscription.topic,
            subscription.group.as_deref().unwrap_or(""),
        );
        Arc::new(Shared {
            topic: Arc::from(subscription.topic.as_str()),
            group,
            consumer,
            dead_letters,
            control: self.control.clone(),
            writes: self.writes.clone(),
            config: self.config.clone(),
            in_flight: InFlight::new(subscription.prefetch),
            prefetch: subscription.prefetch.max(1),
            closed: watch::channel(false).0,
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
            acks: match (&subscription.group, self.config.mode) {
                (Some(group), RedisMode::Streams) => Some(spawn_acker(
                    self.control.clone(),
                    subscription.topic.clone(),
                    group.clone(),
                    self.config.clone(),
                    held.clone(),
                )),
                _ => None,
            },
            held,
            layout: match &subscription.dialect {
                Some(dialect) => headers::Layout {
                    dialect: dialect.clone(),
                    ..self.config.layout.clone()
                },
                None => self.config.layout.clone(),
            },
        })
    }

    async fn subscribe_streams(
        &self,
        subscription: Subscription,
    ) -> Result<Box<dyn DeliveryStream>> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let consumer = format!("{}-{n}", self.consumer_base);
        let shared = self.shared(&subscription, consumer);
        let subscribe_error = |e: redis::RedisError| Error::Subscribe {
            topic: subscription.topic.clone(),
            source: Box::new(e),
        };
        // Blocking reads need their own connection, with a reply timeout above BLOCK.
        let read_timeout = self.config.block + self.config.response_timeout;
        let mut conn = self.connector.connect(&self.config, read_timeout).await?;
        let position = match &subscription.group {
            Some(group) => {
                create_group(
                    &mut conn,
                    &subscription.topic,
                    group,
                    &start_id(subscription.start, "$"),
                )
                .await
                .map_err(subscribe_error)?;
                None
            }
            None => Some(match subscription.start {
                StartFrom::Latest => last_entry_id(&mut conn, &subscription.topic)
                    .await
                    .map_err(subscribe_error)?,
                other => start_id(other, "0-0"),
            }),
        };
        let stream = RedisStream::new(shared.clone());
        if shared.group.is_some() && self.config.heartbeat {
            tokio::spawn(heartbeat(Arc::downgrade(&shared)));
        }
        tokio::spawn(read_loop(shared, conn, position));
        Ok(Box::new(stream))
    }
}

#[async_trait]
impl Subscriber for RedisSubscriber {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        match self.config.mode {
            RedisMode::Streams => Capabilities::at_least_once(),
            RedisMode::PubSub => Capabilities::at_most_once(),
        }
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        subscription.check(self.name(), self.capabilities())?;
        match self.config.mode {
            RedisMode::Streams => self.subscribe_streams(subscription).await,
            RedisMode::PubSub => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                let shared = self.shared(&subscription, format!("{}-{n}", self.consumer_base));
                pubsub::subscribe(self.connector.clone(), shared).await
            }
        }
    }

    async fn declare_group(&self, topic: &str, group: &str) -> Result<()> {
        if self.config.mode == RedisMode::PubSub {
            return Ok(());
        }
        create_group(&mut self.control.clone(), topic, group, "$")
            .await
            .map_err(|e| Error::Subscribe {
                topic: topic.to_owned(),
                source: Box::new(e),
            })
    }

    fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        if group.is_empty() {
            format!("{topic}:dlq")
        } else {
            format!("{topic}:{group}:dlq")
        }
    }

    async fn groups(&self, topic: &str, named: &[String]) -> Result<Vec<GroupStats>> {
        if self.config.mode == RedisMode::PubSub {
            return Err(Error::Unsupported {
                adapter: NAME,
                what: "groups in Pub/Sub mode (channels keep no group state)".into(),
            });
        }
        crate::groups::report(&mut self.control.clone(), topic, named, |group| {
            self.dead_letter_topic(topic, group)
        })
        .await
        .map_err(broker_error)
    }
}

/// The id a group or a private read starts after.
fn start_id(start: StartFrom, latest: &str) -> String {
    match start {
        StartFrom::Latest => latest.to_owned(),
        StartFrom::Earliest => "0-0".to_owned(),
        StartFrom::Time(t) => {
            let ms = t
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            if ms == 0 {
                "0-0".to_owned()
            } else {
                format!("{}-{}", ms - 1, u64::MAX)
            }
        }
    }
}

/// `XGROUP CREATE topic group id MKSTREAM`; an existing group is kept as it is.
async fn create_group(conn: &mut Conn, topic: &str, group: &str, id: &str) -> RedisResult<()> {
    let created: RedisResult<Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(topic)
        .arg(group)
        .arg(id)
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

/// The id of the newest entry, or `0-0` for an empty or missing stream.
async fn last_entry_id(conn: &mut Conn, topic: &str) -> RedisResult<String> {
    let reply: Value = redis::cmd("XREVRANGE")
        .arg(topic)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(entries(reply)
        .into_iter()
        .next()
        .map_or_else(|| "0-0".to_owned(), |(id, _)| id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ids() {
        assert_eq!(start_id(StartFrom::Latest, "$"), "$");
        assert_eq!(start_id(StartFrom::Earliest, "$"), "0-0");
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(
            start_id(StartFrom::Time(t), "$"),
            format!("1700000000122-{}", u64::MAX)
        );
    }
}
