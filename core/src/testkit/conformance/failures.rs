//! Failures: redelivery with rising attempts, delays, dead letters, panics.

use super::*;

/// A failing handler's message comes back with attempts 1, 2, 3 and is then acked.
pub async fn nack_redelivers_with_rising_attempt<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "nack").await;
    let seen = Seen::default();
    let record = seen.clone();
    let consumer = Consumer::group(s, "nack")
        .retry(RetryPolicy::new(5).with_backoff(Backoff::fixed(Duration::from_millis(20))))
        .handle(&topic, move |e: Event<Probe>| {
            let record = record.clone();
            async move {
                record.record(&e);
                if e.attempt() < 3 {
                    return Err(HandlerError::retryable("not yet"));
                }
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let event = probe(1);
    let id = event.id().to_owned();
    p.publish_event(&topic, event).await.expect("publish");
    seen.wait(60, "the third attempt", |s| s.attempts_of(&id).len() >= 3)
        .await;
    assert_eq!(seen.attempts_of(&id)[..3], [1, 2, 3]);
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// A nack with a delay is not redelivered before the delay.
pub async fn delayed_nack_waits<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "delayed-nack").await;
    if !s.capabilities().delayed_nack {
        return not_applicable("delayed_nack_waits", s.name(), "no delayed nack");
    }
    let mut stream = subscribe(&*s, Subscription::group(&topic, "delay")).await;
    let m = Message::new("later");
    publish_ok(&*p, &topic, m.clone()).await;
    let mut first = next_delivery(&mut stream, "the first delivery").await;
    let delay = Duration::from_millis(800);
    let nacked_at = Instant::now();
    first.nack(Some(delay)).await.expect("nack");
    let mut again = next_delivery(&mut stream, "the redelivery").await;
    let waited = nacked_at.elapsed();
    assert_eq!(again.message().id, m.id);
    assert_eq!(again.attempt(), 2);
    assert!(
        waited >= delay,
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    again.ack().await.expect("ack");
}

async fn dead_letters<H: Harness>(
    h: &H,
    s: &dyn Subscriber,
    topic: &str,
    group: &str,
) -> Box<dyn DeliveryStream> {
    let _ = h;
    let dlq = s.dead_letter_topic(topic, group);
    s.declare_group(&dlq, "inspect")
        .await
        .expect("declare the dead-letter group");
    subscribe(s, Subscription::group(dlq, "inspect")).await
}

/// After the last allowed attempt the message goes to the dead-letter
/// destination with the reason attached, and the consumer keeps going.
pub async fn dead_letter_after_max_attempts<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "dead-letter").await;
    let group = "dl";
    let mut dlq = dead_letters(h, &*s, &topic, group).await;
    let seen = Seen::default();
    let record = seen.clone();
    let consumer = Consumer::group(s.clone(), group)
        .retry(RetryPolicy::new(2).with_backoff(Backoff::fixed(Duration::from_millis(20))))
        .handle(&topic, move |e: Event<Probe>| {
            let record = record.clone();
            async move {
                record.record(&e);
                if e.data.text == "poison" {
                    return Err(HandlerError::retryable("always fails"));
                }
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let poison = Event::new(Probe {
        n: 1,
        text: "poison".into(),
    });
    let poison_id = poison.id().to_owned();
    p.publish_event(&topic, poison).await.expect("publish");
    let mut letter = next_delivery(&mut dlq, "the dead letter").await;
    let good = probe(2);
    let good_id = good.id().to_owned();
    p.publish_event(&topic, good).await.expect("publish");
    seen.wait(60, "the good message after the poison one", |s| {
        !s.attempts_of(&good_id).is_empty()
    })
    .await;
    assert_eq!(letter.message().id, poison_id);
    let info = DeadLetter::from_message(letter.message()).expect("dead-letter headers");
    assert_eq!(info.reason, DeadLetterReason::AttemptsExhausted);
    assert_eq!(info.attempts, 2);
    assert_eq!(info.topic, topic);
    assert_eq!(info.group.as_deref(), Some(group));
    assert!(
        info.error.contains("always fails"),
        "error text: {}",
        info.error
    );
    assert_eq!(seen.attempts_of(&poison_id), [1, 2]);
    letter.ack().await.expect("ack");
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// An undecodable payload is dead-lettered at once with the decode error,
/// and the next message is handled.
pub async fn undecodable_payload_dead_lettered<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "undecodable").await;
    let group = "typed";
    let mut dlq = dead_letters(h, &*s, &topic, group).await;
    let seen = Seen::default();
    let consumer = Consumer::group(s.clone(), group)
        .handle(&topic, seen.recorder())
        .start()
        .await
        .expect("start consumer");
    let bad = Message::new("{not json").with_content_type("application/json");
    publish_ok(&*p, &topic, bad.clone()).await;
    let good = probe(7);
    let good_id = good.id().to_owned();
    p.publish_event(&topic, good).await.expect("publish");
    let mut letter = next_delivery(&mut dlq, "the dead letter").await;
    seen.wait(60, "the message after the bad one", |s| {
        !s.attempts_of(&good_id).is_empty()
    })
    .await;
    assert_eq!(letter.message().id, bad.id);
    assert_eq!(letter.message().payload, bad.payload);
    let info = DeadLetter::from_message(letter.message()).expect("dead-letter headers");
    assert_eq!(info.reason, DeadLetterReason::Undecodable);
    assert_eq!(info.attempts, 1);
    assert!(
        info.error.contains("Probe"),
        "error text names the type: {}",
        info.error
    );
    assert!(
        seen.attempts_of(&bad.id).is_empty(),
        "the handler saw the bad payload"
    );
    letter.ack().await.expect("ack");
    consumer.shutdown(Duration::from_secs(10)).await;
}

/// A panicking handler is retried and the runtime keeps running.
pub async fn panicking_handler_is_retried<H: Harness>(h: &H) {
    let (p, s, topic) = setup(h, "panic").await;
    let seen = Seen::default();
    let record = seen.clone();
    let consumer = Consumer::group(s, "panic")
        .retry(RetryPolicy::new(3).with_backoff(Backoff::fixed(Duration::from_millis(20))))
        .handle(&topic, move |e: Event<Probe>| {
            let record = record.clone();
            async move {
                record.record(&e);
                if e.attempt() == 1 {
                    panic!("handler bug on first attempt (expected in this test)");
                }
                Ok(())
            }
        })
        .start()
        .await
        .expect("start consumer");
    let event = probe(1);
    let id = event.id().to_owned();
    p.publish_event(&topic, event).await.expect("publish");
    seen.wait(60, "the retry after the panic", |s| {
        s.attempts_of(&id).len() >= 2
    })
    .await;
    assert_eq!(seen.attempts_of(&id)[..2], [1, 2]);
    consumer.shutdown(Duration::from_secs(10)).await;
}
