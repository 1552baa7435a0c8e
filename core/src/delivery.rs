//! Deliveries: a received message and the means to settle it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::error::{BoxError, Error, Result};
use crate::extract::StateMap;
use crate::handler::HandlerError;
use crate::message::Message;
use crate::publisher::Receipt;

/// A received message, its attempt number, and the means to settle it:
/// [`ack`](Delivery::ack), [`nack`](Delivery::nack) or
/// [`dead_letter`](Delivery::dead_letter).
///
/// A delivery is settled once; settling it again is an
/// [`Error::AlreadySettled`]. A delivery dropped unsettled (a handler that
/// outlived the shutdown deadline, say) is never acked: the broker delivers
/// the message again later.
///
/// Most code never settles by hand: the consumer runtime settles by the
/// handler's result.
pub struct Delivery {
    message: Arc<Message>,
    topic: Arc<str>,
    group: Option<Arc<str>>,
    attempt: AtomicU32,
    max_attempts: Option<u32>,
    acker: Option<Box<dyn Acker>>,
    position: Option<Receipt>,
    /// Boxed: rare, and a delivery of at most 128 bytes is moved from layer
    /// to layer by a few register moves rather than a call to `memcpy`.
    rejection: Option<Box<HandlerError>>,
    /// The consumer's shared state, for the `State` extractor.
    state: Option<Arc<StateMap>>,
}

/// The adapter's side of a delivery: how to settle this one message.
///
/// Adapters implement this per delivery. Each method consumes the acker, so
/// an adapter never sees a second settlement. An acker dropped without being
/// called must leave the message to be redelivered.
#[async_trait]
pub trait Acker: Send + Sync + 'static {
    /// The message was handled: remove it for this group.
    async fn ack(self: Box<Self>) -> Result<()>;

    /// Acks at once, without a future, where the adapter can (the
    /// in-process bus; adapters that record acks and send them later):
    /// `Some` with the result, after which the acker is only dropped (and
    /// must not hand the message back then); `None`, the default, to
    /// [`ack`](Acker::ack). Saves the boxed future of an `ack` call per
    /// message on the hot path.
    fn ack_now(&mut self) -> Option<Result<()>> {
        None
    }

    /// Deliver the message again, not before `delay` if one is given,
    /// with the attempt number one higher.
    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()>;

    /// Send the message to the group's dead-letter destination with the
    /// letter's headers, then remove it for this group.
    async fn dead_letter(self: Box<Self>, letter: DeadLetter) -> Result<()>;

    /// Whether this reader still holds the message: false once the broker
    /// has handed it to another member of the group (a Kafka partition
    /// revoked from this member while the message was unsettled). Settling
    /// a message no longer held changes nothing at the broker. True by
    /// default: brokers that lease each message (Redis, RabbitMQ, NATS)
    /// hand it to no one else while it is held.
    fn is_held(&self) -> bool {
        true
    }

    /// Hand the message back unhandled, at once and without counting an
    /// attempt, and return once the broker has it. By default the acker is
    /// dropped, which does the same in the background; adapters whose
    /// hand-back is a broker call await it here, so a process that exits
    /// right after (a command-line tool) does not leave the message
    /// invisible until a timeout.
    async fn release(self: Box<Self>) -> Result<()> {
        drop(self);
        Ok(())
    }
}

impl Delivery {
    /// A delivery of `message` received from `topic`. Used by adapters.
    pub fn new(
        message: Arc<Message>,
        topic: Arc<str>,
        group: Option<Arc<str>>,
        attempt: u32,
        acker: Box<dyn Acker>,
    ) -> Self {
        Delivery {
            message,
            topic,
            group,
            attempt: AtomicU32::new(attempt.max(1)),
            max_attempts: None,
            acker: Some(acker),
            position: None,
            rejection: None,
            state: None,
        }
    }

    /// Marks a delivery the adapter could not read as a message (a foreign
    /// stream entry, a corrupt frame): the consumer runtime dead-letters it
    /// as [`Undecodable`](DeadLetterReason::Undecodable) with `why` as the
    /// error, without running the handler, through the same observed
    /// settlement as every other message. `message` is what could be
    /// salvaged of it. Used by adapters.
    #[must_use]
    pub fn rejected(mut self, why: impl Into<BoxError>) -> Self {
        self.rejection = Some(Box::new(HandlerError::undecodable(why)));
        self
    }

