use std::sync::Arc;
use tidings_core::{Consumer, Event, Subscriber};

#[derive(Debug)]
struct MailError;

async fn handler(_e: Event<String>) -> Result<(), MailError> {
    Err(MailError)
}

fn main() {
    let subscriber: Arc<dyn Subscriber> = tidings_memory::MemoryBus::new().subscriber();
    let _ = Consumer::group(subscriber, "g").handle("t", handler);
}
