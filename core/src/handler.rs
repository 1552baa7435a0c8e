//! Handlers: plain async functions that take a typed event.
//!
//! Any `async fn(Event<T>) -> Result<(), HandlerError>` or closure of that
//! shape is a handler, and so is one of up to six arguments, each extracted
//! from the delivery ([`FromDelivery`]): the typed event, shared
//! [`State`](crate::extract::State), the envelope, the attempt (see
//! [`extract`](crate::extract)). A payload that does not decode into `T`
//! never reaches the function; it is dead-lettered as undecodable.
//!
//! Handlers return [`HandlerResult`]. Any error converts into it with `?`
//! (every `std::error::Error`, `anyhow::Error`, a service's own error
//! enum), as a retryable failure unless marked otherwise. The return type
//! itself stays `HandlerResult` rather than any `Result<(), E>`: with a
//! generic error, every closure that ends in `Ok(())` or uses `?` would no
//! longer compile without naming its error type.

use std::any::TypeId;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::time::Duration;

use std::future::Ready;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt;
use futures::future::{BoxFuture, Either};
use tokio_util::sync::ReusableBoxFuture;

use crate::codec::Codec;
use crate::delivery::{DeadLetterReason, Delivery};
use crate::error::BoxError;
use crate::event::Event;

/// How a handler failed, and so how its message is settled.
///
/// Any error converts into a retryable `HandlerError` with `?`. Mark errors
/// that no retry can fix as [`permanent`](HandlerError::permanent): the
/// message goes straight to the dead-letter destination.
///
/// ```
/// use tidings_core::{HandlerError, ResultExt};
/// fn parse(s: &str) -> Result<u32, HandlerError> {
///     let n: u32 = s.parse().permanent()?; // bad input: no retry will fix it
///     Ok(n)
/// }
/// assert!(parse("x").unwrap_err().is_permanent());
/// ```
pub struct HandlerError {
    kind: Failure,
    retry_after: Option<Duration>,
    source: BoxError,
}

/// The class of a handler failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Another attempt may succeed.
    Retryable,
    /// No attempt will succeed: dead-letter now.
    Permanent,
    /// The payload could not be decoded.
    Undecodable,
    /// Retries were made in process (the retry middleware) and every one failed.
    Exhausted,
    /// No handler of the topic takes the message's event type.
    UnhandledType,
}

impl HandlerError {
    /// A failure another attempt may fix.
    pub fn retryable(error: impl Into<BoxError>) -> Self {
        Self::of(Failure::Retryable, error)
    }

    /// A failure no retry will fix: the message is dead-lettered at once.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self::of(Failure::Permanent, error)
    }

    /// The payload could not be decoded: the message is dead-lettered at once.
    pub fn undecodable(error: impl Into<BoxError>) -> Self {
        Self::of(Failure::Undecodable, error)
    }

    /// Retries already made (in process) all failed: the message is dead-lettered
    /// as `attempts-exhausted`.
    pub fn exhausted(error: impl Into<BoxError>) -> Self {
        Self::of(Failure::Exhausted, error)
    }

    /// No handler takes the message's event type: dead-lettered as
    /// `unhandled-type` (see [`Unhandled`](crate::consumer::Unhandled)).
    pub fn unhandled_type(error: impl Into<BoxError>) -> Self {
        Self::of(Failure::UnhandledType, error)
    }

    /// The same failure again (class, `retry_after`, and the error's text),
    /// for each message of a batch that failed as a whole.
    pub(crate) fn replicate(&self) -> Self {
        HandlerError {
            kind: self.kind,
            retry_after: self.retry_after,
            source: self.to_string().into(),
        }
    }

    fn of(kind: Failure, error: impl Into<BoxError>) -> Self {
        HandlerError {
            kind,
            retry_after: None,
            source: error.into(),
        }
    }

    /// Asks for the redelivery not to come before `delay`.
    #[must_use]
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The class of the failure.
    pub fn kind(&self) -> Failure {
        self.kind
    }

    /// Whether the message should be dead-lettered without another attempt.
    pub fn is_permanent(&self) -> bool {
        self.kind != Failure::Retryable
    }

    /// The delay asked for before the redelivery.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The underlying error, owned.
    pub fn into_source(self) -> BoxError {
        self.source
    }

    /// The same error with another class (keeping `retry_after`).
    #[must_use]
    pub fn with_kind(mut self, kind: Failure) -> Self {
        self.kind = kind;
        self
    }

    /// The dead-letter reason this failure leads to, if it is not retryable.
    pub fn dead_letter_reason(&self) -> Option<DeadLetterReason> {
        match self.kind {
            Failure::Retryable => None,
            Failure::Permanent => Some(DeadLetterReason::Permanent),
            Failure::Undecodable => Some(DeadLetterReason::Undecodable),
            Failure::Exhausted => Some(DeadLetterReason::AttemptsExhausted),
            Failure::UnhandledType => Some(DeadLetterReason::UnhandledType),
        }
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError::retryable(error)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)?;
        let mut source = self.source.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("retry_after", &self.retry_after)
            .field("source", &self.source)
            .finish()
    }
}

