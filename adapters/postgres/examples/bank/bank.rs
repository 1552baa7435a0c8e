//! The bank of the event-sourcing articles, done right: accounts as event
//! streams, commands decided on the loaded state and saved with its version
//! (a racing writer retries), and a read model in PostgreSQL tables kept by
//! a projection on the consumer runtime, rebuilt by replaying everything.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tidings_core::{Consumer, Event, HandlerError, StartFrom, Subscriber};
use tidings_postgres::{
    Aggregate, Conflict, EventStore, GlobalPosition, StoreError, retry_on_conflict,
};

/// What happens to an account.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AccountEvent {
    /// The account was opened.
    Opened { owner: String },
    /// Money came in.
    Deposited { amount: i64 },
    /// Money went out.
    Withdrawn { amount: i64 },
    /// The account was closed.
    Closed,
}

/// An account, as its events make it.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub open: bool,
    pub closed: bool,
    pub balance: i64,
}

impl Aggregate for Account {
    type Event = AccountEvent;

    fn event_type(event: &AccountEvent) -> String {
        match event {
            AccountEvent::Opened { .. } => "account.opened",
            AccountEvent::Deposited { .. } => "account.deposited",
            AccountEvent::Withdrawn { .. } => "account.withdrawn",
            AccountEvent::Closed => "account.closed",
        }
        .to_owned()
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { .. } => self.open = true,
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
            AccountEvent::Closed => self.closed = true,
        }
    }
}

/// What a client asks of an account.
#[derive(Clone, Debug)]
pub enum Command {
    Open { owner: String },
    Deposit { amount: i64 },
    Withdraw { amount: i64 },
    Close,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// The command does not hold for the account as it is.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The store failed (or another writer won every retry).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Conflict for BankError {
    fn is_conflict(&self) -> bool {
        matches!(self, BankError::Store(e) if e.is_conflict())
    }
}

/// The events a command makes of the account's state, or why not.
pub fn decide(account: &Account, command: &Command) -> Result<Vec<AccountEvent>, BankError> {
    let reject = |why: &str| Err(BankError::Rejected(why.to_owned()));
    match command {
        Command::Open { .. } if account.open => reject("the account is open already"),
        Command::Open { owner } => Ok(vec![AccountEvent::Opened {
            owner: owner.clone(),
        }]),
        _ if !account.open || account.closed => reject("the account is not open"),
        Command::Deposit { amount } | Command::Withdraw { amount } if *amount <= 0 => {
            reject("amounts are positive")
        }
        Command::Deposit { amount } => Ok(vec![AccountEvent::Deposited { amount: *amount }]),
        Command::Withdraw { amount } if *amount > account.balance => {
            reject("the withdrawal exceeds the balance")
        }
        Command::Withdraw { amount } => Ok(vec![AccountEvent::Withdrawn { amount: *amount }]),
        Command::Close if account.balance != 0 => reject("the balance is not zero"),
        Command::Close => Ok(vec![AccountEvent::Closed]),
    }
}

/// A bank: its accounts are the streams `<bank>-<id>` (the category
/// `<bank>`), its read model the rows of `bank_balances` and
/// `bank_history` with `bank = <bank>`.
#[derive(Clone)]
pub struct Bank {
    pub store: EventStore,
    pub name: String,
}

/// Handles a command on account `id`: load, decide, save with the loaded
/// version; when another writer got there first, again (up to 5 times).
/// Returns the account's version after the command.
pub async fn handle(bank: &Bank, id: &str, command: Command) -> Result<u64, BankError> {
    let store = &bank.store;
    let stream = format!("{}-{id}", bank.name);
    retry_on_conflict(5, || async {
        let mut account = store.load::<Account>(&stream).await?;
        let events = decide(&account.state, &command)?;
        store.save(&mut account, events).await?;
        Ok(account.version)
    })
    .await
}

