//! The bank example's outcome (examples/bank), against the real PostgreSQL:
//! commands and their rejections, two writers racing on one account, the
//! read model kept by a projection, a projector killed mid-stream that
//! resumes without gaps or doubled effects, and a rebuild by replay that
//! ends in the same tables.

#[path = "../examples/bank/bank.rs"]
#[allow(dead_code)]
mod bank;

use std::time::Duration;

use bank::{Bank, BankError, Command, handle};
use tidings_core::testkit::unique;
use tidings_postgres::EventStore;

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn bank() -> Bank {
    let store = EventStore::connect(URL)
        .await
        .unwrap_or_else(|e| panic!("{URL}: {e}; scripts/brokers.sh starts PostgreSQL"));
    bank::create_read_model(store.pool()).await.expect("tables");
    Bank {
        store,
        name: unique("bank").replace('-', "_"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_races_the_read_model_and_its_rebuild() {
    let bank = bank().await;
    handle(
        &bank,
        "alice",
        Command::Open {
            owner: "Alice".into(),
        },
    )
    .await
    .expect("open");
    handle(&bank, "alice", Command::Deposit { amount: 100 })
        .await
        .expect("deposit");
    assert!(matches!(
        handle(
            &bank,
            "alice",
            Command::Open {
                owner: "Eve".into()
            }
        )
        .await,
        Err(BankError::Rejected(_))
    ));
    assert!(matches!(
        handle(&bank, "alice", Command::Withdraw { amount: 101 }).await,
        Err(BankError::Rejected(_))
    ));
    assert!(matches!(
        handle(&bank, "nobody", Command::Deposit { amount: 1 }).await,
        Err(BankError::Rejected(_))
    ));
    // Eight withdrawals of 30 race on a balance of 100: every one that
    // lost a race loaded again and decided again, so exactly three go
    // through and the rest are rejected for the balance — none fails with
    // a version conflict, and the balance never goes below zero.
    let racing: Vec<_> = (0..8)
        .map(|_| {
            let bank = bank.clone();
            tokio::spawn(
                async move { handle(&bank, "alice", Command::Withdraw { amount: 30 }).await },
            )
        })
        .collect();
    let (mut won, mut rejected) = (0, 0);
    for r in racing {
        match r.await.expect("joined") {
            Ok(_) => won += 1,
            Err(BankError::Rejected(_)) => rejected += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((won, rejected), (3, 5));
    let alice = bank
        .store
        .load::<bank::Account>(&format!("{}-alice", bank.name))
        .await
        .expect("load");
    assert_eq!((alice.state.balance, alice.version), (10, 5));

    let projection = bank::start_projection(&bank, "read-model")
        .await
        .expect("projection");
    let model = bank::until_caught_up(&bank, 5).await.expect("caught up");
    projection.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        model.0,
        [("alice".to_owned(), "Alice".to_owned(), 10, false)]
    );
    let kinds: Vec<&str> = model.1.iter().map(|e| e.2.as_str()).collect();
    assert_eq!(
        kinds,
        ["opened", "deposited", "withdrawn", "withdrawn", "withdrawn"]
    );

    bank::reset_read_model(&bank, "read-model")
        .await
        .expect("reset");
    assert!(bank::read_model(&bank).await.expect("read").1.is_empty());
    let projection = bank::start_projection(&bank, "read-model")
        .await
        .expect("projection");
    let rebuilt = bank::until_caught_up(&bank, 5).await.expect("rebuilt");
    projection.shutdown(Duration::from_secs(10)).await;
    assert_eq!(rebuilt, model, "the rebuild ends in the same tables");
}

/// The projector dies mid-stream (its runtime dropped: tasks gone, no
/// final checkpoint, connections cut, the open transaction rolled back);
/// the next one resumes from the checkpoint, and the read model ends
/// exact: every deposit once, versions 1..=n without a gap.
#[test]
fn a_projector_killed_mid_stream_resumes_without_gaps_or_doubled_effects() {
    const DEPOSITS: i64 = 150;
    let main = tokio::runtime::Runtime::new().expect("runtime");
    let bank = main.block_on(async {
        let bank = bank().await;
        handle(
            &bank,
            "carol",
            Command::Open {
                owner: "Carol".into(),
            },
        )
        .await
        .expect("open");
        for n in 1..=DEPOSITS {
            handle(&bank, "carol", Command::Deposit { amount: n })
                .await
                .expect("deposit");
        }
        bank
    });

    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let killed_at = doomed.block_on(async {
        // Its own connections, which die with its runtime.
        let own = Bank {
            store: EventStore::connect(URL).await.expect("store"),
            name: bank.name.clone(),
        };
        let projection = bank::start_projection(&own, "read-model")
            .await
            .expect("projection");
        let partial = bank::until_caught_up(&own, 40).await.expect("part of it");
        std::mem::forget(projection);
        partial.1.len()
    });
    doomed.shutdown_background();
    assert!(killed_at < DEPOSITS as usize + 1, "killed before the end");

    main.block_on(async {
        let projection = bank::start_projection(&bank, "read-model")
            .await
            .expect("projection");
        bank::until_caught_up(&bank, DEPOSITS as usize + 1)
            .await
            .expect("resumed");
        // A marker deposit after them, awaited: the projection handles the
        // stream in order, so whatever was to come twice has come once it
        // is.
        const MARKER: i64 = 1_000_000;
        handle(&bank, "carol", Command::Deposit { amount: MARKER })
            .await
            .expect("marker");
        let (balances, history) = bank::until_caught_up(&bank, DEPOSITS as usize + 2)
            .await
            .expect("the marker");
        projection.shutdown(Duration::from_secs(10)).await;
        let (_, after) = bank::read_model(&bank).await.expect("read");
        assert_eq!(after.len(), history.len(), "nothing more came");
        let expected: i64 = (1..=DEPOSITS).sum::<i64>() + MARKER;
        assert_eq!(balances[0].2, expected, "every deposit counted once");
        let versions: Vec<i64> = history.iter().map(|e| e.1).collect();
        let all: Vec<i64> = (1..=DEPOSITS + 2).collect();
        assert_eq!(versions, all, "no gap, no double");
    });
}
