//! Topology and settlement on the real RabbitMQ: wildcard routing, the
//! unroutable error, retry-queue delays, dead-letter queues, plain clients.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tidings_amqp::{AmqpBus, QueueType};
use tidings_core::testkit::{unique, within};
use tidings_core::{
    DeadLetter, DeadLetterReason, Delivery, DeliveryStream, Error, Message, Subscription,
};

async fn next(stream: &mut Box<dyn DeliveryStream>, what: &str) -> Delivery {
    match within(30, what, stream.next()).await {
        Some(Ok(d)) => d,
        other => panic!("waiting for {what}: {other:?}"),
    }
}

async fn nothing_within(stream: &mut Box<dyn DeliveryStream>, ms: u64) -> bool {
    tokio::time::timeout(Duration::from_millis(ms), stream.next())
        .await
        .is_err()
}

async fn raw() -> Connection {
    Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        ConnectionProperties::default(),
    )
    .await
    .expect("raw lapin connection")
}

/// A bus on its own exchange, so `#` sees only this test's messages.
async fn own_exchange_bus(queue_type: QueueType) -> (AmqpBus, String) {
    let exchange = unique("ex");
    let config = common::config(common::BROKER, queue_type).with_exchange(&exchange);
    (common::connect(config).await, exchange)
}

