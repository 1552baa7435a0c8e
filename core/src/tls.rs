//! TLS settings shared by the adapters: which certificate authorities to
//! trust, which client certificate to present, and which name the server's
//! certificate must carry.
//!
//! Every adapter reads the same four query parameters (`tls_ca_file`,
//! `tls_cert_file`, `tls_key_file`, `tls_server_name`) into a [`TlsOptions`]
//! and builds its client from [`TlsOptions::client_config`], so a wrong path
//! or a key without its certificate is the same [`Error::Config`](crate::Error::Config) on every
//! broker, raised at connect before any network traffic.
//!
//! [`TlsOptions::client_config`] (feature `tls`) builds the rustls
//! configuration of the adapters whose clients use rustls. Its crypto
//! provider is *ring*, named explicitly rather than taken from the process
//! default, so linking another provider elsewhere in an application cannot
//! make the choice ambiguous. The Kafka adapter hands the files to
//! librdkafka (OpenSSL) instead.

use std::path::PathBuf;

use crate::error::Result;
use crate::params::invalid;

/// The query parameters [`TlsOptions::set`] understands.
pub const PARAMS: [&str; 4] = [
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_server_name",
];

/// TLS settings of a connection. All optional: the default trusts the
/// system's certificate authorities, presents no client certificate and
/// checks the server's certificate against the host of the URL.
///
/// ```
/// use tidings_core::tls::TlsOptions;
/// let mut tls = TlsOptions::default();
/// assert!(tls.set("tls_server_name", "broker.internal")?);
/// assert!(!tls.set("prefetch", "10")?); // not a TLS parameter
/// assert_eq!(tls.server_name.as_deref(), Some("broker.internal"));
/// # Ok::<(), tidings_core::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM file of the certificate authorities trusted for the server
    /// (`tls_ca_file`). When set, only these are trusted, not the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate chain (`tls_cert_file`), for
    /// servers that verify clients. Goes with [`key_file`](Self::key_file).
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (`tls_key_file`).
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry (`tls_server_name`),
    /// when it differs from the host the client connects to: a broker
    /// reached by IP address, through a tunnel or a load balancer.
    pub server_name: Option<String>,
}

