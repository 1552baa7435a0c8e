//! Publish, then wait until a given group handled the message — for tests,
//! scripts and request-shaped workflows. The consuming group runs the
//! `NotifyHandled` layer. Run with `cargo run --example publish_and_wait`.

use std::time::Duration;

use tidings::layers::prelude::*;
use tidings::prelude::*;

/// Publishes a task, waits for the `workers` group to finish it, and returns
/// whether the work was done by the time the wait returned.
pub async fn demo(bus: &Bus, ns: &str) -> tidings::Result<bool> {
    let topic = format!("{ns}thumbnail.requested");
    let group = format!("{ns}workers");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let consumer = bus
        .consumer(&group)
        .layer(NotifyHandled::new(bus.publisher().clone()))
        .handle(&topic, move |_: Event<String>| {
            let d = d.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await; // the work
                d.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
        })
        .start()
        .await?;
    let message = Event::new("cat.png".to_owned()).into_message()?;
    publish_and_wait(
        &**bus.publisher(),
        &**bus.subscriber(),
        &topic,
        message,
        &group,
        Duration::from_secs(30),
    )
    .await?;
    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
    consumer.shutdown(Duration::from_secs(5)).await;
    Ok(finished)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> tidings::Result<()> {
    let bus = tidings::connect(std::env::var("TIDINGS_URL").unwrap_or_else(|_| "memory://".into()))
        .await?;
    let finished = demo(&bus, "").await?;
    println!("published, and the workers group handled it: {finished}");
    Ok(())
}
