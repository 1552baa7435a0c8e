//! TLS: a nats-server of the test's own with a certificate from a CA made in
//! the test; connecting with `tls_ca_file` works, without it fails, a client
//! certificate is sent to a server that verifies clients, and a missing file
//! is a configuration error naming it.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tidings_core::testkit::{unique, within};
use tidings_core::{Error, Message, Subscription};
use tidings_nats::{NatsBus, NatsConfig};

mod support;

/// A CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate, as PEM files in a directory of their own.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "tidings-nats-tls-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).expect("creating the certificate directory");

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tidings test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>, stem: &str| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.distinguished_name.push(DnType::CommonName, stem);
            let cert = params.signed_by(&key, &issuer).expect("certificate");
            std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).expect("writing");
            std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).expect("writing");
        };
        leaf(vec!["127.0.0.1".into(), "localhost".into()], "server");
        leaf(vec!["client.tidings.test".into()], "client");
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("writing the CA");
        Pki { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// A nats-server config with TLS; `verify` makes it require client certificates.
    fn server_conf(&self, verify: bool) -> String {
        let mut conf = format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 5\n",
            self.path("server.pem"),
            self.path("server.key")
        );
        if verify {
            conf.push_str(&format!(
                "  ca_file: \"{}\"\n  verify: true\n",
                self.path("ca.pem")
            ));
        }
        conf.push_str("}\n");
        conf
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn encode(path: &str) -> String {
    path.replace('%', "%25")
        .replace('&', "%26")
        .replace(' ', "%20")
}

async fn connect(url: &str) -> tidings_core::Result<NatsBus> {
    NatsBus::connect(NatsConfig::from_url(url)?).await
}

/// Publishes one message and receives, checks and acks it.
async fn round_trip(bus: &NatsBus) {
    let topic = unique("tls");
    let mut stream = bus
        .subscriber()
        .subscribe(Subscription::group(&topic, "tls"))
        .await
        .expect("subscribe over TLS");
    let message = Message::new("over tls");
    bus.publisher()
        .publish(&topic, message.clone())
        .await
        .expect("publish over TLS");
    let mut delivery = within(10, "the message over TLS", stream.next())
        .await
        .expect("stream open")
        .expect("delivery");
    assert_eq!(delivery.message().id, message.id);
    assert_eq!(&delivery.message().payload[..], b"over tls");
    delivery.ack().await.expect("ack");
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_the_ca_file_and_fails_without_it() {
    let pki = Pki::new();
    let mut server = support::Server::start(Some(&pki.server_conf(false))).await;
    let base = format!("nats://127.0.0.1:{}?jetstream=false", server.port);

    let bus = within(
        20,
        "a TLS connection",
        connect(&format!(
            "{base}&tls_ca_file={}",
            encode(&pki.path("ca.pem"))
        )),
    )
    .await
    .expect("connects with the test CA");
    round_trip(&bus).await;

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
    let pki = Pki::new();
    let mut server = support::Server::start(Some(&pki.server_conf(true))).await;
    let base = format!(
        "nats://127.0.0.1:{}?jetstream=false&connect_timeout=3s&tls_ca_file={}",
        server.port,
        encode(&pki.path("ca.pem"))
    );

    let bus = within(
        20,
        "a TLS connection with a client certificate",
        connect(&format!(
            "{base}&tls_cert_file={}&tls_key_file={}",
            encode(&pki.path("client.pem")),
            encode(&pki.path("client.key"))
        )),
    )
    .await
    .expect("connects with a client certificate");
    round_trip(&bus).await;

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
    let pki = Pki::new();
    let missing = Path::new(&pki.dir)
        .join("nowhere.pem")
        .display()
        .to_string();
    for (url, key) in [
        (
            format!("nats://127.0.0.1:1?tls_ca_file={}", encode(&missing)),
            "tls_ca_file",
        ),
        (
            format!(
                "nats://127.0.0.1:1?tls_cert_file={}&tls_key_file={}",
                encode(&missing),
                encode(&pki.path("client.key"))
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