    /// Marks a delivery of a message the broker itself gave up on (NATS's
    /// `max_deliver` reached): the runtime dead-letters it as
    /// [`AttemptsExhausted`](DeadLetterReason::AttemptsExhausted) with `why`
    /// as the error, without running the handler. Used by adapters.
    #[must_use]
    pub fn given_up(mut self, why: impl Into<BoxError>) -> Self {
        self.rejection = Some(Box::new(HandlerError::exhausted(why)));
        self
    }

    /// Why the adapter hands this delivery over only to be dead-lettered
    /// (see [`rejected`](Delivery::rejected), [`given_up`](Delivery::given_up)).
    pub fn rejection(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.rejection.as_deref().map(HandlerError::source)
    }

    pub(crate) fn take_rejection(&mut self) -> Option<HandlerError> {
        self.rejection.take().map(|rejection| *rejection)
    }

    /// Records where the broker stored the message: a Kafka partition and
    /// offset ([`Receipt::Offset`]), a Redis stream entry id
    /// ([`Receipt::EntryId`]), a JetStream stream and stream sequence
    /// ([`Receipt::Sequence`], `duplicate` always `false`). Used by adapters
    /// that know it; observability layers put it on the consumer span.
    #[must_use]
    pub fn with_position(mut self, position: Receipt) -> Self {
        self.position = Some(position);
        self
    }

    /// Where the broker stored the message, when the adapter knows it (see
    /// [`with_position`](Delivery::with_position)); `None` for the in-process
    /// bus, AMQP, core NATS and Redis Pub/Sub.
    pub fn position(&self) -> Option<&Receipt> {
        self.position.as_ref()
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The message, shared.
    pub fn shared_message(&self) -> &Arc<Message> {
        &self.message
    }

    /// The topic the message was published to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The topic, shared.
    pub fn shared_topic(&self) -> &Arc<str> {
        &self.topic
    }

    /// The group it was delivered to; `None` for a private subscription.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// The group, shared.
    pub fn shared_group(&self) -> Option<&Arc<str>> {
        self.group.as_ref()
    }

    /// The delivery attempt: 1 on first delivery.
    pub fn attempt(&self) -> u32 {
        self.attempt.load(Ordering::Relaxed)
    }

    /// The most attempts this message gets before it is dead-lettered, when
    /// the consumer runtime handles it (its `RetryPolicy`): lets layers tell a
    /// last attempt from one that will be retried.
    pub fn max_attempts(&self) -> Option<u32> {
        self.max_attempts
    }

    pub(crate) fn set_max_attempts(&mut self, max_attempts: u32) {
        self.max_attempts = Some(max_attempts);
    }

    /// Shared state of type `T` registered on the consumer handling this
    /// delivery ([`ConsumerBuilder::state`](crate::ConsumerBuilder::state)).
    pub fn state<T: 'static>(&self) -> Option<&T> {
        self.state.as_deref()?.get()
    }

    pub(crate) fn set_state(&mut self, state: Arc<StateMap>) {
        self.state = Some(state);
    }

    /// Whether the delivery was settled.
    pub fn is_settled(&self) -> bool {
        self.acker.is_none()
    }

