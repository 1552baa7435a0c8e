//! Broker outages, measured: a producer publishes numbered messages, each
//! awaiting its confirmation, while a consumer group handles them; the
//! broker process is killed (SIGKILL) and started again, twice, in the
//! middle. [`run`] reports what a user relies on: every confirmed message
//! handled (confirmed-but-never-handled is 0), duplicates counted, and how
//! long the publisher and the consumer took to resume once the broker was
//! back.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::{Consumer, Event, HandlerError, Publisher, PublisherExt, Subscriber};

/// A broker process the test owns, on a port of its own that stays the
/// same across restarts.
#[async_trait]
pub trait BrokerProcess: Send {
    /// Kills the process with SIGKILL (a crash) and waits for it to exit.
    async fn kill(&mut self);
    /// Starts it again with the same port and data; returns once it serves.
    async fn start(&mut self);
}

/// What happened across the outages.
#[derive(Debug, Clone)]
pub struct OutageReport {
    /// Messages published and confirmed.
    pub confirmed: usize,
    /// Confirmed messages never handled: must be 0.
    pub lost: Vec<u64>,
    /// Handler calls beyond the first per message.
    pub duplicates: usize,
    /// Publishes that failed (and were retried, as a caller would).
    pub publish_failures: usize,
    /// Per outage: from the broker serving again to the first confirmed publish.
    pub publish_resumed: Vec<Duration>,
    /// Per outage: from the broker serving again to the first handling of a
    /// message confirmed after that.
    pub consume_resumed: Vec<Duration>,
    /// Per outage: from the kill to the first confirmed publish after it —
    /// the whole time publishing stood still, however the broker recovered
    /// (a restart, or a failover to another node before the restart).
    pub publish_stalled: Vec<Duration>,
    /// The whole run.
    pub elapsed: Duration,
}

impl fmt::Display for OutageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} confirmed, {} lost, {} duplicates, {} failed publishes; publishing stood still for {:?} from each kill; publisher resumed after {:?}, consumer after {:?} from each restart; {:.1} s in all",
            self.confirmed,
            self.lost.len(),
            self.duplicates,
            self.publish_failures,
            self.publish_stalled,
            self.publish_resumed,
            self.consume_resumed,
            self.elapsed.as_secs_f64()
        )
    }
}

#[derive(Default)]
struct Handled {
    first: HashMap<u64, Instant>,
    calls: usize,
}

