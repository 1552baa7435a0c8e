//! `Subscriber::groups` on the in-process bus: queued, held and dead
//! letters per group.

use std::time::SystemTime;

use tidings_core::{DeadLetter, DeadLetterReason, Message, Subscriber, Subscription};
use tidings_memory::MemoryBus;

mod support;
use support::next;

#[tokio::test]
async fn groups_report_what_each_group_holds() {
    let bus = MemoryBus::new();
    bus.declare_group("orders", "audit")
        .await
        .expect("declared");
    let mut billing = bus
        .subscribe(Subscription::group("orders", "billing"))
        .await
        .expect("subscribed");
    for n in 0..3 {
        bus.publisher()
            .publish("orders", Message::new(format!("order {n}")))
            .await
            .expect("published");
    }
    let mut held = next(&mut billing).await;
    let mut failed = next(&mut billing).await;
    failed
        .dead_letter(DeadLetter {
            reason: DeadLetterReason::Permanent,
            error: "declined".into(),
            attempts: 1,
            first_failure: None,
            last_failure: SystemTime::now(),
            topic: "orders".into(),
            group: Some("billing".into()),
        })
        .await
        .expect("dead-lettered");

    let all = bus.groups("orders", &[]).await.expect("groups");
    let names: Vec<&str> = all.iter().map(|g| g.group.as_str()).collect();
    assert_eq!(names, ["audit", "billing"]);
    let (audit, billing_stats) = (&all[0], &all[1]);
    assert_eq!(
        (audit.lag, audit.pending, audit.dead_letters),
        (Some(3), Some(0), Some(0))
    );
    assert_eq!(
        (
            billing_stats.lag,
            billing_stats.pending,
            billing_stats.dead_letters
        ),
        (Some(1), Some(1), Some(1)),
        "one queued, one held, one dead letter"
    );
    held.ack().await.expect("acked");
    let named = bus
        .groups("orders", &["billing".into(), "nobody".into()])
        .await
        .expect("groups");
    assert_eq!(named[0].pending, Some(0));
    assert_eq!(
        named[1].lag, None,
        "a group the bus does not know has no figures"
    );
}
