//! The layers end to end on the in-process bus (and the Redis idempotency
//! store on the real Redis at 127.0.0.1:6379).
#![allow(clippy::unwrap_used)] // a test that unwraps fails with the error, which is the point

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidings_core::delivery::DEAD_LETTER_GROUP;
use tidings_core::middleware::{Next, from_fn};
use tidings_core::testkit::{unique, within};
use tidings_core::{
    Backoff, Consumer, DeadLetterReason, Delivery, Event, HandlerError, Message, Publisher,
    PublisherExt, RetryPolicy, Subscriber,
};
use tidings_memory::MemoryBus;
use tidings_middleware::prelude::*;
use tokio::sync::mpsc;

/// Attempts the handler saw, in order.
type Attempts = Arc<Mutex<Vec<u32>>>;

fn flaky_handler(
    attempts: Attempts,
    fail_times: u32,
    done: mpsc::UnboundedSender<()>,
) -> impl Fn(Event<String>) -> futures::future::BoxFuture<'static, Result<(), HandlerError>>
+ Send
+ Sync
+ 'static {
    move |e: Event<String>| {
        let (attempts, done) = (attempts.clone(), done.clone());
        Box::pin(async move {
            let seen = {
                let mut a = attempts.lock().unwrap();
                a.push(e.attempt());
                a.len() as u32
            };
            if seen <= fail_times {
                return Err(HandlerError::retryable("transient failure"));
            }
            let _ = done.send(());
            Ok(())
        })
    }
}

#[tokio::test]
async fn retry_in_process_fails_twice_then_succeeds() {
    let bus = MemoryBus::new();
    let attempts = Attempts::default();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let topic = unique("retry-in-process");
    let consumer = Consumer::group(bus.subscriber(), "g")
        .layer(
            Retry::exponential(Duration::from_millis(5))
                .max_attempts(5)
                .mode(RetryMode::InProcess),
        )
        .handle(&topic, flaky_handler(attempts.clone(), 2, done_tx))
        .start()
        .await
        .unwrap();
    bus.publish_event(&topic, Event::new("hi".to_owned()))
        .await
        .unwrap();
    within(10, "the successful attempt", done.recv()).await;
    assert_eq!(*attempts.lock().unwrap(), [1, 2, 3]);
    assert!(consumer.shutdown(Duration::from_secs(5)).await.drained);
    assert_eq!(bus.queued(&topic, "g"), 0, "acked once, not redelivered");
}

