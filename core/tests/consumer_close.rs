//! `Consumer::shutdown` returns only after the adapter finished closing
//! (`DeliveryStream::closed`), so a member that takes over next starts after
//! what this one settled (Kafka: after its final commit and leaving the group).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tidings_core::{
    Capabilities, Consumer, Delivery, DeliveryStream, Event, Result, Subscriber, Subscription,
};
use tokio::sync::oneshot;

/// A stream that never delivers and finishes closing when told to.
struct Closing {
    entered: Option<oneshot::Sender<()>>,
    release: Option<oneshot::Receiver<()>>,
}

impl Stream for Closing {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Pending
    }
}

impl DeliveryStream for Closing {
    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn closed(&mut self) -> BoxFuture<'_, ()> {
        let entered = self.entered.take();
        let release = self.release.take();
        Box::pin(async move {
            if let Some(entered) = entered {
                let _ = entered.send(());
            }
            if let Some(release) = release {
                let _ = release.await;
            }
        })
    }
}

struct OneStream(Mutex<Option<Closing>>);

#[async_trait]
impl Subscriber for OneStream {
    fn name(&self) -> &'static str {
        "stub"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::full()
    }

    async fn subscribe(&self, _: Subscription) -> Result<Box<dyn DeliveryStream>> {
        let stream = self
            .0
            .lock()
            .expect("lock")
            .take()
            .expect("one subscription");
        Ok(Box::new(stream))
    }

    fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        format!("{topic}.{group}.dlq")
    }
}

#[tokio::test]
async fn shutdown_waits_until_the_stream_finished_closing() {
    let (entered_tx, entered) = oneshot::channel();
    let (release, release_rx) = oneshot::channel();
    let subscriber = Arc::new(OneStream(Mutex::new(Some(Closing {
        entered: Some(entered_tx),
        release: Some(release_rx),
    }))));
    let consumer = Consumer::group(subscriber, "g")
        .handle("t", |_: Event<String>| async { Ok(()) })
        .start()
        .await
        .expect("started");

    let shutdown = tokio::spawn(consumer.shutdown(Duration::from_secs(30)));
    tokio::time::timeout(Duration::from_secs(10), entered)
        .await
        .expect("shutdown reaches closed() in time")
        .expect("signalled");
    // The stream has not finished closing, so neither has shutdown.
    tokio::task::yield_now().await;
    assert!(
        !shutdown.is_finished(),
        "shutdown returned before the stream closed"
    );

    release.send(()).expect("release");
    let report = tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown ends once the stream closed")
        .expect("joined");
    assert!(report.drained);
}

#[tokio::test]
async fn the_default_closed_resolves_at_once() {
    struct Plain(futures::stream::Pending<Result<Delivery>>);
    impl Stream for Plain {
        type Item = Result<Delivery>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_next_unpin(cx)
        }
    }
    impl DeliveryStream for Plain {
        fn close(&mut self) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }
    let mut plain = Plain(futures::stream::pending());
    tokio::time::timeout(Duration::from_secs(1), plain.closed())
        .await
        .expect("resolves at once");
}
