//! The `tracing` logs: fields on every handler log line, no payload unless asked.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidings_core::middleware::LayeredPublisher;
use tidings_core::{Consumer, Event, HandlerError, Message, Publisher};
use tidings_memory::MemoryBus;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

/// Runs one publish → handle with a `tracing` subscriber on this thread
/// (the test runtime is single-threaded) and returns what was logged.
async fn logged(payloads: bool) -> (String, Message) {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let o = common::otel(|b| if payloads { b.log_payloads(64) } else { b });
    let bus = MemoryBus::new();
    let publisher =
        LayeredPublisher::new(bus.publisher()).layer(Arc::new(o.telemetry.publish_layer("memory")));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = Consumer::group(bus.subscriber(), "billing")
        .layer(o.telemetry.process_layer("memory"))
        .handle("orders", move |_: Event<serde_json::Value>| {
            tracing::info!("charging the card");
            let _ = done_tx.send(());
            async { Ok::<_, HandlerError>(()) }
        })
        .start()
        .await
        .expect("start");
    let message = Message::new(r#"{"card":"4111-secret"}"#)
        .with_type("order.placed")
        .with_correlation_id("corr-9")
        .with_header("authorization", "Bearer hunter2");
    publisher
        .publish("orders", message.clone())
        .await
        .expect("publish");
    tokio::time::timeout(common::WAIT, done_rx.recv())
        .await
        .expect("handled")
        .expect("signal");
    o.wait_spans("process orders", 1).await;
    consumer.shutdown(Duration::from_secs(5)).await;
    (buffer.text(), message)
}

#[tokio::test]
async fn handler_logs_carry_the_message_fields_and_no_payload() {
    let (text, message) = logged(false).await;
    let line = text
        .lines()
        .find(|l| l.contains("charging the card"))
        .unwrap_or_else(|| panic!("no handler line in:\n{text}"));
    for field in [
        format!("message_id={}", message.id),
        "event_type=\"order.placed\"".to_owned(),
        "topic=\"orders\"".to_owned(),
        "group=\"billing\"".to_owned(),
        "attempt=1".to_owned(),
        "correlation_id=\"corr-9\"".to_owned(),
        "trace_id=".to_owned(),
    ] {
        assert!(line.contains(&field), "`{field}` missing from: {line}");
    }
    assert!(text.contains("message published"), "{text}");
    assert!(text.contains("message handled"), "{text}");
    assert!(!text.contains("4111-secret"), "payload logged:\n{text}");
    assert!(!text.contains("hunter2"), "header logged:\n{text}");
}

#[tokio::test]
async fn payloads_are_logged_only_when_asked() {
    let (text, _) = logged(true).await;
    assert!(text.contains("4111-secret"), "payload not logged:\n{text}");
    assert!(!text.contains("hunter2"), "header logged:\n{text}");
}
