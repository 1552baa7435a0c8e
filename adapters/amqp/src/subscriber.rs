//! Consuming: group queues, private queues, settlement, retry queues, dead
//! letters and recovery.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use tidings_core::delivery::header;
use tidings_core::in_flight::{InFlight, Slot};
use tidings_core::{
    Acker, Capabilities, DeadLetter, Delivery, DeliveryStream, Dialect, Error, Message, Result,
    Subscriber, Subscription,
};

use crate::config::DeadLetterTarget;
use crate::config::QueueType;
use crate::conn::{self, Connector, GroupNames, NAME};
use crate::headers::{self, short};

/// Subscribes to topics: a durable queue per (group, topic pattern), or an
/// exclusive auto-delete queue for a private subscription.
pub struct AmqpSubscriber {
    connector: Arc<Connector>,
}

impl AmqpSubscriber {
    pub(crate) fn new(connector: Arc<Connector>) -> Self {
        AmqpSubscriber { connector }
    }
}

#[async_trait]
impl Subscriber for AmqpSubscriber {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            persistent: true,
            consumer_groups: true,
            private_subscriptions: true,
            order_per_key: self.connector.config.single_active_consumer,
            redelivery: true,
            delayed_nack: true,
            native_dead_letters: true,
            at_most_once: false,
            replay: false,
            retains_for_declared_groups: true,
        }
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        subscription.check(self.name(), self.capabilities())?;
        let config = &self.connector.config;
        let topic = subscription.topic.clone();
        let target = match &subscription.group {
            Some(group) => Target::Group(GroupNames::new(config, &topic, group)),
            None => Target::Private {
                exchange: GroupNames::new(config, &topic, "private").exchange,
                dlq_topic: conn::dead_letter_topic(config, &topic, "private"),
            },
        };
        let prefetch = subscription.prefetch.clamp(1, usize::from(u16::MAX));
        let route = Arc::new(Route {
            dialect: subscription
                .dialect
                .clone()
                .unwrap_or_else(|| config.dialect.clone()),
            connector: self.connector.clone(),
            topic: topic.as_str().into(),
            group: subscription.group.as_deref().map(Arc::from),
            target,
            retry_queues: Mutex::default(),
        });
        let (tx, rx) = mpsc::channel(prefetch);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(run(
            route,
            prefetch,
            tx,
            stop_rx,
            InFlight::new(prefetch),
            ready_tx,
        ));
        match ready_rx.await {
            Ok(Ok(())) => Ok(Box::new(AmqpStream {
                rx,
                stop: stop_tx,
                task: Some(task),
                closed: false,
            })),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Subscribe {
                topic,
                source: "the subscription task ended before it started".into(),
            }),
        }
    }

    async fn declare_group(&self, topic: &str, group: &str) -> Result<()> {
        let config = &self.connector.config;
        let names = GroupNames::new(config, topic, group);
        let conn = self.connector.connection().await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(conn::connection_error)?;
        let declared = conn::declare_group(&ch, config, &names).await;
        let _ = ch.close(200, "OK".into()).await;
        declared
    }

    fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        conn::dead_letter_topic(&self.connector.config, topic, group)
    }

    async fn groups(&self, topic: &str, named: &[String]) -> Result<Vec<tidings_core::GroupStats>> {
        crate::groups::report(&self.connector, topic, named).await
    }
}

enum Target {
    Group(GroupNames),
    Private { exchange: String, dlq_topic: String },
}

/// What one subscription's deliveries share.
struct Route {
    /// How this subscription's messages are read (and retried copies written).
    dialect: Dialect,
    connector: Arc<Connector>,
    topic: Arc<str>,
    group: Option<Arc<str>>,
    target: Target,
    /// Retry queues declared so far (declaring is idempotent; this saves round trips).
    retry_queues: Mutex<HashSet<String>>,
}

impl Route {
    fn quorum(&self) -> bool {
        matches!(self.target, Target::Group(_))
            && self.connector.config.queue_type == QueueType::Quorum
    }

    fn dlq_topic(&self) -> &str {
        match &self.target {
            Target::Group(n) => &n.dlq_topic,
            Target::Private { dlq_topic, .. } => dlq_topic,
        }
    }