/// Classifying a `Result`'s error for the runtime.
pub trait ResultExt<T> {
    /// Marks the error as permanent.
    fn permanent(self) -> Result<T, HandlerError>;
    /// Marks the error as retryable after at least `delay`.
    fn retry_after(self, delay: Duration) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }

    fn retry_after(self, delay: Duration) -> Result<T, HandlerError> {
        self.map_err(|e| HandlerError::retryable(e).with_retry_after(delay))
    }
}

/// What a handler returns.
pub type HandlerResult = Result<(), HandlerError>;

/// A value a handler can take as an argument, extracted from the delivery.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler's argument",
    label = "not an extractor",
    note = "a handler's arguments are extractors: `Event<T>`, `State<S>`, `Meta`, `Attempt`, `Topic`, or a type implementing `FromDelivery`"
)]
pub trait FromDelivery: Sized + Send + 'static {
    /// Extracts the value; an error here is settled like the handler's own.
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError>;

    /// The shared state this extractor reads, if any (its type and name),
    /// so that a consumer missing it is refused at start rather than at
    /// the first message.
    fn needs_state() -> Option<(TypeId, &'static str)> {
        None
    }
}

impl<T, C> FromDelivery for Event<T, C>
where
    T: Send + 'static,
    C: Codec<T>,
{
    fn from_delivery(delivery: &Delivery) -> Result<Self, HandlerError> {
        let message = delivery.shared_message();
        let data = C::decode(&message.payload).map_err(HandlerError::undecodable)?;
        Ok(Event::received(
            data,
            message.clone(),
            delivery.shared_topic().clone(),
            delivery.attempt(),
        ))
    }
}

/// A function that handles deliveries. Implemented for every
/// `Fn(A1, …, An) -> impl Future<Output = HandlerResult>` (n ≤ 6) whose
/// arguments are extractors ([`FromDelivery`]); the `Args` parameter only
/// tells those implementations apart.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Tidings handler",
    label = "not a handler",
    note = "a handler is an async fn or closure of up to six extractors (`Event<T>`, `State<S>`, `Meta`, `Attempt`, `Topic`) returning `Result<(), HandlerError>`; convert other errors with `?` or `.map_err(HandlerError::retryable)`"
)]
pub trait Handler<Args>: Send + Sync + 'static {
    /// The future of one call: named, so the runtime can keep it in a box
    /// it reuses rather than allocating one per message.
    type Future: Future<Output = HandlerResult> + Send + 'static;

    /// Extracts the arguments and runs the function.
    fn call(&self, delivery: &Delivery) -> Self::Future;

    /// The shared state the arguments read (see [`FromDelivery::needs_state`]).
    fn needs_state(&self) -> Vec<(TypeId, &'static str)> {
        Vec::new()
    }
}

macro_rules! handler_of {
    ($($arg:ident),+) => {
        impl<F, Fut, $($arg),+> Handler<($($arg,)+)> for F
        where
            F: Fn($($arg),+) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = HandlerResult> + Send + 'static,
            $($arg: FromDelivery,)+
        {
            type Future = Either<Ready<HandlerResult>, Fut>;

            #[allow(non_snake_case)]
            fn call(&self, delivery: &Delivery) -> Self::Future {
                $(
                    let $arg = match $arg::from_delivery(delivery) {
                        Ok(value) => value,
                        Err(e) => return Either::Left(std::future::ready(Err(e))),
                    };
                )+
                Either::Right(self($($arg),+))
            }

            fn needs_state(&self) -> Vec<(TypeId, &'static str)> {
                [$($arg::needs_state()),+].into_iter().flatten().collect()
            }
        }
    };
}

