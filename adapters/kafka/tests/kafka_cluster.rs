//! Kafka with several brokers: a partition's leader fails over to another
//! broker in the middle of a stream (librdkafka's mock cluster, three
//! brokers, topics replicated three times). Every confirmed message is
//! handled; publishes during the failover are confirmed or fail with a
//! transient error — none vanish.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{BROKERS, Target};
use futures::StreamExt;
use tidings_core::testkit::{unique, within};
use tidings_core::{Message, Publisher, Subscription};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_mid_stream_loses_no_confirmed_message() {
    let target = Target::from_env();
    let Target::Mock(mock) = &target else {
        panic!(
            "leader failover needs librdkafka's mock cluster: unset TIDINGS_KAFKA_BROKERS (a real cluster's failover is not scripted here)"
        );
    };
    let topic = unique("failover");
    mock.create_replicated_topic(&topic, 3, 3);
    let mut config = target.config();
    config.publish_timeout = Duration::from_secs(30);
    let bus = target.bus_with(config).await;
    let (p, s) = (bus.publisher(), bus.subscriber());
    let mut stream = s
        .subscribe(Subscription::group(&topic, "failover"))
        .await
        .expect("subscribe");
    let mut tasks = Vec::new();
    for n in 0..300u32 {
        if n == 100 {
            // Broker 1 dies; the other replicas lead every partition.
            mock.down(BROKERS[0]);
            for partition in 0..3 {
                mock.leader(&topic, partition, BROKERS[1 + (partition as usize % 2)]);
            }
        }
        if n == 200 {
            mock.up(BROKERS[0]);
        }
        let (p, topic) = (p.clone(), topic.clone());
        let m = Message::new(format!("{n}")).with_key(format!("k{}", n % 7));
        let id = m.id.clone();
        tasks.push(tokio::spawn(
            async move { (id, p.publish(&topic, m).await) },
        ));
        if n % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let results = within(
        90,
        "every publish to finish",
        futures::future::join_all(tasks),
    )
    .await;
    let mut confirmed = HashSet::new();
    for r in results {
        let (id, r) = r.expect("task");
        match r {
            Ok(_) => {
                confirmed.insert(id);
            }
            Err(e) => assert!(e.is_transient(), "a failover error is transient: {e}"),
        }
    }
    assert!(
        confirmed.len() >= 200,
        "most publishes are confirmed: {}",
        confirmed.len()
    );
    let mut got = HashSet::new();
    within(90, "every confirmed message", async {
        while !confirmed.iter().all(|id| got.contains(id)) {
            let mut d = within(60, "a delivery", stream.next())
                .await
                .expect("stream open")
                .expect("delivery");
            got.insert(d.message().id.clone());
            d.ack().await.expect("ack");
        }
    })
    .await;
    stream.close().await.expect("close");
}
