use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use crate::codec::{Codec, Json};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::publisher::{Publisher, Receipt};

/// A publisher that records what is published instead of sending it, for
/// unit tests of code that publishes.
///
/// ```
/// use tidings_core::testkit::RecordingPublisher;
/// use tidings_core::{Event, PublisherExt};
/// # #[tokio::main] async fn main() {
/// let recorder = RecordingPublisher::new();
/// recorder.publish_event("order.placed", Event::new(42u32)).await.unwrap();
/// assert_eq!(recorder.decoded::<u32>("order.placed"), vec![42]);
/// # }
/// ```
#[derive(Debug, Default)]
pub struct RecordingPublisher {
    published: Mutex<Vec<(String, Message)>>,
    closed: AtomicBool,
}

impl RecordingPublisher {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Message)>> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything published, in order, with its topic.
    pub fn published(&self) -> Vec<(String, Message)> {
        self.lock().clone()
    }

    /// The messages published to `topic`, in order.
    pub fn messages(&self, topic: &str) -> Vec<Message> {
        self.lock()
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// The payloads published to `topic`, decoded as JSON.
    ///
    /// # Panics
    /// If a payload does not decode into `T`: in a test, that is the failure to report.
    pub fn decoded<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        topic: &str,
    ) -> Vec<T> {
        self.messages(topic)
            .iter()
            .map(|m| match <Json as Codec<T>>::decode(&m.payload) {
                Ok(value) => value,
                Err(e) => panic!("a message on `{topic}` does not decode: {e}"),
            })
            .collect()
    }

    /// Forgets everything recorded.
    pub fn clear(&self) {
        self.lock().clear();
    }
}

#[async_trait]
impl Publisher for RecordingPublisher {
    async fn publish(&self, topic: &str, message: Message) -> Result<Receipt> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("publisher"));
        }
        self.lock().push((topic.to_owned(), message));
        Ok(Receipt::Accepted)
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}