handler_of!(A1);
handler_of!(A1, A2);
handler_of!(A1, A2, A3);
handler_of!(A1, A2, A3, A4);
handler_of!(A1, A2, A3, A4, A5);
handler_of!(A1, A2, A3, A4, A5, A6);

/// Where a consumer's worker keeps the future of the handler it runs: one
/// allocation, reused from call to call (see [`Endpoint::call_in`]).
///
/// A wrapper, so that the crate that does the reusing (tokio-util) is not
/// part of this crate's API.
pub struct HandlerSlot(ReusableBoxFuture<'static, HandlerResult>);

impl HandlerSlot {
    /// An empty slot: polled before a future was put in it, it panics
    /// (which the runtime settles as a failed attempt) rather than report
    /// a result no handler gave. Allocates nothing.
    pub(crate) fn empty() -> Self {
        HandlerSlot(ReusableBoxFuture::new(std::future::poll_fn(
            |_| -> Poll<HandlerResult> {
                panic!("a handler slot was polled before Endpoint::call_in filled it")
            },
        )))
    }

    /// Puts `future` in the slot, in the slot's allocation when its size
    /// and alignment are those of the future there before. The future
    /// there before is dropped.
    pub fn set<F>(&mut self, future: F)
    where
        F: Future<Output = HandlerResult> + Send + 'static,
    {
        self.0.set(future);
    }
}

impl Future for HandlerSlot {
    type Output = HandlerResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<HandlerResult> {
        self.0.poll(cx)
    }
}

impl fmt::Debug for HandlerSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandlerSlot")
    }
}

/// A handler with its argument type erased, as the runtime stores it.
pub trait Endpoint: Send + Sync + 'static {
    /// Runs the handler on a delivery.
    fn call(&self, delivery: &Delivery) -> BoxFuture<'static, HandlerResult>;

    /// Puts the handler's future for `delivery` in `slot` (always: the
    /// runtime polls the slot next), replacing the one there. A worker
    /// keeps one slot and calls the same handler each time, so the slot's
    /// allocation is reused rather than a box made per message. By
    /// default, puts [`call`](Endpoint::call)'s boxed future there.
    fn call_in(&self, delivery: &Delivery, slot: &mut HandlerSlot) {
        slot.set(self.call(delivery));
    }

    /// The shared state the handler reads (see [`FromDelivery::needs_state`]).
    fn needs_state(&self) -> Vec<(TypeId, &'static str)> {
        Vec::new()
    }
}

pub(crate) struct Erased<H, Args> {
    handler: H,
    args: PhantomData<fn() -> Args>,
}

impl<H, Args> Erased<H, Args> {
    pub(crate) fn new(handler: H) -> Self {
        Erased {
            handler,
            args: PhantomData,
        }
    }
}

impl<H: Handler<Args>, Args: 'static> Endpoint for Erased<H, Args> {
    fn call(&self, delivery: &Delivery) -> BoxFuture<'static, HandlerResult> {
        Box::pin(self.handler.call(delivery))
    }

    fn call_in(&self, delivery: &Delivery, slot: &mut HandlerSlot) {
        // Fused: the handler's future is dropped as soon as it is done,
        // not when the worker's next message replaces it (a span or a
        // permit it holds ends with the handler).
        slot.set(self.handler.call(delivery).fuse());
    }

    fn needs_state(&self) -> Vec<(TypeId, &'static str)> {
        self.handler.needs_state()
    }
}

/// A handler (or a layer, or a settlement) panicked; a handler's panic is a
/// retryable failure like any other error.
#[derive(Debug, thiserror::Error)]
#[error("panicked: {0}")]
pub struct Panicked(String);

impl From<Box<dyn std::any::Any + Send>> for Panicked {
    fn from(panic: Box<dyn std::any::Any + Send>) -> Self {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        Panicked(text)
    }
}
