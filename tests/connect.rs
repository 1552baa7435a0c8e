//! Every URL form connects to its broker; invalid ones fail with the key named.
#![allow(clippy::unwrap_used)]

use tidings::{Config, Error};
use tidings_tests::kafka_mock;

async fn broker_of(url: &str) -> &'static str {
    match tidings::connect(url).await {
        Ok(bus) => bus.subscriber().name(),
        Err(e) => panic!("cannot connect to {url}: {e}; start the brokers with scripts/brokers.sh"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_url_form_reaches_its_adapter() {
    assert_eq!(broker_of("memory://").await, "memory");
    assert_eq!(
        broker_of("redis://127.0.0.1:6379?mode=streams").await,
        "redis"
    );
    assert_eq!(
        broker_of("redis://127.0.0.1:6379?mode=pubsub").await,
        "redis"
    );
    assert_eq!(
        broker_of(
            "amqp://guest:guest@127.0.0.1:5672/%2f?exchange=tidings.connect-test&queue_expires=5m"
        )
        .await,
        "amqp"
    );
    assert_eq!(
        broker_of("nats://127.0.0.1:4222?jetstream=true").await,
        "nats"
    );
    assert_eq!(
        broker_of("nats://127.0.0.1:4222?jetstream=false").await,
        "nats"
    );
    assert_eq!(
        broker_of(&format!("kafka://{}", kafka_mock())).await,
        "kafka"
    );
}

async fn config_error(url: &str) -> (String, String) {
    match tidings::connect(url).await {
        Err(Error::Config { key, message }) => (key, message),
        Err(other) => panic!("{url}: expected a configuration error, got {other}"),
        Ok(_) => panic!("{url}: expected a configuration error, got a connection"),
    }
}

#[tokio::test]
async fn invalid_urls_name_the_key() {
    let (key, message) = config_error("carrier-pigeon://coop").await;
    assert_eq!(key, "url");
    assert!(
        message.contains("memory://") && message.contains("amqp://"),
        "{message}"
    );

    let (key, _) = config_error("amqp://guest:guest@127.0.0.1:5672/%2f?queue_type=fancy").await;
    assert_eq!(key, "queue_type");

    let (key, message) =
        config_error("amqp://guest:guest@127.0.0.1:5672/%2f?tls_ca_file=/etc/ca.pem").await;
    assert_eq!(
        key, "url",
        "TLS files without amqps:// are refused, not ignored"
    );
    assert!(message.contains("amqps://"), "{message}");

    let (key, _) = config_error("rediss://127.0.0.1:6379?tls_server_name=redis.internal").await;
    assert_eq!(key, "tls_server_name");

    let (key, message) = config_error("kafka://127.0.0.1:9092?tls_ca_file=/nowhere/ca.pem").await;
    assert_eq!(key, "tls_ca_file");
    assert!(message.contains("/nowhere/ca.pem"), "{message}");

    let (key, _) = config_error("memory://?colour=blue").await;
    assert_eq!(key, "colour");

    let (key, _) = config_error("redis://127.0.0.1:6379?mode=carrier").await;
    assert_eq!(key, "mode");

    let (key, _) = config_error("nats://127.0.0.1:4222?jetstream=maybe").await;
    assert_eq!(key, "jetstream");

    let (key, _) = config_error("kafka://127.0.0.1:9092?acks=some").await;
    assert_eq!(key, "acks");
}

#[tokio::test]
async fn credentials_stay_out_of_errors() {
    let err = tidings::connect("amqp://guest:hunter2@127.0.0.1:5672/%2f?queue_type=fancy")
        .await
        .err()
        .unwrap();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    let config = Config::from_url("amqp://guest:hunter2@127.0.0.1:5672/%2f");
    assert!(!format!("{config:?}").contains("hunter2"));
}

#[tokio::test]
async fn a_config_file_with_middleware_connects() {
    let config = Config::from_toml(
        r#"
        url = "memory://"
        [retry]
        max_attempts = 3
        mode = "in-process"
        [idempotency]
        store = "memory"
        ttl = "10m"
        [breaker]
        failures = 5
        [publish_retry]
        max_attempts = 2
        "#,
    )
    .unwrap();
    let bus = tidings::connect(&config).await.unwrap();
    assert_eq!(
        format!("{bus:?}"),
        "Bus { broker: \"memory\", retry: RetryPolicy { max_attempts: 3, backoff: Backoff { initial: 100ms, max: 30s, multiplier: 2.0, jitter: true } }, layers: 3, settle_observers: 0 }"
    );
}

/// `Bus::close` closes the adapter's connection as the adapter's own close
/// does (NATS drains it): afterwards nothing new can be started on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_close_closes_the_adapter_connection() {
    let bus = tidings::connect("nats://127.0.0.1:4222")
        .await
        .unwrap_or_else(|e| {
            panic!("nats-server must run on 127.0.0.1:4222 ({e}); scripts/brokers.sh starts it")
        });
    let topic = format!("tk-close-{:08x}", std::process::id());
    tidings::Publisher::publish(&bus, &topic, tidings::Message::new("before"))
        .await
        .expect("published before closing");
    tidings::Publisher::close(&bus).await.expect("closed");
    let after = bus
        .subscriber()
        .subscribe(tidings::Subscription::private(topic.as_str()))
        .await;
    assert!(
        after.is_err(),
        "the connection is closed, not only the publisher"
    );
}

/// `Bus::publisher_in` writes another dialect than the configured one,
/// still inside the configured publish layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_in_another_dialect() {
    use futures::StreamExt;
    use tidings::{Dialect, Message, Publisher};
    let config = Config::from_toml(
        "url = \"nats://127.0.0.1:4222?jetstream=false\"\n[publish_retry]\nmax_attempts = 2",
    )
    .unwrap();
    let bus = tidings::connect(config)
        .await
        .unwrap_or_else(|e| panic!("NATS on 127.0.0.1:4222 ({e}); scripts/brokers.sh starts it"));
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let subject = tidings::testkit::unique("dialects");
    let mut raw = client.subscribe(subject.clone()).await.unwrap();
    // In place at the server once a probe on the same connection comes
    // back (a flush only empties the socket buffer).
    client
        .publish(subject.clone(), "probe".into())
        .await
        .unwrap();
    let probe = tidings::testkit::within(10, "the probe", raw.next())
        .await
        .unwrap();
    assert_eq!(probe.payload.as_ref(), b"probe");

    let structured = bus.publisher_in(Dialect::CloudEventsStructured);
    structured
        .publish(
            &subject,
            Message::new(r#"{"n":1}"#).with_type("thing.happened"),
        )
        .await
        .unwrap();
    bus.publish(
        &subject,
        Message::new(r#"{"n":2}"#).with_type("thing.happened"),
    )
    .await
    .unwrap();

    let first = tidings::testkit::within(10, "the structured event", raw.next())
        .await
        .unwrap();
    let headers = first.headers.clone().unwrap_or_default();
    let content_type = headers
        .get("Content-Type")
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/cloudevents+json"),
        "{headers:?}"
    );
    let event: serde_json::Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["type"], "thing.happened");
    assert_eq!(event["data"]["n"], 1);

    let second = tidings::testkit::within(10, "the binary event", raw.next())
        .await
        .unwrap();
    assert_eq!(
        second.payload.as_ref(),
        br#"{"n":2}"#,
        "the configured dialect"
    );
    let headers = second.headers.clone().unwrap_or_default();
    assert!(
        headers.get("ce-type").is_some() || headers.get("ce_type").is_some(),
        "CloudEvents binary headers: {headers:?}"
    );
}

