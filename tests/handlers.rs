//! Handlers as services write them, on every broker: several event types on
//! one topic routed to their handlers, shared state and other extractors
//! beside the typed event, a typed topic publishing the type each event
//! declares, and a type nobody handles dead-lettered as `unhandled-type`.
//! Start-time errors (a duplicate handler, missing state) need no broker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::extract::{Attempt, Meta};
use tidings::memory::MemoryBus;
use tidings::prelude::*;
use tidings::testkit::{unique, within};
use tidings::{DeadLetterReason, Error, SettleAction};
use tidings_tests::kafka_mock;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UserRegistered {
    email: String,
}

impl EventType for UserRegistered {
    const TYPE: &'static str = "user.registered";
    const VERSION: Option<&'static str> = Some("2");
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UserDeleted {
    email: String,
}

impl EventType for UserDeleted {
    const TYPE: &'static str = "user.deleted";
}

/// The service's shared dependency: records what it was asked to do.
#[derive(Clone, Default)]
struct Mailer {
    sent: Arc<Mutex<Vec<String>>>,
}

impl Mailer {
    fn sent(&self) -> Vec<String> {
        self.sent.lock().expect("lock").clone()
    }
}

async fn welcome(
    event: Event<UserRegistered>,
    State(mailer): State<Mailer>,
    meta: Meta,
    Attempt(attempt): Attempt,
) -> HandlerResult {
    assert_eq!(meta.id, event.id());
    let version = meta.metadata.schema_version.clone().unwrap_or_default();
    mailer.sent.lock().expect("lock").push(format!(
        "welcome {} (v{version}, attempt {attempt})",
        event.data.email
    ));
    Ok(())
}

async fn farewell(event: Event<UserDeleted>, State(mailer): State<Mailer>) -> HandlerResult {
    mailer
        .sent
        .lock()
        .expect("lock")
        .push(format!("farewell {}", event.data.email));
    Ok(())
}

async fn routes_by_event_type(url: &str) {
    let bus = tidings::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}; scripts/brokers.sh starts the brokers"));
    let topic = unique("users");
    let mailer = Mailer::default();
    let settled: Arc<Mutex<Vec<(String, SettleAction)>>> = Arc::default();
    let record = settled.clone();
    let consumer = bus
        .consumer("email")
        .state(mailer.clone())
        .on::<UserRegistered, _, _>(&topic, welcome)
        .handle_type(&topic, UserDeleted::TYPE, farewell)
        .on_settle(move |s| {
            let event_type = s.delivery.message().metadata.event_type.clone();
            record
                .lock()
                .expect("lock")
                .push((event_type.unwrap_or_default(), s.action));
        })
        .start()
        .await
        .expect("started");

    let registered = bus.publisher().topic::<UserRegistered>(&topic);
    let deleted = bus.publisher().topic::<UserDeleted>(&topic);
    registered
        .publish(UserRegistered {
            email: "ada@example.com".into(),
        })
        .await
        .expect("published");
    deleted
        .publish(UserDeleted {
            email: "bob@example.com".into(),
        })
        .await
        .expect("published");
    // A type this service has no handler for.
    bus.publish_event(
        &topic,
        Event::new(UserDeleted {
            email: "eve@example.com".into(),
        })
        .with_type("user.renamed"),
    )
    .await
    .expect("published");

