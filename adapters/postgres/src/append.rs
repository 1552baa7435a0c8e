//! An append as one call of the SQL function `tidings_append`: the lock,
//! the idempotency and version checks and the inserts (and, inside a
//! caller's transaction, the notification) run inside the database, so an
//! append costs one round trip (in its own transaction) instead of one per
//! step.

use sqlx::PgExecutor;
use tidings_core::Message;

use crate::error::StoreError;
use crate::event_store::{Appended, ExpectedVersion, category};
use crate::row::{Columns, bind_columns};

/// The namespace of the store's advisory locks (the first key of the
/// two-key form), so they do not meet an application's own: "tdng".
pub(crate) const LOCK_NAMESPACE: i32 = 0x7464_6e67;

/// The function, created (or replaced) with the tables.
///
/// Why each step is where it is:
/// - the stream's advisory lock comes first, before the transaction writes
///   anything: PostgreSQL gives a transaction its id at its first write, so
///   appends to one stream get increasing transaction ids in the order they
///   hold the lock, which makes the global order agree with version order
///   within a stream (a row lock would not: two transactions creating the
///   same stream can both take their ids before one waits for the other);
/// - each statement after it sees what committed before the lock was
///   granted (read committed takes a snapshot per statement);
/// - a transaction that wrote before the append (`append_in` after other
///   writes, or a second stream in the same transaction) has its id from
///   before the lock; if the stream's last event has a later id, the
///   append is refused with `serialization_failure` (SQLSTATE 40001, the
///   usual signal to retry a transaction) rather than stored out of order;
/// - the idempotency check comes before the version check, so a retried
///   append answers as the first did even though the version moved;
/// - `p_notify` is false for an append in its own transaction: the
///   notification is sent after its commit (see `notifier.rs`).
///
/// The signature changed once (`p_notify` was added): the 14-argument
/// function of earlier versions is left in place for services of the
/// earlier version still running beside this one during an upgrade.
pub(crate) fn function_ddl() -> String {
    format!(
        r#"CREATE OR REPLACE FUNCTION tidings_append(
    p_stream text, p_category text, p_expected bigint,
    p_ids text[], p_types text[], p_sources text[], p_times bigint[], p_schemas text[],
    p_correlations text[], p_causations text[], p_content_types text[], p_keys text[],
    p_headers jsonb[], p_payloads bytea[], p_notify boolean)
RETURNS TABLE (outcome text, actual bigint, first_version bigint, dup_id text, dup_stream text)
LANGUAGE plpgsql
-- Every statement here finds its rows by a unique index. PL/pgSQL caches
-- its plans per connection, and a plan made while the tables were small
-- (a new store's first appends) chose to scan them whole, for the life of
-- the connection: measured, batches of 100 took 2–3 s each once the
-- table held 250k events. Without sequential scans the cached plans use the
-- indexes whatever the tables' size (planning every call instead costs
-- a tenth of the throughput).
SET enable_seqscan = off
AS $fn$
DECLARE
    v_actual bigint;
    v_n int := coalesce(array_length(p_ids, 1), 0);
    v_found int;
    v_base bigint;
    v_xid xid8 := pg_current_xact_id_if_assigned();
BEGIN
    PERFORM pg_advisory_xact_lock({LOCK_NAMESPACE}, hashtext(p_stream));
    SELECT s.version INTO v_actual FROM tidings_streams s WHERE s.stream_id = p_stream;
    v_actual := coalesce(v_actual, 0);
    -- A transaction that wrote before this append took its id before the
    -- lock: if the stream's last event has a later id, this append would
    -- come before it in global order. Refused; the transaction is retried.
    IF v_xid IS NOT NULL AND EXISTS (SELECT 1 FROM tidings_events e
        WHERE e.stream_id = p_stream AND e.version = v_actual AND e.transaction_id > v_xid)
    THEN
        RAISE EXCEPTION 'tidings: stream % moved on after this transaction began writing; retry the transaction', p_stream
            USING ERRCODE = 'serialization_failure';
    END IF;
    IF v_n > 0 THEN
        SELECT count(*) INTO v_found FROM tidings_events e WHERE e.event_id = ANY(p_ids);
        IF v_found > 0 THEN
            SELECT e.version INTO v_base FROM tidings_events e
                WHERE e.event_id = p_ids[1] AND e.stream_id = p_stream;
            IF v_found = v_n AND v_base IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM unnest(p_ids) WITH ORDINALITY AS t(id, ord)
                LEFT JOIN tidings_events e ON e.event_id = t.id
                    AND e.stream_id = p_stream AND e.version = v_base + t.ord - 1
                WHERE e.event_id IS NULL)
            THEN
                RETURN QUERY SELECT 'stored'::text, v_actual, v_base, NULL::text, NULL::text;
            ELSE
                RETURN QUERY SELECT 'duplicate'::text, v_actual, 0::bigint, e.event_id, e.stream_id
                    FROM tidings_events e WHERE e.event_id = ANY(p_ids) LIMIT 1;
            END IF;
            RETURN;
        END IF;
    END IF;
    IF (p_expected = -2 AND v_actual <> 0) OR (p_expected = -3 AND v_actual = 0)
        OR (p_expected >= 0 AND v_actual <> p_expected) THEN
        RETURN QUERY SELECT 'conflict'::text, v_actual, 0::bigint, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF v_n = 0 THEN
        RETURN QUERY SELECT 'ok'::text, v_actual, v_actual + 1, NULL::text, NULL::text;
        RETURN;
    END IF;
    INSERT INTO tidings_events (stream_id, category, version, event_id, event_type, source,
        time_us, schema_version, correlation_id, causation_id, content_type, message_key,
        headers, payload)
    SELECT p_stream, p_category, v_actual + t.ord, t.id, t.type, t.source, t.time_us, t.schema,
        t.correlation, t.causation, t.content_type, t.key, t.headers, t.payload
    FROM unnest(p_ids, p_types, p_sources, p_times, p_schemas, p_correlations, p_causations,
        p_content_types, p_keys, p_headers, p_payloads)
        WITH ORDINALITY AS t(id, type, source, time_us, schema, correlation, causation,
            content_type, key, headers, payload, ord)
    ORDER BY t.ord;
    INSERT INTO tidings_streams (stream_id, version) VALUES (p_stream, v_actual + v_n)
        ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version;
    -- Inside a caller's transaction: wakes the subscriptions at its commit
    -- (and only if it commits). Appends in their own transaction are
    -- notified after their commit instead (see notifier.rs).
    IF p_notify THEN
        PERFORM pg_notify('{channel}', '');
    END IF;
    RETURN QUERY SELECT 'ok'::text, v_actual + v_n, v_actual + 1, NULL::text, NULL::text;