    /// Opens a channel, declares what the subscription needs and starts consuming.
    async fn start(&self, prefetch: usize) -> Result<(Channel, Consumer, Arc<str>)> {
        let config = &self.connector.config;
        let conn = self.connector.connection().await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(conn::connection_error)?;
        let qos = u16::try_from(prefetch).unwrap_or(u16::MAX);
        ch.basic_qos(qos, BasicQosOptions::default())
            .await
            .map_err(conn::connection_error)?;
        let subscribe_error = |e: lapin::Error| Error::Subscribe {
            topic: self.topic.to_string(),
            source: e.into(),
        };
        let queue: Arc<str> = match &self.target {
            Target::Group(names) => {
                conn::declare_group(&ch, config, names).await?;
                names.queue.as_str().into()
            }
            Target::Private { exchange, .. } => {
                let options = QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                };
                let mut args = FieldTable::default();
                args.insert(
                    "x-queue-type".into(),
                    lapin::types::AMQPValue::LongString("classic".into()),
                );
                let q = ch
                    .queue_declare("".into(), options, args)
                    .await
                    .map_err(subscribe_error)?;
                let key = short(&self.topic).map_err(|e| Error::Config {
                    key: "topic".into(),
                    message: e.to_string(),
                })?;
                let ex = short(exchange).map_err(|e| Error::Config {
                    key: "exchange".into(),
                    message: e.to_string(),
                })?;
                ch.queue_bind(
                    q.name().clone(),
                    ex,
                    key,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(subscribe_error)?;
                q.name().as_str().into()
            }
        };
        let consumer = ch
            .basic_consume(
                short(&queue).map_err(|e| Error::Config {
                    key: "group".into(),
                    message: e.to_string(),
                })?,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(subscribe_error)?;
        Ok((ch, consumer, queue))
    }

    fn delivery(
        self: &Arc<Self>,
        ch: &Channel,
        queue: &Arc<str>,
        d: lapin::message::Delivery,
        slot: Slot,
    ) -> Delivery {
        let received = headers::decode(
            &self.dialect,
            &d.properties,
            Bytes::from(d.data),
            Some(d.routing_key.as_str()),
        );
        // The attempt header is Tidings' own count, written on the copies it
        // republishes straight to the group's queue (the default exchange,
        // directly or out of a retry queue). On a message that came through
        // the topic exchange any client wrote it: not trusted, or one
        // `tidings-attempt: 4294967295` would make the first failure final.
        let base = match received.attempt {
            Some(n) if d.exchange.as_str().is_empty() => n.max(1),
            _ => 1,
        };
        // `x-delivery-count` is the broker's count on a quorum queue's
        // redeliveries; on a first delivery, or on a classic queue, any
        // client wrote it (the same forgery as the attempt header's).
        let extra = match received.delivery_count {
            Some(n) if self.quorum() && d.redelivered => u32::try_from(n).unwrap_or(u32::MAX),
            _ => u32::from(d.redelivered && !self.quorum()),
        };
        let attempt = base.saturating_add(extra);
        let topic: Arc<str> = match received.topic {
            Some(t) if *t == *self.topic => self.topic.clone(),
            Some(t) => t.into(),
            None if d.routing_key.as_str() == &*self.topic => self.topic.clone(),
            None => d.routing_key.as_str().into(),
        };
        let message = Arc::new(received.message);
        let acker = AmqpAcker {
            has_message_id: d.properties.message_id().is_some(),
            route: self.clone(),
            channel: ch.clone(),
            tag: d.delivery_tag,
            message: message.clone(),
            topic: topic.clone(),
            attempt,
            queue: queue.clone(),
            settled: false,
            _slot: slot,
        };
        let delivery = Delivery::new(message, topic, self.group.clone(), attempt, Box::new(acker));
        match received.undecodable {
            Some(why) => delivery.rejected(why),
            None => delivery,
        }
    }

    /// Publishes a copy of `message` with the next attempt number to the
    /// group's queue, through a retry queue when there is a delay.
    async fn republish(
        &self,
        queue: &str,
        message: &Message,
        topic: &str,
        attempt: u32,
        delay: Option<u64>,
    ) -> Result<()> {
        let next = attempt.saturating_add(1).to_string();
        let first = message
            .headers
            .get(header::FIRST_FAILURE)
            .cloned()
            .unwrap_or_else(tidings_core::time::now_rfc3339);
        let (props, body) = headers::encode(
            &self.dialect,
            message,
            &[
                (header::ATTEMPT, &next),
                (headers::TOPIC, topic),
                (header::FIRST_FAILURE, &first),
            ],
        )
        .map_err(|e| Error::Publish {
            topic: topic.to_owned(),
            source: e.into(),
            transient: false,
        })?;
        let c = &self.connector;
        let Some(ms) = delay else {
            return c.publish("", queue, &body, props).await.map(drop);
        };
        let private = matches!(self.target, Target::Private { .. });
        let name = format!("{queue}.retry.{ms}");
        let known = self.retry_lock().contains(&name);
        if !known {
            self.declare_retry(queue, ms, private).await?;
        }
        match c.publish("", &name, &body, props.clone()).await {
            // The retry queue vanished (deleted, or expired): declare it again once.
            Err(Error::Unroutable { .. }) if known => {
                self.declare_retry(queue, ms, private).await?;
                c.publish("", &name, &body, props).await.map(drop)
            }
            other => other.map(drop),
        }
    }

    fn retry_lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.retry_queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn declare_retry(&self, queue: &str, ms: u64, private: bool) -> Result<()> {
        let conn = self.connector.connection().await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(conn::connection_error)?;
        let declared =
            conn::declare_retry_queue(&ch, &self.connector.config, queue, ms, private).await;
        let _ = ch.close(200, "OK".into()).await;
        let name = declared?;
        self.retry_lock().insert(name);
        Ok(())
    }
}

/// Settles one delivery on the channel it came from.
struct AmqpAcker {
    /// Whether the message carries an AMQP `message-id`: one without gets
    /// its id at the first delivery, and keeps it only on a copy we publish.
    has_message_id: bool,
    route: Arc<Route>,
    channel: Channel,
    tag: u64,
    message: Arc<Message>,
    topic: Arc<str>,
    attempt: u32,
    queue: Arc<str>,
    settled: bool,
    _slot: Slot,
}

impl AmqpAcker {
    fn settle_error(&self, e: impl Into<tidings_core::BoxError>) -> Error {
        Error::Settle {
            id: self.message.id.clone(),
            source: e.into(),
        }
    }

