//! A subscription's life: the in-flight bound, closing and reopening,
//! shutdown, reconnecting, the API's contract.

use super::*;

/// No delivery beyond the in-flight bound until an earlier one is settled.
pub async fn in_flight_bound<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "in-flight").await;
    if s.capabilities().at_most_once {
        return not_applicable(
            "in_flight_bound",
            s.name(),
            "at-most-once: nothing is held unsettled",
        );
    }
    let mut stream = subscribe(&*s, Subscription::group(&topic, "bound").with_prefetch(3)).await;
    for n in 0..6 {
        publish_ok(&*p, &topic, Message::new(format!("{n}"))).await;
    }
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next_delivery(&mut stream, "a delivery within the bound").await);
    }
    let beyond = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
    assert!(
        beyond.is_err(),
        "a fourth delivery arrived with three unsettled and a prefetch of 3"
    );
    held[0].ack().await.expect("ack");
    let mut fourth = next_delivery(&mut stream, "the delivery after one was settled").await;
    fourth.ack().await.expect("ack");
    for d in &mut held[1..] {
        d.ack().await.expect("ack");
    }
}

/// Consumers of one group are started and stopped repeatedly while messages
/// are published: every message is handled at least once.
pub async fn close_and_reopen_under_load<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "reopen").await;
    if s.capabilities().at_most_once {
        return not_applicable(
            "close_and_reopen_under_load",
            s.name(),
            "at-most-once loses messages without a consumer",
        );
    }
    const TOTAL: u64 = 600;
    s.declare_group(&topic, "reopen")
        .await
        .expect("declare group");
    let seen = Seen::default();
    let start = |s: Arc<dyn Subscriber>| {
        Consumer::group(s, "reopen")
            .concurrency(4)
            .handle(&topic, seen.recorder())
            .start()
    };
    let publisher = {
        let (p, topic) = (p.clone(), topic.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..TOTAL {
                let event = probe(n);
                ids.push(event.id().to_owned());
                p.publish_event(&topic, event).await.expect("publish");
                if n.is_multiple_of(20) {
                    tokio::task::yield_now().await;
                }
            }
            ids
        })
    };
    for round in 1..=4usize {
        let consumer = start(s.clone()).await.expect("start consumer");
        let target = round * 50;
        seen.wait(60, "progress between restarts", |s| {
            s.unique_ids().len() >= target.min(TOTAL as usize)
        })
        .await;
        let report = consumer.shutdown(Duration::from_secs(10)).await;
        assert!(report.drained, "round {round} did not drain");
    }
    let ids = within(120, "the publisher", publisher)
        .await
        .expect("publisher task");
    let consumer = start(s.clone()).await.expect("start consumer");
    seen.wait(120, "every message after the restarts", |s| {
        let got = s.unique_ids();
        ids.iter().all(|id| got.contains(id))
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// Shutdown lets running handlers finish and settles them.
pub async fn shutdown_drains_in_flight<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "drain").await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let finished: Arc<Mutex<Vec<String>>> = Arc::default();
    let done = finished.clone();
    let consumer = Consumer::group(s.clone(), "drain")
        .concurrency(4)
        .handle(&topic, move |e: Event<Probe>| {
            let (started, done) = (started_tx.clone(), done.clone());
            async move {
                let _ = started.send(());
                // Simulated work that is still running when shutdown begins.
                tokio::time::sleep(Duration::from_millis(300)).await;
                done.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(e.id().to_owned());
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let mut ids = HashSet::new();
    for n in 0..4 {
        let event = probe(n);
        ids.insert(event.id().to_owned());
        p.publish_event(&topic, event).await.expect("publish");
    }
    for _ in 0..4 {
        within(30, "the handlers to start", started.recv()).await;
    }
    let report = consumer.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained);
    let finished: HashSet<String> = finished
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    assert_eq!(
        finished, ids,
        "every running handler finished before shutdown returned"
    );
    if s.capabilities().at_most_once {
        return;
    }
    // Settled means acked: a new member of the group sees the marker, not the four.
    let seen = Seen::default();
    let consumer = Consumer::group(s, "drain")
        .handle(&topic, seen.recorder())
        .start()
        .await
        .expect("restart consumer");
    let marker = probe(99);
    let marker_id = marker.id().to_owned();
    p.publish_event(&topic, marker).await.expect("publish");
    seen.wait(60, "the marker", |s| !s.attempts_of(&marker_id).is_empty())
        .await;
    assert!(
        seen.unique_ids().is_disjoint(&ids),
        "a drained message was delivered again"
    );
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// The connection is cut (or the broker restarted) in the middle of a stream
/// of confirmed publishes: every confirmed message is handled afterwards.
pub async fn reconnect<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "reconnect").await;
    if s.capabilities().at_most_once {
        return not_applicable(
            "reconnect",
            s.name(),
            "at-most-once: messages in flight during the cut are lost by design",
        );
    }
    const TOTAL: u64 = 400;
    let seen = Seen::default();
    let consumer = Consumer::group(s.clone(), "reconnect")
        .handle(&topic, seen.recorder())
        .start()
        .await
        .expect("start consumer");
    let mut confirmed = Vec::new();
    for n in 0..TOTAL {
        if n == TOTAL / 2 {
            let disrupted = within(120, "the disruption", h.disrupt()).await;
            if !disrupted {
                consumer.shutdown(Duration::from_secs(10)).await;
                return not_applicable(
                    "reconnect",
                    s.name(),
                    "the harness cannot disrupt the broker",
                );
            }
        }
        // A publish that fails during the cut is retried as a user would;
        // only confirmed messages are promised.
        let mut tries = 0;
        loop {
            let event = probe(n);
            let id = event.id().to_owned();
            match p.publish_event(&topic, event).await {
                Ok(_) => {
                    confirmed.push(id);
                    break;
                }
                Err(e) if tries < 60 => {
                    tries += 1;
                    eprintln!("publish {n} failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("publishing kept failing after the disruption: {e}"),
            }
        }
    }
    seen.wait(120, "every confirmed message after the disruption", |s| {
        let got = s.unique_ids();
        confirmed.iter().all(|id| got.contains(id))
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// Publishing on a closed publisher and settling twice are errors, not panics.
pub async fn api_contract<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "contract").await;
    let mut stream = subscribe(&*s, Subscription::group(&topic, "contract")).await;
    publish_ok(&*p, &topic, Message::new("once")).await;
    let mut d = next_delivery(&mut stream, "the delivery").await;
    d.ack().await.expect("first ack");
    assert!(matches!(d.ack().await, Err(Error::AlreadySettled { .. })));
    assert!(matches!(
        d.nack(None).await,
        Err(Error::AlreadySettled { .. })
    ));
    p.close().await.expect("close");
    let after = p.publish(&topic, Message::new("after close")).await;
    assert!(
        matches!(after, Err(Error::Closed(_))),
        "publish after close: {after:?}"
    );
    let unchecked = Subscription::group(&topic, "");
    assert!(
        s.subscribe(unchecked).await.is_err(),
        "an empty group name is rejected"
    );
}
