//! What an event store operation can fail with.

use crate::event_store::ExpectedVersion;

/// An event store error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another writer appended first: the stream is not at the version the
    /// append expected. Read the stream again, decide again, append again.
    #[error("stream `{stream}` is at version {actual}; the append expected {expected}")]
    WrongExpectedVersion {
        /// The stream.
        stream: String,
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's version (events in it) when the append looked.
        actual: u64,
    },
    /// An event with this id is stored already, and not as the same append
    /// (a retried append of the same events answers as the first did).
    #[error("event `{id}` is stored already in stream `{stream}`")]
    DuplicateEvent {
        /// The event id.
        id: String,
        /// The stream that holds it.
        stream: String,
    },
    /// An aggregate's event that does not read (or write) as its type.
    #[error("event {version} of stream `{stream}` is not an event of the aggregate: {error}")]
    Undecodable {
        /// The stream.
        stream: String,
        /// The event's version.
        version: u64,
        /// What serde said.
        error: String,
    },
    /// A stream id the store cannot hold (empty).
    #[error("invalid stream id `{0}`: must not be empty")]
    InvalidStream(String),
    /// The database failed or could not be reached.
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// Whether trying the same operation again later may succeed (a
    /// connection problem), as opposed to a decision to make again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Database(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
            )
        )
    }
}

impl From<StoreError> for tidings_core::Error {
    fn from(e: StoreError) -> Self {
        tidings_core::Error::Broker {
            broker: "postgres",
            source: Box::new(e),
        }
    }
}