async fn cleanup(exchange: &str, queues: &[String]) {
    let conn = raw().await;
    let ch = conn.create_channel().await.expect("channel");
    for q in queues {
        for name in [q.clone(), format!("{q}.dlq")] {
            let _ = ch
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    for ex in [exchange.to_owned(), format!("{exchange}.dlx")] {
        let _ = ch
            .exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_patterns_route_like_rabbitmq() {
    let (bus, exchange) = own_exchange_bus(QueueType::Classic).await;
    let (p, s) = (bus.publisher(), bus.subscriber());
    let mut star = s
        .subscribe(Subscription::group("order.*", "wild-star"))
        .await
        .expect("sub");
    let mut hash = s
        .subscribe(Subscription::group("user.#", "wild-hash"))
        .await
        .expect("sub");
    let mut all = s
        .subscribe(Subscription::group("#", "wild-all"))
        .await
        .expect("sub");
    for topic in [
        "order.placed",
        "order.paid",
        "order.eu.placed",
        "user",
        "user.a.b",
        "misc",
    ] {
        p.publish(topic, Message::new(topic))
            .await
            .expect("publish");
    }
    let collect = async |stream: &mut Box<dyn DeliveryStream>, n: usize| {
        let mut topics = HashSet::new();
        for _ in 0..n {
            let mut d = next(stream, "a routed message").await;
            assert_eq!(d.message().payload, d.topic().as_bytes().to_vec());
            topics.insert(d.topic().to_owned());
            d.ack().await.expect("ack");
        }
        assert!(
            nothing_within(stream, 300).await,
            "an extra message arrived"
        );
        topics
    };
    let expect = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
    assert_eq!(
        collect(&mut star, 2).await,
        expect(&["order.placed", "order.paid"])
    );
    assert_eq!(collect(&mut hash, 2).await, expect(&["user", "user.a.b"]));
    assert_eq!(collect(&mut all, 6).await.len(), 6);
    for mut st in [star, hash, all] {
        st.close().await.expect("close");
    }
    bus.close().await;
    cleanup(
        &exchange,
        &[
            "wild-star.order.*".into(),
            "wild-hash.user.#".into(),
            "wild-all.#".into(),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_topic_is_an_error() {
    let bus = common::connect(common::config(common::BROKER, QueueType::Quorum)).await;
    let topic = unique("nobody-listens");
    let err = bus
        .publisher()
        .publish(&topic, Message::new("lost?"))
        .await
        .expect_err("no queue is bound");
    assert!(
        matches!(&err, Error::Unroutable { topic: t } if *t == topic),
        "{err:?}"
    );
    assert!(!err.is_transient());
    // Once a group is declared the same topic routes.
    bus.subscriber()
        .declare_group(&topic, "late")
        .await
        .expect("declare");
    bus.publisher()
        .publish(&topic, Message::new("kept"))
        .await
        .expect("routable now");
    // A batch reports per message.
    let other = unique("nobody-either");
    let results = bus
        .publisher()
        .publish_batch(&other, vec![Message::new("a"), Message::new("b")])
        .await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(Error::Unroutable { .. }))),
        "{results:?}"
    );
}

async fn retry_delay_reaches_only_the_nacking_group(queue_type: QueueType) {
    let bus = common::connect(common::config(common::BROKER, queue_type)).await;
    let (p, s) = (bus.publisher(), bus.subscriber());
    let topic = unique("retry");
    let mut nacker = s
        .subscribe(Subscription::group(&topic, "nacker"))
        .await
        .expect("sub");
    let mut bystander = s
        .subscribe(Subscription::group(&topic, "bystander"))
        .await
        .expect("sub");
    let m = Message::new("again").with_header("x-keep", "1");
    p.publish(&topic, m.clone()).await.expect("publish");
    let mut b = next(&mut bystander, "the bystander's copy").await;
    b.ack().await.expect("ack");
    let mut first = next(&mut nacker, "the first delivery").await;
    assert_eq!(first.attempt(), 1);
    let delay = Duration::from_millis(1500);
    let at = Instant::now();
    first.nack(Some(delay)).await.expect("nack with delay");
    let mut again = next(&mut nacker, "the delayed redelivery").await;
    let waited = at.elapsed();
    assert!(waited >= delay, "came back after {waited:?}");
    assert!(
        waited < delay + Duration::from_secs(5),
        "came back late: {waited:?}"
    );
    assert_eq!(again.message().id, m.id);
    assert_eq!(
        again.topic(),
        topic,
        "the original topic, not the retry queue"
    );
    assert_eq!(again.attempt(), 2);
    assert_eq!(
        again.message().headers.get("x-keep").map(String::as_str),
        Some("1")
    );
    // An immediate nack raises the attempt too (quorum: x-delivery-count; classic: the header).
    again.nack(None).await.expect("immediate nack");
    let mut third = next(&mut nacker, "the immediate redelivery").await;
    assert_eq!(third.attempt(), 3);
    third.ack().await.expect("ack");
    assert!(
        nothing_within(&mut bystander, 500).await,
        "the retry reached another group"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_delay_quorum() {
    retry_delay_reaches_only_the_nacking_group(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_delay_classic() {
    retry_delay_reaches_only_the_nacking_group(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_client_message_is_handled_with_defaults() {
    let bus = common::connect(common::config(common::BROKER, QueueType::Quorum)).await;
    let topic = unique("plain");
    let mut stream = bus
        .subscriber()
        .subscribe(Subscription::group(&topic, "plain"))
        .await
        .expect("sub");
    let conn = raw().await;
    let ch = conn.create_channel().await.expect("channel");
    // No headers, no message id, no properties at all.
    ch.basic_publish(
        "tidings-test".into(),
        topic.as_str().into(),
        BasicPublishOptions::default(),
        b"hello from lapin",
        BasicProperties::default(),
    )
    .await
    .expect("raw publish");
    let mut d = next(&mut stream, "the plain message").await;
    assert_eq!(d.message().payload, &b"hello from lapin"[..]);
    assert_eq!(d.attempt(), 1);
    let generated = d.message().id.clone();
    assert_eq!(generated.len(), 36, "a generated id");
    assert!(d.message().headers.is_empty());
    assert_eq!(
        d.message().metadata.event_type.as_deref(),
        Some(topic.as_str()),
        "the routing key says what it is"
    );
    assert_eq!(d.topic(), topic);
    // The id given at the first delivery survives a redelivery, so the
    // idempotency layer can recognise the message.
    d.nack(None).await.expect("nack");
    let mut again = next(&mut stream, "the plain message again").await;
    assert_eq!(again.message().id, generated);
    assert_eq!(again.attempt(), 2);
    again.ack().await.expect("ack");
    // With a message id and a content type, those are used.
    ch.basic_publish(
        "tidings-test".into(),
        topic.as_str().into(),
        BasicPublishOptions::default(),
        b"{}",
        BasicProperties::default()
            .with_message_id("plain-42".into())
            .with_content_type("application/json".into()),
    )
    .await
    .expect("raw publish");
    let mut d = next(&mut stream, "the second plain message").await;
    assert_eq!(d.message().id, "plain-42");
    assert_eq!(
        d.message().metadata.content_type.as_deref(),
        Some("application/json")
    );
    d.ack().await.expect("ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_land_in_the_group_dead_letter_queue() {
    let bus = common::connect(common::config(common::BROKER, QueueType::Quorum)).await;
    let topic = unique("dlq");
    let mut stream = bus
        .subscriber()
        .subscribe(Subscription::group(&topic, "dlg"))
        .await
        .expect("sub");
    let m = Message::new("poison");
    bus.publisher()
        .publish(&topic, m.clone())
        .await
        .expect("publish");
    let mut d = next(&mut stream, "the poison message").await;
    let now = std::time::SystemTime::now();
    d.dead_letter(DeadLetter {
        reason: DeadLetterReason::Permanent,
        error: "bad input".into(),
        attempts: 1,
        first_failure: Some(now),
        last_failure: now,
        topic: topic.clone(),
        group: Some("dlg".into()),
    })
    .await
    .expect("dead letter");
    // Nobody subscribed to the dead-letter topic: the letter waits in `<group>.<topic>.dlq`.
    let conn = raw().await;
    let ch = conn.create_channel().await.expect("channel");
    let queue = format!("dlg.{topic}.dlq");
    let got = within(10, "the dead letter in its queue", async {
        loop {
            if let Some(g) = ch
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("get")
            {
                return g;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let letter =
        tidings_amqp::headers::received(&got.delivery.properties, got.delivery.data.clone().into())
            .message;
    assert_eq!(letter.id, m.id);
    let info = DeadLetter::from_message(&letter).expect("reason headers");
    assert_eq!(info.reason, DeadLetterReason::Permanent);
    assert_eq!(info.error, "bad input");
    assert_eq!(info.group.as_deref(), Some("dlg"));
    assert_eq!(
        got.delivery.routing_key.as_str(),
        bus.subscriber().dead_letter_topic(&topic, "dlg")
    );
    // The original is gone from the group.
    assert!(nothing_within(&mut stream, 300).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_mode_checks_and_never_creates() {
    let exchange = unique("missing-ex");
    let mut config = common::config(common::BROKER, QueueType::Quorum).with_exchange(&exchange);
    config.passive = true;
    assert!(
        AmqpBus::connect(config.clone()).await.is_err(),
        "a missing exchange is an error in passive mode"
    );
    // Created by "an administrator" (here: the adapter in declaring mode), passive mode works.
    let mut admin = config.clone();
    admin.passive = false;
    let topic = unique("passive");
    let admin_bus = common::connect(admin).await;
    admin_bus
        .subscriber()
        .declare_group(&topic, "ops")
        .await
        .expect("declare");
    let bus = common::connect(config).await;
    let mut stream = bus
        .subscriber()
        .subscribe(Subscription::group(&topic, "ops"))
        .await
        .expect("passive subscribe");
    assert!(
        bus.subscriber()
            .subscribe(Subscription::group(&topic, "undeclared"))
            .await
            .is_err(),
        "passive mode does not create queues"
    );
    bus.publisher()
        .publish(&topic, Message::new("x"))
        .await
        .expect("publish");
    next(&mut stream, "the message")
        .await
        .ack()
        .await
        .expect("ack");
    stream.close().await.expect("close");
    cleanup(&exchange, &[format!("ops.{topic}")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_subscription_is_exclusive_and_goes_away() {
    let bus = common::connect(common::config(common::BROKER, QueueType::Quorum)).await;
    let topic = unique("private");
    let mut a = bus
        .subscriber()
        .subscribe(Subscription::private(&topic))
        .await
        .expect("sub");
    let mut b = bus
        .subscriber()
        .subscribe(Subscription::private(&topic))
        .await
        .expect("sub");
    bus.publisher()
        .publish(&topic, Message::new("both"))
        .await
        .expect("publish");
    next(&mut a, "a's copy").await.ack().await.expect("ack");
    next(&mut b, "b's copy").await.ack().await.expect("ack");
    a.close().await.expect("close");
    b.close().await.expect("close");
    drop((a, b));
    // With both private queues gone the topic is unroutable again.
    let gone = within(10, "the private queues to go away", async {
        loop {
            match bus.publisher().publish(&topic, Message::new("late")).await {
                Err(Error::Unroutable { .. }) => return,
                _ => tokio::task::yield_now().await,
            }
        }
    });
    gone.await;
}
