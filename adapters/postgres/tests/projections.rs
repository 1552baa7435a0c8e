//! Projections on the consumer runtime: a group of the store's events is
//! an ordinary Tidings consumer, with its checkpoint in PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings_core::testkit::{unique, within};
use tidings_core::{Consumer, Event, HandlerError, Message, SettleAction, StartFrom, Subscriber};
use tidings_postgres::{EventStore, ExpectedVersion, GlobalPosition};

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Deposited {
    account: String,
    amount: i64,
}

async fn store() -> EventStore {
    EventStore::connect(URL).await.unwrap_or_else(|e| {
        panic!("{URL}: {e}; scripts/brokers.sh starts PostgreSQL (or: pg_ctlcluster 15 main start)")
    })
}

fn subscriber(store: &EventStore) -> Arc<dyn Subscriber> {
    Arc::new(store.subscriber().poll_interval(Duration::from_millis(50)))
}

fn deposit(account: &str, amount: i64) -> Message {
    Message::new(
        serde_json::to_vec(&Deposited {
            account: account.into(),
            amount,
        })
        .expect("JSON"),
    )
    .with_type("account.deposited")
}

/// Balances by account, and the ids handled (to count each once).
#[derive(Default)]
struct ReadModel {
    balances: HashMap<String, i64>,
    handled: Vec<String>,
}

fn projection(
    subscriber: Arc<dyn Subscriber>,
    category: &str,
    model: &Arc<Mutex<ReadModel>>,
) -> tidings_core::ConsumerBuilder {
    let model = model.clone();
    Consumer::group(subscriber, "balances")
        .start_from(StartFrom::Earliest)
        .concurrency(1)
        .handle(category.to_owned(), move |e: Event<Deposited>| {
            let model = model.clone();
            async move {
                if e.data.amount < 0 {
                    return Err(HandlerError::permanent("a deposit cannot be negative"));
                }
                let mut model = model.lock().expect("lock");
                *model.balances.entry(e.data.account.clone()).or_default() += e.data.amount;
                model.handled.push(e.message().id.to_string());
                Ok(())
            }
        })
}

