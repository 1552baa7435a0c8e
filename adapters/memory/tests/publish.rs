//! Publishing on the in-process bus: a message is queued when `publish` is
//! called; the future only waits for room in a full group.

use std::time::Duration;

use futures::StreamExt;
use tidings_core::{Delivery, DeliveryStream, Message, Publisher, Subscriber, Subscription};
use tidings_memory::{MemoryBus, MemoryConfig};

async fn next(stream: &mut Box<dyn DeliveryStream>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a delivery within 5 s")
        .expect("open")
        .expect("ok")
}

#[tokio::test]
async fn a_message_is_queued_at_the_call_in_the_order_of_the_calls() {
    let bus = MemoryBus::new();
    bus.declare_group("calls", "g").await.expect("declared");
    let first = bus.publish("calls", Message::new("first"));
    let second = bus.publish("calls", Message::new("second"));
    assert_eq!(bus.queued("calls", "g"), 2, "queued before any await");
    second.await.expect("published");
    first.await.expect("published");
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
