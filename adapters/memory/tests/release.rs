//! A delivery dropped unsettled on the in-process bus: back in the queue at
//! once, counted as a delivery but not marked as a failure.

use tidings_core::delivery::header;
use tidings_core::{Message, Publisher, Subscriber, Subscription};
use tidings_memory::MemoryBus;

mod support;
use support::next;

#[tokio::test]
async fn a_dropped_delivery_comes_back_counted_but_not_failed() {
    let bus = MemoryBus::new();
    let mut stream = bus
        .subscribe(Subscription::group("dropped", "g"))
        .await
        .expect("subscribed");
    bus.publish("dropped", Message::new("again"))
        .await
        .expect("published");
    let first = next(&mut stream).await;
    assert_eq!(first.attempt(), 1);
    drop(first);
    let mut second = next(&mut stream).await;
    assert_eq!(second.message().payload, "again");
    assert_eq!(second.attempt(), 2, "the dropped delivery counts");
    assert!(
        !second.message().headers.contains_key(header::FIRST_FAILURE),
        "dropping is not a failure"
    );
    second.ack().await.expect("acked");
    assert_eq!(bus.queued("dropped", "g"), 0);
}
