//! Retention: what a declared group keeps, and replay from the earliest
//! message.

use super::*;

/// Messages published after a group was declared, before its first consumer, reach it.
pub async fn retained_for_declared_group<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "declared").await;
    if !s.capabilities().retains_for_declared_groups {
        return not_applicable(
            "retained_for_declared_group",
            s.name(),
            "keeps nothing for absent consumers",
        );
    }
    s.declare_group(&topic, "late")
        .await
        .expect("declare group");
    let mut ids = HashSet::new();
    for n in 0..10 {
        let m = Message::new(format!("{n}"));
        ids.insert(m.id.clone());
        publish_ok(&*p, &topic, m).await;
    }
    let mut stream = subscribe(&*s, Subscription::group(&topic, "late")).await;
    let mut got = HashSet::new();
    for _ in 0..10 {
        let mut d = next_delivery(&mut stream, "a message published before the consumer").await;
        got.insert(d.message().id.clone());
        d.ack().await.expect("ack");
    }
    assert_eq!(got, ids);
}

/// A private subscription from the beginning replays what the broker holds.
pub async fn replay_from_earliest<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "replay").await;
    let caps = s.capabilities();
    if !caps.replay || !caps.private_subscriptions {
        return not_applicable(
            "replay_from_earliest",
            s.name(),
            "keeps no history to replay",
        );
    }
    let mut ids = Vec::new();
    for n in 0..10 {
        // One key: brokers that partition keep order per key only.
        let m = Message::new(format!("{n}")).with_key("replay");
        ids.push(m.id.clone());
        publish_ok(&*p, &topic, m).await;
    }
    let mut stream = subscribe(
        &*s,
        Subscription::private(&topic).starting_at(StartFrom::Earliest),
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..10 {
        let mut d = next_delivery(&mut stream, "a replayed message").await;
        got.push(d.message().id.clone());
        d.ack().await.expect("ack");
    }
    assert_eq!(got, ids, "replay is in publish order (per key)");
}
