//! TLS origination toward upstreams (rustls, ring provider), and
//! termination toward the Pod's callers (`server`).
//!
//! Verification is on by default against the webpki roots plus an optional CA
//! bundle; SNI and the name checked come from the configured server name. The
//! files a service names (CA bundle, client certificate and key) are re-read
//! when they change on disk; connections already open keep the config they
//! started with.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use rustls::{
    ClientConfig, RootCertStore,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use tracing::warn;

use crate::{
    config::service::{TlsConfig, TlsVersion},
    files::FromFiles,
};

mod pem;
pub mod server;
mod stream;
pub use pem::TlsError;
use pem::read_certs;
pub use server::TlsTermination;
pub use stream::PlainOrTls;

/// One service's TLS client side.
pub struct TlsOrigin {
    /// Set when an upstream asked for a client certificate we do not have.
    cert_requested: Arc<AtomicBool>,
    settings: TlsConfig,
    server_name: ServerName<'static>,
    config: FromFiles<ClientConfig>,
    /// For `ambassador_tls_handshake_failures_total`.
    service: String,
}

impl TlsOrigin {
    /// ALPN offers no `h2`: the upstream speaks HTTP/1.1 on every connection.
    pub fn http1_only(&self) -> bool {
        !self.settings.alpn.iter().any(|p| p == "h2")
    }
}

impl std::fmt::Debug for TlsOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOrigin")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsOrigin {
    /// Builds the config now, so a missing or bad file stops start-up.
    /// `default_name` is the endpoint's host when no `server_name` is set.
    pub fn new(
        service: &str,
        settings: &TlsConfig,
        default_name: Option<&str>,
    ) -> Result<Self, TlsError> {
        let name = settings
            .server_name
            .as_deref()
            .or(default_name)
            .ok_or_else(|| TlsError::ServerName(String::new()))?;
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| TlsError::ServerName(name.into()))?;
        if settings.insecure_skip_verify {
            warn!(
                service,
                "upstream.tls.insecure_skip_verify is ON: certificates of this upstream are NOT verified"
            );
        }
        let files: Vec<_> = [
            &settings.ca_file,
            &settings.client_cert,
            &settings.client_key,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        let cert_requested = Arc::new(AtomicBool::new(false));
        let config = build(settings, &cert_requested)?;
        Ok(TlsOrigin {
            cert_requested,
            settings: settings.clone(),
            server_name,
            config: FromFiles::new(files, config),
            service: service.to_string(),
        })
    }

    /// The config for a new connection: rebuilt first if a file changed.
    fn config(&self) -> Arc<ClientConfig> {
        self.config
            .get("TLS files", || build(&self.settings, &self.cert_requested))
    }

    /// True once the upstream has asked for a client certificate and none is
    /// configured. Under TLS 1.3 the refusal comes after the handshake, often
    /// as a plain reset: this names the cause anyway.
    pub fn client_cert_missing(&self) -> bool {
        self.cert_requested.load(Ordering::Relaxed)
    }

    /// Handshakes over `tcp`; the error keeps rustls' reason for [`reason`].
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        let r = TlsConnector::from(self.config())
            .connect(self.server_name.clone(), tcp)
            .await;
        if let Err(e) = &r {
            let class = reason_class(&reason(e));
            crate::metrics::get().tls_failure(&self.service, class);
        }
        r
    }
}

fn build(s: &TlsConfig, cert_requested: &Arc<AtomicBool>) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = match s.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder =
        ClientConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions)?;
    let builder = if s.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = &s.ca_file {
            let certs = read_certs("CA file", path)?;
            roots.add_parsable_certificates(certs);
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match (&s.client_cert, &s.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs("client certificate", cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
                what: "client key",
                path: key.clone(),
                source: io::Error::other(e.to_string()),
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_client_cert_resolver(Arc::new(NoClientCert(cert_requested.clone()))),
    };
    config.alpn_protocols = s.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

/// The kind of a TLS handshake failure, for a bounded label.
pub fn reason_class(reason: &str) -> &'static str {
    if reason.contains("expired") || reason.contains("not yet valid") {
        "expired"
    } else if reason.contains("server name") {
        "wrong_name"
    } else if reason.contains("unknown certificate authority") {
        "unknown_ca"
    } else if reason.contains("protocol version") {
        "protocol_version"
    } else if reason.contains("client certificate") {
        "client_certificate"
    } else if reason.contains("closed") || reason.contains("reset") {
        "connection"
    } else {
        "other"
    }
}

/// Why a handshake failed, in a few words for the app and the log.
pub fn reason(e: &io::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => "connection closed during handshake".into(),
            io::ErrorKind::ConnectionReset => "connection reset during handshake".into(),
            _ => format!("handshake failed: {e}"),
        };
    };
    match tls {
        E::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "certificate expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => "certificate not yet valid".into(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "certificate not valid for the server name".into()
            }
            C::UnknownIssuer => "unknown certificate authority".into(),
            C::Revoked => "certificate revoked".into(),
            other => format!("invalid certificate ({other:?})"),
        },
        E::AlertReceived(A::ProtocolVersion) | E::PeerIncompatible(_) => {
            "protocol version or parameters not supported by the upstream".into()
        }
        E::AlertReceived(a) => format!("upstream sent alert {a:?}"),
        E::NoApplicationProtocol => "no common application protocol (ALPN)".into(),
        other => format!("handshake failed: {other}"),
    }
}

