//! Aggregates: state rebuilt by folding a stream's events, new events saved
//! with the loaded version as the expectation.

use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tidings_core::Message;

use crate::error::StoreError;
use crate::event_store::{Appended, Direction, EventStore, ExpectedVersion};

/// An aggregate: a state and how each of its events changes it.
///
/// Events are stored as JSON with their [`event_type`](Aggregate::event_type)
/// as the message type, so they read like any other Tidings event.
pub trait Aggregate: Default + Send {
    /// The aggregate's events (an enum, usually).
    type Event: Serialize + DeserializeOwned + Send + Sync;

    /// The message type an event is stored under (`account.deposited`).
    fn event_type(event: &Self::Event) -> String;

    /// The state after `event`.
    fn apply(&mut self, event: &Self::Event);
}

/// An aggregate as loaded: its state and the version it was loaded at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded<A> {
    /// The stream.
    pub stream: String,
    /// The state after every event of the stream.
    pub state: A,
    /// How many events the stream held: what the next save expects.
    pub version: u64,
}

/// Events read per round trip while loading.
const PAGE: usize = 500;

impl EventStore {
    /// Loads the aggregate of `stream` by folding its events from the
    /// first (a stream without events is the default state at version 0).
    pub async fn load<A: Aggregate>(&self, stream: &str) -> Result<Loaded<A>, StoreError> {
        self.fold(stream, A::default(), 0).await
    }

    /// Loads the aggregate of `stream` from its latest snapshot (see
    /// [`save_snapshot`](Self::save_snapshot)), folding only the events
    /// after it; without a snapshot, or with one that no longer reads as
    /// `A` (its shape changed), from the first event.
    pub async fn load_from_snapshot<A>(&self, stream: &str) -> Result<Loaded<A>, StoreError>
    where
        A: Aggregate + DeserializeOwned,
    {
        let snapshot: Option<(i64, serde_json::Value)> =
            sqlx::query_as("SELECT version, state FROM tidings_snapshots WHERE stream_id = $1")
                .bind(stream)
                .fetch_optional(self.pool())
                .await?;
        match snapshot.map(|(v, state)| (v, serde_json::from_value::<A>(state))) {
            Some((version, Ok(state))) => self.fold(stream, state, version.max(0) as u64).await,
            Some((_, Err(error))) => {
                tracing::warn!(%stream, %error, "the snapshot does not read as the aggregate; folding every event");
                self.load(stream).await
            }
            None => self.load(stream).await,
        }
    }

    /// Stores the loaded state as the stream's snapshot, unless a newer one
    /// is stored already. Snapshots are a cache: dropping the table loses
    /// nothing but load time.
    pub async fn save_snapshot<A>(&self, loaded: &Loaded<A>) -> Result<(), StoreError>
    where
        A: Aggregate + Serialize,
    {
        let state = serde_json::to_value(&loaded.state).map_err(|e| StoreError::Undecodable {
            stream: loaded.stream.clone(),
            version: loaded.version,
            error: e.to_string(),
        })?;
        sqlx::query(
            "INSERT INTO tidings_snapshots (stream_id, version, state) VALUES ($1, $2, $3) \
             ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version, state = EXCLUDED.state \
             WHERE tidings_snapshots.version < EXCLUDED.version",
        )
        .bind(&loaded.stream)
        .bind(loaded.version as i64)
        .bind(state)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// `state` at `version`, with the stream's later events applied.
    async fn fold<A: Aggregate>(
        &self,
        stream: &str,
        mut state: A,
        mut version: u64,
    ) -> Result<Loaded<A>, StoreError> {
        loop {
            let page = self
                .read_stream(stream, version + 1, Direction::Forward, PAGE)
                .await?;
            for recorded in &page {
                let event: A::Event =
                    serde_json::from_slice(&recorded.message.payload).map_err(|e| {
                        StoreError::Undecodable {
                            stream: stream.to_owned(),
                            version: recorded.version,
                            error: e.to_string(),
                        }
                    })?;
                state.apply(&event);
                version = recorded.version;
            }
            if page.len() < PAGE {
                break;
            }
        }
        Ok(Loaded {
            stream: stream.to_owned(),
            state,
            version,
        })
    }

    /// Saves `events` after `loaded`, expecting the stream still at the
    /// loaded version, and applies them to the state; a writer that got
    /// there first is [`StoreError::WrongExpectedVersion`] (load again and
    /// decide again: [`retry_on_conflict`]).
    pub async fn save<A: Aggregate>(
        &self,
        loaded: &mut Loaded<A>,
        events: Vec<A::Event>,
    ) -> Result<Appended, StoreError> {
        let messages = events
            .iter()
            .map(|e| {
                serde_json::to_vec(e)
                    .map(|json| {
                        Message::new(json)
                            .with_type(A::event_type(e))
                            .with_content_type("application/json")
                    })
                    .map_err(|e| StoreError::Undecodable {
                        stream: loaded.stream.clone(),
                        version: loaded.version + 1,
                        error: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let expected = if loaded.version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(loaded.version)
        };
        let appended = self.append(&loaded.stream, expected, messages).await?;
        for event in &events {
            loaded.state.apply(event);
        }
        loaded.version = appended.version;
        Ok(appended)
    }
}

/// Errors that can say they are a version conflict: [`StoreError`], and a
/// service's own error type that wraps it (so that a command's domain
/// errors — "insufficient funds" — and the store's go through one `?`).
pub trait Conflict {
    /// Whether another writer got there first.
    fn is_conflict(&self) -> bool;
}

impl Conflict for StoreError {
    fn is_conflict(&self) -> bool {
        matches!(self, StoreError::WrongExpectedVersion { .. })
    }
}

/// Runs `attempt` (load, decide, save) again while it fails with a
/// version conflict, up to `tries` times in all; other errors and the last
/// conflict are returned as they are.
///
/// ```no_run
/// # use tidings_postgres::{retry_on_conflict, EventStore, StoreError};
/// # async fn demo(store: &EventStore) -> Result<(), StoreError> {
/// retry_on_conflict(3, || async {
///     // let mut account = store.load::<Account>("account-42").await?;
///     // store.save(&mut account, account.state.withdraw(30)?).await?;
///     Ok::<_, StoreError>(())
/// })
/// .await
/// # }
/// ```
pub async fn retry_on_conflict<T, E, F, Fut>(tries: usize, mut attempt: F) -> Result<T, E>
where
    E: Conflict,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut left = tries.max(1);
    loop {
        match attempt().await {
            Err(e) if e.is_conflict() && left > 1 => left -= 1,
            other => return other,
        }
    }
}
