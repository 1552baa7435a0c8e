//! Batch handlers: a handler that takes up to `max` events at once — a
//! projector writing 500 rows in one transaction — and says which of them
//! failed, so each message is still settled on its own.
//!
//! ```
//! # use std::sync::Arc;
//! use tidings_core::batch::{BatchFailure, BatchOptions, BatchResult};
//! use tidings_core::{Consumer, Event, HandlerError};
//! # async fn f(subscriber: Arc<dyn tidings_core::Subscriber>) -> tidings_core::Result<()> {
//! let consumer = Consumer::group(subscriber, "projector")
//!     .handle_batch("orders", BatchOptions::new(500), |events: Vec<Event<u64>>| async move {
//!         // write every event in one transaction; a bad one fails alone:
//!         let bad: Vec<_> = events
//!             .iter()
//!             .enumerate()
//!             .filter(|(_, e)| e.data == 0)
//!             .map(|(i, _)| (i, HandlerError::permanent("order id 0")))
//!             .collect();
//!         if bad.is_empty() { Ok(()) } else { Err(BatchFailure::Some(bad)) }
//!     })
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::codec::Codec;
use crate::delivery::Delivery;
use crate::error::BoxError;
use crate::event::Event;
use crate::handler::{FromDelivery, HandlerError};

/// How a batch is gathered: up to `max` messages, waiting at most `wait`
/// after the first for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Most messages in one call.
    pub max: usize,
    /// How long to wait for more once a batch has its first message.
    pub wait: Duration,
}

impl BatchOptions {
    /// Batches of up to `max`, gathered for at most 50 ms.
    pub fn new(max: usize) -> Self {
        BatchOptions {
            max: max.max(1),
            wait: Duration::from_millis(50),
        }
    }

    /// How long a batch waits for more after its first message.
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }
}

/// How a batch failed: all of it, or some of its events, by their index in
/// the `Vec` the handler was given. Events not named succeeded (acked);
/// the named ones are settled by their error like a single handler's
/// (retried, or dead-lettered when permanent or out of attempts).
#[derive(Debug)]
pub enum BatchFailure {
    /// Every event of the batch failed with this error.
    All(HandlerError),
    /// These events failed; the others succeeded.
    Some(Vec<(usize, HandlerError)>),
}

impl From<HandlerError> for BatchFailure {
    fn from(error: HandlerError) -> Self {
        BatchFailure::All(error)
    }
}

impl<E: Into<BoxError>> From<E> for BatchFailure {
    fn from(error: E) -> Self {
        BatchFailure::All(HandlerError::retryable(error))
    }
}

/// What a batch handler returns.
pub type BatchResult = Result<(), BatchFailure>;

/// A batch, decoded and ready to run: the handler's future, which delivery
/// each of its events came from, and the deliveries that could not be
/// decoded (never given to the handler).
pub struct Prepared {
    pub(crate) run: BoxFuture<'static, BatchResult>,
    pub(crate) positions: Vec<usize>,
    pub(crate) rejected: Vec<(usize, HandlerError)>,
}

/// A function that handles batches: implemented for every
/// `Fn(Vec<Event<T, C>>) -> impl Future<Output = BatchResult>`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Tidings batch handler",
    note = "a batch handler is an async fn or closure taking `Vec<Event<T>>` and returning `Result<(), BatchFailure>`"
)]
pub trait BatchHandler<Args>: Send + Sync + 'static {
    /// Decodes the deliveries and starts the function on those that decode.
    fn prepare(&self, deliveries: &[Delivery]) -> Prepared;
}

impl<F, Fut, T, C> BatchHandler<(Vec<Event<T, C>>,)> for F
where
    F: Fn(Vec<Event<T, C>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BatchResult> + Send + 'static,
    T: Send + 'static,
    C: Codec<T>,
{
    fn prepare(&self, deliveries: &[Delivery]) -> Prepared {
        let mut events = Vec::with_capacity(deliveries.len());
        let mut positions = Vec::with_capacity(deliveries.len());
        let mut rejected = Vec::new();
        for (i, delivery) in deliveries.iter().enumerate() {
            match Event::<T, C>::from_delivery(delivery) {
                Ok(event) => {
                    events.push(event);
                    positions.push(i);
                }
                Err(error) => rejected.push((i, error)),
            }
        }
        let run: BoxFuture<'static, BatchResult> = if events.is_empty() {
            Box::pin(std::future::ready(Ok(())))
        } else {
            Box::pin(self(events))
        };
        Prepared {
            run,
            positions,
            rejected,
        }
    }
}

/// A batch handler with its argument type erased, as the runtime stores it.
pub(crate) trait BatchEndpoint: Send + Sync + 'static {
    fn prepare(&self, deliveries: &[Delivery]) -> Prepared;
}

pub(crate) struct ErasedBatch<H, Args> {
    handler: H,
    args: std::marker::PhantomData<fn() -> Args>,
}

impl<H, Args> ErasedBatch<H, Args> {
    pub(crate) fn new(handler: H) -> Self {
        ErasedBatch {
            handler,
            args: std::marker::PhantomData,
        }
    }
}

impl<H: BatchHandler<Args>, Args: 'static> BatchEndpoint for ErasedBatch<H, Args> {
    fn prepare(&self, deliveries: &[Delivery]) -> Prepared {
        self.handler.prepare(deliveries)
    }
}
