//! Publishing on the in-process bus: a message is queued when `publish` is
//! called; the future only waits for room in a full group.

use std::time::Duration;

use tidings_core::{DeliveryStream, Message, Publisher, Subscriber, Subscription};
use tidings_memory::{MemoryBus, MemoryConfig};

mod support;
use support::next;

#[tokio::test]
async fn a_message_is_queued_at_the_call_in_the_order_of_the_calls() {
    let bus = MemoryBus::new();
    bus.declare_group("calls", "g").await.expect("declared");
    let first = bus.publish("calls", Message::new("first"));
    let second = bus.publish("calls", Message::new("second"));
    assert_eq!(bus.queued("calls", "g"), 2, "queued before any await");
    second.await.expect("published");
    within_5s(first).await.expect("published");
    let mut stream = bus
        .subscribe(Subscription::group("calls", "g"))
        .await
        .expect("subscribed");
    for expected in ["first", "second"] {
        let mut delivery = next(&mut stream).await;
        assert_eq!(delivery.message().payload, expected);
        delivery.ack().await.expect("acked");
    }
}

#[tokio::test]
async fn a_full_group_makes_the_publish_wait_for_room() {
    let bus = MemoryBus::with_config(MemoryConfig {
        group_capacity: 1,
        ..MemoryConfig::default()
    });
    let mut stream = bus
        .subscribe(Subscription::group("full", "g"))
        .await
        .expect("subscribed");
    bus.publish("full", Message::new("one"))
        .await
        .expect("room for one");
    let mut waiting = bus.publish("full", Message::new("two"));
    assert!(
        futures::poll!(&mut waiting).is_pending(),
        "no room until the first is settled"
    );
    let mut delivery = next(&mut stream).await;
    assert_eq!(delivery.message().payload, "one");
    delivery.ack().await.expect("acked");
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("room within 5 s of the ack")
        .expect("published");
    assert_eq!(next(&mut stream).await.message().payload, "two");
}

/// A bus whose groups hold `capacity` messages, with `topic`'s group `g`
/// filled up and one subscription on it.
async fn full_group(
    topic: &str,
    capacity: usize,
    publish_timeout: Duration,
) -> (MemoryBus, Box<dyn DeliveryStream>) {
    let bus = MemoryBus::with_config(MemoryConfig {
        group_capacity: capacity,
        publish_timeout,
        ..MemoryConfig::default()
    });
    let stream = bus
        .subscribe(Subscription::group(topic, "g"))
        .await
        .expect("subscribed");
    for i in 0..capacity {
        bus.publish(topic, Message::new(format!("{i}")))
            .await
            .expect("room");
    }
    (bus, stream)
}

async fn within_5s<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("within 5 s")
}

// The next tests run on a paused clock, which moves only when every task
// waits on a timer: a publisher woken by freed room completes with the clock
// where it was; one that had to look again on its own moved it by 1 ms.

#[tokio::test(start_paused = true)]
async fn a_waiting_publisher_takes_room_a_stopped_consumer_freed_below_a_batch() {
    // 64 messages of room: waiting publishers are woken once 4 are free.
    let (bus, mut stream) = full_group("stopped", 64, Duration::from_secs(30)).await;
    let mut waiting = bus.publish("stopped", Message::new("late"));
    assert!(
        futures::poll!(&mut waiting).is_pending(),
        "the group is full"
    );
    let start = tokio::time::Instant::now();
    // One ack, then the consumer stops.
    next(&mut stream).await.ack().await.expect("acked");
    within_5s(waiting).await.expect("published");
    assert!(
        start.elapsed() >= Duration::from_millis(1),
        "taken when the publisher looked again, not woken by a batch"
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(bus.queued("stopped", "g"), 64);
}

#[tokio::test(start_paused = true)]
async fn every_publisher_waiting_is_woken_by_a_batch_of_room() {
    let (bus, mut stream) = full_group("batch", 64, Duration::from_secs(30)).await;
    let mut waiting: Vec<_> = (0..3)
        .map(|i| bus.publish("batch", Message::new(format!("late {i}"))))
        .collect();
    for publish in &mut waiting {
        assert!(futures::poll!(publish).is_pending(), "the group is full");
    }
    let start = tokio::time::Instant::now();
    for _ in 0..4 {
        next(&mut stream).await.ack().await.expect("acked");
    }
    for publish in waiting {
        within_5s(publish).await.expect("published");
    }
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "woken by the batch, not by looking again"
    );
    assert_eq!(bus.queued("batch", "g"), 64 - 4 + 3);
}

#[tokio::test(start_paused = true)]
async fn a_new_publish_does_not_take_room_freed_for_a_waiting_one() {
    // 16 messages of room: a batch is one message.
    let (bus, mut stream) = full_group("fair", 16, Duration::from_secs(30)).await;
    let mut first = bus.publish("fair", Message::new("first"));
    assert!(futures::poll!(&mut first).is_pending(), "the group is full");
    next(&mut stream).await.ack().await.expect("acked");
    // Room for one is free, and `first` waits for it.
    let mut second = bus.publish("fair", Message::new("second"));
    assert!(futures::poll!(&mut second).is_pending(), "room is first's");
    within_5s(first).await.expect("published");
    assert!(futures::poll!(&mut second).is_pending(), "full again");
    next(&mut stream).await.ack().await.expect("acked");
    within_5s(second).await.expect("published");
    let mut order = Vec::new();
    for _ in 0..16 {
        let mut delivery = next(&mut stream).await;
        order.push(delivery.message().payload.clone());
        delivery.ack().await.expect("acked");
    }
    assert_eq!(order[14..], ["first", "second"]);
}

#[tokio::test]
async fn a_publish_that_timed_out_waiting_leaves_the_next_one_to_be_woken() {
    let (bus, mut stream) = full_group("timed-out", 1, Duration::from_millis(50)).await;
    let error = bus
        .publish("timed-out", Message::new("too late"))
        .await
        .expect_err("no room within the publish timeout");
    assert!(
        matches!(error, tidings_core::Error::Timeout { .. }),
        "{error}"
    );
    let mut waiting = bus.publish("timed-out", Message::new("next"));
    assert!(futures::poll!(&mut waiting).is_pending(), "still full");
    next(&mut stream).await.ack().await.expect("acked");
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken within 5 s of the ack")
        .expect("published");
    assert_eq!(next(&mut stream).await.message().payload, "next");
}