/// Publishes `total` numbered messages to `topic` one by one (awaiting each
/// confirmation; a failed publish is retried after 50 ms), with a consumer
/// of `group` handling them, and kills and restarts `broker` when a third
/// and two thirds are confirmed. Waits (at most `settle`) for every
/// confirmed message to be handled.
///
/// # Panics
/// When the run takes longer than ten minutes in all (a hang).
pub async fn run(
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    topic: &str,
    group: &str,
    broker: &mut dyn BrokerProcess,
    total: u64,
    settle: Duration,
) -> OutageReport {
    let started = Instant::now();
    let handled: Arc<Mutex<Handled>> = Arc::default();
    let record = handled.clone();
    let consumer = Consumer::group(subscriber, group)
        .concurrency(8)
        .handle(topic, move |e: Event<u64>| {
            let record = record.clone();
            async move {
                let mut h = record.lock().unwrap_or_else(|e| e.into_inner());
                h.calls += 1;
                h.first.entry(e.data).or_insert_with(Instant::now);
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("the consumer starts");

    let (progress, mut confirmed_rx) = tokio::sync::watch::channel(0u64);
    let confirmed_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let producer = {
        let (topic, confirmed_at) = (topic.to_owned(), confirmed_at.clone());
        tokio::spawn(async move {
            let mut failures = 0usize;
            for n in 0..total {
                loop {
                    match publisher.publish_event(&topic, Event::new(n)).await {
                        Ok(_) => break,
                        Err(_) => {
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                confirmed_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Instant::now());
                progress.send_replace(n + 1);
            }
            failures
        })
    };

    let mut ready = Vec::new();
    let mut killed = Vec::new();
    let limit = Duration::from_secs(600);
    for mark in [total / 3, total * 2 / 3] {
        tokio::time::timeout(limit, confirmed_rx.wait_for(|n| *n >= mark))
            .await
            .expect("the producer makes progress")
            .expect("the producer runs");
        broker.kill().await;
        killed.push(Instant::now());
        // The outage itself: what a crash and a restarting server cost.
        tokio::time::sleep(Duration::from_millis(500)).await;
        broker.start().await;
        ready.push(Instant::now());
    }
    let publish_failures = tokio::time::timeout(limit, producer)
        .await
        .expect("the producer finishes")
        .expect("the producer does not panic");

    // Every confirmed message handled, or `settle` passed.
    let deadline = Instant::now() + settle;
    loop {
        let done = handled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first
            .len() as u64
            >= total;
        if done || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = consumer.shutdown(Duration::from_secs(10)).await;
    let _ = report;

    let confirmed_at = confirmed_at
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let handled = handled.lock().unwrap_or_else(|e| e.into_inner());
    let lost = (0..total)
        .filter(|n| !handled.first.contains_key(n))
        .collect();
    let first_confirmed_after = |t: &Instant| {
        confirmed_at
            .iter()
            .find(|c| *c > t)
            .map_or(Duration::MAX, |c| *c - *t)
    };
    let publish_stalled = killed.iter().map(first_confirmed_after).collect();
    let publish_resumed = ready.iter().map(first_confirmed_after).collect();
    let consume_resumed = ready
        .iter()
        .map(|r| {
            handled
                .first
                .iter()
                .filter(|(n, _)| confirmed_at.get(**n as usize).is_some_and(|c| c > r))
                .map(|(_, t)| *t)
                .min()
                .map_or(Duration::MAX, |t| t - *r)
        })
        .collect();
    OutageReport {
        confirmed: confirmed_at.len(),
        lost,
        duplicates: handled.calls.saturating_sub(handled.first.len()),
        publish_failures,
        publish_resumed,
        consume_resumed,
        publish_stalled,
        elapsed: started.elapsed(),
    }
}

/// A member of `group` dies holding deliveries: `dying` (whose every
/// connection goes through `proxy`) takes `held` messages of `topic` and
/// never settles them, then its connections are cut and refused for good,
/// which is what the broker sees of a process killed with SIGKILL. Returns
/// how long after the death the live member (`live`, a consumer of the same
/// group) had handled all of them.
///
/// # Panics
/// When a step fails, or the held messages are not all handled within 60 s.
pub async fn member_dies_holding(
    dying: Arc<dyn Subscriber>,
    proxy: &crate::testkit::FaultProxy,
    live: (Arc<dyn Publisher>, Arc<dyn Subscriber>),
    topic: &str,
    group: &str,
    held: usize,
) -> Duration {
    use futures::StreamExt;
    let (publisher, live) = live;
    let mut stream = dying
        .subscribe(crate::Subscription::group(topic, group).with_prefetch(held))
        .await
        .expect("the dying member subscribes");
    for n in 0..held as u64 {
        publisher
            .publish_event(topic, Event::new(n))
            .await
            .expect("published");
    }
    let mut taken = Vec::new();
    while taken.len() < held {
        match crate::testkit::within(30, "the dying member's deliveries", stream.next()).await {
            Some(Ok(d)) => taken.push(d),
            Some(Err(_)) => {}
            None => panic!("the dying member's stream ended"),
        }
    }
    let handled: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let record = handled.clone();
    let consumer = Consumer::group(live, group)
        .handle(topic, move |e: Event<u64>| {
            let record = record.clone();
            async move {
                record
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(e.data)
                    .or_insert_with(Instant::now);
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("the live member starts");
    // The death: no connection of the dying member works again, and
    // nothing it held is ever settled.
    proxy.refuse(true);
    proxy.cut();
    let died = Instant::now();
    std::mem::forget(taken);
    std::mem::forget(stream);
    crate::testkit::within(60, "the dead member's messages at the live one", async {
        loop {
            if handled.lock().unwrap_or_else(|e| e.into_inner()).len() >= held {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
    let last = handled
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .copied()
        .max()
        .expect("handled");
    last.saturating_duration_since(died)
}

/// [`run`] as every adapter's outage test runs it: 20,000 messages on a
/// fresh topic, the report printed under `what`, and asserted: nothing
/// confirmed lost, publisher and consumer resumed within 30 s of each restart.
///
/// # Panics
/// When an assertion fails.
pub async fn assert_killed_twice(
    what: &str,
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    broker: &mut dyn BrokerProcess,
) -> OutageReport {
    let topic = crate::testkit::unique("outage");
    assert_killed_twice_on(what, &topic, publisher, subscriber, broker).await
}

/// [`assert_killed_twice`] on a topic of the caller's: the one a cluster's
/// `broker` node serves.
///
/// # Panics
/// When an assertion fails.
pub async fn assert_killed_twice_on(
    what: &str,
    topic: &str,
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    broker: &mut dyn BrokerProcess,
) -> OutageReport {
    let report = run(
        publisher,
        subscriber,
        topic,
        "g",
        broker,
        20_000,
        Duration::from_secs(60),
    )
    .await;
    eprintln!("{what}: {report}");
    assert!(
        report.lost.is_empty(),
        "confirmed but never handled: {report}"
    );
    for resumed in report.publish_resumed.iter().chain(&report.consume_resumed) {
        assert!(*resumed < Duration::from_secs(30), "{report}");
    }
    report
}

/// [`member_dies_holding`] as every adapter's test runs it: 5 messages on a
/// fresh topic, the time printed under `what`, and asserted under 15 s.
///
/// # Panics
/// When a step fails or the messages take 15 s or more.
pub async fn assert_dead_member_replaced(
    what: &str,
    dying: Arc<dyn Subscriber>,
    proxy: &crate::testkit::FaultProxy,
    live: (Arc<dyn Publisher>, Arc<dyn Subscriber>),
) -> Duration {
    let topic = crate::testkit::unique("dead-member");
    let elapsed = member_dies_holding(dying, proxy, live, &topic, "g", 5).await;
    eprintln!("{what}: a dead member's deliveries were handled by another after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(15), "{elapsed:?}");
    elapsed
}
