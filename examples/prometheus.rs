//! The Tidings metrics on a Prometheus endpoint.
//!
//! The otel layers on the in-process bus feed an OpenTelemetry meter provider
//! whose reader is the `opentelemetry-prometheus` exporter; each
//! `GET /metrics` encodes its registry in the Prometheus text format. A small
//! loop publishes an `order.placed` every 100 ms; the handler fails one
//! message in five with a retryable error (retried once after 50 ms) so that
//! the `retry` outcome shows up next to `ack`.
//!
//! Run with `cargo run --example prometheus --features otel [-- <seconds>]`
//! (default 60 s, or until Ctrl-C) and scrape
//! `curl http://127.0.0.1:9464/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder as _, Registry, TextEncoder};
use tidings::memory::MemoryBus;
use tidings::middleware::LayeredPublisher;
use tidings::otel::Telemetry;
use tidings::prelude::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Where the metrics are served.
const ADDR: &str = "127.0.0.1:9464";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let seconds: u64 = match std::env::args().nth(1) {
        Some(s) => s
            .parse()
            .map_err(|_| format!("not a number of seconds: {s}"))?,
        None => 60,
    };

    // The meter provider, read by the Prometheus exporter into `registry`.
    let registry = Registry::new();
    let reader = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()?;
    let provider = SdkMeterProvider::builder().with_reader(reader).build();
    let telemetry = Telemetry::builder()
        .meter(provider.meter("prometheus-example"))
        .max_attempts(3)
        .build();

    // The in-process bus with the otel layers, a consumer and a publish loop.
    let bus = MemoryBus::new();
    let system = bus.subscriber().name();
    let publisher =
        LayeredPublisher::new(bus.publisher()).layer(Arc::new(telemetry.publish_layer(system)));
    let handled = Arc::new(AtomicU64::new(0));
    let counter = handled.clone();
    let consumer = Consumer::group(bus.subscriber(), "billing")
        .layer(telemetry.process_layer(system))
        .retry(RetryPolicy::new(3).with_backoff(tidings::Backoff::fixed(Duration::from_millis(50))))
        .handle("order.placed", move |e: Event<serde_json::Value>| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            async move {
                if n % 5 == 4 && e.attempt() == 1 {
                    return Err(HandlerError::retryable("payment service busy"));
                }
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await?;
    let publishing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for n in 0u64.. {
            tick.tick().await;
            let order = Message::new(format!(r#"{{"order":{n}}}"#)).with_type("order.placed");
            if let Err(e) = publisher.publish("order.placed", order).await {
                eprintln!("publish failed: {e}");
            }
        }
    });

    let listener = TcpListener::bind(ADDR).await?;
    println!("metrics on http://{ADDR}/metrics for {seconds} s (Ctrl-C to stop)");
    let serving = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let registry = registry.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, &registry).await {
                            eprintln!("scrape failed: {e}");
                        }
                    });
                }
                Err(e) => eprintln!("accept failed: {e}"),
            }
        }
    };
    tokio::select! {
        _ = serving => {}
        _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
        _ = tokio::signal::ctrl_c() => {}
    }

    publishing.abort();
    consumer.shutdown(Duration::from_secs(5)).await;
    println!("handled {} deliveries", handled.load(Ordering::Relaxed));
    provider.shutdown()?;
    Ok(())
}

/// Answers one HTTP/1.1 request: `GET /metrics` with the registry in the
/// Prometheus text format, anything else with 404. One request per
/// connection; the request head is bounded in size and time.
async fn serve(mut stream: TcpStream, registry: &Registry) -> Result<(), BoxError> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > 16 * 1024 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await??;
    let request_line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, content_type, body) =
        if request_line.starts_with(b"GET /metrics ") || request_line == b"GET /metrics" {
            let encoder = TextEncoder::new();
            let mut body = Vec::new();
            encoder.encode(&registry.gather(), &mut body)?;
            ("200 OK", encoder.format_type().to_owned(), body)
        } else {
            (
                "404 Not Found",
                "text/plain".to_owned(),
                b"try /metrics\n".to_vec(),
            )
        };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await?;
    Ok(())
}
