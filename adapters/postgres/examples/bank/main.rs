//! The bank example: `cargo run -p tidings-postgres --example bank`
//! (PostgreSQL on 127.0.0.1:5432; `scripts/brokers.sh` starts it).
//!
//! Opens two accounts, moves money, races two withdrawals on one account
//! (one wins, the other retries and is rejected), keeps a read model with a
//! projection, then rebuilds the read model by replay and checks it comes
//! out the same.

mod bank;

use std::time::Duration;

use bank::{Bank, BankError, Command, handle};
use tidings_postgres::EventStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let store = EventStore::connect(&url).await?;
    bank::create_read_model(store.pool()).await?;
    // A bank of its own per run, so runs do not mix.
    let name = format!("bank{}", std::process::id());
    let bank = Bank { store, name };

    handle(
        &bank,
        "alice",
        Command::Open {
            owner: "Alice".into(),
        },
    )
    .await?;
    handle(&bank, "alice", Command::Deposit { amount: 100 }).await?;
    handle(
        &bank,
        "bob",
        Command::Open {
            owner: "Bob".into(),
        },
    )
    .await?;
    handle(&bank, "bob", Command::Deposit { amount: 20 }).await?;
    match handle(&bank, "bob", Command::Withdraw { amount: 50 }).await {
        Err(BankError::Rejected(why)) => println!("bob withdraws 50: rejected ({why})"),
        other => println!("bob withdraws 50: {other:?}"),
    }
    handle(&bank, "bob", Command::Withdraw { amount: 20 }).await?;
    handle(&bank, "bob", Command::Close).await?;
    // Two withdrawals race on Alice's account: both load version 2, one
    // saves first, the other conflicts, loads again and decides again.
    let (a, b) = tokio::join!(
        handle(&bank, "alice", Command::Withdraw { amount: 60 }),
        handle(&bank, "alice", Command::Withdraw { amount: 60 }),
    );
    println!("two withdrawals of 60 from 100: {a:?} / {b:?}");

    let projection = bank::start_projection(&bank, "read-model").await?;
    let (balances, history) = bank::until_caught_up(&bank, 7).await?;
    projection.shutdown(Duration::from_secs(10)).await;
    for (account, owner, balance, closed) in &balances {
        println!(
            "{account} ({owner}): {balance}{}",
            if *closed { ", closed" } else { "" }
        );
    }

    bank::reset_read_model(&bank, "read-model").await?;
    let projection = bank::start_projection(&bank, "read-model").await?;
    let rebuilt = bank::until_caught_up(&bank, 7).await?;
    projection.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        rebuilt,
        (balances, history),
        "the rebuild ends in the same tables"
    );
    println!(
        "rebuilt by replay: the same {} history rows",
        rebuilt.1.len()
    );
    Ok(())
}