    /// Counts one more attempt made in process (the message stays in flight):
    /// used by in-process retries, so handlers see the attempt rise.
    /// Returns the new attempt number.
    pub fn next_attempt(&self) -> u32 {
        self.attempt.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn take_acker(&mut self) -> Result<Box<dyn Acker>> {
        self.acker.take().ok_or_else(|| Error::AlreadySettled {
            id: self.message.id.clone(),
        })
    }

    /// Acknowledges the message: it was handled.
    pub async fn ack(&mut self) -> Result<()> {
        let mut acker = self.take_acker()?;
        match acker.ack_now() {
            Some(acked) => acked,
            None => acker.ack().await,
        }
    }

    /// Asks for the message again, after `delay` if given.
    pub async fn nack(&mut self, delay: Option<Duration>) -> Result<()> {
        self.take_acker()?.nack(delay).await
    }

    /// Sends the message to the dead-letter destination of its group, then acks it.
    pub async fn dead_letter(&mut self, letter: DeadLetter) -> Result<()> {
        self.take_acker()?.dead_letter(letter).await
    }

    /// Whether this delivery is unsettled and still this reader's: see
    /// [`Acker::is_held`]. A tool that holds messages for a while (the
    /// dead-letter inbox) checks it before acting on one, so that two
    /// readers never both act on the same message.
    pub fn is_held(&self) -> bool {
        self.acker.as_ref().is_some_and(|a| a.is_held())
    }

    /// Hands the message back unhandled (no attempt counted), for another
    /// member or a later reader at once; see [`Acker::release`]. Dropping
    /// an unsettled delivery does the same without waiting.
    pub async fn release(&mut self) -> Result<()> {
        self.take_acker()?.release().await
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.message.id)
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("attempt", &self.attempt())
            .field("settled", &self.is_settled())
            .field("position", &self.position)
            .field("rejection", &self.rejection)
            .finish()
    }
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The handler returned a permanent error.
    Permanent,
    /// The payload could not be decoded into the handler's type.
    Undecodable,
    /// Every allowed attempt failed.
    AttemptsExhausted,
    /// No handler of the topic takes the message's event type.
    UnhandledType,
}