impl TlsOptions {
    /// Takes the query parameter `key` if it is one of [`PARAMS`]; returns
    /// whether it was. An empty value is an error naming the key.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool> {
        let slot = match key {
            "tls_server_name" => {
                if value.is_empty() {
                    return Err(invalid(key, "must not be empty"));
                }
                let allowed = |c: char| c.is_ascii_alphanumeric() || "-._:".contains(c);
                if !value.chars().all(allowed) {
                    return Err(invalid(
                        key,
                        format!("`{value}` is not a DNS name or IP address"),
                    ));
                }
                self.server_name = Some(value.to_owned());
                return Ok(true);
            }
            "tls_ca_file" => &mut self.ca_file,
            "tls_cert_file" => &mut self.cert_file,
            "tls_key_file" => &mut self.key_file,
            _ => return Ok(false),
        };
        if value.is_empty() {
            return Err(invalid(key, "must be a path to a PEM file"));
        }
        *slot = Some(PathBuf::from(value));
        Ok(true)
    }

    /// Whether anything is set: an adapter that speaks TLS only on request
    /// turns it on when this is true.
    pub fn is_set(&self) -> bool {
        self != &TlsOptions::default()
    }

    /// The settings as query parameters, for error messages.
    pub fn describe(&self) -> String {
        let show = |p: &Option<PathBuf>, none: &str| {
            p.as_ref()
                .map_or_else(|| none.to_owned(), |p| format!("`{}`", p.display()))
        };
        format!(
            "tls_ca_file: {}, tls_cert_file: {}, tls_key_file: {}, tls_server_name: {}",
            show(&self.ca_file, "none (the system's CAs)"),
            show(&self.cert_file, "none"),
            show(&self.key_file, "none"),
            self.server_name.as_deref().unwrap_or("the URL's host"),
        )
    }

    /// Checks what can be checked without reading the files: a client
    /// certificate comes with its key.
    pub fn validate(&self) -> Result<()> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err(invalid(
                "tls_key_file",
                "is required when tls_cert_file is set",
            )),
            (None, Some(_)) => Err(invalid(
                "tls_cert_file",
                "is required when tls_key_file is set",
            )),
            _ => Ok(()),
        }
    }

    /// The name to check the server's certificate against: the configured
    /// one, else `host`. Adapters that open the TLS connection themselves
    /// (RabbitMQ) also send it as SNI.
    pub fn server_name_for<'a>(&'a self, host: &'a str) -> &'a str {
        self.server_name.as_deref().unwrap_or(host)
    }

    /// Checks that each file can be read and holds what it should, a PEM
    /// certificate or private key (an
    /// [`Error::Config`](crate::Error::Config) naming the parameter and the
    /// file otherwise), for clients that read the files themselves later.
    pub fn check_files(&self) -> Result<()> {
        self.validate()?;
        const CERTIFICATE: (&str, &[u8]) = ("certificate", b"-----BEGIN CERTIFICATE-----");
        const KEY: (&str, &[u8]) = ("private key", b"PRIVATE KEY-----");
        for (key, file, (what, marker)) in [
            ("tls_ca_file", &self.ca_file, CERTIFICATE),
            ("tls_cert_file", &self.cert_file, CERTIFICATE),
            ("tls_key_file", &self.key_file, KEY),
        ] {
            if let Some(file) = file {
                let text = std::fs::read(file)
                    .map_err(|e| invalid(key, format!("cannot read `{}`: {e}", file.display())))?;
                if !text.windows(marker.len()).any(|w| w == marker) {
                    return Err(invalid(
                        key,
                        format!("`{}` holds no PEM {what}", file.display()),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(feature = "tls")]
pub use rustls_config::install_default_provider;

#[cfg(feature = "tls")]
mod rustls_config {
    use std::fmt;
    use std::path::Path;
    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

    use rustls::ClientConfig;

    use super::TlsOptions;
    use crate::error::{Error, Result};
    use crate::params::invalid;

    /// Makes *ring* the process-wide rustls crypto provider unless one is
    /// already installed. For client libraries that build their rustls
    /// configuration from the process default (the redis crate does): with
    /// two providers linked into an application and none installed, rustls
    /// would not know which to use and panic.
    pub fn install_default_provider() {
        // An error means a provider is installed already: that one stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    impl TlsOptions {
        /// Reads the files and builds a rustls client configuration.
        ///
        /// Errors are [`Error::Config`] naming the parameter and the file: one
        /// that cannot be read, holds no certificate or key, or a certificate
        /// without its key (or the other way round).
        pub fn client_config(&self) -> Result<ClientConfig> {
            self.validate()?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let roots = Arc::new(self.roots()?);
            let builder = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid("tls", e.to_string()))?;
            let builder = match &self.server_name {
                // The client libraries check the certificate against the host
                // they connect to; a verifier that substitutes the configured
                // name is the one way to override that in all of them.
                Some(name) => {
                    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| invalid("tls_ca_file", e.to_string()))?;
                    let name = ServerName::try_from(name.clone())
                        .map_err(|e| invalid("tls_server_name", e.to_string()))?;
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(ExpectedName { inner, name }))
                }
                None => builder.with_root_certificates(roots),
            };
            match (&self.cert_file, &self.key_file) {
                (Some(cert), Some(key)) => {
                    let chain = certificates("tls_cert_file", cert)?;
                    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                        invalid(
                            "tls_key_file",
                            format!("no private key read from `{}`: {e}", key.display()),
                        )
                    })?;
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| invalid("tls_key_file", e.to_string()))
                }
                _ => Ok(builder.with_no_client_auth()),
            }
        }

        fn roots(&self) -> Result<RootCertStore> {
            let mut roots = RootCertStore::empty();
            match &self.ca_file {
                Some(file) => {
                    for cert in certificates("tls_ca_file", file)? {
                        roots.add(cert).map_err(|e| {
                            invalid("tls_ca_file", format!("`{}`: {e}", file.display()))
                        })?;
                    }
                }
                None => {
                    // Unreadable system certificates are skipped, as browsers do;
                    // an empty store then fails the handshake with a clear error.
                    let (added, _) = roots
                        .add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                    tracing::debug!(added, "trusting the system's certificate authorities");
                }
            }
            Ok(roots)
        }
    }

    /// The certificates of a PEM file; none is an error.
    fn certificates(key: &str, file: &Path) -> Result<Vec<CertificateDer<'static>>> {
        let unreadable = |e: &dyn fmt::Display| -> Error {
            invalid(key, format!("cannot read `{}`: {e}", file.display()))
        };
        // Read first, so a missing file says so rather than "no certificate".
        let pem = std::fs::read(file).map_err(|e| unreadable(&e))?;
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| unreadable(&e))?;
        if chain.is_empty() {
            return Err(invalid(
                key,
                format!("`{}` holds no PEM certificate", file.display()),
            ));
        }
        Ok(chain)
    }

    /// Checks the server's certificate against a configured name instead of the
    /// one the client library connected to.
    #[derive(Debug)]
    struct ExpectedName {
        inner: Arc<WebPkiServerVerifier>,
        name: ServerName<'static>,
    }

    impl ServerCertVerifier for ExpectedName {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _connected_to: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> std::result::Result<ServerCertVerified, rustls::Error> {
            self.inner
                .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;
    use std::path::Path;

    use super::*;
    use crate::error::Error;

    fn key_of(result: Result<impl fmt::Debug>) -> String {
        match result {
            Err(Error::Config { key, .. }) => key,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn parameters_are_taken_and_checked() {
        let mut tls = TlsOptions::default();
        assert!(!tls.is_set());
        assert!(tls.set("tls_ca_file", "/etc/ca.pem").unwrap());
        assert!(tls.is_set());
        assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(key_of(tls.set("tls_cert_file", "")), "tls_cert_file");
        assert_eq!(key_of(tls.set("tls_server_name", "")), "tls_server_name");
        assert_eq!(
            key_of(tls.set("tls_server_name", "not a name")),
            "tls_server_name"
        );
        assert!(!tls.set("tls_other", "x").unwrap());
        assert_eq!(tls.server_name_for("10.0.0.1"), "10.0.0.1");
        tls.set("tls_server_name", "broker.internal").unwrap();
        assert_eq!(tls.server_name_for("10.0.0.1"), "broker.internal");
    }

    #[test]
    fn unreadable_files_name_the_parameter() {
        let missing = std::env::temp_dir().join("tidings-no-such-file.pem");
        let tls = TlsOptions {
            key_file: Some(missing.clone()),
            cert_file: Some(missing),
            ..TlsOptions::default()
        };
        assert_eq!(key_of(tls.check_files()), "tls_cert_file");
        let tls = TlsOptions {
            cert_file: Some("c.pem".into()),
            ..TlsOptions::default()
        };
        assert_eq!(key_of(tls.check_files()), "tls_key_file");

        let not_pem =
            std::env::temp_dir().join(format!("tidings-not-pem-{}.pem", std::process::id()));
        std::fs::write(&not_pem, "not pem").unwrap();
        let tls = TlsOptions {
            ca_file: Some(not_pem.clone()),
            ..TlsOptions::default()
        };
        let err = tls.check_files().unwrap_err();
        std::fs::remove_file(&not_pem).unwrap();
        assert!(
            err.to_string().contains("holds no PEM certificate"),
            "{err}"
        );
    }

    #[cfg(feature = "tls")]
    #[test]
    fn unreadable_or_unpaired_files_name_the_parameter_in_the_rustls_config() {
        let missing = std::env::temp_dir().join("tidings-no-such-file.pem");
        let with = |key: &str| {
            let mut tls = TlsOptions::default();
            tls.set(key, missing.to_str().unwrap()).unwrap();
            tls
        };
        assert_eq!(key_of(with("tls_ca_file").client_config()), "tls_ca_file");
        assert_eq!(
            key_of(with("tls_cert_file").client_config()),
            "tls_key_file"
        );
        assert_eq!(
            key_of(with("tls_key_file").client_config()),
            "tls_cert_file"
        );

        // A file that exists but holds no certificate.
        let empty = std::env::temp_dir().join(format!("tidings-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "not pem").unwrap();
        let tls = TlsOptions {
            ca_file: Some(empty.clone()),
            ..TlsOptions::default()
        };
        let err = tls.client_config().unwrap_err();
        std::fs::remove_file(&empty).unwrap();
        assert!(
            err.to_string().contains("holds no PEM certificate"),
            "{err}"
        );
    }

    #[cfg(feature = "tls")]
    #[test]
    fn the_system_roots_serve_when_no_ca_file_is_given() {
        TlsOptions::default()
            .client_config()
            .expect("a configuration with the system's roots");
        TlsOptions {
            server_name: Some("broker.internal".into()),
            ..TlsOptions::default()
        }
        .client_config()
        .expect("a configuration with a server name");
    }
}
