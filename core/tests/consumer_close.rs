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

/// Hands out one stream, then fails: a second topic's subscription fails.
struct FailsSecond(Mutex<Option<Closing>>);

#[async_trait]
impl Subscriber for FailsSecond {
    fn name(&self) -> &'static str {
        "stub"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::full()
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        match self.0.lock().expect("lock").take() {
            Some(stream) => Ok(Box::new(stream)),
            None => Err(tidings_core::Error::Config {
                key: "topic".into(),
                message: format!("cannot subscribe to `{}`", subscription.topic),
            }),
        }
    }

    fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        format!("{topic}.{group}.dlq")
    }
}

#[tokio::test]
async fn a_failed_start_shuts_down_the_topics_it_had_started() {
    let (entered_tx, mut entered) = oneshot::channel();
    let subscriber = Arc::new(FailsSecond(Mutex::new(Some(Closing {
        entered: Some(entered_tx),
        release: None,
    }))));
    let started = Consumer::group(subscriber, "g")
        .handle("a", |_: Event<String>| async { Ok(()) })
        .handle("b", |_: Event<String>| async { Ok(()) })
        .start()
        .await;
    let Err(error) = started else {
        panic!("the second subscription fails, so start fails");
    };
    assert!(error.to_string().contains("cannot subscribe"), "{error}");
    // The first topic's stream was closed before `start` returned: on this
    // one-thread runtime its tasks could not have run since.
    assert!(
        entered.try_recv().is_ok(),
        "the first topic was still subscribed after start failed"
    );
}
