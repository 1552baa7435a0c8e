//! The transactional outbox against the real PostgreSQL: a message exists
//! exactly when the transaction that wrote it commits; the relay delivers
//! what was written while it was down, sends again (same id) what a broker
//! refused, runs safely as two replicas in key order, and relays into a
//! real broker end to end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tidings_core::testkit::{unique, within};
use tidings_core::{Consumer, Event, Message, Publisher, Raw, Receipt};
use tidings_memory::MemoryBus;
use tidings_postgres::{Outbox, PgPool};

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn outbox() -> Outbox {
    let pool = PgPool::connect(URL)
        .await
        .unwrap_or_else(|e| panic!("{URL}: {e}; scripts/brokers.sh starts PostgreSQL"));
    Outbox::named(pool, &unique("outbox"))
        .await
        .expect("the outbox tables")
}

type Seen = Arc<Mutex<Vec<Message>>>;

/// Writes `message` to the outbox in a transaction of its own, committed.
async fn commit(outbox: &Outbox, topic: &str, message: Message) {
    let mut tx = outbox.pool().begin().await.expect("begin");
    outbox
        .publish_in(&mut tx, topic, message)
        .await
        .expect("written");
    tx.commit().await.expect("committed");
}

/// A consumer of `topic` on `bus` recording what it receives, in order.
async fn receiver(bus: &MemoryBus, topic: &str, ordered: bool) -> (tidings_core::Consumer, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let mut builder = Consumer::group(bus.subscriber(), "shipping").concurrency(4);
    if ordered {
        builder = builder.ordered_by_key();
    }
    let consumer = builder
        .handle(topic, move |e: Event<Bytes, Raw>| {
            record.lock().expect("lock").push(e.message().clone());
            async { Ok::<_, tidings_core::HandlerError>(()) }
        })
        .start()
        .await
        .expect("started");
    (consumer, seen)
}

