//! Production authentication against a nats-server of the test's own that
//! admits one user by its NKey (the server holds the public key; the client
//! signs the server's challenge with the seed, which never leaves it).

use std::time::Duration;

use futures::StreamExt;
use tidings_core::testkit::{unique, within};
use tidings_core::{Error, Message, Subscription};
use tidings_nats::{NatsBus, NatsConfig};

mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_user_connects_and_a_stranger_is_refused() {
    let user = nkeys::KeyPair::new_user();
    let server = support::Server::start(Some(&format!(
        "authorization {{\n  users = [ {{ nkey: {} }} ]\n}}\n",
        user.public_key()
    )))
    .await;
    let dir = std::env::temp_dir().join(unique("nats-nkey"));
    std::fs::create_dir_all(&dir).expect("a directory");
    let seed_file = dir.join("user.nk");
    std::fs::write(&seed_file, user.seed().expect("a seed")).expect("the seed file");

    let url = format!(
        "{}?nkey_seed_file={}&connect_timeout=2s",
        server.url(),
        seed_file.display()
    );
    let config = NatsConfig::from_url(&url).expect("config");
    assert!(!format!("{config:?}").contains(&user.seed().expect("seed")));
    let bus = NatsBus::connect(config)
        .await
        .unwrap_or_else(|e| panic!("the NKey user is admitted: {e}"));
    let topic = unique("nkey");
    let mut stream = bus
        .subscriber()
        .subscribe(Subscription::group(&topic, "g"))
        .await
        .expect("subscribe");
    let sent = Message::new("signed in");
    bus.publisher()
        .publish(&topic, sent.clone())
        .await
        .expect("published");
    let mut d = within(10, "the message", stream.next())
        .await
        .expect("open")
        .expect("delivery");
    assert_eq!(d.message().id, sent.id);
    d.ack().await.expect("ack");

    // No credentials, or another key: refused, as a connection error.
    let stranger = dir.join("stranger.nk");
    std::fs::write(&stranger, nkeys::KeyPair::new_user().seed().expect("seed")).expect("file");
    for options in [
        String::from("connect_timeout=2s"),
        format!("nkey_seed_file={}&connect_timeout=2s", stranger.display()),
    ] {
        let config = NatsConfig::from_url(&format!("{}?{options}", server.url())).expect("config");
        match tokio::time::timeout(Duration::from_secs(20), NatsBus::connect(config)).await {
            Ok(Err(Error::Connection { .. })) => {}
            Ok(Err(other)) => panic!("{options}: refused, but as {other:?}"),
            Ok(Ok(_)) => panic!("{options}: a stranger was admitted"),
            Err(_) => panic!("{options}: connecting did not give up within 20 s"),
        }
    }
    // A seed file that is missing is a configuration error naming the option.
    let missing = NatsConfig::from_url(&format!(
        "{}?nkey_seed_file={}",
        server.url(),
        dir.join("none.nk").display()
    ))
    .expect("config");
    match NatsBus::connect(missing).await {
        Err(Error::Config { key, .. }) => assert_eq!(key, "nkey_seed_file"),
        other => panic!("a missing seed file: {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