async fn until_handled(model: &Arc<Mutex<ReadModel>>, n: usize) {
    within(30, "the projection to catch up", async {
        while model.lock().expect("lock").handled.len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_catches_up_keeps_its_checkpoint_and_resumes_after_it() {
    let store = store().await;
    let category = unique("acct").replace('-', "_");
    let (a, b) = (format!("{category}-a"), format!("{category}-b"));
    store
        .append(
            &a,
            ExpectedVersion::NoStream,
            vec![deposit("a", 10), deposit("a", 5)],
        )
        .await
        .expect("a");
    store
        .append(&b, ExpectedVersion::NoStream, vec![deposit("b", 7)])
        .await
        .expect("b");

    let model = Arc::new(Mutex::new(ReadModel::default()));
    let consumer = projection(subscriber(&store), &category, &model)
        .start()
        .await
        .expect("started");
    until_handled(&model, 3).await;
    // Live: an event appended now arrives without a restart.
    store
        .append(&a, ExpectedVersion::Exact(2), vec![deposit("a", 1)])
        .await
        .expect("a again");
    until_handled(&model, 4).await;
    consumer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(model.lock().expect("lock").balances["a"], 16);
    assert_eq!(model.lock().expect("lock").balances["b"], 7);

    let last = store
        .read_category(&category, GlobalPosition::START, 100)
        .await
        .expect("read")
        .last()
        .expect("events")
        .position;
    let checkpoint = store
        .subscriber()
        .checkpoint(&category, "balances")
        .await
        .expect("checkpoint");
    assert_eq!(checkpoint, Some(last), "saved on shutdown");

    // A restart handles only what came after the checkpoint.
    store
        .append(&b, ExpectedVersion::Exact(1), vec![deposit("b", 3)])
        .await
        .expect("b again");
    let again = Arc::new(Mutex::new(ReadModel::default()));
    let consumer = projection(subscriber(&store), &category, &again)
        .start()
        .await
        .expect("restarted");
    until_handled(&again, 1).await;
    // A marker appended after it: the projection handles in order, one at
    // a time, so once the marker is handled anything that was to come
    // again has come.
    store
        .append(&b, ExpectedVersion::Exact(2), vec![deposit("b", 100)])
        .await
        .expect("marker");
    until_handled(&again, 2).await;
    consumer.shutdown(Duration::from_secs(10)).await;
    let again = again.lock().expect("lock");
    assert_eq!(
        again.handled.len(),
        2,
        "nothing before the checkpoint again"
    );
    assert_eq!(again.balances["b"], 103);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_event_is_dead_lettered_into_the_store_and_the_projection_moves_on() {
    let store = store().await;
    let category = unique("acct").replace('-', "_");
    let stream = format!("{category}-c");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![deposit("c", 1), deposit("c", -5), deposit("c", 2)],
        )
        .await
        .expect("appended");
    let model = Arc::new(Mutex::new(ReadModel::default()));
    let dead = Arc::new(Mutex::new(Vec::new()));
    let record = dead.clone();
    let consumer = projection(subscriber(&store), &category, &model)
        .on_settle(move |s| {
            if matches!(s.action, SettleAction::DeadLetter { .. }) {
                record
                    .lock()
                    .expect("lock")
                    .push(s.delivery.message().id.clone());
            }
        })
        .start()
        .await
        .expect("started");
    until_handled(&model, 2).await;
    within(30, "the dead letter", async {
        while dead.lock().expect("lock").is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        model.lock().expect("lock").balances["c"],
        3,
        "the others were handled"
    );

    let letters_topic = store.subscriber().dead_letter_topic(&category, "balances");
    // Global reads wait for every older transaction of the database (the
    // other tests' included) to end: poll, bounded.
    let letters = within(30, "the dead letter in the store", async {
        loop {
            let letters = store
                .read_category(&letters_topic, GlobalPosition::START, 10)
                .await
                .expect("letters");
            if !letters.is_empty() {
                return letters;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0].message;
    assert_eq!(
        letter.headers.get("tidings-dlq-reason").map(String::as_str),
        Some("permanent-error")
    );
    let data: Deposited = serde_json::from_slice(&letter.payload).expect("the event itself");
    assert_eq!(data.amount, -5);
    // Dead letters are the store's own: not events of `$all`.
    let just_before = GlobalPosition {
        sequence: letters[0].position.sequence - 1,
        ..letters[0].position
    };
    let next = store.read_all(just_before, 1).await.expect("read all");
    assert!(
        next.iter().all(|e| e.message.id != letter.id),
        "a dead letter read as an event of $all"
    );
    let checkpoint = store
        .subscriber()
        .checkpoint(&category, "balances")
        .await
        .expect("checkpoint")
        .expect("saved");
    let last = store
        .read_stream(&stream, u64::MAX, tidings_postgres::Direction::Backward, 1)
        .await
        .expect("read")[0]
        .position;
    assert_eq!(checkpoint, last, "past the dead letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_take_turns_and_a_standby_resumes_from_the_checkpoint() {
    let store = store().await;
    let category = unique("acct").replace('-', "_");
    let stream = format!("{category}-d");
    let first_model = Arc::new(Mutex::new(ReadModel::default()));
    let second_model = Arc::new(Mutex::new(ReadModel::default()));
    let first = projection(subscriber(&store), &category, &first_model)
        .start()
        .await
        .expect("first");
    let second = projection(subscriber(&store), &category, &second_model)
        .start()
        .await
        .expect("second");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            (0..10).map(|n| deposit("d", n)).collect(),
        )
        .await
        .expect("appended");
    within(30, "one member to handle all", async {
        loop {
            let n = first_model.lock().expect("lock").handled.len()
                + second_model.lock().expect("lock").handled.len();
            if n >= 10 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let (active, standby, active_model, standby_model) =
        if first_model.lock().expect("lock").handled.is_empty() {
            (second, first, second_model, first_model)
        } else {
            (first, second, first_model, second_model)
        };
    assert_eq!(active_model.lock().expect("lock").handled.len(), 10);
    assert!(
        standby_model.lock().expect("lock").handled.is_empty(),
        "one reader at a time"
    );

    active.shutdown(Duration::from_secs(10)).await;
    store
        .append(
            &stream,
            ExpectedVersion::Exact(10),
            (10..15).map(|n| deposit("d", n)).collect(),
        )
        .await
        .expect("more");
    until_handled(&standby_model, 5).await;
    // A marker after them, awaited: handled in order, so whatever was to
    // come twice has come once it is.
    store
        .append(&stream, ExpectedVersion::Exact(15), vec![deposit("d", 99)])
        .await
        .expect("marker");
    until_handled(&standby_model, 6).await;
    standby.shutdown(Duration::from_secs(10)).await;
    let standby_ids: HashSet<String> = standby_model
        .lock()
        .unwrap()
        .handled
        .iter()
        .cloned()
        .collect();
    let active_ids: HashSet<String> = active_model
        .lock()
        .unwrap()
        .handled
        .iter()
        .cloned()
        .collect();
    assert_eq!(
        standby_ids.len(),
        6,
        "only what came after the checkpoint, and the marker"
    );
    assert!(standby_ids.is_disjoint(&active_ids), "nothing twice");
}

/// Writers commit out of order while a projection follows: every
/// committed event is handled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_beside_concurrent_writers_handles_every_event_once() {
    let store = Arc::new(store().await);
    let category = unique("acct").replace('-', "_");
    let model = Arc::new(Mutex::new(ReadModel::default()));
    let consumer = projection(subscriber(&store), &category, &model)
        .start()
        .await
        .expect("started");
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (store, category) = (store.clone(), category.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in 0..20 {
                    let events = vec![deposit("e", 1)];
                    let mut tx = store.pool().begin().await.expect("begin");
                    EventStore::append_in(
                        &mut tx,
                        &format!("{category}-{}", (w + n) % 3),
                        ExpectedVersion::Any,
                        &events,
                    )
                    .await
                    .expect("appended");
                    if n % 4 == 0 {
                        tokio::time::sleep(Duration::from_millis(15)).await;
                    }
                    tx.commit().await.expect("commit");
                    ids.push(events[0].id.to_string());
                }
                ids
            })
        })
        .collect();
    let mut committed = HashSet::new();
    for w in writers {
        committed.extend(w.await.expect("writer"));
    }
    until_handled(&model, committed.len()).await;
    // A marker after them all, awaited: handled in order, one at a time,
    // so whatever was to come twice has come once it is.
    let marker = deposit("e", 1);
    committed.insert(marker.id.to_string());
    store
        .append(&format!("{category}-0"), ExpectedVersion::Any, vec![marker])
        .await
        .expect("marker");
    until_handled(&model, committed.len()).await;
    consumer.shutdown(Duration::from_secs(10)).await;
    let model = model.lock().expect("lock");
    let handled: HashSet<String> = model.handled.iter().cloned().collect();
    assert_eq!(model.handled.len(), handled.len(), "each once");
    assert_eq!(handled, committed);
}
