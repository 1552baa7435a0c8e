use std::sync::Arc;
use tidings_core::{Consumer, HandlerError, Subscriber};

async fn handler(_name: String) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {
    let subscriber: Arc<dyn Subscriber> = tidings_memory::MemoryBus::new().subscriber();
    let _ = Consumer::group(subscriber, "g").handle("t", handler);
}
