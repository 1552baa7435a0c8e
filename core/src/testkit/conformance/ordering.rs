//! Order per key, and a slow key holding up only itself.

use super::*;

/// With concurrent handling of different keys, each key's messages are handled in order.
pub async fn order_per_key<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "order").await;
    if !s.capabilities().order_per_key {
        return not_applicable("order_per_key", s.name(), "no order per key");
    }
    const KEYS: u64 = 6;
    const EACH: u64 = 40;
    let order: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let seen = Seen::default();
    let (record, log) = (seen.clone(), order.clone());
    let consumer = Consumer::group(s, "ordered")
        .concurrency(8)
        .ordered_by_key()
        .handle(&topic, move |e: Event<Probe>| {
            let (record, log) = (record.clone(), log.clone());
            async move {
                for _ in 0..(e.data.n % 3) {
                    tokio::task::yield_now().await;
                }
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(e.key().unwrap_or_default().to_owned())
                    .or_default()
                    .push(e.data.n / KEYS);
                record.record(&e);
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    for n in 0..KEYS * EACH {
        let event = probe(n).with_key(format!("key-{}", n % KEYS));
        p.publish_event(&topic, event).await.expect("publish");
    }
    let total = (KEYS * EACH) as usize;
    seen.wait(120, "every ordered message", |s| s.ids().len() >= total)
        .await;
    let order = order.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(order.len(), KEYS as usize);
    for (key, seq) in order {
        let expected: Vec<u64> = (0..EACH).collect();
        assert_eq!(seq, expected, "order of {key}");
    }
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// Under per-key order, a key whose handler blocks holds up only its own
/// messages: every other key is handled meanwhile, each in order.
pub async fn slow_key_holds_up_only_itself<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "slow-key").await;
    if !s.capabilities().order_per_key {
        return not_applicable(
            "slow_key_holds_up_only_itself",
            s.name(),
            "no order per key",
        );
    }
    const KEYS: u64 = 15;
    const EACH: u64 = 4;
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let order: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let seen = Seen::default();
    let (gate, record, log) = (release.clone(), seen.clone(), order.clone());
    let consumer = Consumer::group(s, "slow-key")
        .concurrency(4)
        .prefetch(64)
        .ordered_by_key()
        .handle(&topic, move |e: Event<Probe>| {
            let (gate, record, log) = (gate.clone(), record.clone(), log.clone());
            async move {
                let key = e.key().unwrap_or_default().to_owned();
                if key == "slow" {
                    gate.acquire().await.expect("open").forget();
                }
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(key)
                    .or_default()
                    .push(e.data.n);
                record.record(&e);
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    for n in 0..3 {
        p.publish_event(&topic, probe(n).with_key("slow"))
            .await
            .expect("publish");
    }
    for n in 0..KEYS * EACH {
        let event = probe(100 + n).with_key(format!("key-{}", n % KEYS));
        p.publish_event(&topic, event).await.expect("publish");
    }
    let others = (KEYS * EACH) as usize;
    seen.wait(60, "every other key while one is blocked", |s| {
        s.ids().len() >= others
    })
    .await;
    assert!(
        !order
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key("slow"),
        "the slow key is still blocked"
    );
    release.add_permits(3);
    seen.wait(60, "the slow key once released", |s| {
        s.ids().len() >= others + 3
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
    let order = order.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(order["slow"], [0, 1, 2], "the slow key in order");
    for k in 0..KEYS {
        let expected: Vec<u64> = (0..EACH).map(|i| 100 + k + i * KEYS).collect();
        assert_eq!(order[&format!("key-{k}")], expected, "order of key-{k}");
    }
}
