//! TLS against a redis-server of the test's own (`--tls-port`) that requires
//! client certificates: `rediss://` with a CA made in the test, in both
//! modes; the wrong CA or no client certificate is refused, and bad TLS
//! options are configuration errors before any connection.

mod common;

use std::time::Duration;

use tidings_core::Error;
use tidings_core::testkit::{Pki, assert_config_errors, round_trip, unique, within};
use tidings_redis::{RedisBus, RedisConfig};

/// A redis-server with only a TLS port, requiring client certificates.
struct TlsServer {
    port: u16,
    _node: common::OwnNode,
}

impl TlsServer {
    async fn start(pki: &Pki) -> TlsServer {
        let mut node = common::OwnNode::new("tls", &[]);
        let port = node.port;
        let file = |name: &str| pki.path(name).display().to_string();
        node.spawn(&[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &file("server.pem"),
            "--tls-key-file",
            &file("server.key"),
            "--tls-ca-cert-file",
            &file("ca.pem"),
            "--tls-auth-clients",
            "yes",
        ]);
        let server = TlsServer { port, _node: node };
        listening(port, "redis-server").await;
        server
    }

    fn url(&self, mode: &str, params: &str) -> String {
        format!(
            "rediss://127.0.0.1:{}/?mode={mode}&connect_timeout=3s{params}",
            self.port
        )
    }
}

/// Waits (up to 10 s) until `what` accepts connections on `port`; a TLS-only
/// server cannot answer a plain `PING`.
async fn listening(port: u16, what: &str) {
    within(10, &format!("{what} to listen"), async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn connect(url: &str) -> tidings_core::Result<RedisBus> {
    RedisBus::connect(RedisConfig::from_url(url)?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_ca_and_client_certificate() {
    let pki = Pki::new(&["127.0.0.1", "localhost"]);
    let server = TlsServer::start(&pki).await;
    let ca = format!("&tls_ca_file={}", pki.param("ca.pem"));
    let client = format!(
        "&tls_cert_file={}&tls_key_file={}",
        pki.param("client.pem"),
        pki.param("client.key")
    );

    let bus = within(
        20,
        "a TLS connection",
        connect(&server.url("streams", &format!("{ca}{client}"))),
    )
    .await
    .expect("connects over TLS");
    round_trip(&*bus.publisher(), &*bus.subscriber(), Some("tls")).await;

    let bus = within(
        20,
        "a TLS connection in Pub/Sub mode",
        connect(&server.url("pubsub", &format!("{ca}{client}"))),
    )
    .await
    .expect("connects over TLS");
    round_trip(&*bus.publisher(), &*bus.subscriber(), None).await;

    for (params, why) in [
        (client.clone(), "the system's CAs do not know the test CA"),
        (
            format!("&tls_ca_file={}{client}", pki.param("other-ca.pem")),
            "another CA",
        ),
        (ca.clone(), "the server requires a client certificate"),
    ] {
        let err = within(20, why, connect(&server.url("streams", &params)))
            .await
            .expect_err(why);
        assert!(matches!(err, Error::Connection { .. }), "{why}: {err:?}");
    }
}

/// Sentinel over TLS: a master and its sentinel that both listen on TLS
/// only and require client certificates. The bus asks the sentinel for the
/// master and reaches both with the URL's TLS files; without the client
/// certificate the sentinel refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_through_a_sentinel() {
    let pki = Pki::new(&["127.0.0.1", "localhost"]);
    let master = TlsServer::start(&pki).await;
    let name = unique("tls-master");
    let mut sentinel = common::OwnNode::sentinel(&name, master.port);
    let file = |name: &str| pki.path(name).display().to_string();
    // TLS only (the last `port` wins), and the sentinel reaches the master
    // over TLS with a client certificate of its own.
    let tls = format!(
        "port 0\ntls-port {}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
         tls-auth-clients yes\ntls-replication yes\ntls-client-cert-file {}\ntls-client-key-file {}\n",
        sentinel.port,
        file("server.pem"),
        file("server.key"),
        file("ca.pem"),
        file("client.pem"),
        file("client.key"),
    );
    let conf = sentinel.dir().join("sentinel.conf");
    let mut text = std::fs::read_to_string(&conf).expect("the sentinel's configuration");
    text.push_str(&tls);
    std::fs::write(&conf, text).expect("the sentinel's configuration");
    sentinel.spawn(&[]);
    let port = sentinel.port;
    listening(port, "the sentinel").await;

    let url = |params: &str| {
        format!(
            "rediss://127.0.0.1:{port}/?sentinel={name}&connect_timeout=3s&tls_ca_file={}{params}",
            pki.param("ca.pem")
        )
    };
    let client = format!(
        "&tls_cert_file={}&tls_key_file={}",
        pki.param("client.pem"),
        pki.param("client.key")
    );
    let bus = within(
        20,
        "a TLS connection through the sentinel",
        connect(&url(&client)),
    )
    .await
    .expect("connects through the sentinel over TLS");
    round_trip(&*bus.publisher(), &*bus.subscriber(), Some("tls-sentinel")).await;

    let err = within(
        20,
        "a connection without the client certificate",
        connect(&url("")),
    )
    .await
    .expect_err("the sentinel requires a client certificate");
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
}

#[tokio::test]
async fn tls_options_are_checked_before_connecting() {
    let pki = Pki::new(&["127.0.0.1"]);
    let missing = pki.param("nowhere.pem");
    assert_config_errors(
        &[
            // A refused port: an error here proves no connection was tried.
            (
                format!("rediss://127.0.0.1:1/?tls_ca_file={missing}"),
                "tls_ca_file",
            ),
            (
                format!(
                    "rediss://127.0.0.1:1/?tls_cert_file={missing}&tls_key_file={}",
                    pki.param("client.key")
                ),
                "tls_cert_file",
            ),
            (
                format!(
                    "rediss://127.0.0.1:1/?tls_cert_file={}",
                    pki.param("client.pem")
                ),
                "tls_key_file",
            ),
            (
                "rediss://127.0.0.1:1/?tls_server_name=redis.internal".to_owned(),
                "tls_server_name",
            ),
            (
                format!(
                    "rediss://127.0.0.1:1/?tls_ca_file={}#insecure",
                    pki.param("ca.pem")
                ),
                "url",
            ),
            (
                format!(
                    "rediss://127.0.0.1:1/?tls_ca_file={}",
                    pki.param("client.key")
                ),
                "tls_ca_file",
            ),
            (
                format!("redis://127.0.0.1:1/?tls_ca_file={}", pki.param("ca.pem")),
                "url",
            ),
            // The same checks for sentinels, under the same keys.
            (
                format!("rediss://127.0.0.1:1/?sentinel=m&tls_ca_file={missing}"),
                "tls_ca_file",
            ),
            (
                format!(
                    "rediss://127.0.0.1:1/?sentinel=m&tls_cert_file={}",
                    pki.param("client.pem")
                ),
                "tls_key_file",
            ),
        ],
        |url| async move { connect(&url).await },
    )
    .await;
}
