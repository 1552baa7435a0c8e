//! Certificates for TLS tests: a CA made for the test, a server certificate
//! for the names the test chooses, and a client certificate, as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A certificate authority and the certificates it signed, as PEM files in a
/// directory of their own (removed on drop):
///
/// - `ca.pem`: the CA's certificate, to trust;
/// - `server.pem`, `server.key`: for the names given to [`Pki::new`];
/// - `client.pem`, `client.key`: a client certificate (CN `tidings-client`);
/// - `other-ca.pem`: a CA that signed nothing here, for negative tests.
///
/// Files are readable by every user, so a broker running as its own user
/// (RabbitMQ runs as `rabbitmq`) can load them.
///
/// ```
/// let pki = tidings_core::testkit::Pki::new(&["localhost", "127.0.0.1"]);
/// assert!(pki.path("ca.pem").exists());
/// assert!(pki.path("server.key").exists());
/// ```
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes the files; `server_names` are the DNS names and IP addresses
    /// the server certificate carries.
    ///
    /// # Panics
    /// When a key cannot be generated or a file cannot be written: a test
    /// fixture, failing loudly.
    pub fn new(server_names: &[&str]) -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "tidings-pki-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).expect("creating the certificate directory");
        let pki = Pki { dir };
        pki.readable_by_all(&pki.dir, 0o755);

        let ca = |common_name: &str, file: &str| {
            let key = KeyPair::generate().expect("CA key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).expect("CA certificate");
            pki.write(file, &cert.pem());
            Issuer::new(params, key)
        };
        let issuer = ca("tidings test CA", "ca.pem");
        ca("tidings other CA", "other-ca.pem");

        let leaf = |names: Vec<String>, common_name: &str, stem: &str| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("certificate params");
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            let cert = params.signed_by(&key, &issuer).expect("certificate");
            pki.write(&format!("{stem}.pem"), &cert.pem());
            pki.write(&format!("{stem}.key"), &key.serialize_pem());
        };
        let names = server_names.iter().map(|n| (*n).to_owned()).collect();
        leaf(
            names,
            server_names.first().copied().unwrap_or("server"),
            "server",
        );
        leaf(vec!["tidings-client".into()], "tidings-client", "client");
        pki
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of one of the files.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The path of one of the files, escaped for a URL's query.
    pub fn param(&self, file: &str) -> String {
        url_escape(&self.path(file).display().to_string())
    }

    fn write(&self, file: &str, contents: &str) {
        let path = self.path(file);
        std::fs::write(&path, contents).expect("writing a certificate file");
        self.readable_by_all(&path, 0o644);
    }

    #[cfg(unix)]
    fn readable_by_all(&self, path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .expect("setting permissions");
    }

    #[cfg(not(unix))]
    fn readable_by_all(&self, _: &Path, _: u32) {}
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Escapes what would end or split a query value.
fn url_escape(value: &str) -> String {
    value
        .replace('%', "%25")
        .replace('&', "%26")
        .replace('#', "%23")
        .replace('+', "%2B")
        .replace(' ', "%20")
}
