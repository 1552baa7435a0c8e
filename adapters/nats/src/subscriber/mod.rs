//! Subscribing: durable pull consumers (JetStream groups), ordered consumers
//! (JetStream private subscriptions), queue groups and plain subscriptions
//! (core NATS). The pump that moves a subscription's messages to the
//! consumer is in `pump`; settling them, in `ackers`.

mod ackers;
mod pump;

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, pull};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use tidings_core::{
    Capabilities, DeliveryStream, Error, Result, StartFrom, Subscriber, Subscription,
};

use crate::config::Mode;
use crate::stale_pull;
use crate::{NAME, Shared, broker_error, given_up};
use tidings_core::in_flight::InFlight;

use ackers::Tracker;
use pump::{NatsStream, Pump};

/// Subscribes to NATS. Made by [`NatsBus::subscriber`](crate::NatsBus::subscriber).
pub struct NatsSubscriber {
    shared: Arc<Shared>,
}

/// The prefetch a declared group's consumer gets until a subscription sets its own.
const DECLARED_PREFETCH: usize = 64;

impl NatsSubscriber {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        NatsSubscriber { shared }
    }
}

/// Returns once the server has processed everything this connection sent
/// before the call. `Client::flush` only empties the socket buffer, so a
/// SUB sent just before may still be unread by the server when a message
/// from another connection arrives. The server handles one connection's
/// commands in order, so a message to a fresh inbox of ours coming back
/// proves every earlier command was processed.
async fn round_trip(
    client: &async_nats::Client,
    timeout: Duration,
) -> std::result::Result<(), tidings_core::BoxError> {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await?;
    client.publish(inbox, Bytes::new()).await?;
    client.flush().await?;
    let back = tokio::time::timeout(timeout, echo.next()).await;
    let _ = echo.unsubscribe().await;
    match back {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("the connection closed before the subscription was confirmed".into()),
        Err(_) => {
            Err(format!("the server did not confirm the subscription within {timeout:?}").into())
        }
    }
}

fn subscribe_error(topic: &str, e: impl Into<tidings_core::BoxError>) -> Error {
    Error::Subscribe {
        topic: topic.to_owned(),
        source: e.into(),
    }
}

