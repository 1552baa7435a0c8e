//! Subscribing: the [`Subscriber`] trait, subscriptions and capabilities.

use std::time::SystemTime;

use async_trait::async_trait;
use futures::Stream;
use futures::future::BoxFuture;

use crate::delivery::Delivery;
use crate::error::{Error, Result};

/// What an adapter can do, declared as data.
///
/// The consumer runtime and the conformance suite read these: configuration
/// that asks for something an adapter cannot do is rejected when the
/// subscription starts ([`Subscription::check`]), never silently ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Messages outlive the process and a broker restart.
    pub persistent: bool,
    /// Groups with competing consumers and fan-out across groups.
    pub consumer_groups: bool,
    /// Subscriptions without a group.
    pub private_subscriptions: bool,
    /// Messages with the same key reach one consumer in publish order.
    pub order_per_key: bool,
    /// A nacked message is delivered again with a higher attempt number.
    pub redelivery: bool,
    /// A nack can ask for a delay before the redelivery.
    pub delayed_nack: bool,
    /// Dead letters go to a destination the broker manages.
    pub native_dead_letters: bool,
    /// Delivery is at most once: no acks, a message is lost if its handler fails.
    pub at_most_once: bool,
    /// A subscription can start from the beginning or a point in time.
    pub replay: bool,
    /// Messages published before a group's first consumer starts are kept for it
    /// once the group was declared.
    pub retains_for_declared_groups: bool,
}

impl Capabilities {
    /// The capabilities of an at-least-once broker that keeps history
    /// (Redis Streams, Kafka, NATS JetStream): everything but dead letters
    /// managed by the broker itself.
    pub const fn at_least_once() -> Self {
        Capabilities {
            persistent: true,
            consumer_groups: true,
            private_subscriptions: true,
            order_per_key: true,
            redelivery: true,
            delayed_nack: true,
            native_dead_letters: false,
            at_most_once: false,
            replay: true,
            retains_for_declared_groups: true,
        }
    }

    /// Every capability of an at-least-once broker, native dead letters included.
    pub const fn full() -> Self {
        Capabilities {
            native_dead_letters: true,
            ..Capabilities::at_least_once()
        }
    }

    /// The capabilities of an at-most-once broker (NATS core, Redis Pub/Sub):
    /// groups share the load, nothing is kept, nothing is redelivered.
    pub const fn at_most_once() -> Self {
        Capabilities {
            persistent: false,
            consumer_groups: true,
            private_subscriptions: true,
            order_per_key: true,
            redelivery: false,
            delayed_nack: false,
            native_dead_letters: false,
            at_most_once: true,
            replay: false,
            retains_for_declared_groups: false,
        }
    }
}

/// Where a subscription starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StartFrom {
    /// New messages only (the default for private subscriptions). For a
    /// group, where it starts when the broker creates it; an existing group
    /// resumes where it left off.
    #[default]
    Latest,
    /// Everything the broker still holds (replay).
    Earliest,
    /// Messages from this time on.
    Time(SystemTime),
}

/// What to subscribe to and how.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Subscription {
    /// The topic.
    pub topic: String,
    /// The group; `None` for a private subscription.
    pub group: Option<String>,
    /// The bound on unsettled deliveries handed out by this subscription.
    pub prefetch: usize,
    /// Where to start.
    pub start: StartFrom,
    /// How messages are read, when not the adapter's configured dialect.
    pub dialect: Option<crate::Dialect>,
}

impl Subscription {
    /// A subscription to `topic` in `group`, with a prefetch of 64.
    pub fn group(topic: impl Into<String>, group: impl Into<String>) -> Self {
        Subscription {
            topic: topic.into(),
            group: Some(group.into()),
            prefetch: 64,
            start: StartFrom::Latest,
            dialect: None,
        }
    }

    /// A private subscription to `topic`, with a prefetch of 64.
    pub fn private(topic: impl Into<String>) -> Self {
        Subscription {
            topic: topic.into(),
            group: None,
            prefetch: 64,
            start: StartFrom::Latest,
            dialect: None,
        }
    }

