//! Publishing: `XADD` (Streams) or `PUBLISH` (Pub/Sub).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use redis::{RedisError, RedisResult, Value};
use tidings_core::{Error, Message, Publisher, Receipt, Result};

use crate::config::{RedisConfig, RedisMode};
use crate::headers::{self, Layout};
use crate::{Conn, is_connection_error};

/// Publishes to Redis streams (`XADD`) or channels (`PUBLISH`).
///
/// `publish` returns once Redis replied: the entry id
/// ([`Receipt::EntryId`]) in Streams mode, [`Receipt::Accepted`] in Pub/Sub mode.
pub struct RedisPublisher {
    conn: Conn,
    config: Arc<RedisConfig>,
    layout: Layout,
    closed: AtomicBool,
}

impl std::fmt::Debug for RedisPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPublisher")
            .field("mode", &self.config.mode)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

/// The `XADD` command for `message` on `topic`.
pub(crate) fn xadd(
    config: &RedisConfig,
    layout: &Layout,
    topic: &str,
    message: &Message,
) -> redis::Cmd {
    // Sized up front: growing the buffer argument by argument is measurable.
    let headers: usize = message.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    let fields = 2 * (message.headers.len() + 10);
    let mut cmd = redis::Cmd::with_capacity(
        fields + 6,
        message.payload.len() + headers + topic.len() + 192,
    );
    cmd.arg("XADD").arg(topic);
    if let Some(n) = config.max_len_for(topic) {
        cmd.arg("MAXLEN").arg("~").arg(n);
    }
    cmd.arg("*");
    headers::add_fields(&mut cmd, layout, message);
    cmd
}

/// The `PUBLISH` command for `message` on `channel`.
pub(crate) fn publish_cmd(layout: &Layout, channel: &str, message: &Message) -> redis::Cmd {
    let mut cmd = redis::cmd("PUBLISH");
    cmd.arg(channel).arg(headers::encode_body(layout, message));
    cmd
}

/// Sends one write (`XADD` of a message or a dead letter) and, when the
/// configuration asks replicas to confirm writes, a `WAIT` after it on the
/// same connection; its reply.
pub(crate) async fn write(
    conn: &mut Conn,
    config: &RedisConfig,
    cmd: redis::Cmd,
) -> RedisResult<Value> {
    if !waits(config) {
        return cmd.query_async(conn).await;
    }
    let mut pipe = redis::Pipeline::with_capacity(2);
    pipe.add_command(cmd);
    let mut replies = write_all(conn, config, pipe).await?;
    replies.pop().ok_or_else(|| {
        RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "no reply to a write",
        ))
    })
}

/// Sends a pipeline of writes, followed by `WAIT` when replicas must
/// confirm them (see [`write`]); the replies of the writes. A pipeline goes
/// to one connection (on a cluster, the node of its first key), so the
/// `WAIT` covers exactly these writes and everything before them.
pub(crate) async fn write_all(
    conn: &mut Conn,
    config: &RedisConfig,
    mut pipe: redis::Pipeline,
) -> RedisResult<Vec<Value>> {
    if !waits(config) {
        return pipe.query_async(conn).await;
    }
    let timeout = config.wait_timeout.as_millis().clamp(1, u64::MAX as u128) as u64;
    pipe.cmd("WAIT").arg(config.wait_replicas).arg(timeout);
    let mut replies: Vec<Value> = pipe.query_async(conn).await?;
    match replies.pop() {
        Some(Value::Int(n)) if n >= i64::from(config.wait_replicas) => Ok(replies),
        Some(Value::Int(n)) => {
            conn.recheck().await;
            Err(RedisError::from(std::io::Error::new(
                // A timeout, and so transient: the caller retries, as after a
                // connection fault (the write may still arrive: at least once).
                std::io::ErrorKind::TimedOut,
                format!(
                    "written on the master, but {n} of the {} replicas asked for confirmed it within {:?}",
                    config.wait_replicas, config.wait_timeout
                ),
            )))
        }
        // `WAIT` refused (an ACL without it, say): that error, as it is.
        Some(Value::ServerError(e)) => Err(e.into()),
        other => Err(RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "an unexpected reply to WAIT",
            format!("{other:?}"),
        ))),
    }
}

