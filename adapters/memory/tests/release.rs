//! Deliveries leaving the in-process bus's queue: one dropped unsettled
//! comes back counted but not marked as a failure, and a message waits for
//! no member that stopped polling while another waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Context;

use futures::StreamExt;
use tidings_core::delivery::header;
use tidings_core::{DeliveryStream, Message, Publisher, Subscriber, Subscription};
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
struct Flag(AtomicBool);

impl futures::task::ArcWake for Flag {
    fn wake_by_ref(flag: &Arc<Self>) {
        flag.0.store(true, Ordering::SeqCst);
    }
}

/// Polls `stream` once with a waker that records being woken.
fn poll_once(stream: &mut Box<dyn DeliveryStream>) -> (bool, Arc<Flag>) {
    let flag = Arc::new(Flag::default());
    let waker = futures::task::waker(flag.clone());
    let polled = stream.poll_next_unpin(&mut Context::from_waker(&waker));
    (polled.is_pending(), flag)
}

async fn members(topic: &str, n: usize) -> (MemoryBus, Vec<Box<dyn DeliveryStream>>) {
    let bus = MemoryBus::new();
    let mut members = Vec::new();
    for _ in 0..n {
        members.push(
            bus.subscribe(Subscription::group(topic, "g"))
                .await
                .expect("subscribed"),
        );
    }
    (bus, members)
}

#[tokio::test]
async fn a_message_wakes_every_waiting_member() {
    let (bus, mut members) = members("members", 2).await;
    let flags: Vec<_> = members
        .iter_mut()
        .map(|stream| {
            let (pending, flag) = poll_once(stream);
            assert!(pending, "nothing queued yet");
            flag
        })
        .collect();
    bus.publish("members", Message::new("one"))
        .await
        .expect("published");
    assert!(
        flags.iter().all(|flag| flag.0.load(Ordering::SeqCst)),
        "every waiting member is woken"
    );
    // The first to poll takes it; the other finds the queue empty again.
    let delivery = next(&mut members[1]).await;
    assert_eq!(delivery.message().payload, "one");
    assert!(poll_once(&mut members[0]).0, "taken by the other member");
}

#[tokio::test]
async fn a_member_whose_poll_was_abandoned_does_not_keep_a_message_from_another() {
    let (bus, mut members) = members("abandoned", 2).await;
    let mut abandoned = members.pop().expect("two members");
    let mut waiting = members.pop().expect("two members");
    // One member waits in its own task: on this one-thread runtime the task
    // runs from `send` on to its first wait in `next` before this test
    // resumes, so it is registered first.
    let (started, started_rx) = tokio::sync::oneshot::channel();
    let taker = tokio::spawn(async move {
        let _ = started.send(());
        next(&mut waiting).await.message().payload.clone()
    });
    started_rx.await.expect("started");
    // The other polls once and is never polled again (a timed-out `next()`).
    assert!(poll_once(&mut abandoned).0, "nothing queued yet");
    bus.publish("abandoned", Message::new("one"))
        .await
        .expect("published");
    let payload = tokio::time::timeout(std::time::Duration::from_secs(5), taker)
        .await
        .expect("the waiting member gets it within 5 s")
        .expect("joined");
    assert_eq!(payload, "one");
    drop(abandoned);
}
