//! The Prometheus side of the library's OpenTelemetry metrics: a meter
//! provider whose reader is the `opentelemetry-prometheus` exporter, and
//! its registry encoded in the Prometheus text format for `/metrics`.
//!
//! [`connect`](crate::connect) builds one when the configuration says
//! `[telemetry] prometheus = true` and feeds the bus's telemetry layers
//! from it; [`App`](crate::App) serves it. A service adds its own
//! instruments to the same endpoint through [`Metrics::meter`].

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder as _, Registry, TextEncoder};

use tidings_core::{Error, Result};

/// A meter provider read by a Prometheus registry; clones share both.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    provider: SdkMeterProvider,
}

impl Metrics {
    /// A new provider and its registry.
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let reader = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|e| Error::Config {
                key: "telemetry.prometheus".into(),
                message: format!("the Prometheus exporter could not be built: {e}"),
            })?;
        let provider = SdkMeterProvider::builder().with_reader(reader).build();
        Ok(Metrics { registry, provider })
    }

    /// A meter for a scope (the service's name, a module's): its
    /// instruments appear on the same `/metrics`.
    pub fn meter(&self, scope: &'static str) -> Meter {
        self.provider.meter(scope)
    }

    /// Everything recorded so far, in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = Vec::new();
        // Encoding into memory fails only on metric families the registry
        // itself produced inconsistently; say so in the body rather than
        // failing the scrape silently.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut text) {
            return format!("# encoding the metrics failed: {e}\n");
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    /// The `Content-Type` of [`encode`](Metrics::encode)'s text.
    pub const CONTENT_TYPE: &'static str = "text/plain; version=0.0.4; charset=utf-8";
}
