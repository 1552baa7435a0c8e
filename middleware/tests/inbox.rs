//! The dead-letter inbox on a real broker: opened after the failure (the
//! usual case for an operator), it still sees the letter.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidings_core::testkit::{unique, within};
use tidings_core::{Consumer, DeadLetterReason, Event, HandlerError, PublisherExt, SettleAction};
use tidings_middleware::dead_letters::DeadLetterInbox;
use tidings_redis::{RedisBus, RedisConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_opened_after_the_failure_sees_the_letter() {
    let bus = RedisBus::connect(RedisConfig::from_url("redis://127.0.0.1:6379").expect("url"))
        .await
        .unwrap_or_else(|e| {
            panic!("Redis must run on 127.0.0.1:6379 ({e}); scripts/brokers.sh starts it")
        });
    let topic = unique("inbox");
    let settled: Arc<Mutex<Vec<SettleAction>>> = Arc::default();
    let record = settled.clone();
    let consumer = Consumer::group(bus.subscriber(), "g")
        .handle(&topic, |_: Event<String>| async {
            Err::<(), _>(HandlerError::permanent("cannot handle this"))
        })
        .on_settle(move |s| record.lock().expect("lock").push(s.action))
        .start()
        .await
        .expect("started");
    let event = Event::new("poison".to_owned());
    let id = event.id().to_owned();
    bus.publisher()
        .publish_event(&topic, event)
        .await
        .expect("published");
    within(30, "the dead letter", async {
        while settled.lock().expect("lock").is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        settled.lock().expect("lock")[0],
        SettleAction::DeadLetter {
            reason: DeadLetterReason::Permanent
        }
    );

    // Only now does the operator look.
    let dlq = bus.subscriber().dead_letter_topic(&topic, "g");
    let mut inbox = DeadLetterInbox::open(&*bus.subscriber(), bus.publisher(), &dlq, 100)
        .await
        .expect("opened");
    let held = within(30, "the letter in the inbox", async {
        loop {
            let n = inbox.fetch(Duration::from_millis(200)).await;
            if n > 0 {
                return n;
            }
        }
    })
    .await;
    assert_eq!(held, 1);
    let (message, letter) = inbox
        .get(&id)
        .expect("the letter written before the inbox opened");
    assert_eq!(message.id, id);
    assert_eq!(letter.reason, DeadLetterReason::Permanent);
    assert_eq!(letter.topic, topic);
    let purged = inbox
        .purge(&tidings_middleware::dead_letters::Filter::default())
        .await
        .expect("purged");
    assert_eq!(purged, 1);
}
