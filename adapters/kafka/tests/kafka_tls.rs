//! TLS: the adapter hands its TLS files to librdkafka (OpenSSL).
//!
//! There is no Kafka broker with a TLS listener here (see `docs/kafka.md`,
//! Tests), so the first broker of the mock cluster is put behind a TLS
//! terminator of the test's own that requires client certificates.
//! Connecting fetches the cluster's metadata through it: that answer proves
//! the handshake (CA, client certificate) and a Kafka exchange over TLS. The
//! brokers the metadata names listen without TLS, so the test stops there;
//! producing over TLS needs a real broker with a TLS listener
//! (`TIDINGS_KAFKA_BROKERS` with `tls_*` options).

mod common;

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tidings_core::Error;
use tidings_core::testkit::{Pki, assert_config_errors, within};
use tidings_kafka::{KafkaBus, KafkaConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// Accepts TLS connections (client certificates required), and forwards
/// what they carry to `upstream` in plain TCP. Returns its port.
async fn tls_terminator(pki: &Pki, upstream: String) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.path("ca.pem")).expect("the CA") {
        roots.add(cert.expect("the CA")).expect("the CA");
    }
    let clients = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("a client verifier");
    let chain = CertificateDer::pem_file_iter(pki.path("server.pem"))
        .expect("the server certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("the server certificate");
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).expect("the server key");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)
        .expect("a server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let port = listener.local_addr().expect("the port").port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                // A refused handshake just ends this connection.
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                if let Ok(mut plain) = TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    port
}

async fn connect(url: &str) -> tidings_core::Result<KafkaBus> {
    KafkaBus::connect(KafkaConfig::from_url(url)?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_crosses_a_tls_listener_with_a_client_certificate() {
    let mock = common::Mock::start();
    let first = mock
        .bootstrap
        .split(',')
        .next()
        .expect("a broker")
        .to_owned();
    let pki = Pki::new(&["127.0.0.1", "localhost"]);
    let port = tls_terminator(&pki, first).await;
    let base = format!("kafka://127.0.0.1:{port}?operation_timeout_ms=3000");
    let ca = format!("&tls_ca_file={}", pki.param("ca.pem"));
    let client = format!(
        "&tls_cert_file={}&tls_key_file={}",
        pki.param("client.pem"),
        pki.param("client.key")
    );

    let bus = within(
        20,
        "metadata over TLS",
        connect(&format!("{base}{ca}{client}")),
    )
    .await
    .expect("the metadata request crosses TLS");
    // Dropping a producer can block for a while: off the async threads.
    tokio::task::spawn_blocking(move || drop(bus))
        .await
        .expect("dropped");

    for (params, why) in [
        (
            format!("&tls_ca_file={}{client}", pki.param("other-ca.pem")),
            "another CA",
        ),
        (ca.clone(), "no client certificate"),
    ] {
        let err = within(20, why, connect(&format!("{base}{params}")))
            .await
            .expect_err(why);
        assert!(
            matches!(err, Error::Connection { .. } | Error::Timeout { .. }),
            "{why}: {err:?}"
        );
    }
}

#[tokio::test]
async fn tls_options_are_checked_before_connecting() {
    let pki = Pki::new(&["127.0.0.1"]);
    let missing = pki.param("nowhere.pem");
    assert_config_errors(
        &[
            (
                format!("kafka://127.0.0.1:1?tls_ca_file={missing}"),
                "tls_ca_file",
            ),
            (
                format!(
                    "kafka://127.0.0.1:1?tls_cert_file={}&tls_key_file={missing}",
                    pki.param("client.pem")
                ),
                "tls_key_file",
            ),
            (
                format!(
                    "kafka://127.0.0.1:1?tls_cert_file={}",
                    pki.param("client.pem")
                ),
                "tls_key_file",
            ),
            (
                "kafka://127.0.0.1:1?tls_server_name=kafka.internal".to_owned(),
                "tls_server_name",
            ),
        ],
        |url| async move { connect(&url).await },
    )
    .await;
}
