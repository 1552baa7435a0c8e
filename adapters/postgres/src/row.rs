//! A Tidings [`Message`] as table columns: the event store, the outbox
//! (and any later table) store messages the same way, so a message read
//! back is the message written, with all its metadata.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{Column, Row};
use tidings_core::{Headers, Message, Metadata};

use crate::error::StoreError;

/// The message columns, in the order [`Columns`] binds them.
pub(crate) const COLUMNS: &str = "event_id, event_type, source, time_us, schema_version, \
     correlation_id, causation_id, content_type, message_key, headers, payload";

/// The bound [`Columns`] as rows, `$2` to `$12`, numbered in order (the
/// caller names them: `{UNNEST} AS m({COLUMNS}, ord) ORDER BY ord`).
pub(crate) const UNNEST: &str = "unnest($2::text[], $3::text[], $4::text[], $5::int8[], \
     $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::jsonb[], $12::bytea[]) \
     WITH ORDINALITY";

/// The messages of one statement, column by column (bound as arrays and
/// unnested: one round trip for any number of messages).
pub(crate) struct Columns<'a> {
    pub ids: Vec<&'a str>,
    pub types: Vec<Option<&'a str>>,
    pub sources: Vec<Option<&'a str>>,
    pub times: Vec<Option<i64>>,
    pub schemas: Vec<Option<&'a str>>,
    pub correlations: Vec<Option<&'a str>>,
    pub causations: Vec<Option<&'a str>>,
    pub content_types: Vec<Option<&'a str>>,
    pub keys: Vec<Option<&'a str>>,
    pub headers: Vec<Json<&'a Headers>>,
    pub payloads: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    pub fn of(messages: &'a [Message]) -> Self {
        let n = messages.len();
        let mut c = Columns {
            ids: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            sources: Vec::with_capacity(n),
            times: Vec::with_capacity(n),
            schemas: Vec::with_capacity(n),
            correlations: Vec::with_capacity(n),
            causations: Vec::with_capacity(n),
            content_types: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            headers: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
        };
        for m in messages {
            let meta = &m.metadata;
            c.ids.push(m.id.as_str());
            c.types.push(meta.event_type.as_deref());
            c.sources.push(meta.source.as_deref());
            c.times.push(meta.time.map(micros));
            c.schemas.push(meta.schema_version.as_deref());
            c.correlations.push(meta.correlation_id.as_deref());
            c.causations.push(meta.causation_id.as_deref());
            c.content_types.push(meta.content_type.as_deref());
            c.keys.push(m.key.as_deref());
            c.headers.push(Json(&m.headers));
            c.payloads.push(m.payload.as_ref());
        }
        c
    }
}

/// Binds a [`Columns`]' arrays, in [`COLUMNS`] order, after what `$query`
/// bound already (`query`, `query_as` and `query_scalar` all have `bind`).
macro_rules! bind_columns {
    ($query:expr, $columns:expr) => {{
        let c = &$columns;
        $query
            .bind(&c.ids)
            .bind(&c.types)
            .bind(&c.sources)
            .bind(&c.times)
            .bind(&c.schemas)
            .bind(&c.correlations)
            .bind(&c.causations)
            .bind(&c.content_types)
            .bind(&c.keys)
            .bind(&c.headers)
            .bind(&c.payloads)
    }};
}
pub(crate) use bind_columns;

/// Microseconds since the Unix epoch.
pub(crate) fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros().min(i64::MAX as u128) as i64)
}

/// The message of a selected row holding [`COLUMNS`], in their order.
pub(crate) fn message(row: &PgRow) -> Result<Message, StoreError> {
    // Found by name once, then by position: a name costs a hash lookup,
    // eleven per message otherwise.
    let at = row.try_column("event_id")?.ordinal();
    // Straight from the column's JSON (no `serde_json::Value` between);
    // headers another writer made unreadable are no reason to lose the event.
    let headers = row
        .try_get::<Json<Headers>, _>(at + 9)
        .map_or_else(|_| Headers::default(), |Json(h)| h);
    let time: Option<i64> = row.try_get(at + 3)?;
    let payload: Vec<u8> = row.try_get(at + 10)?;
    Ok(Message {
        id: row.try_get::<&str, _>(at)?.into(),
        key: row.try_get(at + 8)?,
        headers,
        payload: Bytes::from(payload),
        metadata: Metadata {
            event_type: row.try_get(at + 1)?,
            source: row.try_get(at + 2)?,
            time: time.map(|us| UNIX_EPOCH + Duration::from_micros(us.max(0) as u64)),
            schema_version: row.try_get(at + 4)?,
            correlation_id: row.try_get(at + 5)?,
            causation_id: row.try_get(at + 6)?,
            content_type: row.try_get(at + 7)?,
        },
    })
}
