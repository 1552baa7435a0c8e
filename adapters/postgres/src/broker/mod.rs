//! PostgreSQL as a broker, `postgres://`: for services that run no broker,
//! or that want a message and their own writes in one database.
//!
//! Three tables hold it:
//!
//! | table | holds |
//! |---|---|
//! | `tidings_messages` | every published message (the log), kept for `retention` for replay |
//! | `tidings_groups` | the groups of each topic (a private subscription is a group of its own) |
//! | `tidings_queue` | one row per message per group: its attempt and when it is next visible |
//!
//! A publish writes the message once and a queue row for every group of the
//! topic, in one statement, and notifies (`pg_notify`, on commit). Members
//! of a group claim rows with `FOR UPDATE SKIP LOCKED` — they never wait on
//! each other — by moving the row's `visible_at` a visibility timeout ahead:
//! a member that dies leaves its claims to come back when that passes
//! (while a handler runs, its claim is extended). An ack deletes the row; a
//! nack moves `visible_at` by the delay and counts an attempt; a dead letter
//! is written to the dead-letter topic and the row deleted, in one
//! transaction. Members wake on the notification, and look at least every
//! `poll` for delayed messages coming due.

mod stream;
mod wakeups;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tidings_core::health::{Health, HealthCheck, State};
use tidings_core::{
    Capabilities, DeliveryStream, Error, Message, Publisher, Receipt, Result, StartFrom,
    Subscriber, Subscription,
};

use crate::row;
use wakeups::Wakeups;

pub use tidings_core::delivery::DEAD_LETTER_GROUP;

/// What a delivery's position stream starts with: `postgres:<database identity>`,
/// the sequence being the queue row.
pub(crate) const POSITION_PREFIX: &str = "postgres:";

/// Settings of the PostgreSQL broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// How long a claimed message stays invisible to other members before
    /// it comes back (a dead member's messages); extended while its
    /// handler runs. Default 30 s.
    pub visibility: Duration,
    /// The longest a member waits without a notification before it looks
    /// (delayed messages coming due, a notification lost). Default 250 ms.
    pub poll: Duration,
    /// How long published messages are kept in the log for replay
    /// (`StartFrom::Earliest` or a time) once no group needs them. Default 24 h.
    pub retention: Duration,
    /// Most rows claimed in one statement. Default 64.
    pub claim_batch: usize,
    /// Most connections in the pool. Default 10.
    pub max_connections: u32,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            visibility: Duration::from_secs(30),
            poll: Duration::from_millis(250),
            retention: Duration::from_secs(24 * 3600),
            claim_batch: 64,
            max_connections: 10,
        }
    }
}

impl BrokerConfig {
    /// Reads the broker's options from a `postgres://` URL's query
    /// (`visibility`, `poll`, `retention`, `claim_batch`,
    /// `max_connections`) and returns them with the URL PostgreSQL gets
    /// (without them).
    pub fn from_url(url: &str) -> Result<(String, Self)> {
        use tidings_core::params::{duration, number};
        let mut config = BrokerConfig::default();
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "visibility" => config.visibility = duration(key, value)?,
                "poll" => config.poll = duration(key, value)?,
                "retention" => config.retention = duration(key, value)?,
                "claim_batch" => config.claim_batch = number::<usize>(key, value)?.max(1),
                "max_connections" => config.max_connections = number::<u32>(key, value)?.max(2),
                _ => kept.push(pair),
            }
        }
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((url, config))
    }
}

/// PostgreSQL as a broker: a [`Publisher`] and a [`Subscriber`] in one
/// value; see the [module docs](self). Clones share the pool.
#[derive(Clone)]
pub struct PostgresBroker {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub pool: PgPool,
    /// Deliveries' position names it (`postgres:<identity>`), so the inbox
    /// can delete a queue row in its own transaction when it is the same
    /// database.
    pub identity: String,
    pub config: BrokerConfig,
    closed: AtomicBool,
    pub wakeups: Wakeups,
}

fn broker_error(error: impl Into<tidings_core::BoxError>) -> Error {
    Error::Broker {
        broker: "postgres",
        source: error.into(),
    }
}

