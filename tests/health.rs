//! The service host's health and metrics: readiness through the app's
//! phases, `/healthz`, `/readyz` and `/metrics` over HTTP, readiness
//! following a cut broker connection on every broker, and the restart
//! policy for a consumer whose subscription ended.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, oneshot};

use tidings::app::{HealthReport, Kind, Phase};
use tidings::health::State;
use tidings::memory::MemoryBus;
use tidings::prelude::*;
use tidings::testkit::{FaultProxy, unique, within};
use tidings::{App, DeliveryStream, Restart, ServiceHealth, Subscription};

/// `GET path` over HTTP/1.1: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("the endpoint {addr} takes connections: {e}"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("sent");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP status line: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A consumer of `topic` that counts what it handled.
fn counting(
    builder: tidings::ConsumerBuilder,
    topic: &str,
    handled: &Arc<AtomicUsize>,
) -> tidings::ConsumerBuilder {
    let handled = handled.clone();
    builder.handle(topic, move |_: Event<u64>| {
        handled.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, HandlerError>(()) }
    })
}

fn state_of(report: &HealthReport, name: &str) -> State {
    report
        .components
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no component {name} in {report:?}"))
        .health
        .state
}

/// Asks until `wanted` holds of the report (bounded), returning that report.
async fn until(
    health: &ServiceHealth,
    secs: u64,
    what: &str,
    wanted: impl Fn(&HealthReport) -> bool,
) -> HealthReport {
    within(secs, what, async {
        loop {
            let report = health.report().await;
            if wanted(&report) {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_follow_the_phases_over_http() {
    let bus = tidings::connect("memory://").await.expect("memory");
    let topic = unique("phases");
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let consumer = bus.consumer("g").handle(&topic, {
        let (entered, release) = (entered.clone(), release.clone());
        move |_: Event<u64>| {
            let (entered, release) = (entered.clone(), release.clone());
            async move {
                entered.notify_one();
                release.notified().await;
                Ok::<_, HandlerError>(())
            }
        }
    });
    let app = App::new()
        .without_signals()
        .bus(&bus)
        .consumer("billing", consumer)
        .serve("127.0.0.1:0".parse().expect("an address"));
    let health = app.health();
    let stop = app.shutdown_handle();
    let running = tokio::spawn(app.run());
    within(10, "the app to start", health.started()).await;
    let addr = health.http_address().expect("bound");

    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json["ready"], true, "{body}");
    assert_eq!(json["phase"], "running", "{body}");
    let kinds: Vec<(&str, &str, &str)> = json["components"]
        .as_array()
        .expect("components")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default(),
                c["kind"].as_str().unwrap_or_default(),
                c["state"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("memory", "connection", "connected"),
            ("billing", "consumer", "running")
        ],
        "{body}"
    );
    let (status, _) = get(addr, "/healthz").await;
    assert_eq!(status, 200);
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 404, "no metrics configured: {body}");
    assert!(
        body.contains("prometheus"),
        "says how to turn them on: {body}"
    );

    // A handler holds a delivery; the shutdown drains it, and meanwhile the
    // service is alive but not ready, its consumer draining.
    bus.publish_event(&topic, Event::new(1u64))
        .await
        .expect("published");
    within(10, "the handler to start", entered.notified()).await;
    stop.shutdown();
    let report = until(&health, 10, "not ready while draining", |r| {
        r.phase == Phase::Stopping
    })
    .await;
    assert!(!report.ready && report.live, "{report:?}");
    assert_eq!(state_of(&report, "billing"), State::Draining);
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = get(addr, "/healthz").await;
    assert_eq!(status, 200, "alive while draining: {body}");
    release.notify_one();
    let report = within(10, "the app to stop", running)
        .await
        .expect("joined")
        .expect("a clean stop");
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.consumers[0].1.settled, 1);
    let after = health.report().await;
    assert!(!after.live && !after.ready, "{after:?}");
    assert_eq!(state_of(&after, "billing"), State::Stopped);
    assert_eq!(
        state_of(&after, "memory"),
        State::Stopped,
        "the bus was closed last"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the endpoint stopped with the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_from_the_configured_endpoint() {
    let config = tidings::Config::from_toml(
        "url = \"memory://\"\n[telemetry]\nprometheus = true\n[http]\naddress = \"127.0.0.1:0\"",
    )
    .expect("a valid configuration");
    let bus = tidings::connect(config).await.expect("memory");
    let topic = unique("metrics");
    let handled = Arc::new(AtomicUsize::new(0));
    let consumer = counting(bus.consumer("g"), &topic, &handled);
    let app = App::new()
        .without_signals()
        .bus(&bus)
        .consumer("g", consumer);
    let health = app.health();
    let stop = app.shutdown_handle();
    let running = tokio::spawn(app.run());
    within(10, "the app to start", health.started()).await;
    let addr = health
        .http_address()
        .expect("the [http] address was served");
    for n in 0..3u64 {
        bus.publish_event(&topic, Event::new(n))
            .await
            .expect("published");
    }
    within(10, "three handled", async {
        while handled.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    // Parsed as Prometheus reads it: `name{labels} value` lines.
    let counted = within(10, "the acks on /metrics", async {
        loop {
            let (status, text) = get(addr, "/metrics").await;
            assert_eq!(status, 200, "{text}");
            let acks: f64 = text
                .lines()
                .filter(|l| l.starts_with("messaging_client_consumed_messages_total{"))
                .filter(|l| l.contains("tidings_outcome=\"ack\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if acks >= 3.0 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        counted.contains("# TYPE messaging_client_consumed_messages_total counter"),
        "{counted}"
    );
    assert!(
        counted.contains("messaging_client_sent_messages_total{"),
        "the publisher's counter too: {counted}"
    );
    stop.shutdown();
    within(10, "the app to stop", running)
        .await
        .expect("joined")
        .expect("a clean stop");
}

/// Readiness goes false while the connection through `proxy` is cut and
/// true again once it is back; the consumer stays `running` throughout.
async fn readiness_follows_a_cut(url: String, broker: &str, proxy: FaultProxy) {
    let bus = tidings::connect(url.as_str()).await.unwrap_or_else(|e| {
        panic!("{broker} through the proxy ({e}); scripts/brokers.sh starts it")
    });
    let topic = unique("health");
    let consumer = bus
        .consumer(unique("g"))
        .handle(&topic, |_: Event<u64>| async { Ok::<_, HandlerError>(()) });
    let app = App::new()
        .without_signals()
        .bus(&bus)
        .consumer("c", consumer);
    let health = app.health();
    let stop = app.shutdown_handle();
    let running = tokio::spawn(app.run());
    within(20, "the app to start", health.started()).await;
    until(&health, 15, "ready", |r| r.ready).await;

    proxy.refuse(true);
    proxy.cut();
    let down = until(&health, 15, "not ready while the broker is away", |r| {
        !r.ready
    })
    .await;
    let connection = down
        .components
        .iter()
        .find(|c| c.kind == Kind::Connection)
        .expect("the connection");
    assert_eq!(connection.health.state, State::Reconnecting, "{down:?}");
    assert!(down.live, "alive: restarting the process would not help");

    proxy.refuse(false);
    let up = until(&health, 30, "ready again once the broker is back", |r| {
        r.ready
    })
    .await;
    assert_eq!(state_of(&up, "c"), State::Running);
    stop.shutdown();
    within(30, "the app to stop", running)
        .await
        .expect("joined")
        .expect("a stop");
}

async fn proxy_to(target: &str) -> FaultProxy {
    FaultProxy::start(target).await.expect("a proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_cut_on_redis() {
    let proxy = proxy_to("127.0.0.1:6379").await;
    let url = format!("redis://{}?mode=streams", proxy.addr());
    readiness_follows_a_cut(url, "redis", proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_cut_on_rabbitmq() {
    let proxy = proxy_to("127.0.0.1:5672").await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    readiness_follows_a_cut(url, "rabbitmq", proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_cut_on_nats() {
    let proxy = proxy_to("127.0.0.1:4222").await;
    let url = format!("nats://{}?jetstream=true", proxy.addr());
    readiness_follows_a_cut(url, "nats", proxy).await;
}

/// A subscriber whose subscriptions end when the test says so, as an
/// adapter's do when it gives up on one.
struct Ending {
    inner: Arc<dyn Subscriber>,
    ends: std::sync::Mutex<Vec<oneshot::Sender<()>>>,
}

impl Ending {
    /// Ends the latest subscription.
    fn end_latest(&self) {
        if let Some(end) = self.ends.lock().expect("not poisoned").pop() {
            let _ = end.send(());
        }
    }
}

struct EndingStream(futures::stream::TakeUntil<Box<dyn DeliveryStream>, oneshot::Receiver<()>>);

impl futures::Stream for EndingStream {
    type Item = tidings::Result<Delivery>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_next_unpin(cx)
    }
}

impl DeliveryStream for EndingStream {
    fn close(&mut self) -> BoxFuture<'_, tidings::Result<()>> {
        self.0.get_mut().close()
    }
}

#[async_trait::async_trait]
impl Subscriber for Ending {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> tidings::Capabilities {
        self.inner.capabilities()
    }
    async fn subscribe(
        &self,
        subscription: Subscription,
    ) -> tidings::Result<Box<dyn DeliveryStream>> {
        let stream = self.inner.subscribe(subscription).await?;
        let (end, ended) = oneshot::channel();
        self.ends.lock().expect("not poisoned").push(end);
        Ok(Box::new(EndingStream(stream.take_until(ended))))
    }
    fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        self.inner.dead_letter_topic(topic, group)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_consumer_is_restarted_by_policy_then_takes_the_app_down() {
    let bus = MemoryBus::new();
    let ending = Arc::new(Ending {
        inner: bus.subscriber(),
        ends: Default::default(),
    });
    let topic = unique("restart");
    let handled = Arc::new(AtomicUsize::new(0));
    let consumer = counting(
        tidings::Consumer::group(ending.clone(), "g"),
        &topic,
        &handled,
    );
    let app = App::new()
        .without_signals()
        .restart(Restart::up_to(1, Duration::from_millis(10)))
        .consumer("g", consumer);
    let health = app.health();
    let running = tokio::spawn(app.run());
    within(10, "the app to start", health.started()).await;
    let publisher = bus.publisher();
    let handled_n = |n: usize| {
        let handled = handled.clone();
        async move {
            while handled.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    publisher
        .publish_event(&topic, Event::new(1u64))
        .await
        .expect("published");
    within(10, "the first message", handled_n(1)).await;

    // The first end: started again, and it handles what comes next.
    ending.end_latest();
    within(10, "a second subscription", async {
        while ending.ends.lock().expect("not poisoned").is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let report = until(&health, 10, "running again", |r| r.ready).await;
    assert_eq!(state_of(&report, "g"), State::Running);
    publisher
        .publish_event(&topic, Event::new(2u64))
        .await
        .expect("published");
    within(10, "the message after the restart", handled_n(2)).await;

    // The second end is one more than the policy allows: the app stops
    // with an error that names the consumer.
    ending.end_latest();
    let error = within(10, "the app to stop", running)
        .await
        .expect("joined")
        .expect_err("a consumer that ended twice takes the app down");
    let text = error.to_string();
    assert!(
        text.contains("`g`") && text.contains("1 consumer restart"),
        "{text}"
    );
}

/// A one-broker Kafka mock cluster on its own thread (its handle is not
/// `Send`), taken down and up on command.
fn kafka_cluster() -> (String, std::sync::mpsc::Sender<bool>) {
    let (up_tx, up_rx) = std::sync::mpsc::channel::<bool>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let cluster = rdkafka::mocking::MockCluster::new(1)
            .unwrap_or_else(|e| panic!("cannot start librdkafka's mock cluster: {e}"));
        let _ = addr_tx.send(cluster.bootstrap_servers());
        // Ends (and drops the cluster) when the test drops its sender.
        while let Ok(up) = up_rx.recv() {
            let changed = if up {
                cluster.broker_up(1)
            } else {
                cluster.broker_down(1)
            };
            changed.unwrap_or_else(|e| panic!("the mock broker did not change: {e}"));
        }
    });
    let bootstrap = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the Kafka mock cluster did not start: {e}"));
    (bootstrap, up_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker_on_kafka() {
    let (bootstrap, broker_up) = kafka_cluster();
    let bus = tidings::connect(format!("kafka://{bootstrap}"))
        .await
        .expect("the mock cluster");
    let app = App::new().without_signals().bus(&bus);
    let health = app.health();
    let stop = app.shutdown_handle();
    let running = tokio::spawn(app.run());
    within(10, "the app to start", health.started()).await;
    until(&health, 15, "ready", |r| r.ready).await;
    broker_up.send(false).expect("the cluster thread");
    let down = until(&health, 15, "not ready while the broker is down", |r| {
        !r.ready
    })
    .await;
    assert_eq!(state_of(&down, "kafka"), State::Reconnecting, "{down:?}");
    broker_up.send(true).expect("the cluster thread");
    until(&health, 30, "ready again", |r| r.ready).await;
    stop.shutdown();
    within(30, "the app to stop", running)
        .await
        .expect("joined")
        .expect("a stop");
}
