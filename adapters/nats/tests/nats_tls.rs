//! TLS: a nats-server of the test's own with a certificate from a CA made in
//! the test; connecting with `tls_ca_file` works, without it fails, a client
//! certificate is sent to a server that verifies clients, and a missing file
//! is a configuration error naming it, and `tls_server_name` checks the
//! certificate against a name other than the host connected to.

use tidings_core::Error;
use tidings_core::testkit::{Pki, round_trip, within};
use tidings_nats::{NatsBus, NatsConfig};

mod support;

/// A nats-server config with TLS; `verify` makes it require client certificates.
fn server_conf(pki: &Pki, verify: bool) -> String {
    let mut conf = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 5\n",
        pki.path("server.pem").display(),
        pki.path("server.key").display()
    );
    if verify {
        conf.push_str(&format!(
            "  ca_file: \"{}\"\n  verify: true\n",
            pki.path("ca.pem").display()
        ));
    }
    conf.push_str("}\n");
    conf
}

async fn connect(url: &str) -> tidings_core::Result<NatsBus> {
    NatsBus::connect(NatsConfig::from_url(url)?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_the_ca_file_and_fails_without_it() {
    let pki = Pki::new(&["127.0.0.1", "localhost"]);
    let mut server = support::Server::start(Some(&server_conf(&pki, false))).await;
    let base = format!("nats://127.0.0.1:{}?jetstream=false", server.port);

    let bus = within(
        20,
        "a TLS connection",
        connect(&format!("{base}&tls_ca_file={}", pki.param("ca.pem"))),
    )
    .await
    .expect("connects with the test CA");
    round_trip(&*bus.publisher(), &*bus.subscriber(), Some("tls")).await;
    bus.close().await.expect("close");

    // The server requires TLS; the system's CAs do not know the test CA.
    let err = within(
        20,
        "a failed connection",
        connect(&format!("{base}&connect_timeout=3s")),
    )
    .await
    .expect_err("the server's certificate is not trusted without the CA");
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );

    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_the_client_certificate() {
    let pki = Pki::new(&["127.0.0.1", "localhost"]);
    let mut server = support::Server::start(Some(&server_conf(&pki, true))).await;
    let base = format!(
        "nats://127.0.0.1:{}?jetstream=false&connect_timeout=3s&tls_ca_file={}",
        server.port,
        pki.param("ca.pem")
    );

    let bus = within(
        20,
        "a TLS connection with a client certificate",
        connect(&format!(
            "{base}&tls_cert_file={}&tls_key_file={}",
            pki.param("client.pem"),
            pki.param("client.key")
        )),
    )
    .await
    .expect("connects with a client certificate");
    round_trip(&*bus.publisher(), &*bus.subscriber(), Some("tls")).await;
    bus.close().await.expect("close");

    let err = within(20, "a refused connection", connect(&base))
        .await
        .expect_err("the server verifies clients");
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );

    server.kill();
}

#[tokio::test]
async fn a_missing_file_is_a_config_error_naming_it() {
    let pki = Pki::new(&["127.0.0.1", "localhost"]);
    let missing = pki.param("nowhere.pem");
    for (url, key) in [
        (
            format!("nats://127.0.0.1:1?tls_ca_file={}", missing),
            "tls_ca_file",
        ),
        (
            format!(
                "nats://127.0.0.1:1?tls_cert_file={}&tls_key_file={}",
                missing,
                pki.param("client.key")
            ),
            "tls_cert_file",
        ),
    ] {
        match within(10, "a config error", connect(&url)).await {
            Err(Error::Config { key: k, message }) => {
                assert_eq!(k, key, "{url}");
                assert!(message.contains("nowhere.pem"), "{message}");
            }
            other => panic!("{url}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_the_certificate_against_the_configured_server_name() {
    // The certificate names a host that is not the address connected to.
    let pki = Pki::new(&["nats.tidings.test"]);
    let mut server = support::Server::start(Some(&server_conf(&pki, false))).await;
    let base = format!(
        "nats://127.0.0.1:{}?jetstream=false&connect_timeout=3s&tls_ca_file={}",
        server.port,
        pki.param("ca.pem")
    );

    let err = within(20, "a refused connection", connect(&base))
        .await
        .expect_err("127.0.0.1 is not a name of the certificate");
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");

    let err = within(
        20,
        "a refused connection",
        connect(&format!("{base}&tls_server_name=other.tidings.test")),
    )
    .await
    .expect_err("nor is other.tidings.test");
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");

    let bus = within(
        20,
        "a TLS connection checked against the server name",
        connect(&format!("{base}&tls_server_name=nats.tidings.test")),
    )
    .await
    .expect("the certificate carries nats.tidings.test");
    round_trip(&*bus.publisher(), &*bus.subscriber(), Some("tls")).await;
    bus.close().await.expect("close");

    server.kill();
}
