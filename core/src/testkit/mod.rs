//! Test support: the conformance suite, a recording publisher and a TCP fault proxy.
//!
//! - [`conformance`]: the executable specification every adapter runs
//!   against its real broker, through [`conformance_tests!`](crate::conformance_tests).
//! - [`RecordingPublisher`]: a publisher that keeps what a service published,
//!   for the service's own unit tests.
//! - [`FaultProxy`]: a TCP proxy between a client and a broker that cuts,
//!   refuses or stalls connections on command.
//! - [`hostile`]: the check that a message any other client wrote cannot
//!   wedge a consumer, for each adapter's hostile-input tests.
//! - [`outage`]: broker kills and restarts under a stream of confirmed
//!   publishes, measured (lost, duplicated, time to resume).
//! - [`interop`]: the Tidings side of a test against another language's client.
//! - [`ChildProcess`]: a plain Node.js peer of an interop test, or a service
//!   binary to signal.
//! - [`ScriptedSubscriber`]: a subscriber without a broker that hands out
//!   queued messages and records (or refuses) their settlements.
//! - `Pki` (feature `testkit-tls`): a CA and certificates made for a test,
//!   for brokers the test starts with TLS.

pub mod conformance;
pub mod hostile;
pub mod interop;
pub mod outage;
#[cfg(feature = "testkit-tls")]
mod pki;
mod process;
mod proxy;
mod recording;
mod scripted;
mod server;

#[cfg(feature = "testkit-tls")]
pub use pki::Pki;
pub use process::ChildProcess;
pub use proxy::FaultProxy;
pub use recording::RecordingPublisher;
pub use scripted::ScriptedSubscriber;
pub use server::{ServerProcess, dies_with_parent};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Publisher, Subscriber};

/// How the conformance suite reaches the adapter under test.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// A fresh publisher and subscriber on the broker under test. Called
    /// once or more per test; each pair should be independent connections.
    async fn connect(&self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>);

    /// Makes `topic` usable, where the broker needs it (Kafka topics,
    /// JetStream stream subjects). Topics are unique per test.
    async fn prepare(&self, topic: &str) {
        let _ = topic;
    }

    /// Cuts every connection to the broker (or restarts it) once, while the
    /// clients from [`connect`](Harness::connect) are in use. Returns
    /// `false` where the harness cannot, and the reconnect test then does not apply.
    async fn disrupt(&self) -> bool {
        false
    }
}

/// A loopback port that was free a moment ago, for a server a test starts
/// (another process may take it meanwhile; servers that fail to bind make
/// the test fail, not pass). Never the same port twice in one process: a
/// port handed out is not bound until its server starts, so the tests of
/// one binary running side by side (or one server's client and cluster
/// ports) could otherwise be given the same one, and a server killed for
/// an outage leaves its port free for another test to take.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Below Linux's ephemeral range (32768 and up by default), not from it:
    // a server a test kills and restarts would otherwise find its port
    // taken by a client's connection — a client reconnecting to the dead
    // port can even be given that very port as its own and connect to
    // itself (TCP simultaneous open). Seen: a Redis master restarted by an
    // outage test never came back.
    for _ in 0..200 {
        let port = fastrand::u16(20_000..32_768);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    given.push(port);
    port
}

/// A topic name unique to this test run: `tk-<name>-<random>`.
pub fn unique(name: &str) -> String {
    format!("tk-{name}-{:08x}", fastrand::u32(..))
}

/// Awaits `future`, failing the test with `what` if it takes longer than `secs` seconds.
pub async fn within<T>(secs: u64, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {secs} s waiting for {what}"),
    }
}

/// Publishes one message to a fresh topic and receives it through a
/// subscription of `group` (a private one for `None`): checks its id and
/// payload, and acks it. A smoke test of a connection (TLS, say), for
/// brokers where a subscription made before the publish receives it without
/// preparing the topic (Redis, RabbitMQ, core NATS, the in-process bus; not
/// Kafka or JetStream, whose topics a [`Harness::prepare`] makes).
///
/// # Panics
/// When a step fails or takes longer than 10 s: in a test, that is the
/// failure to report.
pub async fn round_trip(
    publisher: &dyn Publisher,
    subscriber: &dyn Subscriber,
    group: Option<&str>,
) {
    use futures::StreamExt;

    let topic = unique("round-trip");
    let subscription = match group {
        Some(group) => crate::Subscription::group(&topic, group),
        None => crate::Subscription::private(&topic),
    };
    let mut stream = within(10, "subscribing", subscriber.subscribe(subscription))
        .await
        .expect("subscribe");
    let message = crate::Message::new("round trip");
    within(10, "publishing", publisher.publish(&topic, message.clone()))
        .await
        .expect("publish");
    let mut delivery = within(10, "the message", stream.next())
        .await
        .expect("the stream ended")
        .expect("a delivery");
    assert_eq!(delivery.message().id, message.id);
    assert_eq!(&delivery.message().payload[..], b"round trip");
    delivery.ack().await.expect("ack");
}

/// Checks that `connect` fails with [`Error::Config`](crate::Error::Config)
/// naming `key` for each `(url, key)` case, within 10 s each.
///
/// # Panics
/// On another outcome: in a test, that is the failure to report.
pub async fn assert_config_errors<T, F, Fut>(cases: &[(String, &str)], connect: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = crate::Result<T>>,
{
    for (url, key) in cases {
        match within(10, "a configuration error", connect(url.clone())).await {
            Err(crate::Error::Config { key: k, .. }) => assert_eq!(&k, key, "{url}"),
            Err(other) => {
                panic!("{url}: expected a configuration error naming {key}, got {other:?}")
            }
            Ok(_) => panic!("{url}: connected; expected a configuration error naming {key}"),
        }
    }
}