    within(60, "three settlements", async {
        while settled.lock().expect("lock").len() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;

    let mut sent = mailer.sent();
    sent.sort();
    assert_eq!(
        sent,
        [
            "farewell bob@example.com",
            "welcome ada@example.com (v2, attempt 1)"
        ]
    );
    let mut settled = settled.lock().expect("lock").clone();
    settled.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        settled,
        [
            ("user.deleted".to_owned(), SettleAction::Ack),
            ("user.registered".to_owned(), SettleAction::Ack),
            (
                "user.renamed".to_owned(),
                SettleAction::DeadLetter {
                    reason: DeadLetterReason::UnhandledType
                }
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_memory() {
    routes_by_event_type("memory://").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis() {
    routes_by_event_type("redis://127.0.0.1:6379").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq() {
    routes_by_event_type("amqp://guest:guest@127.0.0.1:5672/%2f").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream() {
    routes_by_event_type("nats://127.0.0.1:4222").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    routes_by_event_type("postgres://postgres@127.0.0.1:5432/test?poll=100ms").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka() {
    routes_by_event_type(&format!("kafka://{}?auto_create_topics=true", kafka_mock())).await;
}

/// A batch handler on `url`: ten events in batches of up to four; one fails
/// for good and is dead-lettered alone, one fails once and comes back alone,
/// the others are acked.
async fn batches_settle_each_message(url: &str) {
    use tidings::batch::{BatchFailure, BatchOptions};
    let bus = tidings::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}; scripts/brokers.sh starts the brokers"));
    let topic = unique("projections");
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let done: Arc<Mutex<Vec<u32>>> = Arc::default();
    let settled: Arc<Mutex<Vec<(u32, SettleAction)>>> = Arc::default();
    let (record_sizes, record_done, record) = (sizes.clone(), done.clone(), settled.clone());
    let consumer = bus
        .consumer("projector")
        .retry(
            tidings::RetryPolicy::new(3)
                .with_backoff(tidings::Backoff::fixed(Duration::from_millis(100))),
        )
        .handle_batch(
            &topic,
            BatchOptions::new(4).wait(Duration::from_millis(200)),
            move |events: Vec<Event<u32>>| {
                let (sizes, done) = (record_sizes.clone(), record_done.clone());
                async move {
                    sizes.lock().expect("lock").push(events.len());
                    let mut failed = Vec::new();
                    for (i, e) in events.iter().enumerate() {
                        match e.data {
                            3 => failed.push((i, HandlerError::permanent("three is refused"))),
                            5 if e.attempt() == 1 => {
                                failed.push((i, HandlerError::retryable("five, once")))
                            }
                            n => done.lock().expect("lock").push(n),
                        }
                    }
                    if failed.is_empty() {
                        Ok(())
                    } else {
                        Err(BatchFailure::Some(failed))
                    }
                }
            },
        )
        .on_settle(move |s| {
            let n: u32 = serde_json::from_slice(&s.delivery.message().payload).expect("a number");
            record.lock().expect("lock").push((n, s.action));
        })
        .start()
        .await
        .expect("started");
    for n in 0..10u32 {
        bus.publish_event(&topic, Event::new(n))
            .await
            .expect("published");
    }
    within(60, "eleven settlements", async {
        while settled.lock().expect("lock").len() < 11 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;

    let mut done = done.lock().expect("lock").clone();
    done.sort_unstable();
    assert_eq!(done, [0, 1, 2, 4, 5, 6, 7, 8, 9]);
    let sizes = sizes.lock().expect("lock").clone();
    assert!(sizes.iter().all(|&n| (1..=4).contains(&n)), "{sizes:?}");
    assert!(
        sizes.iter().any(|&n| n > 1),
        "batches of more than one: {sizes:?}"
    );
    let settled = settled.lock().expect("lock").clone();
    let of = |n: u32| -> Vec<SettleAction> {
        settled
            .iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, a)| *a)
            .collect()
    };
    assert_eq!(
        of(3),
        [SettleAction::DeadLetter {
            reason: DeadLetterReason::Permanent
        }]
    );
    assert!(
        matches!(of(5)[..], [SettleAction::Nack { .. }, SettleAction::Ack]),
        "{:?}",
        of(5)
    );
    for n in [0, 1, 2, 4, 6, 7, 8, 9] {
        assert_eq!(of(n), [SettleAction::Ack], "event {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_memory() {
    batches_settle_each_message("memory://").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_redis() {
    batches_settle_each_message("redis://127.0.0.1:6379").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_rabbitmq() {
    batches_settle_each_message("amqp://guest:guest@127.0.0.1:5672/%2f").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_jetstream() {
    batches_settle_each_message("nats://127.0.0.1:4222").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_postgres() {
    batches_settle_each_message("postgres://postgres@127.0.0.1:5432/test?poll=100ms").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_kafka() {
    batches_settle_each_message(&format!("kafka://{}?auto_create_topics=true", kafka_mock())).await;
}

fn config_error(result: tidings::Result<tidings::Consumer>) -> String {
    match result {
        Err(Error::Config { message, .. }) => message,
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("expected the consumer to be refused"),
    }
}

#[tokio::test]
async fn a_second_handler_for_the_same_type_is_refused_naming_both() {
    let bus = MemoryBus::new();
    let error = config_error(
        Consumer::group(bus.subscriber(), "email")
            .state(Mailer::default())
            .on::<UserRegistered, _, _>("users", welcome)
            .handle_type("users", "user.registered", farewell)
            .start()
            .await,
    );
    assert!(error.contains("`users`"), "{error}");
    assert!(error.contains("user.registered"), "{error}");
    assert!(
        error.contains("welcome") && error.contains("farewell"),
        "{error}"
    );

    let error = config_error(
        Consumer::group(bus.subscriber(), "email")
            .handle("users", |_: Event<String>| async {
                Ok::<_, HandlerError>(())
            })
            .handle("users", |_: Event<u32>| async { Ok::<_, HandlerError>(()) })
            .start()
            .await,
    );
    assert!(error.contains("every event type"), "{error}");
}

#[tokio::test]
async fn state_nobody_registered_is_refused_at_start() {
    let bus = MemoryBus::new();
    let error = config_error(
        Consumer::group(bus.subscriber(), "email")
            .on::<UserRegistered, _, _>("users", welcome)
            .start()
            .await,
    );
    assert!(error.contains("Mailer"), "{error}");
}

#[tokio::test]
async fn unhandled_types_are_acked_when_asked_and_the_untyped_handler_takes_the_rest() {
    let bus = MemoryBus::new();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let settled: Arc<Mutex<Vec<SettleAction>>> = Arc::default();
    let (others, record) = (seen.clone(), settled.clone());
    let consumer = Consumer::group(bus.subscriber(), "audit")
        .state(Mailer::default())
        .unhandled(Unhandled::Ack)
        .on::<UserRegistered, _, _>("users", welcome)
        .handle("orders", move |e: Event<String>| {
            others.lock().expect("lock").push(e.data);
            async { Ok::<_, HandlerError>(()) }
        })
        .on_settle(move |s| record.lock().expect("lock").push(s.action))
        .start()
        .await
        .expect("started");
    bus.publish_event(
        "users",
        Event::new("x".to_owned()).with_type("user.renamed"),
    )
    .await
    .expect("published");
    bus.publish_event(
        "orders",
        Event::new("o-1".to_owned()).with_type("order.placed"),
    )
    .await
    .expect("published");
    within(10, "two settlements", async {
        while settled.lock().expect("lock").len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    consumer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*settled.lock().expect("lock"), [SettleAction::Ack; 2]);
    assert_eq!(*seen.lock().expect("lock"), ["o-1"]);
}