END
$fn$"#,
        channel = crate::subscription::CHANNEL,
    )
}

/// Appends through `executor` (the pool: its own transaction; a
/// transaction: inside it). `notify_at_commit`: whether the function
/// notifies the subscriptions (inside a caller's transaction), rather than
/// the caller after the commit.
pub(crate) async fn append<'c>(
    executor: impl PgExecutor<'c>,
    notify_at_commit: bool,
    stream: &str,
    expected: ExpectedVersion,
    events: &[Message],
) -> Result<Appended, StoreError> {
    if stream.is_empty() {
        return Err(StoreError::InvalidStream(stream.to_owned()));
    }
    let expected_code: i64 = match expected {
        ExpectedVersion::Any => -1,
        ExpectedVersion::NoStream => -2,
        ExpectedVersion::StreamExists => -3,
        ExpectedVersion::Exact(n) => n.min(i64::MAX as u64) as i64,
    };
    let n = events.len();
    let c = Columns::of(events);
    let query = sqlx::query_as(
        "SELECT * FROM tidings_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(stream)
    .bind(category(stream))
    .bind(expected_code);
    let row: (String, i64, i64, Option<String>, Option<String>) = bind_columns!(query, c)
        .bind(notify_at_commit)
        .fetch_one(executor)
        .await
        .map_err(
            |e| match e.as_database_error().and_then(|d| d.constraint()) {
                // Another append stored one of these ids in another stream between
                // the check and the insert (it held that stream's lock).
                Some("tidings_events_event_id_key") => StoreError::DuplicateEvent {
                    id: c.ids.first().map_or_else(String::new, |s| (*s).to_owned()),
                    stream: String::new(),
                },
                _ => StoreError::Database(e),
            },
        )?;
    let (outcome, actual, first, dup_id, dup_stream) = row;
    let (actual, first) = (actual.max(0) as u64, first.max(0) as u64);
    match outcome.as_str() {
        "ok" => Ok(Appended {
            first_version: first,
            version: actual,
            already_stored: false,
        }),
        "stored" => Ok(Appended {
            first_version: first,
            version: first + n as u64 - 1,
            already_stored: true,
        }),
        "conflict" => Err(StoreError::WrongExpectedVersion {
            stream: stream.to_owned(),
            expected,
            actual,
        }),
        _ => Err(StoreError::DuplicateEvent {
            id: dup_id.unwrap_or_default(),
            stream: dup_stream.unwrap_or_default(),
        }),
    }
}
