//! A delivery dropped unsettled on the in-process bus: back in the queue at
//! once, counted as a delivery but not marked as a failure.

use futures::StreamExt;
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

/// A waker that records that it was woken.
#[derive(Default)]
struct Flag(std::sync::atomic::AtomicBool);

impl futures::task::ArcWake for Flag {
    fn wake_by_ref(flag: &std::sync::Arc<Self>) {
        flag.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_member_woken_for_a_message_that_leaves_without_it_passes_it_on() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::task::{Context, Poll};

    let bus = MemoryBus::new();
    let mut members = Vec::new();
    for _ in 0..2 {
        let stream = bus
            .subscribe(Subscription::group("members", "g"))
            .await
            .expect("subscribed");
        members.push((stream, Arc::new(Flag::default())));
    }
    // Both members wait on the empty queue.
    for (stream, flag) in &mut members {
        let waker = futures::task::waker(flag.clone());
        let polled = stream.poll_next_unpin(&mut Context::from_waker(&waker));
        assert!(matches!(polled, Poll::Pending), "nothing queued yet");
    }
    bus.publish("members", Message::new("one"))
        .await
        .expect("published");
    let woken: Vec<bool> = members
        .iter()
        .map(|(_, flag)| flag.0.load(Ordering::SeqCst))
        .collect();
    assert_eq!(
        woken.iter().filter(|w| **w).count(),
        1,
        "one member is woken"
    );
    // The woken member leaves without taking the message.
    let (mut other, other_woken) = members.remove(usize::from(woken[0]));
    drop(members);
    assert!(
        other_woken.0.load(Ordering::SeqCst),
        "the other member is woken in its place"
    );
    let delivery = next(&mut other).await;
    assert_eq!(delivery.message().payload, "one");
}
