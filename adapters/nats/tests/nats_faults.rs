//! Faults and JetStream specifics: a server restart and a cut connection
//! while a consumer runs, progress reports for long handlers, and duplicate
//! detection by message id.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tidings_core::testkit::{FaultProxy, unique, within};
use tidings_core::{
    Consumer, Event, HandlerError, Message, Publisher, PublisherExt, Receipt, StartFrom,
    Subscription,
};
use tidings_nats::{NatsBus, NatsConfig};
use tokio::sync::Notify;

mod support;

const SERVER: &str = "127.0.0.1:4222";

async fn connect(url: &str) -> NatsBus {
    let config = NatsConfig::from_url(url).expect("config");
    NatsBus::connect(config).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach nats-server at {url} ({e}); start it with \
             `nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/nats-js &`"
        )
    })
}

/// Message ids a handler saw (with repeats), and a wake-up on every change.
#[derive(Default, Clone)]
struct Seen(Arc<SeenInner>);

/// (message id, attempt) in the order handled, and a wake-up for waiters.
type SeenInner = (Mutex<Vec<(String, u32)>>, Notify);

impl Seen {
    fn record(&self, id: &str, attempt: u32) {
        self.0
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id.to_owned(), attempt));
        self.0.1.notify_waiters();
    }
    fn ids(&self) -> HashSet<String> {
        let seen = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter().map(|(id, _)| id.clone()).collect()
    }
    fn attempts(&self, id: &str) -> Vec<u32> {
        let seen = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter()
            .filter(|(i, _)| i == id)
            .map(|(_, a)| *a)
            .collect()
    }
    async fn wait(&self, secs: u64, what: &str, done: impl Fn(&Self) -> bool) {
        within(secs, what, async {
            loop {
                let notified = self.0.1.notified();
                if done(self) {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

/// Publishes `total` events, calling `disrupt` halfway; retries failed
/// publishes like a user would. Returns the confirmed ids.
async fn publish_through<F: std::future::Future<Output = ()>>(
    publisher: &dyn Publisher,
    topic: &str,
    total: u64,
    disrupt: impl FnOnce() -> F,
) -> Vec<String> {
    let mut disrupt = Some(disrupt);
    let mut confirmed = Vec::new();
    for n in 0..total {
        if n == total / 2
            && let Some(d) = disrupt.take()
        {
            d().await;
        }
        let mut tries = 0;
        loop {
            let event = Event::new(n);
            let id = event.id().to_owned();
            match publisher.publish_event(topic, event).await {
                Ok(_) => {
                    confirmed.push(id);
                    break;
                }
                Err(e) if tries < 120 => {
                    tries += 1;
                    eprintln!("publish {n} failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("publishing kept failing after the disruption: {e}"),
            }
        }
    }
    confirmed
}

fn recording_consumer(
    bus: &NatsBus,
    group: &str,
    topic: &str,
    seen: &Seen,
) -> tidings_core::ConsumerBuilder {
    let record = seen.clone();
    Consumer::group(bus.subscriber(), group).handle(topic, move |e: Event<u64>| {
        let record = record.clone();
        async move {
            record.record(e.id(), e.attempt());
            Ok::<_, HandlerError>(())
        }
    })
}

/// A nats-server started by the test is killed and restarted on the same
/// port and JetStream directory while a consumer runs: every confirmed
/// publish is handled at least once afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_loses_no_confirmed_message() {
    let mut server = support::Server::start(None).await;
    let bus = connect(&format!("{}?ack_wait=5s", server.url())).await;
    let topic = unique("restart");
    let seen = Seen::default();
    let consumer = recording_consumer(&bus, "restart", &topic, &seen)
        .start()
        .await
        .expect("start consumer");
    let publisher = bus.publisher();
    let confirmed = publish_through(&*publisher, &topic, 400, || server.restart()).await;
    seen.wait(120, "every confirmed message after the restart", |s| {
        let got = s.ids();
        confirmed.iter().all(|id| got.contains(id))
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// The connection is cut through a fault proxy (twice) while a consumer runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_loses_no_confirmed_message() {
    let proxy = FaultProxy::start(SERVER).await.expect("proxy");
    let bus = connect(&format!("nats://{}?ack_wait=5s", proxy.addr())).await;
    let topic = unique("cut");
    let seen = Seen::default();
    let consumer = recording_consumer(&bus, "cut", &topic, &seen)
        .start()
        .await
        .expect("start consumer");
    let publisher = bus.publisher();
    let confirmed = publish_through(&*publisher, &topic, 400, || async {
        proxy.cut();
        tokio::task::yield_now().await;
        proxy.cut();
    })
    .await;
    seen.wait(120, "every confirmed message after the cut", |s| {
        let got = s.ids();
        confirmed.iter().all(|id| got.contains(id))
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// Runs one message through a handler that takes three times `ack_wait`;
/// returns the attempts the handler saw by the time the first run finished.
async fn long_handler(progress: &str) -> Vec<u32> {
    let bus = connect(&format!(
        "nats://{SERVER}?ack_wait=1s&progress_interval={progress}"
    ))
    .await;
    let topic = unique("long");
    let seen = Seen::default();
    let (record, done) = (seen.clone(), Arc::new(Notify::new()));
    let finished = done.clone();
    let consumer = Consumer::group(bus.subscriber(), "slow")
        .concurrency(4)
        .handle(&topic, move |e: Event<u64>| {
            let (record, finished) = (record.clone(), finished.clone());
            async move {
                record.record(e.id(), e.attempt());
                if e.attempt() == 1 {
                    // Simulated long work: three times ack_wait.
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    finished.notify_one();
                }
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let event = Event::new(1u64);
    let id = event.id().to_owned();
    bus.publisher()
        .publish_event(&topic, event)
        .await
        .expect("publish");
    within(30, "the long handler to finish", done.notified()).await;
    consumer.shutdown(Duration::from_secs(10)).await;
    seen.attempts(&id)
}

/// A handler running longer than ack_wait keeps its message: the adapter
/// reports it in progress, so the server does not redeliver it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_handler_keeps_its_message_by_progress_reports() {
    assert_eq!(
        long_handler("300ms").await,
        [1],
        "redelivered while handled"
    );
}

/// The control: without progress reports the server redelivers the message
/// while the first handler still runs (so the test above means something).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_progress_reports_a_long_handler_loses_its_message() {
    let attempts = long_handler("off").await;
    assert!(
        attempts.len() >= 2 && attempts[0] == 1 && attempts[1] == 2,
        "expected a redelivery during the long handler, saw attempts {attempts:?}"
    );
}

/// The same message id published twice within the duplicate window is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_message_id_is_stored_once() {
    let bus = connect(&format!("nats://{SERVER}")).await;
    let topic = unique("dup");
    let publisher = bus.publisher();
    let message = Message::new("once");
    let first = publisher
        .publish(&topic, message.clone())
        .await
        .expect("publish");
    let again = publisher
        .publish(&topic, message.clone())
        .await
        .expect("publish again");
    let batch = publisher
        .publish_batch(&topic, vec![message.clone(), Message::new("other")])
        .await;
    let (
        Receipt::Sequence {
            stream,
            sequence,
            duplicate: false,
        },
        Receipt::Sequence {
            sequence: s2,
            duplicate: true,
            ..
        },
    ) = (&first, &again)
    else {
        panic!("receipts: {first:?} then {again:?}");
    };
    assert_eq!(sequence, s2, "the duplicate names the stored sequence");
    assert!(
        matches!(
            batch[0],
            Ok(Receipt::Sequence {
                duplicate: true,
                ..
            })
        ),
        "{batch:?}"
    );
    assert!(
        matches!(
            batch[1],
            Ok(Receipt::Sequence {
                duplicate: false,
                ..
            })
        ),
        "{batch:?}"
    );
    // The stream holds two messages: "once" and "other".
    let js = async_nats::jetstream::new(bus.client().clone());
    let mut info = js.get_stream(stream).await.expect("stream");
    assert_eq!(info.info().await.expect("info").state.messages, 2);
    // And a replay yields "once" a single time.
    let mut replay = bus
        .subscriber()
        .subscribe(Subscription::private(&topic).starting_at(StartFrom::Earliest))
        .await
        .expect("subscribe");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut d = within(10, "a replayed message", replay.next())
            .await
            .expect("stream open")
            .expect("delivery");
        ids.push(d.message().id.clone());
        d.ack().await.expect("ack");
    }
    assert_eq!(ids[0], message.id);
    assert_ne!(ids[1], message.id);
}

/// An oversized message is a clear, non-transient publish error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_rejected() {
    let bus = connect(&format!("nats://{SERVER}")).await;
    let big = Message::new(vec![0u8; 2 * 1024 * 1024]);
    let err = bus
        .publisher()
        .publish(&unique("big"), big)
        .await
        .expect_err("2 MiB exceeds the default max_payload");
    assert!(!err.is_transient(), "{err}");
}