/// A third-party adapter joins `connect_with` through the registry: its
/// scheme is known to the checks, and its bus gets the configured stack.
mod registry {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use futures::future::BoxFuture;
    use tidings::registry::{Adapter, Parts, Registry};
    use tidings::{Config, Error, Event, HandlerError, HealthCheck, PublisherExt};

    /// The in-process bus under the scheme `loopback`, counting connections.
    struct Loopback(Arc<AtomicU32>);

    impl Adapter for Loopback {
        fn schemes(&self) -> &'static [&'static str] {
            &["loopback"]
        }
        fn connect<'a>(&'a self, url: &'a str) -> BoxFuture<'a, tidings::Result<Parts>> {
            assert!(url.starts_with("loopback://"), "{url}");
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {
                let bus = tidings::memory::MemoryBus::new();
                Ok(Parts::new(bus.publisher(), bus.subscriber(), Arc::new(bus)))
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_third_party_adapter_gets_the_configured_stack() {
        let connections = Arc::new(AtomicU32::new(0));
        let registry = Registry::builtin().register(Loopback(connections.clone()));
        assert!(registry.schemes().contains(&"loopback://".to_owned()));
        let config = Config::from_toml(
            "url = \"loopback://here\"\n[retry]\nmax_attempts = 2\ninitial_backoff = \"1ms\"\nmax_backoff = \"1ms\"",
        )
        .unwrap();
        let bus = tidings::connect_with(&registry, config).await.unwrap();
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        assert!(
            bus.check().await.is_ready(),
            "its health check is the bus's"
        );

        // The configured retry policy (two attempts) applies to its consumers.
        let attempts = Arc::new(AtomicU32::new(0));
        let dead = Arc::new(tokio::sync::Notify::new());
        let (seen, lettered) = (attempts.clone(), dead.clone());
        let consumer = bus
            .consumer("g")
            .handle("t", move |_: Event<u32>| {
                seen.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(HandlerError::retryable("always")) }
            })
            .on_settle(move |s| {
                if matches!(s.action, tidings::SettleAction::DeadLetter { .. }) {
                    lettered.notify_one();
                }
            })
            .start()
            .await
            .unwrap();
        bus.publish_event("t", Event::new(1u32)).await.unwrap();
        tidings::testkit::within(10, "the dead letter", dead.notified()).await;
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            2,
            "then dead-lettered, not retried"
        );
        consumer.shutdown(Duration::from_secs(5)).await;

        // The checks know it: no [tls] for it, and it is listed as allowed.
        let mut with_tls = Config::from_url("loopback://here");
        with_tls.tls = Some(Default::default());
        match tidings::connect_with(&registry, with_tls).await {
            Err(Error::Config { key, .. }) => assert_eq!(key, "tls"),
            other => panic!("expected a tls error, got {:?}", other.map(|_| ())),
        }
        match tidings::connect("loopback://here").await {
            Err(Error::Config { key, message }) => {
                assert_eq!(key, "url");
                assert!(
                    !message.contains("loopback://"),
                    "not a built-in: {message}"
                );
            }
            other => panic!("expected a url error, got {:?}", other.map(|_| ())),
        }
        match tidings::connect_with(&registry, "pigeon://coop").await {
            Err(Error::Config { message, .. }) => {
                assert!(
                    message.contains("loopback://") && message.contains("memory://"),
                    "{message}"
                )
            }
            other => panic!("expected a url error, got {:?}", other.map(|_| ())),
        }
    }
}