async fn until(seen: &Seen, n: usize) {
    within(30, "the relayed messages", async {
        while seen.lock().expect("lock").len() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_messages_are_relayed_and_rolled_back_ones_never_are() {
    let outbox = outbox().await;
    let bus = MemoryBus::new();
    let (consumer, seen) = receiver(&bus, "orders", false).await;

    // Written while no relay runs: a process that died after its commit.
    let mut tx = outbox.pool().begin().await.expect("begin");
    outbox
        .publish_in(
            &mut tx,
            "orders",
            Message::new("rolled back").with_id("phantom"),
        )
        .await
        .expect("written");
    tx.rollback().await.expect("rolled back");
    commit(&outbox, "orders", Message::new("committed").with_id("real")).await;
    assert_eq!(outbox.pending().await.expect("pending").0, 1);

    // The relay starts (the process restarted): the committed one arrives,
    // and since the relay sends in order, the rolled-back one, written
    // first, would have arrived before it.
    let relay = outbox.relay(bus.publisher()).start();
    until(&seen, 1).await;
    commit(&outbox, "orders", Message::new("later").with_id("later")).await;
    until(&seen, 2).await;
    let ids: Vec<String> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    assert_eq!(ids, ["real", "later"]);
    within(10, "the sent rows deleted", async {
        while outbox.pending().await.expect("pending").0 > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(relay.stats().sent, 2);
    relay.shutdown().await;
    consumer.shutdown(Duration::from_secs(5)).await;
}

/// A broker that refuses everything, and counts what it refused.
#[derive(Default)]
struct Refusing {
    refused: AtomicUsize,
}

#[async_trait]
impl Publisher for Refusing {
    async fn publish(&self, topic: &str, _message: Message) -> tidings_core::Result<Receipt> {
        self.refused.fetch_add(1, Ordering::SeqCst);
        Err(tidings_core::Error::Publish {
            topic: topic.to_owned(),
            transient: true,
            source: "the broker is down".into(),
        })
    }

    async fn close(&self) -> tidings_core::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_broker_refused_is_sent_again_with_the_same_id() {
    let outbox = outbox().await;
    let mut tx = outbox.pool().begin().await.expect("begin");
    let message = Message::new("invoice");
    let id = message.id.clone();
    outbox
        .publish_in(&mut tx, "invoices", message)
        .await
        .expect("written");
    tx.commit().await.expect("committed");

    let broker = Arc::new(Refusing::default());
    let refused = outbox
        .relay(broker.clone())
        .poll(Duration::from_millis(50))
        .start();
    within(10, "the relay to lead", async {
        while !refused.stats().leading {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within(10, "a few rounds against the refusing broker", async {
        while broker.refused.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(refused.stats().sent, 0);
    assert_eq!(
        outbox.pending().await.expect("pending").0,
        1,
        "nothing deleted"
    );
    refused.shutdown().await;

    let bus = MemoryBus::new();
    let (consumer, seen) = receiver(&bus, "invoices", false).await;
    let relay = outbox.relay(bus.publisher()).start();
    until(&seen, 1).await;
    assert_eq!(seen.lock().expect("lock")[0].id, id);
    relay.shutdown().await;
    consumer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_deliver_each_message_once_in_key_order() {
    let outbox = outbox().await;
    let bus = MemoryBus::new();
    let (consumer, seen) = receiver(&bus, "accounts", true).await;
    let relays = [
        outbox.relay(bus.publisher()).batch(7).start(),
        outbox.relay(bus.publisher()).batch(7).start(),
    ];
    // 300 messages over 5 keys, written by 3 writers at once, each key's
    // messages by one writer, in order.
    let writers = (0..3).map(|w| {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            for n in 0..100u32 {
                let key = format!("k{}", (n % 5) + 5 * w);
                let mut tx = outbox.pool().begin().await.expect("begin");
                let message = Message::new(format!("{key}:{n}")).with_key(key);
                outbox
                    .publish_in(&mut tx, "accounts", message)
                    .await
                    .expect("written");
                tx.commit().await.expect("committed");
            }
        })
    });
    for writer in writers {
        writer.await.expect("writer");
    }
    until(&seen, 300).await;
    let seen = seen.lock().expect("lock").clone();
    let mut ids: Vec<&str> = seen.iter().map(|m| m.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 300, "each message once");
    let mut last: std::collections::HashMap<String, u32> = Default::default();
    for m in &seen {
        let text = std::str::from_utf8(&m.payload).expect("utf-8");
        let (key, n) = text.split_once(':').expect("key:n");
        let n: u32 = n.parse().expect("n");
        if let Some(before) = last.insert(key.to_owned(), n) {
            assert!(before < n, "{key}: {n} after {before}");
        }
    }
    let leading = relays.iter().filter(|r| r.stats().leading).count();
    assert_eq!(leading, 1, "one relay sends, the other waits");
    // A relay counts a round once its rows are deleted, after the consumer
    // may already have seen them: wait for the count, then check it.
    let sent = || relays.iter().map(|r| r.stats().sent).sum::<u64>();
    within(10, "the relays to count what they sent", async {
        while sent() < 300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(sent(), 300);
    for relay in relays {
        relay.shutdown().await;
    }
    consumer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_into_jetstream_end_to_end() {
    let outbox = outbox().await;
    let nats = tidings::connect("nats://127.0.0.1:4222")
        .await
        .unwrap_or_else(|e| panic!("NATS: {e}; scripts/brokers.sh starts it"));
    let topic = unique("outbox.orders");
    let received: Seen = Arc::default();
    let record = received.clone();
    let consumer = nats
        .consumer("shipping")
        .handle(&topic, move |e: Event<Bytes, Raw>| {
            record.lock().expect("lock").push(e.message().clone());
            async { Ok::<_, tidings_core::HandlerError>(()) }
        })
        .start()
        .await
        .expect("consumer");
    let relay = outbox.relay(nats.publisher().clone()).start();
    let mut ids = Vec::new();
    for n in 0..20 {
        let mut tx = outbox.pool().begin().await.expect("begin");
        let message = Message::new(format!("order {n}")).with_type("order.placed");
        ids.push(message.id.clone());
        outbox
            .publish_in(&mut tx, &topic, message)
            .await
            .expect("written");
        tx.commit().await.expect("committed");
    }
    until(&received, 20).await;
    let got: Vec<String> = received
        .lock()
        .expect("lock")
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(sorted, expected, "every message, with its id");
    assert_eq!(
        received.lock().expect("lock")[0]
            .metadata
            .event_type
            .as_deref(),
        Some("order.placed")
    );
    relay.shutdown().await;
    consumer.shutdown(Duration::from_secs(5)).await;
}

/// A publisher whose publishes never complete: a relay stuck mid-send.
struct Stuck;

#[async_trait]
impl Publisher for Stuck {
    async fn publish(&self, _topic: &str, _message: Message) -> tidings_core::Result<Receipt> {
        std::future::pending().await
    }

    async fn close(&self) -> tidings_core::Result<()> {
        Ok(())
    }
}

/// The child process of the kill test: commits a message to the outbox
/// named by `TIDINGS_OUTBOX_CHILD`, says so, and hangs with its relay stuck
/// mid-send until it is killed. Does nothing when run as a test of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_child_process() {
    let Ok(name) = std::env::var("TIDINGS_OUTBOX_CHILD") else {
        return;
    };
    let pool = PgPool::connect(URL).await.expect("PostgreSQL");
    let outbox = Outbox::named(pool, &name).await.expect("outbox");
    let mut tx = outbox.pool().begin().await.expect("begin");
    let message = Message::new("shipped after a crash");
    let id = message.id.clone();
    outbox
        .publish_in(&mut tx, "orders", message)
        .await
        .expect("written");
    tx.commit().await.expect("committed");
    let _relay = outbox.relay(Arc::new(Stuck)).start();
    println!("committed {id}");
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_between_commit_and_relay_loses_nothing() {
    let name = unique("killed");
    let exe = std::env::current_exe().expect("this test binary");
    let mut child = tidings_core::testkit::ChildProcess::start(
        &exe,
        &[
            "outbox_child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ],
        &[("TIDINGS_OUTBOX_CHILD", name.as_str())],
    );
    let id = within(60, "the child to commit", async {
        loop {
            match child.line(Duration::from_secs(60)).await {
                Some(line) => {
                    // libtest may have printed the test's name on the same line.
                    if let Some((_, id)) = line.split_once("committed ") {
                        break id.trim().to_owned();
                    }
                }
                None => panic!("the child ended without committing"),
            }
        }
    })
    .await;
    // Killed (SIGKILL, this child's PID only) with its relay mid-send.
    drop(child);

    let pool = PgPool::connect(URL).await.expect("PostgreSQL");
    let outbox = Outbox::named(pool, &name).await.expect("outbox");
    let bus = MemoryBus::new();
    let (consumer, seen) = receiver(&bus, "orders", false).await;
    // The restarted service's relay: it takes over once the dead process's
    // session (and its lock) is gone.
    let relay = outbox
        .relay(bus.publisher())
        .poll(Duration::from_millis(100))
        .start();
    until(&seen, 1).await;
    assert_eq!(seen.lock().expect("lock")[0].id, id);
    relay.shutdown().await;
    consumer.shutdown(Duration::from_secs(5)).await;
}
