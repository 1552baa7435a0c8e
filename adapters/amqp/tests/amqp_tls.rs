//! TLS against a RabbitMQ node of the test's own: `amqps://` with a CA made
//! in the test, a server certificate that names a host other than the
//! address connected to, and a node that requires client certificates.
//!
//! The shared broker on 127.0.0.1:5672 has no TLS listener, and giving it one
//! would mean restarting it under every other test; a second node with its
//! own name, ports and data directory starts in about five seconds.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidings_amqp::{AmqpBus, AmqpConfig};
use tidings_core::Error;
use tidings_core::testkit::{Pki, assert_config_errors, round_trip, within};

/// The name on the server certificate; not the address the tests connect to.
const SERVER_NAME: &str = "rabbit.tidings.test";

/// A RabbitMQ node with only a TLS listener, which requires client certificates.
struct TlsNode {
    name: String,
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl TlsNode {
    async fn start(pki: &Pki) -> TlsNode {
        let dir = pki.dir().join("rabbit");
        std::fs::create_dir_all(&dir).expect("creating the node's directory");
        // The node runs as the `rabbitmq` user and writes its data here.
        set_mode(&dir, 0o777);
        let port = tidings_core::testkit::free_port();
        let conf = dir.join("rabbitmq.conf");
        std::fs::write(
            &conf,
            format!(
                "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {ca}\n\
                 ssl_options.certfile = {cert}\n\
                 ssl_options.keyfile = {key}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n",
                ca = pki.path("ca.pem").display(),
                cert = pki.path("server.pem").display(),
                key = pki.path("server.key").display(),
            ),
        )
        .expect("writing the node's config");
        set_mode(&conf, 0o644);
        let plugins = dir.join("enabled_plugins");
        std::fs::write(&plugins, "[].\n").expect("writing the plugins file");
        set_mode(&plugins, 0o644);
        let log = std::fs::File::create(dir.join("server.out")).expect("the node's log");

        let name = format!(
            "tidings-tls-{}-{:06x}@localhost",
            std::process::id(),
            fastrand::u32(..0xffffff)
        );
        let mut command = Command::new("rabbitmq-server");
        command
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_CONFIG_FILE", &conf)
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", &plugins)
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env(
                "RABBITMQ_DIST_PORT",
                tidings_core::testkit::free_port().to_string(),
            );
        // Dies with the test process, however that ends.
        let child = tidings_core::testkit::dies_with_parent(command)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run rabbitmq-server ({e}); install it with `apt-get install rabbitmq-server`")
            });
        let mut node = TlsNode {
            name,
            port,
            dir,
            child,
        };
        // Ready when the TLS port accepts connections (about 5 s here); bounded.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return node;
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                panic!("the TLS RabbitMQ node exited ({status}):\n{}", node.log());
            }
            assert!(
                Instant::now() < deadline,
                "the TLS RabbitMQ node did not listen on {port} within 90 s:\n{}",
                node.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `amqps://` to 127.0.0.1 with `params` and a short connect timeout.
    fn url(&self, params: &str) -> String {
        format!(
            "amqps://guest:guest@127.0.0.1:{}/%2f?exchange=tidings-test&queue_type=classic\
             &queue_expires=1m&connect_timeout=5s{params}",
            self.port
        )
    }
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        // Stop the Erlang node itself (the script's process may not take it along).
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(unix)]
fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

async fn connect(url: &str) -> tidings_core::Result<AmqpBus> {
    AmqpBus::connect(AmqpConfig::from_url(url)?).await
}

async fn refused(node: &TlsNode, params: &str, why: &str) -> Error {
    let err = within(30, why, connect(&node.url(params)))
        .await
        .expect_err(why);
    assert!(
        matches!(err, Error::Connection { .. } | Error::Timeout { .. }),
        "{why}: {err:?}"
    );
    err
}

/// One node for every case: starting one takes seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_ca_client_certificate_and_server_name() {
    let pki = Pki::new(&[SERVER_NAME]);
    let node = TlsNode::start(&pki).await;
    let ca = format!("&tls_ca_file={}", pki.param("ca.pem"));
    let client = format!(
        "&tls_cert_file={}&tls_key_file={}",
        pki.param("client.pem"),
        pki.param("client.key")
    );
    let name = format!("&tls_server_name={SERVER_NAME}");

    // Everything right: the CA, the client certificate, the certificate's name.
    let bus = within(
        30,
        "a TLS connection",
        connect(&node.url(&format!("{ca}{client}{name}"))),
    )
    .await
    .expect("connects over TLS");
    round_trip(&*bus.publisher(), &*bus.subscriber(), Some("tls")).await;
    bus.close().await;

    // The certificate does not name 127.0.0.1.
    let err = refused(&node, &format!("{ca}{client}"), "no server name").await;
    assert!(
        err.to_string().contains("tls_server_name: the URL's host"),
        "{err}"
    );
    refused(
        &node,
        &format!("{ca}{client}&tls_server_name=other.tidings.test"),
        "a name the certificate does not carry",
    )
    .await;
    // The system's CAs do not know the test's CA, nor does another CA.
    refused(&node, &format!("{client}{name}"), "the system's CAs").await;
    refused(
        &node,
        &format!("&tls_ca_file={}{client}{name}", pki.param("other-ca.pem")),
        "another CA",
    )
    .await;
    // The node requires a client certificate.
    refused(&node, &format!("{ca}{name}"), "no client certificate").await;
}

#[tokio::test]
async fn tls_options_are_checked_before_connecting() {
    let pki = Pki::new(&[SERVER_NAME]);
    let missing = pki.param("nowhere.pem");
    assert_config_errors(
        &[
            // A refused port: an error here proves no connection was tried.
            (
                format!("amqps://127.0.0.1:1/%2f?tls_ca_file={missing}"),
                "tls_ca_file",
            ),
            (
                format!(
                    "amqps://127.0.0.1:1/%2f?tls_cert_file={missing}&tls_key_file={}",
                    pki.param("client.key")
                ),
                "tls_cert_file",
            ),
            (
                format!(
                    "amqps://127.0.0.1:1/%2f?tls_cert_file={}",
                    pki.param("client.pem")
                ),
                "tls_key_file",
            ),
            (
                format!("amqp://127.0.0.1:1/%2f?tls_ca_file={}", pki.param("ca.pem")),
                "url",
            ),
        ],
        |url| async move { connect(&url).await },
    )
    .await;

    // A configuration built in code is checked the same way.
    let mut config = AmqpConfig::default();
    config.tls.ca_file = Some(pki.path("ca.pem"));
    match within(10, "a config error", AmqpBus::connect(config)).await {
        Err(Error::Config { key, .. }) => assert_eq!(key, "url"),
        other => panic!("TLS options with amqp:// in code: {other:?}"),
    }
}