impl DeadLetterReason {
    /// The value written to the reason header.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Permanent => "permanent-error",
            DeadLetterReason::Undecodable => "undecodable",
            DeadLetterReason::AttemptsExhausted => "attempts-exhausted",
            DeadLetterReason::UnhandledType => "unhandled-type",
        }
    }

    /// Parses the value of the reason header.
    pub fn parse(s: &str) -> Option<Self> {
        [
            DeadLetterReason::Permanent,
            DeadLetterReason::Undecodable,
            DeadLetterReason::AttemptsExhausted,
            DeadLetterReason::UnhandledType,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is written on a dead letter: the reason and the failure's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Why.
    pub reason: DeadLetterReason,
    /// The last error's text.
    pub error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When the first attempt failed, where known.
    pub first_failure: Option<SystemTime>,
    /// When the last attempt failed.
    pub last_failure: SystemTime,
    /// The topic the message was published to.
    pub topic: String,
    /// The group that gave up on it.
    pub group: Option<String>,
}

/// Header names written on dead letters and on redelivered copies.
pub mod header {
    /// Why the message was dead-lettered ([`DeadLetterReason`](super::DeadLetterReason)).
    pub const DLQ_REASON: &str = "tidings-dlq-reason";
    /// The last error's text.
    pub const DLQ_ERROR: &str = "tidings-dlq-error";
    /// The number of attempts made.
    pub const DLQ_ATTEMPTS: &str = "tidings-dlq-attempts";
    /// When the first attempt failed (RFC 3339).
    pub const DLQ_FIRST_FAILURE: &str = "tidings-dlq-first-failure";
    /// When the last attempt failed (RFC 3339).
    pub const DLQ_LAST_FAILURE: &str = "tidings-dlq-last-failure";
    /// The topic the message was published to.
    pub const DLQ_TOPIC: &str = "tidings-dlq-topic";
    /// The group that dead-lettered it.
    pub const DLQ_GROUP: &str = "tidings-dlq-group";
    /// The attempt number, for adapters that count attempts themselves
    /// (republished copies on Kafka, AMQP retry queues, the in-process bus).
    pub const ATTEMPT: &str = "tidings-attempt";
    /// When the first attempt failed, carried on redelivered copies.
    pub const FIRST_FAILURE: &str = "tidings-first-failure";
    /// How many causes precede this message in its event chain (0 for a
    /// message caused by nothing); set by [`Message::caused_by`](crate::Message::caused_by).
    pub const CHAIN_DEPTH: &str = "tidings-chain-depth";
    /// When a dead letter was replayed: a replay is a deliberate new publish of
    /// the same message, so brokers that deduplicate publishes by id must not drop it.
    pub const REPLAYED_AT: &str = "tidings-replayed-at";
    /// On a replayed dead letter: the one group meant to handle it again.
    /// The consumers of the topic's other groups ack it without running
    /// their handlers (private subscriptions see it as any message).
    pub const REPLAY_FOR: &str = "tidings-replay-for";
}

/// The group that reads dead letters: the dead-letter tooling consumes each
/// dead-letter topic in this group, and adapters that keep nothing for
/// undeclared groups declare it when they dead-letter.
pub const DEAD_LETTER_GROUP: &str = "dead-letters";

impl DeadLetter {
    /// The dead letter for `message`: a copy with the same id and payload and
    /// the letter's headers added. Adapters publish this to the dead-letter
    /// destination.
    pub fn letter_for(&self, message: &Message) -> Message {
        let mut letter = message.clone();
        let fmt = |t: SystemTime| crate::time::format_rfc3339(t).unwrap_or_default();
        let h = &mut letter.headers;
        h.remove(header::ATTEMPT);
        h.remove(header::FIRST_FAILURE);
        h.insert(header::DLQ_REASON.into(), self.reason.as_str().into());
        h.insert(header::DLQ_ERROR.into(), self.error.clone());
        h.insert(header::DLQ_ATTEMPTS.into(), self.attempts.to_string());
        h.insert(
            header::DLQ_FIRST_FAILURE.into(),
            fmt(self.first_failure.unwrap_or(self.last_failure)),
        );
        h.insert(header::DLQ_LAST_FAILURE.into(), fmt(self.last_failure));
        h.insert(header::DLQ_TOPIC.into(), self.topic.clone());
        if let Some(group) = &self.group {
            h.insert(header::DLQ_GROUP.into(), group.clone());
        }
        letter
    }

    /// Reads the letter back from a dead-lettered message's headers;
    /// `None` if the message is not a dead letter.
    pub fn from_message(message: &Message) -> Option<DeadLetter> {
        let h = &message.headers;
        let time = |name: &str| h.get(name).and_then(|v| crate::time::parse_rfc3339(v));
        Some(DeadLetter {
            reason: DeadLetterReason::parse(h.get(header::DLQ_REASON)?)?,
            error: h.get(header::DLQ_ERROR).cloned().unwrap_or_default(),
            attempts: h
                .get(header::DLQ_ATTEMPTS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            first_failure: time(header::DLQ_FIRST_FAILURE),
            last_failure: time(header::DLQ_LAST_FAILURE)?,
            topic: h.get(header::DLQ_TOPIC)?.clone(),
            group: h.get(header::DLQ_GROUP).cloned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_fits_in_128_bytes() {
        // Larger, every move of a delivery between layers is a call to
        // `memcpy` (x86-64 inlines copies of up to 128 bytes).
        assert!(std::mem::size_of::<Delivery>() <= 128);
    }

    struct Noop;

    #[async_trait]
    impl Acker for Noop {
        async fn ack(self: Box<Self>) -> Result<()> {
            Ok(())
        }
        async fn nack(self: Box<Self>, _delay: Option<Duration>) -> Result<()> {
            Ok(())
        }
        async fn dead_letter(self: Box<Self>, _letter: DeadLetter) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn position_is_none_until_set() {
        let delivery = || {
            Delivery::new(
                Arc::new(Message::new("{}")),
                "t".into(),
                None,
                1,
                Box::new(Noop),
            )
        };
        assert_eq!(delivery().position(), None);
        let entry = Receipt::EntryId("1-0".into());
        assert_eq!(
            delivery().with_position(entry.clone()).position(),
            Some(&entry)
        );
    }

    #[test]
    fn letter_headers_round_trip() {
        let letter = DeadLetter {
            reason: DeadLetterReason::Undecodable,
            error: "expected value at line 1".into(),
            attempts: 3,
            first_failure: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_000)),
            last_failure: SystemTime::UNIX_EPOCH + Duration::from_millis(2_000),
            topic: "order.placed".into(),
            group: Some("billing".into()),
        };
        let original = Message::new("{").with_header(header::ATTEMPT, "3");
        let dead = letter.letter_for(&original);
        assert_eq!(dead.id, original.id);
        assert!(!dead.headers.contains_key(header::ATTEMPT));
        assert_eq!(DeadLetter::from_message(&dead), Some(letter));
        assert_eq!(DeadLetter::from_message(&original), None);
    }
}
