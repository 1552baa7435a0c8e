//! Settlement observers (`ConsumerBuilder::on_settle`) see every settlement
//! the runtime makes, with the broker's answer, failures included.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidings_core::testkit::ScriptedSubscriber;
use tidings_core::{Consumer, DeadLetterReason, Event, HandlerError, Message, SettleAction};

#[tokio::test]
async fn observers_see_every_settlement_and_its_result() {
    let word = |w: &str| Message::new(serde_json::to_vec(w).expect("json"));
    let refused = word("refused");
    let subscriber = ScriptedSubscriber::new()
        .with("t", word("fine"))
        .with("t", refused.clone())
        .with("t", word("poison"))
        .refusing(&refused.id);
    let seen: Arc<Mutex<Vec<(String, SettleAction, bool)>>> = Arc::default();
    let record = seen.clone();
    let consumer = Consumer::group(subscriber.clone().into_arc(), "g")
        .concurrency(1)
        .handle("t", |e: Event<String>| async move {
            if e.data == "poison" {
                return Err(HandlerError::permanent("cannot handle poison"));
            }
            Ok(())
        })
        .on_settle(move |s| {
            let word: String = serde_json::from_slice(&s.delivery.message().payload).expect("json");
            record
                .lock()
                .expect("lock")
                .push((word, s.action, s.result.is_ok()));
        })
        .start()
        .await
        .expect("started");
    subscriber.wait_settled(3, Duration::from_secs(10)).await;
    consumer.shutdown(Duration::from_secs(10)).await;

    // Observers run right after the settlement, before the worker moves on;
    // the shutdown above waited for the workers.
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        [
            ("fine".to_owned(), SettleAction::Ack, true),
            ("refused".to_owned(), SettleAction::Ack, false),
            (
                "poison".to_owned(),
                SettleAction::DeadLetter {
                    reason: DeadLetterReason::Permanent
                },
                true
            ),
        ]
    );
    let recorded: Vec<_> = subscriber
        .settlements()
        .into_iter()
        .map(|(_, action, ok)| (action, ok))
        .collect();
    assert_eq!(
        recorded,
        [("ack", true), ("ack", false), ("dead_letter", true)]
    );
}

#[tokio::test]
async fn a_panicking_observer_does_not_stop_the_worker() {
    let subscriber = ScriptedSubscriber::new()
        .with("t", Message::new("\"one\""))
        .with("t", Message::new("\"two\""));
    let consumer = Consumer::group(subscriber.clone().into_arc(), "g")
        .concurrency(1)
        .handle("t", |_: Event<String>| async { Ok::<_, HandlerError>(()) })
        .on_settle(|_| panic!("observer bug"))
        .start()
        .await
        .expect("started");
    // One worker: the second message is handled only if it survived the first panic.
    subscriber.wait_settled(2, Duration::from_secs(10)).await;
    consumer.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_nack_is_observed_with_its_delay() {
    use tidings_core::{Backoff, RetryPolicy};

    let subscriber = ScriptedSubscriber::new().with("t", Message::new("\"flaky\""));
    let seen: Arc<Mutex<Vec<SettleAction>>> = Arc::default();
    let record = seen.clone();
    let consumer = Consumer::group(subscriber.clone().into_arc(), "g")
        .retry(RetryPolicy::new(3).with_backoff(Backoff::fixed(Duration::from_millis(7))))
        .handle("t", |_: Event<String>| async {
            Err::<(), _>(HandlerError::retryable("try again"))
        })
        .on_settle(move |s| record.lock().expect("lock").push(s.action))
        .start()
        .await
        .expect("started");
    subscriber.wait_settled(1, Duration::from_secs(10)).await;
    consumer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        *seen.lock().expect("lock"),
        [SettleAction::Nack {
            delay: Duration::from_millis(7)
        }]
    );
}