    async fn basic_ack(&mut self) -> Result<()> {
        self.settled = true;
        self.channel
            .basic_ack(self.tag, BasicAckOptions::default())
            .await
            .map_err(|e| self.settle_error(e))
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.basic_ack().await
    }

    async fn nack(mut self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let delay = delay.filter(|d| !d.is_zero()).map(conn::delay_bucket);
        if delay.is_none() && self.route.quorum() && self.has_message_id {
            // The quorum queue counts the return in `x-delivery-count`.
            self.settled = true;
            return self
                .channel
                .basic_nack(
                    self.tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await
                .map_err(|e| self.settle_error(e));
        }
        // A copy with the next attempt number, then ack the original. If the
        // copy cannot be published the original stays unsettled and comes back.
        let republished = self
            .route
            .republish(&self.queue, &self.message, &self.topic, self.attempt, delay)
            .await;
        if let Err(e) = republished {
            return Err(self.settle_error(e));
        }
        self.basic_ack().await
    }

    async fn release(mut self: Box<Self>) -> Result<()> {
        self.settled = true;
        self.channel
            .basic_reject(self.tag, BasicRejectOptions { requeue: true })
            .await
            .map_err(crate::conn::connection_error)
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<()> {
        let dead = letter.letter_for(&self.message);
        let route = self.route.clone();
        let props = headers::properties(&dead, &[]).map_err(|e| self.settle_error(e))?;
        let target = route
            .group
            .as_deref()
            .and_then(|g| route.connector.config.dead_letters.get(g));
        match target {
            Some(DeadLetterTarget::Nowhere) => {
                warn!(id = %self.message.id, topic = %self.topic, reason = %letter.reason,
                    error = %letter.error, "dead letters of this group go nowhere (dead_letters.<group>=none); dropping it");
                return self.basic_ack().await;
            }
            Some(DeadLetterTarget::Queue(queue)) => {
                route
                    .connector
                    .publish("", queue, &dead.payload, props)
                    .await
                    .map_err(|e| self.settle_error(e))?;
                return self.basic_ack().await;
            }
            None => {}
        }
        let dlx = &route.connector.config.dead_letter_exchange;
        match route
            .connector
            .publish(dlx, route.dlq_topic(), &dead.payload, props)
            .await
        {
            Ok(_) => {}
            Err(Error::Unroutable { .. }) if route.group.is_none() => {
                warn!(id = %self.message.id, topic = %self.topic,
                    "no queue for the dead letters of a private subscription; dropping it");
            }
            Err(e) => return Err(self.settle_error(e)),
        }
        self.basic_ack().await
    }
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Unsettled: hand it back to the queue now rather than when the channel closes.
        let (channel, tag) = (self.channel.clone(), self.tag);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = channel
                    .basic_reject(tag, BasicRejectOptions { requeue: true })
                    .await;
            });
        }
    }
}