/// No client certificate to give; remembers that one was asked for.
#[derive(Debug)]
struct NoClientCert(Arc<AtomicBool>);

impl rustls::client::ResolvesClientCert for NoClientCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.store(true, Ordering::Relaxed);
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// `insecure_skip_verify`: signatures are still checked (the handshake needs
/// them), the certificate itself is not.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// For tests across the crate: a server certificate and an origin that
/// trusts it.
#[cfg(test)]
mod reason_tests {
    use super::*;

    #[test]
    fn tls_reasons_fold_into_few_labels() {
        assert_eq!(reason_class("certificate expired"), "expired");
        assert_eq!(
            reason_class("certificate not valid for the server name"),
            "wrong_name"
        );
        assert_eq!(reason_class("unknown certificate authority"), "unknown_ca");
        assert_eq!(reason_class("anything else at all"), "other");
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A self-signed certificate for `name` (its own CA) and its key.
    pub struct SelfSigned {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    impl SelfSigned {
        pub fn new(name: &str) -> SelfSigned {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            SelfSigned { cert, key }
        }

        pub fn pem(&self) -> String {
            self.cert.pem()
        }

        /// A server config presenting it, offering `alpn`.
        pub fn acceptor(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
            let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.der().clone()],
                PrivateKeyDer::from_pem_slice(self.key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        }
    }

    /// An origin for `name` that trusts `ca_pem` (written to a file: the
    /// setting is a path), offering `alpn`. The file goes with the guard.
    pub fn origin(name: &str, ca_pem: &str, alpn: &[&str]) -> (TlsOrigin, CaFile) {
        let dir = std::env::temp_dir().join(format!("amb-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        let settings = TlsConfig {
            server_name: Some(name.into()),
            ca_file: Some(ca_file),
            client_cert: None,
            client_key: None,
            min_version: TlsVersion::V1_2,
            alpn: alpn.iter().map(|p| p.to_string()).collect(),
            insecure_skip_verify: false,
        };
        (
            TlsOrigin::new("test", &settings, None).unwrap(),
            CaFile(dir),
        )
    }

    pub struct CaFile(std::path::PathBuf);

    impl Drop for CaFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS server on loopback for `name`; returns its address and the CA
    /// (here the self-signed certificate itself) as PEM.
    async fn server(name: &str) -> (std::net::SocketAddr, String) {
        let cert = testing::SelfSigned::new(name);
        let acceptor = cert.acceptor(&[]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.write_all(b"ok").await;
                        let mut rest = Vec::new();
                        let _ = tls.read_to_end(&mut rest).await;
                    }
                });
            }
        });
        (addr, cert.pem())
    }

    #[tokio::test]
    async fn sessions_are_resumed() {
        let (addr, ca) = server("resume.test").await;
        let (origin, _ca_file) = testing::origin("resume.test", &ca, &["http/1.1"]);
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = origin.connect(tcp).await.unwrap();
            // Reading the first bytes also takes in the session tickets.
            let mut ok = [0u8; 2];
            tls.read_exact(&mut ok).await.unwrap();
            kinds.push(tls.get_ref().1.handshake_kind());
            tls.shutdown().await.unwrap();
        }
        assert_eq!(
            kinds,
            [
                Some(rustls::HandshakeKind::Full),
                Some(rustls::HandshakeKind::Resumed)
            ]
        );
    }
}
