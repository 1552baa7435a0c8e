//! Faults and recovery against a real Redis: cut connections, a restarted
//! server, a consumer that dies holding pending entries, foreign entries.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use redis::Value;
use tidings_core::testkit::{FaultProxy, unique, within};
use tidings_core::{
    Consumer, DeadLetter, DeadLetterReason, Delivery, DeliveryStream, Event, Message, Publisher,
    Receipt, Subscription,
};
use tokio::sync::Notify;

const FAST: &str = "visibility_timeout=1s&reclaim_interval=100ms&block=100ms&max_backoff=200ms";

async fn next(stream: &mut Box<dyn DeliveryStream>, what: &str) -> Delivery {
    within(30, what, async {
        loop {
            match stream.next().await {
                Some(Ok(d)) => return d,
                // Errors are reports (a lost connection); the stream recovers.
                Some(Err(e)) => eprintln!("reported while waiting for {what}: {e}"),
                None => panic!("the stream ended while waiting for {what}"),
            }
        }
    })
    .await
}

/// Publishes, retrying while the connection recovers, as a caller would.
async fn publish_retrying(p: &dyn Publisher, topic: &str, message: Message) -> Receipt {
    within(60, "a publish after the fault", async {
        loop {
            match p.publish(topic, message.clone()).await {
                Ok(r) => return r,
                Err(e) => {
                    assert!(e.is_transient(), "a non-transient error: {e}");
                    eprintln!("publish failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await
}

async fn raw(addr: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://{addr}/")).expect("url");
    match client.get_multiplexed_async_connection().await {
        Ok(c) => c,
        Err(e) => panic!("connecting to {addr} failed: {e}. {}", common::HOW_TO_START),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_group_and_private_subscribers_resume() {
    let proxy = FaultProxy::start(common::REDIS).await.expect("proxy");
    let bus = common::bus(proxy.addr(), FAST).await;
    let (p, s) = (bus.publisher(), bus.subscriber());
    let topic = unique("cut");
    let mut group = s
        .subscribe(Subscription::group(&topic, "g"))
        .await
        .expect("subscribe group");
    let mut private = s
        .subscribe(Subscription::private(&topic))
        .await
        .expect("subscribe private");
    let before = Message::new("before");
    p.publish(&topic, before.clone()).await.expect("publish");
    for stream in [&mut group, &mut private] {
        let mut d = next(stream, "the message before the cut").await;
        assert_eq!(d.message().id, before.id);
        d.ack().await.expect("ack");
    }
    for round in 0..3 {
        proxy.cut();
        let after = Message::new(format!("after cut {round}"));
        let receipt = publish_retrying(&*p, &topic, after.clone()).await;
        assert!(matches!(receipt, Receipt::EntryId(_)), "{receipt:?}");
        for stream in [&mut group, &mut private] {
            let mut d = next(stream, "the message after the cut").await;
            assert_eq!(d.message().id, after.id);
            // An ack lost in a cut is not an error the caller must handle:
            // the entry is then reclaimed, so retry until it sticks.
            let _ = d.ack().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_server_consumer_resumes_and_publishing_works() {
    // Without persistence: the restarted server is empty.
    let mut server = common::OwnNode::new("restart", &[]);
    server.spawn(&[]);
    let _ = server.connection().await;
    let bus = common::bus(server.addr(), FAST).await;
    let (p, s) = (bus.publisher(), bus.subscriber());
    let topic = unique("restart");
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let wake = Arc::new(Notify::new());
    let (record, notify) = (seen.clone(), wake.clone());
    let consumer = Consumer::group(s, "survivors")
        .handle(&topic, move |e: Event<String>| {
            let (record, notify) = (record.clone(), notify.clone());
            async move {
                record
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(e.data);
                notify.notify_waiters();
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let wait_for = |text: &'static str| {
        let (seen, wake) = (seen.clone(), wake.clone());
        async move {
            within(60, text, async {
                loop {
                    let notified = wake.notified();
                    if seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .any(|t| t == text)
                    {
                        return;
                    }
                    notified.await;
                }
            })
            .await
        }
    };
    use tidings_core::PublisherExt;
    p.publish_event(&topic, Event::new("before".to_owned()))
        .await
        .expect("publish before the restart");
    wait_for("before").await;

    server.kill();
    let down = p.publish(&topic, Message::new("while down")).await;
    assert!(
        matches!(&down, Err(e) if e.is_transient()),
        "publishing to a stopped server: {down:?}"
    );
    server.spawn(&[]);
    let _ = server.connection().await;
    // The new server is empty: the group is created again by the subscriber.
    within(60, "a publish after the restart", async {
        loop {
            match p
                .publish_event(&topic, Event::new("after".to_owned()))
                .await
            {
                Ok(_) => return,
                Err(e) => {
                    eprintln!("publish failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await;
    wait_for("after").await;
    consumer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_dead_member_are_reclaimed_and_handled_once() {
    let topic = unique("dead-member");
    let group = "workers";
    // The member that dies: it takes five entries and vanishes without
    // settling them (no acker runs and no heartbeat keeps them, as in a crash).
    let dying = common::bus(common::REDIS, &format!("{FAST}&heartbeat=false")).await;
    let mut doomed = dying
        .subscriber()
        .subscribe(Subscription::group(&topic, group).with_prefetch(5))
        .await
        .expect("subscribe");
    let p = common::bus(common::REDIS, FAST).await.publisher();
    let mut first_five = Vec::new();
    for n in 0..5 {
        let e = Event::new(n);
        first_five.push(e.id().to_owned());
        tidings_core::PublisherExt::publish_event(&*p, &topic, e)
            .await
            .expect("publish");
    }
    for _ in 0..5 {
        let d = next(&mut doomed, "an entry for the dying member").await;
        std::mem::forget(d);
    }
    std::mem::forget(doomed);
    drop(dying);

    // Two live members share the rest and the dead member's entries.
    let handled: Arc<Mutex<Vec<(String, u32, usize)>>> = Arc::default();
    let wake = Arc::new(Notify::new());
    let mut members = Vec::new();
    for member in 0..2 {
        let (record, notify) = (handled.clone(), wake.clone());
        let bus = common::bus(common::REDIS, FAST).await;
        members.push(
            Consumer::group(bus.subscriber(), group)
                .concurrency(2)
                .handle(&topic, move |e: Event<u64>| {
                    let (record, notify) = (record.clone(), notify.clone());
                    async move {
                        record.lock().unwrap_or_else(|e| e.into_inner()).push((
                            e.id().to_owned(),
                            e.attempt(),
                            member,
                        ));
                        notify.notify_waiters();
                        Ok(())
                    }
                })
                .start()
                .await
                .expect("start member"),
        );
    }
    for n in 5..25u64 {
        tidings_core::PublisherExt::publish_event(&*p, &topic, Event::new(n))
            .await
            .expect("publish");
    }
    within(60, "all 25 entries handled", async {
        loop {
            let notified = wake.notified();
            let ids: std::collections::HashSet<String> = handled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(id, _, _)| id.clone())
                .collect();
            if ids.len() >= 25 {
                return;
            }
            notified.await;
        }
    })
    .await;
    // Every entry is acked: nothing stays pending in the group.
    let mut conn = raw(common::REDIS).await;
    within(30, "the pending list to empty", async {
        loop {
            let summary: Value = redis::cmd("XPENDING")
                .arg(&topic)
                .arg(group)
                .query_async(&mut conn)
                .await
                .expect("XPENDING");
            if let Value::Array(parts) = &summary
                && parts.first() == Some(&Value::Int(0))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // One more reclaim interval and visibility timeout: no late duplicate.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for m in members {
        m.shutdown(Duration::from_secs(5)).await;
    }
    let handled = handled.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (id, _, _) in &handled {
        *count.entry(id).or_default() += 1;
    }
    assert_eq!(handled.len(), 25, "handled: {handled:?}");
    assert!(
        count.values().all(|&c| c == 1),
        "a message was handled twice"
    );
    for id in &first_five {
        let (_, attempt, _) = handled
            .iter()
            .find(|(i, _, _)| i == id)
            .expect("the dead member's entry was handled");
        assert_eq!(
            *attempt, 2,
            "the reclaimed entry counts the dead member's delivery"
        );
    }
    let by_member: Vec<usize> = (0..2)
        .map(|m| handled.iter().filter(|(_, _, x)| *x == m).count())
        .collect();
    eprintln!("handled per live member: {by_member:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_entry_comes_rejected_to_be_dead_lettered_and_the_consumer_keeps_going() {
    let bus = common::bus(common::REDIS, FAST).await;
    let (p, s) = (bus.publisher(), bus.subscriber());
    let topic = unique("foreign");
    let mut stream = s
        .subscribe(Subscription::group(&topic, "g"))
        .await
        .expect("subscribe");
    let mut conn = raw(common::REDIS).await;
    let foreign_id: String = redis::cmd("XADD")
        .arg(&topic)
        .arg("*")
        .arg("temperature")
        .arg("21")
        .query_async(&mut conn)
        .await
        .expect("XADD foreign");
    // A plain client that follows the layout is read fine.
    let plain_id: String = redis::cmd("XADD")
        .arg(&topic)
        .arg("*")
        .arg("payload")
        .arg(&[0xffu8, 0x00][..])
        .arg("ce_type")
        .arg("reading")
        .query_async(&mut conn)
        .await
        .expect("XADD plain");
    let ours = Message::new("ours");
    p.publish(&topic, ours.clone()).await.expect("publish");

    // The foreign entry comes as a rejected delivery (what could be
    // salvaged of it), for the consumer runtime to dead-letter where its
    // observers see it; here the test settles it as the runtime would.
    let mut rejected = next(&mut stream, "the foreign entry").await;
    assert_eq!(rejected.message().id, foreign_id);
    let foreign = rejected
        .rejection()
        .expect("marked as rejected")
        .downcast_ref::<tidings_redis::ForeignEntry>()
        .expect("a ForeignEntry");
    assert_eq!(foreign.entry_id, foreign_id);
    let now = std::time::SystemTime::now();
    rejected
        .dead_letter(DeadLetter {
            reason: DeadLetterReason::Undecodable,
            error: foreign.to_string(),
            attempts: 1,
            first_failure: Some(now),
            last_failure: now,
            topic: topic.clone(),
            group: Some("g".into()),
        })
        .await
        .expect("dead-lettered");
    let mut got = Vec::new();
    while got.len() < 2 {
        let mut d = next(&mut stream, "deliveries after the foreign entry").await;
        assert!(d.rejection().is_none());
        got.push(d.message().clone());
        d.ack().await.expect("ack");
    }
    assert_eq!(got[0].id, plain_id);
    assert_eq!(got[0].payload.as_ref(), &[0xff, 0x00]);
    assert_eq!(got[0].metadata.event_type.as_deref(), Some("reading"));
    assert_eq!(got[1].id, ours.id);

    // The dead letter carries the reason and the entry's fields.
    let dlq = s.dead_letter_topic(&topic, "g");
    let mut inspect = s
        .subscribe(
            Subscription::group(&dlq, "inspect").starting_at(tidings_core::StartFrom::Earliest),
        )
        .await
        .expect("subscribe dlq");
    let mut letter = next(&mut inspect, "the dead letter").await;
    assert_eq!(letter.message().id, foreign_id);
    assert_eq!(letter.message().headers["temperature"], "21");
    let info = DeadLetter::from_message(letter.message()).expect("letter");
    assert_eq!(info.reason, DeadLetterReason::Undecodable);
    assert!(info.error.contains("no `payload` field"), "{}", info.error);
    letter.ack().await.expect("ack");
    // And nothing is left pending (acks are sent in the background).
    within(30, "the pending list to empty", async {
        loop {
            let pending: Value = redis::cmd("XPENDING")
                .arg(&topic)
                .arg("g")
                .query_async(&mut conn)
                .await
                .expect("XPENDING");
            if matches!(&pending, Value::Array(parts) if parts.first() == Some(&Value::Int(0))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maxlen_trims_streams_approximately() {
    let topic = unique("trim");
    let bus = common::bus(common::REDIS, &format!("maxlen.{topic}=100")).await;
    let p = bus.publisher();
    let batch = (0..2000).map(|n| Message::new(format!("{n}"))).collect();
    for r in p.publish_batch(&topic, batch).await {
        r.expect("publish");
    }
    let mut conn = raw(common::REDIS).await;
    let len: u64 = redis::cmd("XLEN")
        .arg(&topic)
        .query_async(&mut conn)
        .await
        .expect("XLEN");
    assert!((100..=300).contains(&len), "stream length {len}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_subscriber_resumes_after_a_cut_and_patterns_match() {
    let proxy = FaultProxy::start(common::REDIS).await.expect("proxy");
    let bus = common::bus(proxy.addr(), "mode=pubsub&max_backoff=200ms").await;
    let (p, s) = (bus.publisher(), bus.subscriber());
    let base = unique("ps");
    let mut exact = s
        .subscribe(Subscription::private(format!("{base}.a")))
        .await
        .expect("subscribe");
    let mut pattern = s
        .subscribe(Subscription::private(format!("{base}.*")))
        .await
        .expect("psubscribe");
    proxy.cut();
    // At most once: publish until the resubscribed subscriber sees one.
    within(60, "a message after the cut", async {
        loop {
            let m = Message::new("after");
            let _ = p.publish(&format!("{base}.a"), m.clone()).await;
            match tokio::time::timeout(Duration::from_millis(200), exact.next()).await {
                Ok(Some(Ok(d))) if d.message().id == m.id => return,
                _ => continue,
            }
        }
    })
    .await;
    // The pattern subscription resubscribes on a connection of its own,
    // maybe later than the exact one: publish until it sees one too.
    // (It also holds every message to `.a` above: read on past them.)
    within(60, "the pattern subscription after the cut", async {
        let mut sent = std::collections::HashSet::new();
        loop {
            let m = Message::new("to b");
            let receipt = publish_retrying(&*p, &format!("{base}.b"), m.clone()).await;
            assert_eq!(receipt, Receipt::Accepted);
            sent.insert(m.id);
            while let Ok(next) =
                tokio::time::timeout(Duration::from_millis(200), pattern.next()).await
            {
                match next {
                    Some(Ok(d)) if sent.contains(&d.message().id) => {
                        assert_eq!(d.topic(), format!("{base}.b"), "the matched channel");
                        return;
                    }
                    Some(_) => {}
                    None => panic!("pattern stream ended"),
                }
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_ack_has_reached_redis_when_it_returns() {
    let bus = common::bus(common::REDIS, &format!("{FAST}&confirm_acks=true")).await;
    let (p, s) = (bus.publisher(), bus.subscriber());
    let topic = unique("confirmed");
    let mut stream = s
        .subscribe(Subscription::group(&topic, "g"))
        .await
        .expect("subscribe");
    p.publish(&topic, Message::new("x")).await.expect("publish");
    let mut d = next(&mut stream, "the delivery").await;
    d.ack().await.expect("ack");
    let mut conn = raw(common::REDIS).await;
    let pending: Value = redis::cmd("XPENDING")
        .arg(&topic)
        .arg("g")
        .query_async(&mut conn)
        .await
        .expect("XPENDING");
    assert!(
        matches!(&pending, Value::Array(parts) if parts.first() == Some(&Value::Int(0))),
        "{pending:?}"
    );
}

/// A handler that runs three times the visibility timeout keeps its entry:
/// the heartbeat resets its idle time, so the other member never takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_keeps_its_entry_past_the_visibility_timeout() {
    let topic = unique("long-handler");
    let handled: Arc<Mutex<Vec<(u64, usize)>>> = Arc::default();
    let mut members = Vec::new();
    for member in 0..2 {
        let record = handled.clone();
        let bus = common::bus(common::REDIS, FAST).await;
        members.push(
            Consumer::group(bus.subscriber(), "g")
                .handle(&topic, move |e: Event<u64>| {
                    let record = record.clone();
                    async move {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        record
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((e.data, member));
                        Ok(())
                    }
                })
                .start()
                .await
                .expect("start member"),
        );
    }
    let p = common::bus(common::REDIS, FAST).await.publisher();
    tidings_core::PublisherExt::publish_event(&*p, &topic, Event::new(7u64))
        .await
        .expect("publish");
    // Three times the 1 s visibility timeout, with reclaims every 100 ms.
    within(30, "the handler to finish", async {
        loop {
            if !handled.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for m in members {
        assert!(m.shutdown(Duration::from_secs(10)).await.drained);
    }
    let handled = handled.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(handled.len(), 1, "handled once, by one member: {handled:?}");
}

/// An ack whose `XACK` is lost to a connection fault is sent again once the
/// connection is back: the entry is not left to be reclaimed and handled
/// again after the visibility timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_lost_to_a_connection_fault_is_sent_again() {
    let proxy = FaultProxy::start(common::REDIS).await.expect("proxy");
    let bus = common::bus(
        proxy.addr(),
        "confirm_acks=true&visibility_timeout=10s&max_backoff=200ms",
    )
    .await;
    let topic = unique("ack-retry");
    let mut stream = bus
        .subscriber()
        .subscribe(Subscription::group(&topic, "g"))
        .await
        .expect("subscribe");
    bus.publisher()
        .publish(&topic, Message::new("x"))
        .await
        .expect("publish");
    let mut d = next(&mut stream, "the delivery").await;
    // The connection drops and stays down for a moment while the ack is sent.
    proxy.refuse(true);
    proxy.cut();
    let ack = tokio::spawn(async move { d.ack().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.refuse(false);
    within(30, "the ack", ack)
        .await
        .expect("the ack task")
        .expect("the ack went through after the reconnect");
    let mut conn = raw(common::REDIS).await;
    let summary: Value = redis::cmd("XPENDING")
        .arg(&topic)
        .arg("g")
        .query_async(&mut conn)
        .await
        .expect("XPENDING");
    assert!(
        matches!(&summary, Value::Array(parts) if parts.first() == Some(&Value::Int(0))),
        "nothing pending: {summary:?}"
    );
}

/// A failover behind one address (a managed service's endpoint, a virtual
/// IP): the replica is promoted, the address moves to it (the proxy sends
/// new connections there) and the old master is demoted to its replica,
/// still up. Over the bus's open connections the old master answers every
/// write with `READONLY`; the bus connects to the address again and goes
/// on publishing and consuming on the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_demoted_behind_its_address_is_left_for_the_promoted_one() {
    let mut old = common::OwnNode::new("demoted", &[]);
    old.spawn(&[]);
    let mut old_conn = old.connection().await;
    let mut new = common::OwnNode::new("promoted", &[]);
    new.spawn(&["--replicaof", "127.0.0.1", &old.port.to_string()]);
    new.wait_info(&["INFO", "replication"], &["master_link_status:up"], 15)
        .await;
    let proxy = FaultProxy::start(old.addr()).await.expect("proxy");
    let bus = common::bus(proxy.addr(), FAST).await;
    let (p, s) = (bus.publisher(), bus.subscriber());
    let topic = unique("demoted");
    let mut group = s
        .subscribe(Subscription::group(&topic, "g"))
        .await
        .expect("subscribe group");
    let before = Message::new("before");
    p.publish(&topic, before.clone()).await.expect("publish");
    let mut d = next(&mut group, "the message before the failover").await;
    assert_eq!(d.message().id, before.id);
    d.ack().await.expect("ack");
    let mut new_conn = new.connection().await;
    within(15, "the stream and its group on the replica", async {
        loop {
            let groups: Vec<Value> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&topic)
                .query_async(&mut new_conn)
                .await
                .unwrap_or_default();
            if !groups.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut new_conn)
        .await
        .expect("promote");
    proxy.retarget(new.addr()).await.expect("retarget");
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(new.port)
        .query_async(&mut old_conn)
        .await
        .expect("demote");

    let demoted = std::time::Instant::now();
    let after = Message::new("after");
    let receipt = publish_retrying(&*p, &topic, after.clone()).await;
    assert!(matches!(receipt, Receipt::EntryId(_)), "{receipt:?}");
    let published = demoted.elapsed();
    let mut d = next(&mut group, "the message after the failover").await;
    eprintln!(
        "published {published:?} and consumed {:?} after the demotion",
        demoted.elapsed()
    );
    assert_eq!(d.message().id, after.id);
    d.ack().await.expect("ack on the new master");
    let length: usize = redis::cmd("XLEN")
        .arg(&topic)
        .query_async(&mut new_conn)
        .await
        .expect("XLEN");
    assert_eq!(length, 2, "both messages are on the promoted node");
}