/// The subscription's task: consume, and reconnect with backoff when the
/// channel or the connection closes.
async fn run(
    route: Arc<Route>,
    prefetch: usize,
    tx: mpsc::Sender<Delivery>,
    mut stop: watch::Receiver<bool>,
    in_flight: InFlight,
    ready: oneshot::Sender<Result<()>>,
) {
    let config = &route.connector.config;
    let mut ready = Some(ready);
    let mut backoff = config.reconnect_min;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = route.start(prefetch).await;
        let (ch, mut consumer, queue) = match started {
            Ok(s) => s,
            Err(e) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(e));
                    return;
                }
                warn!(topic = %route.topic, error = %e, ?backoff, "resubscribing failed; retrying");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(config.reconnect_max);
                continue;
            }
        };
        match ready.take() {
            Some(ready) => {
                let _ = ready.send(Ok(()));
            }
            None => debug!(topic = %route.topic, %queue, "resumed consuming"),
        }
        backoff = config.reconnect_min;
        let stopped = pump(
            &route,
            &ch,
            &queue,
            &mut consumer,
            &tx,
            &mut stop,
            &in_flight,
        )
        .await;
        if stopped {
            let _ = ch
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
            return;
        }
        warn!(topic = %route.topic, %queue, "the consumer's channel closed; reconnecting");
    }
}

/// Forwards deliveries until asked to stop (`true`) or the consumer ends (`false`).
async fn pump(
    route: &Arc<Route>,
    ch: &Channel,
    queue: &Arc<str>,
    consumer: &mut Consumer,
    tx: &mpsc::Sender<Delivery>,
    stop: &mut watch::Receiver<bool>,
    in_flight: &InFlight,
) -> bool {
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return true,
            next = consumer.next() => next,
        };
        let d = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                warn!(topic = %route.topic, error = %e, "consumer error");
                return false;
            }
            None => return false,
        };
        let slot = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => None,
            slot = in_flight.take() => slot,
        };
        let Some(slot) = slot else {
            let _ = ch
                .basic_reject(d.delivery_tag, BasicRejectOptions { requeue: true })
                .await;
            return true;
        };
        let delivery = route.delivery(ch, queue, d, slot);
        if tx.send(delivery).await.is_err() {
            return true;
        }
    }
}

/// The stream of one subscription.
struct AmqpStream {
    rx: mpsc::Receiver<Delivery>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    closed: bool,
}

impl Stream for AmqpStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.closed {
            return Poll::Ready(None);
        }
        self.rx.poll_recv(cx).map(|d| d.map(Ok))
    }
}

impl DeliveryStream for AmqpStream {
    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.stop.send_replace(true);
            self.closed = true;
            if let Some(task) = self.task.take() {
                let _ = task.await;
            }
            // Taken from the broker but never handed out: back to the queue.
            self.rx.close();
            while self.rx.try_recv().is_ok() {}
            Ok(())
        })
    }
}

impl Drop for AmqpStream {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