    /// Reads this subscription's messages in `dialect` instead of the
    /// adapter's configured one (a legacy format on one topic, CloudEvents
    /// on another).
    #[must_use]
    pub fn with_dialect(mut self, dialect: crate::Dialect) -> Self {
        self.dialect = Some(dialect);
        self
    }

    /// Sets the bound on unsettled deliveries (at least 1).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Sets where to start reading.
    #[must_use]
    pub fn starting_at(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Checks the subscription against what the adapter can do.
    pub fn check(&self, adapter: &'static str, caps: Capabilities) -> Result<()> {
        let unsupported = |what: &str| {
            Err(Error::Unsupported {
                adapter,
                what: what.to_owned(),
            })
        };
        if self.topic.is_empty() {
            return Err(Error::Config {
                key: "topic".into(),
                message: "must not be empty".into(),
            });
        }
        match &self.group {
            Some(g) if g.is_empty() => Err(Error::Config {
                key: "group".into(),
                message: "must not be empty; use a private subscription for none".into(),
            }),
            Some(_) if !caps.consumer_groups => unsupported("consumer groups"),
            None if !caps.private_subscriptions => unsupported("subscriptions without a group"),
            _ if self.start != StartFrom::Latest && !caps.replay => {
                unsupported("replay (starting from the beginning or a time)")
            }
            _ => Ok(()),
        }
    }
}

/// A stream of deliveries from one subscription.
///
/// The stream ends after [`close`](DeliveryStream::close). Deliveries already
/// handed out stay valid after close and must still be settled; connections
/// are released once the stream and all its deliveries are dropped.
pub trait DeliveryStream: Stream<Item = Result<Delivery>> + Send + Unpin {
    /// Stops intake: no new deliveries are taken from the broker.
    fn close(&mut self) -> BoxFuture<'_, Result<()>>;

    /// Resolves once the adapter has finished closing after
    /// [`close`](DeliveryStream::close): the deliveries it handed out are
    /// settled or dropped, and what follows is done (Kafka commits the final
    /// offsets and leaves the group). It may be awaited while deliveries are
    /// still being settled elsewhere; adapters that must wait for them do,
    /// within a bound of their own. The consumer runtime awaits it in
    /// [`Consumer::shutdown`](crate::Consumer::shutdown), so that another
    /// member taking over starts after what this one settled. Resolves at
    /// once by default.
    fn closed(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Subscribes to topics.
///
/// When [`subscribe`](Subscriber::subscribe) returns, the subscription is in
/// place: a message published afterwards reaches it. The trait is object safe.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// The adapter's name, used in errors and as `messaging.system`.
    fn name(&self) -> &'static str;

    /// What this adapter can do with its current configuration.
    fn capabilities(&self) -> Capabilities;

    /// Starts a subscription.
    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>>;

    /// Creates the group's durable state (queue, consumer group, durable
    /// consumer) ahead of its first consumer, so that messages published from
    /// now on are kept for it. A no-op where groups need no declaration.
    async fn declare_group(&self, topic: &str, group: &str) -> Result<()> {
        let _ = (topic, group);
        Ok(())
    }

    /// The topic that the dead letters of `group` on `topic` can be read from
    /// with this same subscriber.
    fn dead_letter_topic(&self, topic: &str, group: &str) -> String;

    /// What the broker can tell about the groups of `topic`: the ones named
    /// in `groups`, or every group it knows of when `groups` is empty. A
    /// named group the broker has no state for is reported with no figures.
    /// Brokers that cannot list a topic's groups (RabbitMQ over AMQP, Kafka
    /// without its admin API) answer an empty `groups` with
    /// [`Error::Unsupported`] naming what to give instead.
    async fn groups(&self, topic: &str, groups: &[String]) -> Result<Vec<crate::GroupStats>> {
        let _ = (topic, groups);
        Err(Error::Unsupported {
            adapter: self.name(),
            what: "reporting the groups of a topic".into(),
        })
    }
}
