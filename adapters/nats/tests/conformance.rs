//! The conformance suite against the real nats-server on 127.0.0.1:4222,
//! in both modes: JetStream (at least once) and core NATS (at most once).
//!
//! Every client goes through a [`FaultProxy`], so `disrupt` can cut every
//! connection for the reconnect test.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tidings_core::testkit::{FaultProxy, Harness};
use tidings_core::{Publisher, Subscriber};
use tidings_nats::{NatsBus, NatsConfig};

mod support;

const SERVER: &str = "127.0.0.1:4222";

/// Lists every conformance test but `round_trip`: its 1 MiB payload plus
/// headers exceeds the 1 MiB `max_payload` of a default nats-server, so it
/// runs against a server of its own with a larger limit (below).
macro_rules! all_but_round_trip {
    ($harness:expr) => {
        tidings_core::conformance_tests!(@cases $harness;
            volume, isolation, fan_out, competing_consumers,
            nack_redelivers_with_rising_attempt, delayed_nack_waits,
            dead_letter_after_max_attempts, undecodable_payload_dead_lettered,
            retained_for_declared_group, replay_from_earliest, order_per_key,
            slow_key_holds_up_only_itself, in_flight_bound, close_and_reopen_under_load, shutdown_drains_in_flight,
            reconnect, api_contract, panicking_handler_is_retried);
    };
}

struct Nats {
    proxy: FaultProxy,
    core: bool,
    /// `?options` added to the URL.
    options: &'static str,
    /// Keeps a test's own server alive.
    _server: Option<support::Server>,
}

impl Nats {
    async fn new(core: bool) -> Self {
        Self::with(SERVER, core, "", None).await
    }

    async fn with(
        server: &str,
        core: bool,
        options: &'static str,
        own: Option<support::Server>,
    ) -> Self {
        let proxy = FaultProxy::start(server.to_owned())
            .await
            .expect("starting the fault proxy");
        Nats {
            proxy,
            core,
            options,
            _server: own,
        }
    }

    /// A server of its own whose `max_payload` fits a 1 MiB payload and its headers.
    async fn big_payloads(core: bool) -> Self {
        let server = support::Server::start(Some("max_payload: 4194304\n")).await;
        Self::with(&server.addr(), core, "", Some(server)).await
    }
}

#[async_trait]
impl Harness for Nats {
    async fn connect(&self) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
        let mut config = NatsConfig::from_url(&format!(
            "nats://{}?max_age=1h&connect_timeout=3s{}",
            self.proxy.addr(),
            self.options
        ))
        .expect("config");
        if self.core {
            config = config.core();
        }
        let bus = NatsBus::connect(config).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach nats-server with JetStream at {SERVER} ({e}); start it with \
                 `nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/nats-js &`"
            )
        });
        (bus.publisher(), bus.subscriber())
    }

    async fn disrupt(&self) -> bool {
        self.proxy.cut();
        // Let the clients notice before the next publishes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        true
    }
}

mod jetstream {
    use super::*;
    all_but_round_trip!(Nats::new(false).await);
    tidings_core::conformance_tests!(@cases Nats::big_payloads(false).await; round_trip);
}

mod core {
    use super::*;
    all_but_round_trip!(Nats::new(true).await);
    tidings_core::conformance_tests!(@cases Nats::big_payloads(true).await; round_trip);
}

/// JetStream with one shared stream capturing `tidingstest.>`.
mod shared_stream {
    use super::*;
    tidings_core::conformance_tests!(@cases
        Nats::with(SERVER, false, "&stream=TIDINGS_CONFORMANCE&subject_prefix=tidingstest", None).await;
        volume, isolation, fan_out, nack_redelivers_with_rising_attempt, delayed_nack_waits,
        dead_letter_after_max_attempts, undecodable_payload_dead_lettered,
        retained_for_declared_group, replay_from_earliest, in_flight_bound,
        close_and_reopen_under_load, reconnect);
}
