//! Delivery: a message gets there whole, to every group once and to one
//! consumer of a group.

use super::*;

/// Payload bytes (non-UTF-8, empty, 1 MiB), key, non-ASCII headers and all
/// metadata arrive intact.
pub async fn round_trip<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "round-trip").await;
    let mut stream = subscribe(&*s, Subscription::group(&topic, "rt")).await;
    let parent = Message::new("parent").with_correlation_id("corr-1");
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let sent = vec![
        Message::new(Bytes::from_static(&[0xff, 0x00, 0xfe, 0x80]))
            .with_key("kunde-ä-1")
            .with_header("grüße", "✓ ünïcödé ☃")
            .with_header("x-plain", "1")
            .with_type("order.placed")
            .with_source("/conformance")
            .with_schema_version("3")
            .with_content_type("application/octet-stream")
            .caused_by(&parent),
        Message::new(Bytes::new()).with_type("empty"),
        Message::new(Bytes::from(big)).with_key("big"),
        Message::new("plain text"),
    ];
    for m in &sent {
        publish_ok(&*p, &topic, m.clone()).await;
    }
    let mut received = HashMap::new();
    for _ in 0..sent.len() {
        let mut d = next_delivery(&mut stream, "a round-tripped message").await;
        assert_eq!(d.topic(), topic);
        assert_eq!(d.attempt(), 1);
        received.insert(d.message().id.clone(), d.message().clone());
        d.ack().await.expect("ack");
    }
    for m in &sent {
        let got = received
            .get(&m.id)
            .unwrap_or_else(|| panic!("message {} was not received", m.id));
        assert_eq!(got.payload, m.payload, "payload of {}", m.id);
        assert_eq!(got.key, m.key, "key of {}", m.id);
        assert_eq!(got.metadata, m.metadata, "metadata of {}", m.id);
        for (name, value) in &m.headers {
            assert_eq!(
                got.headers.get(name),
                Some(value),
                "header {name} of {}",
                m.id
            );
        }
    }
}

/// Thousands of messages from 20 concurrent publishers all arrive, none twice.
pub async fn volume<H: Harness>(h: &H) {
    const PUBLISHERS: u64 = 20;
    const EACH: u64 = 150;
    let (p, s, topic) = setup(h, "volume").await;
    let seen = Seen::default();
    let consumer = Consumer::group(s, "volume")
        .concurrency(16)
        .handle(&topic, seen.recorder())
        .start()
        .await
        .expect("start consumer");
    let mut publishers = Vec::new();
    for i in 0..PUBLISHERS {
        let p = p.clone();
        let topic = topic.clone();
        publishers.push(tokio::spawn(async move {
            for j in 0..EACH {
                let n = i * EACH + j;
                p.publish_event(&topic, probe(n)).await.expect("publish");
            }
        }));
    }
    within(
        120,
        "the publishers",
        futures::future::try_join_all(publishers),
    )
    .await
    .expect("publisher task");
    let total = (PUBLISHERS * EACH) as usize;
    seen.wait(120, "every message to be handled", |s| {
        s.unique_ids().len() >= total
    })
    .await;
    let ids = seen.ids();
    assert_eq!(ids.len(), total, "some messages were handled twice");
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// Many topics at once: each subscription gets only its own topic's messages.
pub async fn isolation<H: Harness>(h: &H) {
    let (p, s, _) = setup(h, "isolation").await;
    let topics: Vec<String> = (0..8).map(|i| unique(&format!("iso{i}"))).collect();
    let mut streams = Vec::new();
    for t in &topics {
        within(30, "preparing the topic", h.prepare(t)).await;
        streams.push(subscribe(&*s, Subscription::group(t, "iso")).await);
    }
    for (i, t) in topics.iter().enumerate() {
        for n in 0..25 {
            let m = Message::new(format!("{i}:{n}"));
            publish_ok(&*p, t, m).await;
        }
    }
    for (i, (t, stream)) in topics.iter().zip(&mut streams).enumerate() {
        for _ in 0..25 {
            let mut d = next_delivery(stream, "an isolated message").await;
            assert_eq!(d.topic(), t.as_str());
            let body = String::from_utf8_lossy(&d.message().payload).into_owned();
            assert!(body.starts_with(&format!("{i}:")), "{t} received {body}");
            d.ack().await.expect("ack");
        }
    }
}

/// Two groups each get every message.
pub async fn fan_out<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "fan-out").await;
    if !s.capabilities().consumer_groups {
        return not_applicable("fan_out", s.name(), "no consumer groups");
    }
    let mut a = subscribe(&*s, Subscription::group(&topic, "a")).await;
    let mut b = subscribe(&*s, Subscription::group(&topic, "b")).await;
    let sent: HashSet<MessageId> = {
        let mut ids = HashSet::new();
        for n in 0..50 {
            let m = Message::new(format!("{n}"));
            ids.insert(m.id.clone());
            publish_ok(&*p, &topic, m).await;
        }
        ids
    };
    for stream in [&mut a, &mut b] {
        let mut got = HashSet::new();
        for _ in 0..sent.len() {
            let mut d = next_delivery(stream, "a fanned-out message").await;
            got.insert(d.message().id.clone());
            d.ack().await.expect("ack");
        }
        assert_eq!(got, sent);
    }
}

/// Two members of one group share the messages: each gets some, none gets one twice.
pub async fn competing_consumers<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "compete").await;
    if !s.capabilities().consumer_groups {
        return not_applicable("competing_consumers", s.name(), "no consumer groups");
    }
    let seen = Seen::default();
    let per_member: Vec<Arc<Mutex<usize>>> = (0..2).map(|_| Arc::default()).collect();
    let mut consumers = Vec::new();
    for count in &per_member {
        let (record, count) = (seen.clone(), count.clone());
        let s2 = h.connect().await.1;
        consumers.push(
            Consumer::group(s2, "members")
                .concurrency(1)
                .prefetch(1)
                .handle(&topic, move |e: Event<Probe>| {
                    let (record, count) = (record.clone(), count.clone());
                    async move {
                        // Simulated work, so that one member cannot take everything.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                        record.record(&e);
                        Ok(())
                    }
                })
                .start()
                .await
                .expect("start member"),
        );
    }
    drop(s);
    for n in 0..60 {
        p.publish_event(&topic, probe(n)).await.expect("publish");
    }
    seen.wait(60, "all 60 messages", |s| s.unique_ids().len() >= 60)
        .await;
    assert_eq!(seen.ids().len(), 60, "a message was handled twice");
    for (i, count) in per_member.iter().enumerate() {
        let n = *count.lock().unwrap_or_else(|e| e.into_inner());
        assert!(n > 0, "member {i} got no messages: the load was not shared");
    }
    for c in consumers {
        c.shutdown(Duration::from_secs(10)).await;
    }
}
