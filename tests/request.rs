//! Request/reply on every broker: a request handler's return value comes
//! back to the caller that awaits it, correlated by the request's id; a
//! handler that fails for good answers with its error; nobody answering is
//! a timeout.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::Error;
use tidings::prelude::*;
use tidings::testkit::unique;
use tidings_tests::kafka_mock;

#[derive(Debug, Serialize, Deserialize)]
struct Quote {
    item: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Price {
    item: String,
    cents: u64,
}

async fn request_and_reply(url: &str) {
    let bus = tidings::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}; scripts/brokers.sh starts the brokers"));
    let topic = unique("price.quote");
    let pricing = bus
        .consumer("pricing")
        .handle_request(&topic, |q: Event<Quote>| async move {
            if q.data.item == "unobtainium" {
                return Err(HandlerError::permanent("we do not sell unobtainium"));
            }
            Ok(Price {
                item: q.data.item,
                cents: 700,
            })
        })
        .start()
        .await
        .expect("started");
    let requester = bus
        .requester(unique("replies.checkout"))
        .await
        .expect("requester");

    let request = Event::new(Quote { item: "tea".into() });
    let id = request.id().to_owned();
    let reply: Event<Price> = requester
        .request(&topic, request, Duration::from_secs(30))
        .await
        .expect("a reply");
    assert_eq!(
        reply.data,
        Price {
            item: "tea".into(),
            cents: 700
        }
    );
    assert_eq!(
        reply.metadata().correlation_id.as_deref(),
        Some(id.as_str())
    );

    // Several at once, each answered to its own caller.
    let calls = ["a", "b", "c", "d"].map(|item| {
        requester.request::<_, Price, _>(
            &topic,
            Event::new(Quote { item: item.into() }),
            Duration::from_secs(30),
        )
    });
    let replies = futures::future::join_all(calls).await;
    let items: Vec<String> = replies
        .into_iter()
        .map(|r| r.expect("a reply").data.item)
        .collect();
    assert_eq!(items, ["a", "b", "c", "d"]);

    let refused = requester
        .request::<_, Price, _>(
            &topic,
            Event::new(Quote {
                item: "unobtainium".into(),
            }),
            Duration::from_secs(30),
        )
        .await
        .expect_err("refused");
    assert!(
        refused.to_string().contains("we do not sell unobtainium"),
        "{refused}"
    );
    requester.close().await;
    pricing.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_memory() {
    request_and_reply("memory://").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis() {
    request_and_reply("redis://127.0.0.1:6379").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq() {
    request_and_reply("amqp://guest:guest@127.0.0.1:5672/%2f").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream() {
    request_and_reply("nats://127.0.0.1:4222").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    request_and_reply("postgres://postgres@127.0.0.1:5432/test?poll=100ms").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka() {
    request_and_reply(&format!("kafka://{}?auto_create_topics=true", kafka_mock())).await;
}

#[tokio::test]
async fn nobody_answering_is_a_timeout() {
    let bus = tidings::connect("memory://").await.expect("bus");
    let requester = bus.requester("replies.lonely").await.expect("requester");
    let error = requester
        .request::<_, Price, _>(
            "price.quote",
            Event::new(Quote { item: "tea".into() }),
            Duration::from_millis(200),
        )
        .await
        .expect_err("no reply");
    assert!(matches!(error, Error::Timeout { .. }), "{error}");
    requester.close().await;
}