/// Creates (or checks and updates) the durable pull consumer of `group` on `topic`.
async fn ensure_consumer(
    shared: &Shared,
    topic: &str,
    group: &str,
    prefetch: usize,
    start: StartFrom,
) -> Result<consumer::Consumer<pull::Config>> {
    let stream = shared.ensure_stream(topic).await?;
    let subject = shared.topology.subject(topic)?;
    let durable = shared.topology.durable(topic, group);
    let c = &shared.config;
    let max_ack_pending = c.max_ack_pending.unwrap_or(prefetch as i64).max(1);
    let max_deliver = c.max_deliver.unwrap_or(-1);
    let js = &shared.js;
    match js
        .get_consumer_from_stream::<pull::Config, _, _>(&durable, &stream)
        .await
    {
        Ok(mut existing) => {
            let have = existing.cached_info().config.clone();
            if have.max_ack_pending != max_ack_pending
                || have.ack_wait != c.ack_wait
                || have.max_deliver != max_deliver
            {
                let wanted = <pull::Config as consumer::FromConsumer>::try_from_consumer_config(
                    have,
                )
                .map(|mut wanted| {
                    wanted.max_ack_pending = max_ack_pending;
                    wanted.ack_wait = c.ack_wait;
                    wanted.max_deliver = max_deliver;
                    wanted
                });
                // Creating an existing durable with changed limits updates it.
                let updated = match wanted {
                    Ok(wanted) => js
                        .create_consumer_on_stream(wanted, &stream)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match updated {
                    Ok(updated) => existing = updated,
                    Err(e) => {
                        warn!(%durable, %stream, error = %e, "updating the consumer's limits failed; keeping its settings")
                    }
                }
            }
            Ok(existing)
        }
        Err(_) => {
            let config = pull::Config {
                durable_name: Some(durable.clone()),
                description: Some(format!("tidings group `{group}` on `{topic}`")),
                filter_subject: subject,
                ack_policy: AckPolicy::Explicit,
                ack_wait: c.ack_wait,
                max_deliver,
                max_ack_pending,
                deliver_policy: deliver_policy(start, DeliverPolicy::New)?,
                ..Default::default()
            };
            match js.create_consumer_on_stream(config, &stream).await {
                Ok(created) => Ok(created),
                Err(create) => js
                    .get_consumer_from_stream::<pull::Config, _, _>(&durable, &stream)
                    .await
                    .map_err(|_| subscribe_error(topic, create)),
            }
        }
    }
}

fn deliver_policy(start: StartFrom, latest: DeliverPolicy) -> Result<DeliverPolicy> {
    Ok(match start {
        StartFrom::Latest => latest,
        StartFrom::Earliest => DeliverPolicy::All,
        StartFrom::Time(t) => {
            let nanos = t
                .duration_since(UNIX_EPOCH)
                .map_err(|_| Error::Config {
                    key: "start".into(),
                    message: "a start time before 1970".into(),
                })?
                .as_nanos();
            DeliverPolicy::ByStartTime {
                start_time: async_nats::datetime::from_nanos(nanos as i128).map_err(|e| {
                    Error::Config {
                        key: "start".into(),
                        message: e.to_string(),
                    }
                })?,
            }
        }
    })
}

#[async_trait]
impl Subscriber for NatsSubscriber {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        match self.shared.config.mode {
            Mode::JetStream => Capabilities::at_least_once(),
            Mode::Core => Capabilities::at_most_once(),
        }
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        subscription.check(self.name(), self.capabilities())?;
        let shared = self.shared.clone();
        let topic = subscription.topic.clone();
        let subject = shared.topology.subject(&topic)?;
        let prefetch = subscription.prefetch.max(1);
        let group = subscription.group.clone();
        if let Some(g) = &group
            && g.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::Config {
                key: "group".into(),
                message: format!("`{g}` holds whitespace, which NATS names cannot"),
            });
        }
        let (tx, rx) = mpsc::channel(prefetch.min(1024));
        let (stop_tx, stop) = watch::channel(false);
        let pump = Pump {
            dialect: subscription
                .dialect
                .clone()
                .unwrap_or_else(|| shared.config.dialect.clone()),
            shared: shared.clone(),
            topic: topic.as_str().into(),
            group: group.as_deref().map(Arc::from),
            in_flight: InFlight::new(prefetch),
            tx,
            stop,
            pull_end: stale_pull::needs_waiting(&shared.client.server_info().version)
                .then(Arc::default),
        };
        let pull_end = pump.pull_end.clone();
        let task = match (shared.config.mode, &group) {
            (Mode::JetStream, Some(g)) => {
                let consumer =
                    ensure_consumer(&shared, &topic, g, prefetch, subscription.start).await?;
                // Listening before pulling: no advisory is missed.
                let info = consumer.cached_info();
                // A queue subscription: one member of the group takes each advisory.
                let advisories = shared
                    .client
                    .queue_subscribe(
                        given_up::advisory_subject(&info.stream_name, &info.name),
                        info.name.clone(),
                    )
                    .await
                    .map_err(|e| subscribe_error(&topic, e))?;
                let messages = pull_messages(&consumer, prefetch, pump.pull_end.is_some())
                    .await
                    .map_err(|e| subscribe_error(&topic, e))?;
                let tracker = Tracker::start(&shared);
                tokio::spawn(pump.run_pull(
                    consumer,
                    messages,
                    advisories,
                    tracker,
                    prefetch,
                    subscription.start,
                ))
            }
            (Mode::JetStream, None) => {
                let stream = shared.ensure_stream(&topic).await?;
                let start = deliver_policy(subscription.start, DeliverPolicy::New)?;
                let messages = ordered_messages(&shared, &stream, &subject, start)
                    .await
                    .map_err(|e| subscribe_error(&topic, e))?;
                tokio::spawn(pump.run_ordered(stream, subject, messages))
            }
            (Mode::Core, group) => {
                let client = &shared.client;
                let sub = match group {
                    Some(g) => client.queue_subscribe(subject, g.clone()).await,
                    None => client.subscribe(subject).await,
                }
                .map_err(|e| subscribe_error(&topic, e))?;
                // The subscription is in place once the server has processed it.
                round_trip(client, shared.config.request_timeout)
                    .await
                    .map_err(|e| subscribe_error(&topic, e))?;
                tokio::spawn(pump.run_core(sub))
            }
        };
        Ok(Box::new(NatsStream {
            rx,
            stop: stop_tx,
            task: Some(task),
            pull_end,
        }))
    }

    async fn declare_group(&self, topic: &str, group: &str) -> Result<()> {
        match self.shared.config.mode {
            Mode::JetStream => {
                ensure_consumer(
                    &self.shared,
                    topic,
                    group,
                    DECLARED_PREFETCH,
                    StartFrom::Latest,
                )
                .await?;
                Ok(())
            }
            Mode::Core => Ok(()),
        }
    }

    fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        self.shared.topology.dead_letter_topic(topic, group)
    }

    async fn groups(&self, topic: &str, named: &[String]) -> Result<Vec<tidings_core::GroupStats>> {
        match self.shared.config.mode {
            Mode::JetStream => crate::groups::report(&self.shared, topic, named).await,
            Mode::Core => Err(Error::Unsupported {
                adapter: NAME,
                what: "groups on core NATS (queue groups keep no state)".into(),
            }),
        }
    }
}

/// The pull stream of a group; `old_server`: a server before 2.10, where
/// requests must expire soon (see `stale_pull`).
async fn pull_messages(
    consumer: &consumer::Consumer<pull::Config>,
    prefetch: usize,
    old_server: bool,
) -> std::result::Result<pull::Stream, async_nats::jetstream::consumer::StreamError> {
    let (expires, heartbeat) = if old_server {
        (stale_pull::EXPIRES_ON_OLD_SERVERS, Duration::from_secs(1))
    } else {
        (Duration::from_secs(30), Duration::from_secs(5))
    };
    consumer
        .stream()
        .max_messages_per_batch(prefetch.min(10_000))
        .expires(expires)
        .heartbeat(heartbeat)
        .messages()
        .await
}

async fn ordered_messages(
    shared: &Shared,
    stream: &str,
    subject: &str,
    deliver_policy: DeliverPolicy,
) -> Result<pull::Ordered> {
    let stream = shared.js.get_stream(stream).await.map_err(broker_error)?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(broker_error)?;
    consumer.messages().await.map_err(broker_error)
}
