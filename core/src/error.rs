//! The error types of Tidings.
//!
//! [`Error`] is what the transport side returns: publishing, subscribing,
//! settling, configuration. Handlers return [`HandlerError`](crate::HandlerError)
//! instead, which carries how the failure should be settled.

use std::time::Duration;

/// A boxed error from a broker client or a user's code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in the transport: connecting, publishing, subscribing or settling.
///
/// Every adapter maps its client's errors onto these variants, so that retry
/// policies and users can tell a transient failure from a rejected message
/// with [`Error::is_transient`] whatever the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker could not be reached or the connection dropped; retrying may help.
    #[error("connection to {broker} failed: {source}")]
    Connection {
        /// The adapter's name (`redis`, `amqp`, ...).
        broker: &'static str,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// The broker did not accept (or did not confirm) a published message.
    #[error("publishing to `{topic}` failed: {source}")]
    Publish {
        /// The topic published to.
        topic: String,
        /// The client's or broker's error.
        #[source]
        source: BoxError,
        /// Whether publishing the same message again may succeed.
        transient: bool,
    },
    /// Nothing is bound to the topic, so the broker would have dropped the message.
    #[error("`{topic}` is unroutable: no group or queue is bound to it (declare the group first)")]
    Unroutable {
        /// The topic published to.
        topic: String,
    },
    /// The publisher or subscription was closed; create a new one.
    #[error("the {0} is closed")]
    Closed(&'static str),
    /// A delivery was acked, nacked or dead-lettered a second time.
    #[error("the delivery of message {id} was already settled")]
    AlreadySettled {
        /// The message id.
        id: crate::MessageId,
    },
    /// Settling a delivery failed; the broker will redeliver the message.
    #[error("settling message {id} failed: {source}")]
    Settle {
        /// The message id.
        id: crate::MessageId,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// Subscribing failed.
    #[error("subscribing to `{topic}` failed: {source}")]
    Subscribe {
        /// The topic subscribed to.
        topic: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// The configuration asks the adapter for something it cannot do.
    #[error("{adapter} does not support {what}")]
    Unsupported {
        /// The adapter's name.
        adapter: &'static str,
        /// What was asked for.
        what: String,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration `{key}`: {message}")]
    Config {
        /// The configuration key.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// Encoding or decoding a payload failed.
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    /// An operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was being done.
        operation: &'static str,
        /// The time limit.
        after: Duration,
    },
    /// Another broker error.
    #[error("{broker}: {source}")]
    Broker {
        /// The adapter's name.
        broker: &'static str,
        /// The client's error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Whether the same operation may succeed if tried again later.
    ///
    /// Connection failures, timeouts and transient publish failures are;
    /// a rejected, unroutable or undecodable message and bad configuration are not.
    ///
    /// ```
    /// use tidings_core::Error;
    /// assert!(!Error::Unroutable { topic: "t".into() }.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connection { .. } | Error::Timeout { .. } | Error::Broker { .. } => true,
            Error::Publish { transient, .. } => *transient,
            _ => false,
        }
    }
}
