//! Order inside a partition (`ordering=partition`, the default, and
//! `ordering=key`) under a concurrent consumer whose handlers finish out of
//! order: a partition's (or a key's) next record is not handed out before the
//! previous one is settled, while different partitions (keys) run concurrently.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::Target;
use tidings_core::testkit::{unique, within};
use tidings_core::{Consumer, Event, Message, Publisher, Raw, Receipt, Subscriber};
use tidings_kafka::PartitionOrder;

const PARTITIONS: i32 = 3;
const KEYS: u64 = 12;
const TOTAL: u64 = 240;

/// What the handlers saw.
#[derive(Default)]
struct Log {
    /// Per lane (partition, or partition and key): offsets in the order their handlers finished.
    order: HashMap<(i32, Option<String>), Vec<i64>>,
    /// Per lane: handlers running now, and the most ever at once.
    running: HashMap<(i32, Option<String>), usize>,
    most_per_lane: usize,
    /// Per partition: handlers running now, and the most ever at once.
    in_partition: HashMap<i32, usize>,
    most_in_partition: usize,
    /// Handlers running now over all partitions, and the most ever at once.
    total: usize,
    most_total: usize,
    handled: u64,
}

/// Publishes `TOTAL` keyed messages to a declared group (so they are kept),
/// then handles them with 8 concurrent handlers whose running time falls
/// with the offset (so, run concurrently, later records would finish first).
async fn run(order: PartitionOrder) -> Log {
    let target = Target::from_env();
    let topic = unique("ordering");
    let group = "ordered";
    target.create_topic(&topic, PARTITIONS).await;
    let mut config = target.config();
    config.ordering = order;
    let bus = target.bus_with(config).await;
    let (p, s): (Arc<dyn Publisher>, Arc<dyn Subscriber>) = (bus.publisher(), bus.subscriber());
    within(60, "declaring the group", s.declare_group(&topic, group))
        .await
        .expect("declare the group");
    // Where each message landed, from its receipt.
    let mut placed: HashMap<String, (i32, i64)> = HashMap::new();
    let batch: Vec<Message> = (0..TOTAL)
        .map(|n| Message::new(format!("{n}")).with_key(format!("key-{}", n % KEYS)))
        .collect();
    let ids: Vec<String> = batch.iter().map(|m| m.id.to_string()).collect();
    let results = within(60, "publishing", p.publish_batch(&topic, batch)).await;
    for (id, r) in ids.into_iter().zip(results) {
        match r.expect("publish") {
            Receipt::Offset { partition, offset } => {
                placed.insert(id, (partition, offset));
            }
            other => panic!("unexpected receipt {other:?}"),
        }
    }
    let placed = Arc::new(placed);
    let log: Arc<Mutex<Log>> = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let (l, pl) = (log.clone(), placed.clone());
    let by_key = order == PartitionOrder::Key;
    let consumer = Consumer::group(s, group)
        .concurrency(8)
        .handle(&topic, move |e: Event<Bytes, Raw>| {
            let (log, placed, done) = (l.clone(), pl.clone(), done_tx.clone());
            async move {
                let (partition, offset) = placed[e.id()];
                let lane = (
                    partition,
                    by_key.then(|| e.key().unwrap_or_default().to_owned()),
                );
                {
                    let mut g = log.lock().unwrap();
                    let r = g.running.entry(lane.clone()).or_default();
                    *r += 1;
                    let r = *r;
                    g.most_per_lane = g.most_per_lane.max(r);
                    let n = g.in_partition.entry(partition).or_default();
                    *n += 1;
                    let n = *n;
                    g.most_in_partition = g.most_in_partition.max(n);
                    g.total += 1;
                    g.most_total = g.most_total.max(g.total);
                }
                // Simulated work: earlier records take longer, so handlers
                // running side by side finish out of order.
                let ms = 4 - (offset % 5).min(4) as u64;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let mut g = log.lock().unwrap();
                g.order.entry(lane.clone()).or_default().push(offset);
                *g.running.get_mut(&lane).unwrap() -= 1;
                *g.in_partition.get_mut(&partition).unwrap() -= 1;
                g.total -= 1;
                g.handled += 1;
                if g.handled == TOTAL {
                    let _ = done.send(());
                }
                Ok(())
            }
        })
        .start()
        .await
        .expect("start the consumer");
    within(120, "every message to be handled", done_rx.recv()).await;
    let report = consumer.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained);
    let log = std::mem::take(&mut *log.lock().unwrap());
    let spread: std::collections::HashSet<i32> = placed.values().map(|(p, _)| *p).collect();
    assert!(
        spread.len() > 1,
        "the keys landed in one partition only; the test needs several"
    );
    log
}

fn assert_in_offset_order(log: &Log) {
    for (lane, offsets) in &log.order {
        let mut sorted = offsets.clone();
        sorted.sort_unstable();
        assert_eq!(offsets, &sorted, "lane {lane:?} was handled out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_order_is_the_default_and_holds_under_concurrency() {
    assert_eq!(
        tidings_kafka::KafkaConfig::default().ordering,
        PartitionOrder::Partition
    );
    let log = run(PartitionOrder::Partition).await;
    assert_eq!(log.handled, TOTAL);
    assert_in_offset_order(&log);
    assert_eq!(
        log.most_in_partition, 1,
        "two records of one partition were handled at once"
    );
    assert!(
        log.most_total > 1,
        "different partitions were never handled concurrently"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_runs_keys_of_a_partition_concurrently() {
    let log = run(PartitionOrder::Key).await;
    assert_eq!(log.handled, TOTAL);
    assert_in_offset_order(&log);
    assert_eq!(
        log.most_per_lane, 1,
        "two records of one key were handled at once"
    );
    assert!(
        log.most_in_partition > 1,
        "different keys of one partition were never handled concurrently"
    );
}
