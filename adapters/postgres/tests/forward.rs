//! Forwarding appended events to a broker (the in-process bus here; the
//! publisher is any Tidings publisher): every event once, each stream in
//! order, the same ids, resumed from the checkpoint after a stop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tidings_core::testkit::{unique, within};
use tidings_core::{Consumer, Event, Message, Publisher, Raw, Subscriber};
use tidings_memory::MemoryBus;
use tidings_postgres::{EventStore, ExpectedVersion, STREAM_HEADER, VERSION_HEADER, forwarder};

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_events_reach_the_broker_once_each_stream_in_order() {
    let store = EventStore::connect(URL)
        .await
        .unwrap_or_else(|e| panic!("{URL}: {e}; scripts/brokers.sh starts PostgreSQL"));
    let category = unique("order").replace('-', "_");
    let bus = MemoryBus::new();
    let received: Arc<Mutex<Vec<Message>>> = Arc::default();
    let record = received.clone();
    let subscriber: Arc<dyn Subscriber> = bus.subscriber();
    let downstream = Consumer::group(subscriber, "shipping")
        .concurrency(1)
        .handle("orders", move |e: Event<Bytes, Raw>| {
            let record = record.clone();
            async move {
                record.lock().expect("lock").push(e.message().clone());
                Ok(())
            }
        })
        .start()
        .await
        .expect("downstream");

    let mut ids = Vec::new();
    for round in 0..2 {
        for s in 0..3 {
            let events: Vec<Message> = (0..5)
                .map(|n| Message::new(format!("{s}/{round}/{n}")).with_type("order.changed"))
                .collect();
            ids.extend(events.iter().map(|m| m.id.clone()));
            store
                .append(&format!("{category}-{s}"), ExpectedVersion::Any, events)
                .await
                .expect("appended");
        }
        // The forwarder runs once per round: the second resumes from the
        // first one's checkpoint.
        let publisher: Arc<dyn Publisher> = bus.publisher();
        let forwarding = forwarder(&store, "to-broker", &category, publisher, |_| {
            "orders".into()
        })
        .start()
        .await
        .expect("forwarder");
        let want = ids.len();
        within(30, "the events at the broker", async {
            while received.lock().expect("lock").len() < want {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        forwarding.shutdown(Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    downstream.shutdown(Duration::from_secs(10)).await;

    let received = received.lock().expect("lock");
    let got: Vec<&str> = received.iter().map(|m| m.id.as_str()).collect();
    let mut sorted_got = got.clone();
    sorted_got.sort_unstable();
    let mut sorted_ids: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
    sorted_ids.sort_unstable();
    assert_eq!(sorted_got, sorted_ids, "every event once, with its id");
    for s in 0..3 {
        let stream = format!("{category}-{s}");
        let versions: Vec<u64> = received
            .iter()
            .filter(|m| m.headers.get(STREAM_HEADER) == Some(&stream))
            .map(|m| m.headers[VERSION_HEADER].parse().expect("a version"))
            .collect();
        assert_eq!(
            versions,
            (1..=10).collect::<Vec<u64>>(),
            "{stream} in order"
        );
    }
    assert!(
        received
            .iter()
            .all(|m| m.metadata.event_type.as_deref() == Some("order.changed"))
    );
}
