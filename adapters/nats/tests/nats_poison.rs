//! Protocol-level poison: a JetStream message whose header block the client
//! cannot parse (a value that is not UTF-8) drops the client's connection
//! each time it is delivered, so the adapter never sees it. The server gives
//! up after `max_deliver`; the adapter hears the advisory, fetches the
//! message and the runtime dead-letters it where observers see it. The loop
//! ends and the consumer goes on.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidings_core::testkit::{unique, within};
use tidings_core::{
    Consumer, DeadLetterReason, Event, HandlerError, Message, Publisher, SettleAction,
};
use tidings_nats::{NatsBus, NatsConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const SERVER: &str = "127.0.0.1:4222";

/// Publishes with a hand-written `HPUB`, as any client may: the header
/// value holds bytes that are not UTF-8.
async fn publish_poison(subject: &str) {
    let stream = TcpStream::connect(SERVER).await.unwrap_or_else(|e| {
        panic!("nats-server is not reachable at {SERVER} ({e}); start it with `nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/nats-js &`")
    });
    let mut conn = BufReader::new(stream);
    let mut info = String::new();
    conn.read_line(&mut info).await.expect("INFO");
    let headers: &[u8] = b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n";
    let payload: &[u8] = b"{\"poison\":true}";
    let mut frame = format!(
        "CONNECT {{\"verbose\":false,\"headers\":true}}\r\nHPUB {subject} {} {}\r\n",
        headers.len(),
        headers.len() + payload.len()
    )
    .into_bytes();
    frame.extend_from_slice(headers);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(b"\r\nPING\r\n");
    conn.get_mut().write_all(&frame).await.expect("HPUB");
    let mut line = String::new();
    loop {
        line.clear();
        conn.read_line(&mut line).await.expect("reply");
        assert!(!line.starts_with("-ERR"), "{line}");
        if line.starts_with("PONG") {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_is_dead_lettered_once_the_server_gives_up() {
    let config = NatsConfig::from_url(&format!(
        "nats://{SERVER}?ack_wait=1s&max_deliver=3&max_age=1h"
    ))
    .expect("config");
    let bus = NatsBus::connect(config).await.expect("connected");
    let topic = unique("poison");
    let seen: Arc<Mutex<Vec<(String, SettleAction, bool)>>> = Arc::default();
    let record = seen.clone();
    let consumer = Consumer::group(bus.subscriber(), "g")
        .handle(&topic, |_: Event<serde_json::Value>| async {
            Ok::<_, HandlerError>(())
        })
        .on_settle(move |s| {
            record.lock().expect("lock").push((
                s.delivery.message().id.to_string(),
                s.action,
                s.result.is_ok(),
            ))
        })
        .start()
        .await
        .expect("started");
    let started = Instant::now();
    publish_poison(&topic).await;
    let sentinel = Message::new("\"after the poison\"");
    bus.publisher()
        .publish(&topic, sentinel.clone())
        .await
        .expect("published");
    within(
        60,
        "the poison dead-lettered and the sentinel handled",
        async {
            loop {
                let done = {
                    let seen = seen.lock().expect("lock");
                    seen.iter().any(|(id, _, _)| *id == sentinel.id)
                        && seen.iter().any(|(id, _, _)| *id != sentinel.id)
                };
                if done {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    eprintln!("dead-lettered after {:?}", started.elapsed());
    let report = consumer.shutdown(Duration::from_secs(10)).await;
    let seen = seen.lock().expect("lock").clone();
    let poison: Vec<_> = seen
        .iter()
        .filter(|(id, _, _)| *id != sentinel.id)
        .collect();
    assert_eq!(poison.len(), 1, "settled once: {seen:?}");
    let (id, action, ok) = poison[0];
    assert!(id.contains(':'), "named by its stream position: {id}");
    assert_eq!(
        *action,
        SettleAction::DeadLetter {
            reason: DeadLetterReason::Undecodable
        }
    );
    assert!(*ok, "the dead letter was published");
    assert_eq!(report.failed_settlements, 0, "{report:?}");

    // The dead letter is on the group's dead-letter topic, with the reason.
    let dlq = bus.subscriber().dead_letter_topic(&topic, "g");
    let mut inspect = bus
        .subscriber()
        .subscribe(
            tidings_core::Subscription::group(&dlq, "inspect")
                .starting_at(tidings_core::StartFrom::Earliest),
        )
        .await
        .expect("dlq subscription");
    use futures::StreamExt;
    // Under load, the reconnections the poison causes (every second here)
    // can also cost a neighbour its acks until the server gives up on it
    // too: that one is dead-lettered as attempts-exhausted. Find the poison.
    within(30, "the poison's dead letter", async {
        loop {
            let mut letter = match inspect.next().await {
                Some(Ok(d)) => d,
                other => panic!("{other:?}"),
            };
            letter.ack().await.expect("ack");
            if letter.message().payload.as_ref() != b"{\"poison\":true}" {
                continue;
            }
            let info = tidings_core::DeadLetter::from_message(letter.message()).expect("a letter");
            assert_eq!(info.reason, DeadLetterReason::Undecodable);
            assert!(info.error.contains("not UTF-8"), "{}", info.error);
            return;
        }
    })
    .await;
}
