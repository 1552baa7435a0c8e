//! The HTTP endpoint an [`App`](super::App) serves for container
//! platforms and Prometheus: `/healthz` (liveness), `/readyz` (readiness),
//! each a JSON [`HealthReport`](super::HealthReport) with 200 or 503, and
//! `/metrics` when the bus has Prometheus metrics.

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::health::{HealthReport, ServiceHealth};

#[derive(Clone)]
struct Served {
    health: ServiceHealth,
    #[cfg(feature = "prometheus")]
    metrics: Option<crate::metrics::Metrics>,
}

/// What the endpoint serves: the app's health and, with the `prometheus`
/// feature, the bus's metrics.
pub(crate) struct Endpoint {
    pub(crate) health: ServiceHealth,
    #[cfg(feature = "prometheus")]
    pub(crate) metrics: Option<crate::metrics::Metrics>,
}

/// Serves until `stop` resolves, then finishes the requests in progress.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    endpoint: Endpoint,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let served = Served {
        health: endpoint.health,
        #[cfg(feature = "prometheus")]
        metrics: endpoint.metrics,
    };
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(served);
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
}

async fn healthz(State(served): State<Served>) -> Response {
    probe(&served, |r| r.live).await
}

async fn readyz(State(served): State<Served>) -> Response {
    probe(&served, |r| r.ready).await
}

/// The health report, 200 when `passes` says so, 503 otherwise.
async fn probe(served: &Served, passes: impl Fn(&HealthReport) -> bool) -> Response {
    let report = served.health.report().await;
    let status = if passes(&report) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

#[cfg_attr(not(feature = "prometheus"), allow(unused_variables))]
async fn metrics(State(served): State<Served>) -> Response {
    #[cfg(feature = "prometheus")]
    if let Some(metrics) = &served.metrics {
        return (
            [(header::CONTENT_TYPE, crate::metrics::Metrics::CONTENT_TYPE)],
            metrics.encode(),
        )
            .into_response();
    }
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "no metrics here: set `[telemetry] prometheus = true` (cargo feature `prometheus`)\n",
    )
        .into_response()
}