/// The read model's tables.
pub async fn create_read_model(pool: &PgPool) -> Result<(), sqlx::Error> {
    // `CREATE TABLE IF NOT EXISTS` is not safe against itself: two services
    // (or tests) starting at once can both try to create the table and one
    // fails on the catalog's unique index. A transaction-scoped advisory
    // lock makes them take turns.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('bank read model'))")
        .execute(&mut *tx)
        .await?;
    for ddl in [
        "CREATE TABLE IF NOT EXISTS bank_balances (
            bank text NOT NULL, account text NOT NULL, owner text NOT NULL,
            balance bigint NOT NULL, closed boolean NOT NULL, version bigint NOT NULL,
            PRIMARY KEY (bank, account))",
        "CREATE TABLE IF NOT EXISTS bank_history (
            bank text NOT NULL, account text NOT NULL, version bigint NOT NULL,
            kind text NOT NULL, amount bigint NOT NULL, PRIMARY KEY (bank, account, version))",
    ] {
        sqlx::query(ddl).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// Applies one event to the read model, in one transaction, idempotently:
/// an event at or below the version the balance row records changes
/// nothing (a projector restarted after a crash sees some events again).
async fn project(
    pool: &PgPool,
    bank: &str,
    account: &str,
    version: i64,
    event: &AccountEvent,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let seen: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM bank_balances WHERE bank = $1 AND account = $2 FOR UPDATE",
    )
    .bind(bank)
    .bind(account)
    .fetch_optional(&mut *tx)
    .await?;
    if seen.is_some_and(|seen| seen >= version) {
        return Ok(());
    }
    let (kind, amount) = match event {
        AccountEvent::Opened { owner } => {
            sqlx::query(
                "INSERT INTO bank_balances (bank, account, owner, balance, closed, version) \
                 VALUES ($4, $1, $2, 0, false, $3)",
            )
            .bind(account)
            .bind(owner)
            .bind(version)
            .bind(bank)
            .execute(&mut *tx)
            .await?;
            ("opened", 0)
        }
        AccountEvent::Deposited { amount } => ("deposited", *amount),
        AccountEvent::Withdrawn { amount } => ("withdrawn", -*amount),
        AccountEvent::Closed => ("closed", 0),
    };
    sqlx::query(
        "UPDATE bank_balances SET balance = balance + $2, closed = closed OR $3, version = $4 \
         WHERE bank = $5 AND account = $1",
    )
    .bind(account)
    .bind(amount)
    .bind(kind == "closed")
    .bind(version)
    .bind(bank)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO bank_history (bank, account, version, kind, amount) VALUES ($5, $1, $2, $3, $4)",
    )
    .bind(account)
        .bind(version)
        .bind(kind)
        .bind(amount)
        .bind(bank)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Starts the projection that keeps the read model: every `account-*`
/// event, in order, from where the group `group` stands.
pub async fn start_projection(bank: &Bank, group: &str) -> tidings_core::Result<Consumer> {
    let store = &bank.store;
    let pool = store.pool().clone();
    let name = bank.name.clone();
    let prefix = format!("{}-", bank.name);
    let subscriber: Arc<dyn Subscriber> =
        Arc::new(store.subscriber().poll_interval(Duration::from_millis(50)));
    Consumer::group(subscriber, group.to_owned())
        .start_from(StartFrom::Earliest)
        .concurrency(1)
        .handle(bank.name.clone(), move |e: Event<AccountEvent>| {
            let (pool, name, prefix) = (pool.clone(), name.clone(), prefix.clone());
            async move {
                let header = |name: &str| e.message().headers.get(name).cloned();
                let stream = header(tidings_postgres::STREAM_HEADER).unwrap_or_default();
                let account = stream.strip_prefix(&prefix).unwrap_or(&stream).to_owned();
                let version: i64 = header(tidings_postgres::VERSION_HEADER)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_default();
                project(&pool, &name, &account, version, &e.data)
                    .await
                    .map_err(HandlerError::retryable)
            }
        })
        .start()
        .await
}

/// Empties the read model and moves the group back to the first event: the
/// next projection rebuilds everything by replay.
pub async fn reset_read_model(bank: &Bank, group: &str) -> Result<(), BankError> {
    for table in ["bank_balances", "bank_history"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE bank = $1"))
            .bind(&bank.name)
            .execute(bank.store.pool())
            .await
            .map_err(StoreError::from)?;
    }
    bank.store
        .subscriber()
        .set_checkpoint(&bank.name, group, GlobalPosition::START)
        .await
        .map_err(|e| BankError::Rejected(e.to_string()))?;
    Ok(())
}

/// A balance row: account, owner, balance, closed.
pub type Balance = (String, String, i64, bool);
/// A history row: account, version, kind, amount.
pub type Entry = (String, i64, String, i64);

/// The bank's read model as rows, for comparing.
pub async fn read_model(bank: &Bank) -> Result<(Vec<Balance>, Vec<Entry>), sqlx::Error> {
    // One snapshot for both tables, so they agree with each other.
    let mut tx = bank.store.pool().begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    let balances = sqlx::query_as(
        "SELECT account, owner, balance, closed FROM bank_balances WHERE bank = $1 ORDER BY account",
    )
    .bind(&bank.name)
    .fetch_all(&mut *tx)
    .await?;
    let history = sqlx::query_as(
        "SELECT account, version, kind, amount FROM bank_history WHERE bank = $1 \
         ORDER BY account, version",
    )
    .bind(&bank.name)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((balances, history))
}

/// Waits (bounded) until the read model holds `entries` history rows.
pub async fn until_caught_up(
    bank: &Bank,
    entries: usize,
) -> Result<(Vec<Balance>, Vec<Entry>), Box<dyn std::error::Error>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let model = read_model(bank).await?;
        if model.1.len() >= entries {
            return Ok(model);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "the read model has {} of {entries} rows after 30 s",
                model.1.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