/// Whether writes wait for replicas (Streams mode only: Pub/Sub keeps nothing).
fn waits(config: &RedisConfig) -> bool {
    config.wait_replicas > 0 && config.mode == RedisMode::Streams
}

fn publish_error(topic: &str, e: RedisError) -> Error {
    Error::Publish {
        topic: topic.to_owned(),
        transient: is_connection_error(&e),
        source: Box::new(e),
    }
}

fn receipt(topic: &str, value: Value) -> Result<Receipt> {
    match value {
        Value::BulkString(id) => Ok(Receipt::EntryId(
            String::from_utf8(id)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        )),
        Value::SimpleString(id) => Ok(Receipt::EntryId(id)),
        Value::Int(_) | Value::Okay => Ok(Receipt::Accepted),
        Value::ServerError(e) => Err(publish_error(topic, e.into())),
        other => Err(Error::Publish {
            topic: topic.to_owned(),
            source: format!("unexpected reply {other:?}").into(),
            transient: false,
        }),
    }
}

impl RedisPublisher {
    pub(crate) fn new(conn: Conn, config: Arc<RedisConfig>, layout: Layout) -> Self {
        RedisPublisher {
            conn,
            config,
            layout,
            closed: AtomicBool::new(false),
        }
    }

    fn command(&self, topic: &str, message: &Message) -> redis::Cmd {
        match self.config.mode {
            RedisMode::Streams => xadd(&self.config, &self.layout, topic, message),
            RedisMode::PubSub => publish_cmd(&self.layout, topic, message),
        }
    }

    fn check(&self, topic: &str) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("publisher"));
        }
        if topic.is_empty() {
            return Err(Error::Config {
                key: "topic".into(),
                message: "must not be empty".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Publisher for RedisPublisher {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        self.check(topic)?;
        let cmd = self.command(topic, &message);
        drop(message);
        let reply = write(&mut self.conn.clone(), &self.config, cmd)
            .await
            .map_err(|e| publish_error(topic, e))?;
        receipt(topic, reply)
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<Receipt>> {
        if let Err(e) = self.check(topic) {
            return messages
                .iter()
                .map(|_| match &e {
                    Error::Closed(what) => Err(Error::Closed(what)),
                    other => Err(Error::Config {
                        key: "topic".into(),
                        message: other.to_string(),
                    }),
                })
                .collect();
        }
        if messages.is_empty() {
            return Vec::new();
        }
        let mut pipe = redis::Pipeline::with_capacity(messages.len());
        pipe.ignore_errors();
        for message in &messages {
            pipe.add_command(self.command(topic, message));
        }
        let count = messages.len();
        drop(messages);
        // With `ignore_errors`, a rejected command is a `Value::ServerError` in its slot.
        let replies = write_all(&mut self.conn.clone(), &self.config, pipe).await;
        match replies {
            Ok(replies) if replies.len() == count => {
                replies.into_iter().map(|v| receipt(topic, v)).collect()
            }
            Ok(replies) => (0..count)
                .map(|_| {
                    Err(Error::Publish {
                        topic: topic.to_owned(),
                        source: format!("{} replies for {count} commands", replies.len()).into(),
                        transient: true,
                    })
                })
                .collect(),
            Err(e) => {
                let transient = is_connection_error(&e);
                let text = e.to_string();
                (0..count)
                    .map(|_| {
                        Err(Error::Publish {
                            topic: topic.to_owned(),
                            source: text.clone().into(),
                            transient,
                        })
                    })
                    .collect()
            }
        }
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}
