//! Several RabbitMQ nodes in the URL: tried in turn when connecting and on
//! every reconnect. Two fault proxies in front of the one broker stand in
//! for two nodes of a cluster; the node the connection uses "dies" (its
//! proxy cuts every connection and refuses new ones) in the middle of a
//! stream: the adapter moves to the other node, publishes are confirmed
//! again, the consumer recovers, and every confirmed message is handled.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{BROKER, config, connect};
use tidings_amqp::QueueType;
use tidings_core::testkit::{FaultProxy, unique, within};
use tidings_core::{Consumer, Event, HandlerError, Publisher, PublisherExt};

async fn proxy() -> FaultProxy {
    FaultProxy::start(BROKER)
        .await
        .unwrap_or_else(|e| panic!("starting a fault proxy failed: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_node_is_skipped() {
    let (dead, alive) = (proxy().await, proxy().await);
    dead.refuse(true);
    let nodes = format!("{},{}", dead.addr(), alive.addr());
    let bus = connect(config(&nodes, QueueType::Quorum)).await;
    let topic = unique("cluster.start");
    bus.subscriber()
        .declare_group(&topic, "g")
        .await
        .expect("declared through the live node");
    bus.publisher()
        .publish(&topic, tidings_core::Message::new("x"))
        .await
        .expect("confirmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_connected_node_moves_to_the_next_and_loses_nothing_confirmed() {
    let (a, b) = (proxy().await, proxy().await);
    let nodes = format!("{},{}", a.addr(), b.addr());
    let bus = connect(config(&nodes, QueueType::Quorum)).await;
    let topic = unique("cluster.failover");
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let record = seen.clone();
    let consumer = Consumer::group(bus.subscriber(), "billing")
        .handle(&topic, move |e: Event<u32>| {
            record.lock().expect("lock").insert(e.id().to_owned());
            async { Ok::<_, HandlerError>(()) }
        })
        .start()
        .await
        .expect("consumer");
    let publisher = bus.publisher();
    let mut confirmed = Vec::new();
    for n in 0..200u32 {
        if n == 100 {
            // Node A dies: every connection through it is cut, new ones refused.
            a.refuse(true);
            a.cut();
        }
        let mut tries = 0;
        loop {
            let event = Event::new(n);
            let id = event.id().to_owned();
            match publisher.publish_event(&topic, event).await {
                Ok(_) => {
                    confirmed.push(id);
                    break;
                }
                Err(e) if tries < 40 => {
                    tries += 1;
                    assert!(e.is_transient(), "{e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("publishing kept failing after node A died: {e}"),
            }
        }
    }
    within(60, "every confirmed message", async {
        loop {
            {
                let seen = seen.lock().expect("lock");
                if confirmed.iter().all(|id| seen.contains(id)) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
}