impl PostgresBroker {
    /// Connects (`postgres://user@host:port/db?visibility=30s&…`) and
    /// creates the tables where missing.
    pub async fn connect(url: &str) -> Result<Self> {
        let (url, config) = BrokerConfig::from_url(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .map_err(|e| Error::Connection {
                broker: "postgres",
                source: Box::new(e),
            })?;
        Self::with_pool(pool, config).await
    }

    /// Uses an existing pool; creates the tables where missing.
    pub async fn with_pool(pool: PgPool, config: BrokerConfig) -> Result<Self> {
        crate::schema::create(&pool).await.map_err(broker_error)?;
        let identity = crate::schema::identity(&pool).await.map_err(broker_error)?;
        Ok(PostgresBroker {
            inner: Arc::new(Inner {
                identity: format!("{POSITION_PREFIX}{identity}"),
                wakeups: Wakeups::new(pool.clone()),
                pool,
                config,
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// This broker as a shared publisher.
    pub fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.clone())
    }

    /// This broker as a shared subscriber.
    pub fn subscriber(&self) -> Arc<dyn Subscriber> {
        Arc::new(self.clone())
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Deletes logged messages older than the retention that no group
    /// still needs. Members run it now and then; callable by hand.
    pub async fn clean_up(&self) -> Result<u64> {
        clean_up(&self.inner).await
    }
}

pub(crate) async fn clean_up(inner: &Inner) -> Result<u64> {
    let done = sqlx::query(
        "DELETE FROM tidings_messages m
         WHERE m.published_at < clock_timestamp() - make_interval(secs => $1)
           AND NOT EXISTS (SELECT 1 FROM tidings_queue q WHERE q.position = m.position)",
    )
    .bind(inner.config.retention.as_secs_f64())
    .execute(&inner.pool)
    .await
    .map_err(broker_error)?;
    Ok(done.rows_affected())
}

/// Writes `messages` to `topic`: the log, a queue row per group, and a
/// notification, in one statement (one transaction).
pub(crate) async fn write<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    topic: &str,
    messages: &[Message],
) -> std::result::Result<(), sqlx::Error> {
    let c = row::Columns::of(messages);
    let sql = format!(
        "WITH m AS (
             INSERT INTO tidings_messages (topic, {cols})
             SELECT $1, {cols} FROM {unnest} AS u({cols}, ord)
             ORDER BY ord
             RETURNING position),
         q AS (
             INSERT INTO tidings_queue (topic, group_name, position)
             SELECT $1, g.group_name, m.position FROM m, tidings_groups g WHERE g.topic = $1
             ORDER BY m.position)
         SELECT pg_notify('tidings_queue', $1)",
        cols = row::COLUMNS,
        unnest = row::UNNEST,
    );
    let query = sqlx::query(&sql);
    row::bind_columns!(query.bind(topic), c)
        .execute(executor)
        .await?;
    Ok(())
}

/// Declares `group` on `topic`; a group created now gets the logged
/// messages `start` asks for.
pub(crate) async fn declare(
    inner: &Inner,
    topic: &str,
    group: &str,
    start: StartFrom,
) -> Result<()> {
    let mut tx = inner.pool.begin().await.map_err(broker_error)?;
    if start != StartFrom::Latest {
        // A publish that began before this group existed writes no row for
        // it; the backfill must see that publish's message, so it waits for
        // publishes in flight to commit (and holds new ones back the few
        // milliseconds until this commits).
        sqlx::query("LOCK TABLE tidings_messages IN SHARE MODE")
            .execute(&mut *tx)
            .await
            .map_err(broker_error)?;
    }
    let created = sqlx::query(
        "INSERT INTO tidings_groups (topic, group_name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(topic)
    .bind(group)
    .execute(&mut *tx)
    .await
    .map_err(broker_error)?
    .rows_affected()
        == 1;
    let from = match start {
        StartFrom::Latest => None,
        StartFrom::Earliest => Some(0),
        StartFrom::Time(t) => Some(row::micros(t)),
    };
    if let (true, Some(from_us)) = (created, from) {
        sqlx::query(
            "INSERT INTO tidings_queue (topic, group_name, position)
             SELECT topic, $2, position FROM tidings_messages
             WHERE topic = $1 AND published_at >= to_timestamp($3::float8 / 1e6)
             ORDER BY position
             ON CONFLICT DO NOTHING",
        )
        .bind(topic)
        .bind(group)
        .bind(from_us as f64)
        .execute(&mut *tx)
        .await
        .map_err(broker_error)?;
    }
    tx.commit().await.map_err(broker_error)
}

#[async_trait]
impl Publisher for PostgresBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        self.publish_batch(topic, vec![message])
            .await
            .pop()
            .unwrap_or(Ok(Receipt::Accepted))
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<Receipt>> {
        if self.inner.closed.load(Ordering::Acquire) {
            return messages
                .iter()
                .map(|_| Err(Error::Closed("publisher")))
                .collect();
        }
        match write(&self.inner.pool, topic, &messages).await {
            Ok(()) => messages.iter().map(|_| Ok(Receipt::Accepted)).collect(),
            Err(e) => {
                let text = e.to_string();
                messages
                    .iter()
                    .map(|_| {
                        Err(Error::Publish {
                            topic: topic.to_owned(),
                            transient: true,
                            source: text.clone().into(),
                        })
                    })
                    .collect()
            }
        }
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        Ok(())
    }
}

#[async_trait]
impl Subscriber for PostgresBroker {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::at_least_once()
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        subscription.check(self.name(), self.capabilities())?;
        stream::subscribe(self.inner.clone(), subscription).await
    }

    async fn declare_group(&self, topic: &str, group: &str) -> Result<()> {
        declare(&self.inner, topic, group, StartFrom::Latest).await
    }

    fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        format!("{topic}.{group}.dlq")
    }
}

/// `connected` while a connection can be had, `stopped` once closed.
impl HealthCheck for PostgresBroker {
    fn check(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            if self.inner.closed.load(Ordering::Acquire) {
                return Health::new(State::Stopped);
            }
            match sqlx::query("SELECT 1").execute(&self.inner.pool).await {
                Ok(_) => Health::new(State::Connected),
                Err(e) => Health::because(State::Reconnecting, e.to_string()),
            }
        })
    }
}
