//! PostgreSQL for Tidings: an event store, a transactional [`outbox`] and an
//! [`inbox`] for handlers whose effect must happen once.
//!
//! [`EventStore`] keeps streams of events (`account-42`: opened, deposited,
//! withdrawn…) in one table, each event a Tidings [`Message`] with all its
//! metadata, so the events flow unchanged onto a broker.
//!
//! - **Append** with an [`ExpectedVersion`]: a writer that lost the race
//!   gets [`StoreError::WrongExpectedVersion`] with the stream's actual
//!   version, never a silently interleaved stream. An append is atomic, and
//!   idempotent by event id: retried after a lost reply, it writes nothing
//!   twice and answers as the first time.
//! - **Read** a stream forward or backward from a version; read every event,
//!   or one category of streams (`account-*`), in [`GlobalPosition`] order.
//! - **Never skip**: the global reads return only events whose position can
//!   no longer be overtaken by a transaction still in progress (see
//!   [`GlobalPosition`]), so a reader that follows the store from a
//!   checkpoint sees every committed event exactly once, however writers'
//!   transactions interleave.
//!
//! ```no_run
//! use tidings_core::Message;
//! use tidings_postgres::{EventStore, ExpectedVersion};
//!
//! # async fn demo() -> Result<(), tidings_postgres::StoreError> {
//! let store = EventStore::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! let opened = Message::new(r#"{"owner":"Zoë"}"#).with_type("account.opened");
//! store.append("account-42", ExpectedVersion::NoStream, vec![opened]).await?;
//! let events = store.read_stream("account-42", 1, tidings_postgres::Direction::Forward, 100).await?;
//! assert_eq!(events[0].version, 1);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod aggregate;
mod append;
pub mod broker;
mod error;
mod event_store;
mod forward;
pub mod inbox;
mod notifier;
pub mod outbox;
mod position;
mod row;
mod schema;
mod subscription;

pub use aggregate::{Aggregate, Conflict, Loaded, retry_on_conflict};
pub use broker::{BrokerConfig, PostgresBroker};
pub use error::StoreError;
pub use event_store::{Appended, Direction, EventStore, ExpectedVersion, RecordedEvent};
pub use forward::forwarder;
pub use outbox::{Outbox, Relay, RelayStats};
pub use position::GlobalPosition;
pub use sqlx::{PgPool, Postgres, Transaction};
pub use subscription::{ALL, EventStoreSubscriber, STREAM_HEADER, VERSION_HEADER};

/// Creates every table of this crate (event store, outbox, inbox) where
/// missing; [`EventStore`] and [`Outbox`] do it when they connect, the
/// [`inbox`] needs it once before its first message.
pub async fn create_tables(pool: &PgPool) -> Result<(), StoreError> {
    schema::create(pool).await?;
    Ok(())
}
pub use tidings_core::Message;