#[tokio::test]
async fn a_panicking_handler_is_retried_in_process_like_a_failing_one() {
    let bus = MemoryBus::new();
    let attempts = Attempts::default();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let topic = unique("retry-panic");
    let seen = attempts.clone();
    let consumer = Consumer::group(bus.subscriber(), "g")
        .layer(
            Retry::exponential(Duration::from_millis(5))
                .max_attempts(5)
                .mode(RetryMode::InProcess),
        )
        .handle(&topic, move |e: Event<String>| {
            let (seen, done) = (seen.clone(), done_tx.clone());
            async move {
                let n = {
                    let mut a = seen.lock().unwrap();
                    a.push(e.attempt());
                    a.len()
                };
                assert!(n > 2, "attempt {n} panics");
                let _ = done.send(());
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .unwrap();
    bus.publish_event(&topic, Event::new("hi".to_owned()))
        .await
        .unwrap();
    within(10, "the successful attempt", done.recv()).await;
    // Before, the panic went past the layer: no in-process retry, and the
    // runtime nacked it as attempt 1.
    assert_eq!(*attempts.lock().unwrap(), [1, 2, 3]);
    assert!(consumer.shutdown(Duration::from_secs(5)).await.drained);
    assert_eq!(bus.queued(&topic, "g"), 0, "acked once, not redelivered");
}

#[tokio::test]
async fn retry_through_the_broker_fails_twice_then_succeeds() {
    let bus = MemoryBus::new();
    let attempts = Attempts::default();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let topic = unique("retry-broker");
    let consumer = Consumer::group(bus.subscriber(), "g")
        .layer(Retry::exponential(Duration::from_millis(5)).max_attempts(5))
        .handle(&topic, flaky_handler(attempts.clone(), 2, done_tx))
        .start()
        .await
        .unwrap();
    bus.publish_event(&topic, Event::new("hi".to_owned()))
        .await
        .unwrap();
    within(10, "the successful attempt", done.recv()).await;
    assert_eq!(*attempts.lock().unwrap(), [1, 2, 3]);
    consumer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn retry_predicate_makes_an_error_final() {
    let bus = MemoryBus::new();
    let topic = unique("retry-predicate");
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let consumer = Consumer::group(bus.subscriber(), "g")
        .layer(
            Retry::exponential(Duration::from_millis(5))
                .mode(RetryMode::InProcess)
                .retry_if(|e| !e.to_string().contains("invalid")),
        )
        .handle(&topic, move |_: Event<String>| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::retryable("invalid card number")) }
        })
        .start()
        .await
        .unwrap();
    let mut inbox = DeadLetterInbox::open(&*bus.subscriber(), bus.publisher(), "g.dlq", 100)
        .await
        .unwrap();
    bus.publish_event(&topic, Event::new("x".to_owned()))
        .await
        .unwrap();
    within(10, "the dead letter", async {
        while inbox.fetch(Duration::from_millis(50)).await == 0 {}
    })
    .await;
    let (_, letter) = inbox.list().next().unwrap();
    assert_eq!(letter.reason, DeadLetterReason::Permanent);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not retried");
    consumer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn poison_message_is_dead_lettered_then_replayed_after_a_fix() {
    let bus = MemoryBus::new();
    let topic = unique("poison");
    let fixed = Arc::new(AtomicBool::new(false));
    let (ok_tx, mut ok) = mpsc::unbounded_channel::<String>();
    let f = fixed.clone();
    let consumer = Consumer::group(bus.subscriber(), "orders")
        .retry(RetryPolicy::new(2).with_backoff(Backoff::fixed(Duration::from_millis(5))))
        .handle(&topic, move |e: Event<String>| {
            let (fixed, ok) = (f.clone(), ok_tx.clone());
            async move {
                if e.data == "poison" && !fixed.load(Ordering::SeqCst) {
                    return Err(HandlerError::retryable("cannot price this order"));
                }
                let _ = ok.send(e.id().to_owned());
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    let dlq = bus.dead_letter_topic(&topic, "orders");
    let mut inbox = DeadLetterInbox::open(&*bus.subscriber(), bus.publisher(), &dlq, 100)
        .await
        .unwrap();
    let alarms = Arc::new(AtomicU32::new(0));
    let a = alarms.clone();
    inbox.on_threshold(1, move |_| {
        a.fetch_add(1, Ordering::SeqCst);
    });
    let poison = Event::new("poison".to_owned());
    let id = poison.id().to_owned();
    bus.publish_event(&topic, poison).await.unwrap();
    within(10, "the dead letter", async {
        while inbox.fetch(Duration::from_millis(50)).await == 0 {}
    })
    .await;
    assert_eq!(alarms.load(Ordering::SeqCst), 1, "the threshold hook fired");
    let (message, letter) = inbox.get(&id).expect("held");
    assert_eq!(letter.reason, DeadLetterReason::AttemptsExhausted);
    assert_eq!(letter.attempts, 2);
    assert_eq!(letter.topic, topic);
    assert_eq!(message.payload, "\"poison\"");

    fixed.store(true, Ordering::SeqCst);
    inbox.replay(&id).await.unwrap();
    assert_eq!(
        within(10, "the replayed message", ok.recv()).await.unwrap(),
        id
    );
    assert_eq!(inbox.list().count(), 0);
    inbox.close().await.unwrap();
    consumer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn dead_letters_are_kept_without_a_declared_group_and_can_be_purged() {
    let bus = MemoryBus::new();
    let topic = unique("purge");
    let consumer = Consumer::group(bus.subscriber(), "p")
        .handle(&topic, |_: Event<u32>| async { Ok(()) })
        .start()
        .await
        .unwrap();
    for _ in 0..3 {
        bus.publish(&topic, Message::new("not a number"))
            .await
            .unwrap();
    }
    let dlq = bus.dead_letter_topic(&topic, "p");
    within(10, "three dead letters", async {
        while bus.queued(&dlq, DEAD_LETTER_GROUP) < 3 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let mut inbox = DeadLetterInbox::open(&*bus.subscriber(), bus.publisher(), &dlq, 100)
        .await
        .unwrap();
    assert_eq!(inbox.fetch(Duration::from_millis(50)).await, 3);
    assert!(
        inbox
            .list()
            .all(|(_, l)| l.reason == DeadLetterReason::Undecodable)
    );
    assert_eq!(inbox.purge(&Filter::default()).await.unwrap(), 3);
    assert_eq!(bus.queued(&dlq, DEAD_LETTER_GROUP), 0);
    consumer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn breaker_opens_stops_intake_and_closes_after_probes() {
    let bus = MemoryBus::new();
    let topic = unique("breaker");
    let healthy = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let (ok_tx, mut ok) = mpsc::unbounded_channel::<()>();
    let breaker = CircuitBreaker::new(Threshold::Consecutive(3))
        .open_for(Duration::from_secs(60))
        .probes(1);
    let mut states = breaker.watch();
    let (h, c) = (healthy.clone(), calls.clone());
    let consumer = Consumer::group(bus.subscriber(), "b")
        .concurrency(1)
        .prefetch(1)
        .retry(RetryPolicy::new(100).with_backoff(Backoff::fixed(Duration::from_millis(10))))
        .layer(breaker.clone())
        .handle(&topic, move |_: Event<u32>| {
            let (healthy, calls, ok) = (h.clone(), c.clone(), ok_tx.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if !healthy.load(Ordering::SeqCst) {
                    return Err(HandlerError::retryable("payment API down"));
                }
                let _ = ok.send(());
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    for n in 0..10u32 {
        bus.publish_event(&topic, Event::new(n)).await.unwrap();
    }
    within(
        600,
        "the breaker to open",
        states.wait_for(|s| *s == BreakerState::Open),
    )
    .await
    .unwrap();
    let calls_when_opened = calls.load(Ordering::SeqCst);
    assert_eq!(calls_when_opened, 3);
    // Virtual time: half the open interval passes with no handler call.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        calls_when_opened,
        "intake paused while open"
    );
    assert_eq!(
        bus.queued(&topic, "b") + 1,
        10,
        "messages wait in the broker (one is held at the breaker)"
    );

    healthy.store(true, Ordering::SeqCst);
    within(
        600,
        "the breaker to close",
        states.wait_for(|s| *s == BreakerState::Closed),
    )
    .await
    .unwrap();
    for _ in 0..10 {
        within(600, "every message handled", ok.recv()).await;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3 + 10,
        "no message was burnt while open"
    );
    consumer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn idempotency_runs_a_duplicate_once() {
    let bus = MemoryBus::new();
    let topic = unique("dedup");
    let runs = Arc::new(AtomicU32::new(0));
    let results: Arc<Mutex<Vec<bool>>> = Arc::default();
    let (r, res) = (runs.clone(), results.clone());
    let consumer = Consumer::group(bus.subscriber(), "d")
        .concurrency(1)
        .layer(from_fn(move |d: &Delivery, next: Next<'_>| {
            let res = res.clone();
            Box::pin(async move {
                let out = next.run(d).await;
                res.lock().unwrap().push(out.is_ok());
                out
            })
        }))
        .layer(Idempotency::in_memory(Duration::from_secs(60)))
        .handle(&topic, move |_: Event<u32>| {
            r.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .start()
        .await
        .unwrap();
    let message = Event::new(7u32).into_message().unwrap();
    bus.publish(&topic, message.clone()).await.unwrap();
    bus.publish(&topic, message).await.unwrap();
    within(10, "both deliveries settled", async {
        while results.lock().unwrap().len() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(*results.lock().unwrap(), [true, true]);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    consumer.shutdown(Duration::from_secs(5)).await;
}

/// A handler call dropped by a layer above (here a timeout) gives its
/// claim up at once: the redelivery runs the handler, where a claim kept
/// for its lease (a minute here) would hold it off as "in progress".
#[tokio::test]
async fn idempotency_frees_the_key_of_a_call_dropped_above_it() {
    let bus = MemoryBus::new();
    let topic = unique("dedup-dropped");
    let runs = Arc::new(AtomicU32::new(0));
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let r = runs.clone();
    let consumer = Consumer::group(bus.subscriber(), "d")
        .concurrency(1)
        .retry(RetryPolicy::new(5).with_backoff(Backoff::fixed(Duration::from_millis(10))))
        .layer(Timeout(Duration::from_millis(50)))
        .layer(Idempotency::in_memory(Duration::from_secs(60)).lease(Duration::from_secs(60)))
        .handle(&topic, move |_: Event<u32>| {
            let first = r.fetch_add(1, Ordering::SeqCst) == 0;
            let done_tx = done_tx.clone();
            async move {
                if first {
                    std::future::pending::<()>().await; // until the timeout drops it
                }
                let _ = done_tx.send(());
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    bus.publish(&topic, Event::new(7u32).into_message().unwrap())
        .await
        .unwrap();
    within(10, "the redelivery handled", done.recv()).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    consumer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn chain_depth_limit_dead_letters_a_runaway_loop() {
    let bus = MemoryBus::new();
    let topic = unique("loop");
    let consumer = Consumer::group(bus.subscriber(), "loop")
        .layer(MaxChainDepth(3))
        .handle(&topic, |_: Event<u32>| async { Ok(()) })
        .start()
        .await
        .unwrap();
    let mut inbox = DeadLetterInbox::open(&*bus.subscriber(), bus.publisher(), "loop.dlq", 10)
        .await
        .unwrap();
    let mut parent = Message::new("0");
    for _ in 0..4 {
        parent = Message::new("0").caused_by(&parent);
    }
    assert_eq!(parent.chain_depth(), 4);
    bus.publish(&topic, parent.clone()).await.unwrap();
    within(10, "the dead letter", async {
        while inbox.fetch(Duration::from_millis(50)).await == 0 {}
    })
    .await;
    let (_, letter) = inbox.get(&parent.id).expect("dead-lettered");
    assert_eq!(letter.reason, DeadLetterReason::Permanent);
    assert!(letter.error.contains("chain depth 4"), "{}", letter.error);
    consumer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn timeout_turns_a_slow_call_into_a_retry() {
    let bus = MemoryBus::new();
    let topic = unique("timeout");
    let attempts = Attempts::default();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let a = attempts.clone();
    let consumer = Consumer::group(bus.subscriber(), "t")
        .retry(RetryPolicy::new(3).with_backoff(Backoff::fixed(Duration::from_millis(10))))
        .layer(Timeout(Duration::from_secs(1)))
        .handle(&topic, move |e: Event<u32>| {
            let (a, done) = (a.clone(), done_tx.clone());
            async move {
                a.lock().unwrap().push(e.attempt());
                if e.attempt() == 1 {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                let _ = done.send(());
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    bus.publish_event(&topic, Event::new(1u32)).await.unwrap();
    within(600, "the second attempt", done.recv()).await;
    assert_eq!(*attempts.lock().unwrap(), [1, 2]);
    consumer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_timeout_too_long_to_reach_lets_calls_finish() {
    let bus = MemoryBus::new();
    let topic = unique("timeout-max");
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let consumer = Consumer::group(bus.subscriber(), "t")
        .layer(Timeout(Duration::MAX))
        .handle(&topic, move |e: Event<u32>| {
            let done = done_tx.clone();
            async move {
                tokio::task::yield_now().await; // waits once: the timer is set up
                let _ = done.send(e.data);
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    bus.publish_event(&topic, Event::new(7u32)).await.unwrap();
    assert_eq!(
        within(10, "the handled message", done.recv()).await,
        Some(7)
    );
    consumer.shutdown(Duration::from_secs(5)).await;
}

#[cfg(feature = "redis")]
mod redis_store {
    use super::*;
    use tidings_middleware::idempotency::{Claim, IdempotencyStore, RedisStore};

    const REDIS: &str = "redis://127.0.0.1:6379";

    async fn store() -> RedisStore {
        RedisStore::connect(REDIS).await.unwrap_or_else(|e| {
            panic!("Redis is not reachable at {REDIS} ({e}); start it with scripts/brokers.sh")
        })
    }

    /// A handler past its lease that fails releases its own claim only:
    /// not the newer claim of the same key, made by this replica (another
    /// worker) or another one, and not a completion.
    #[tokio::test]
    async fn a_release_frees_only_its_own_claim() {
        let (replica, other) = (store().await, store().await);
        let key = unique("idem-release");
        let (short, lease) = (Duration::from_millis(1), Duration::from_secs(30));
        let Claim::Claimed(first) = replica.claim(&key, short).await.unwrap() else {
            panic!("a new key is free");
        };
        let second = within(10, "the first lease to end", async {
            loop {
                if let Claim::Claimed(claim) = replica.claim(&key, lease).await.unwrap() {
                    break claim;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        replica.release(&key, first).await.unwrap();
        other.release(&key, second).await.unwrap();
        assert_eq!(
            replica.claim(&key, lease).await.unwrap(),
            Claim::InProgress,
            "the newer claim holds"
        );
        replica.complete(&key, lease).await.unwrap();
        replica.release(&key, second).await.unwrap();
        assert_eq!(replica.claim(&key, lease).await.unwrap(), Claim::Done);

        let key = unique("idem-release");
        let Claim::Claimed(claim) = replica.claim(&key, lease).await.unwrap() else {
            panic!("a new key is free");
        };
        replica.release(&key, claim).await.unwrap();
        assert!(
            matches!(replica.claim(&key, lease).await.unwrap(), Claim::Claimed(_)),
            "free again once released"
        );
    }

    /// Two replicas (two buses standing in for two consumers that both got
    /// the same message, as after a redelivery race) share one Redis store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_id_on_two_concurrent_consumers_runs_once() {
        let group = unique("idem");
        let topic = unique("idem-topic");
        let runs = Arc::new(AtomicU32::new(0));
        let (settled_tx, mut settled) = mpsc::unbounded_channel::<bool>();
        let mut replicas = Vec::new();
        let mut consumers = Vec::new();
        for _ in 0..2 {
            let bus = MemoryBus::new();
            let (r, s) = (runs.clone(), settled_tx.clone());
            let consumer = Consumer::group(bus.subscriber(), &group)
                .retry(RetryPolicy::new(20).with_backoff(Backoff::fixed(Duration::from_millis(50))))
                .layer(from_fn(move |d: &Delivery, next: Next<'_>| {
                    let s = s.clone();
                    Box::pin(async move {
                        let out = next.run(d).await;
                        let _ = s.send(out.is_ok());
                        out
                    })
                }))
                .layer(
                    Idempotency::new(store().await, Duration::from_secs(60))
                        .lease(Duration::from_secs(10)),
                )
                .handle(&topic, move |_: Event<u32>| {
                    let r = r.clone();
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        // Long enough that the other replica arrives while this one runs.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok(())
                    }
                })
                .start()
                .await
                .unwrap();
            consumers.push(consumer);
            replicas.push(bus);
        }
        let message = Event::new(1u32).into_message().unwrap();
        let (a, b) = (replicas[0].clone(), replicas[1].clone());
        let (m1, m2) = (message.clone(), message);
        let (t1, t2) = (topic.clone(), topic.clone());
        let (r1, r2) = tokio::join!(async move { a.publish(&t1, m1).await }, async move {
            b.publish(&t2, m2).await
        });
        r1.unwrap();
        r2.unwrap();
        let mut oks = 0;
        while oks < 2 {
            if within(30, "both replicas to settle", settled.recv()).await == Some(true) {
                oks += 1;
            }
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "the handler ran once across replicas"
        );
        for c in consumers {
            c.shutdown(Duration::from_secs(5)).await;
        }
    }
}
