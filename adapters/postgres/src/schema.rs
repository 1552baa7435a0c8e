//! The tables, created when missing.

use sqlx::PgPool;

/// Serialises concurrent creations (two services starting at once would
/// otherwise race on `CREATE TABLE IF NOT EXISTS`).
const DDL_LOCK: i64 = 0x7469_6469_6e67_7301; // "tidings" + 1

/// A [`Message`](tidings_core::Message)'s columns, the same in every table
/// that holds messages (see `row.rs`); `{MESSAGE}` in [`DDL`] stands for them.
const MESSAGE_COLUMNS: &str = "event_id text NOT NULL,
        event_type text,
        source text,
        time_us bigint,
        schema_version text,
        correlation_id text,
        causation_id text,
        content_type text,
        message_key text,
        headers jsonb NOT NULL DEFAULT '{}',
        payload bytea NOT NULL";

const DDL: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS tidings_streams (
        stream_id text PRIMARY KEY,
        version bigint NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS tidings_events (
        sequence bigint GENERATED ALWAYS AS IDENTITY,
        transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
        stream_id text NOT NULL,
        category text NOT NULL,
        version bigint NOT NULL,
        {MESSAGE},
        PRIMARY KEY (transaction_id, sequence),
        UNIQUE (stream_id, version),
        UNIQUE (event_id)
    )",
    "CREATE INDEX IF NOT EXISTS tidings_events_by_category
        ON tidings_events (category, transaction_id, sequence)",
    "CREATE TABLE IF NOT EXISTS tidings_snapshots (
        stream_id text PRIMARY KEY,
        version bigint NOT NULL,
        state jsonb NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS tidings_outbox (
        position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        outbox text NOT NULL,
        topic text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        {MESSAGE}
    )",
    "CREATE INDEX IF NOT EXISTS tidings_outbox_in_order ON tidings_outbox (outbox, position)",
    "CREATE TABLE IF NOT EXISTS tidings_inbox (
        group_name text NOT NULL,
        message_id text NOT NULL,
        handled_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (group_name, message_id)
    )",
    "CREATE INDEX IF NOT EXISTS tidings_inbox_by_age ON tidings_inbox (handled_at)",
    "CREATE TABLE IF NOT EXISTS tidings_messages (
        position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        topic text NOT NULL,
        published_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        {MESSAGE}
    )",
    "CREATE INDEX IF NOT EXISTS tidings_messages_by_topic ON tidings_messages (topic, published_at)",
    "CREATE TABLE IF NOT EXISTS tidings_groups (
        topic text NOT NULL,
        group_name text NOT NULL,
        PRIMARY KEY (topic, group_name)
    )",
    "CREATE TABLE IF NOT EXISTS tidings_queue (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        topic text NOT NULL,
        group_name text NOT NULL,
        position bigint NOT NULL,
        attempt integer NOT NULL DEFAULT 1,
        visible_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        claimed boolean NOT NULL DEFAULT false,
        claim bigint NOT NULL DEFAULT 0,
        first_failure text,
        UNIQUE (topic, group_name, position)
    )",
    "CREATE INDEX IF NOT EXISTS tidings_queue_claims ON tidings_queue (topic, group_name, id)",
    "CREATE INDEX IF NOT EXISTS tidings_queue_by_position ON tidings_queue (position)",
    "CREATE TABLE IF NOT EXISTS tidings_identity (id text PRIMARY KEY)",
    "INSERT INTO tidings_identity SELECT gen_random_uuid()::text
        WHERE NOT EXISTS (SELECT 1 FROM tidings_identity)",
    "CREATE TABLE IF NOT EXISTS tidings_checkpoints (
        topic text NOT NULL,
        group_name text NOT NULL,
        transaction_id xid8 NOT NULL,
        sequence bigint NOT NULL,
        PRIMARY KEY (topic, group_name)
    )",
];

/// This database's identity (made once, with the tables): tells whether a
/// delivery's queue row lives in the database a pool points to.
pub(crate) async fn identity<'c>(
    executor: impl sqlx::PgExecutor<'c>,
) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM tidings_identity LIMIT 1")
        .fetch_one(executor)
        .await
}

/// Creates the store's tables and indexes where they do not exist.
pub(crate) async fn create(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(DDL_LOCK)
        .execute(&mut *tx)
        .await?;
    for statement in DDL {
        sqlx::query(&statement.replace("{MESSAGE}", MESSAGE_COLUMNS))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(&crate::append::function_ddl())
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}
