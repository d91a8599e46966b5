//! TLS termination toward callers of the Pod: the Pod's certificate and key,
//! re-read when their files change (a rotated Secret); connections already
//! open keep the config they started with. With a client CA, callers must
//! show a certificate it signed (mutual TLS), naming an allowed SAN.

use std::{io, sync::Arc};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::pem::{TlsError, read_certs};
use crate::{
    config::{ServerTls, service::TlsVersion},
    files::FromFiles,
};

/// One inbound port's TLS server side.
pub struct TlsTermination {
    settings: ServerTls,
    config: FromFiles<ServerConfig>,
}

impl std::fmt::Debug for TlsTermination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTermination")
            .field("cert", &self.settings.cert)
            .finish_non_exhaustive()
    }
}

impl TlsTermination {
    /// Builds the config now, so a missing or bad file stops start-up (or
    /// the reload).
    pub fn new(settings: &ServerTls) -> Result<TlsTermination, TlsError> {
        let files = [
            Some(&settings.cert),
            Some(&settings.key),
            settings.client_ca.as_ref(),
        ]
        .into_iter()
        .flatten()
        .cloned();
        Ok(TlsTermination {
            config: FromFiles::new(files, build(settings)?),
            settings: settings.clone(),
        })
    }

    /// The config for a new connection: rebuilt first if a file changed.
    fn config(&self) -> Arc<ServerConfig> {
        self.config
            .get("inbound certificate", || build(&self.settings))
    }

    /// The handshake with a caller, and its certificate's names checked.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        let stream = TlsAcceptor::from(self.config()).accept(tcp).await?;
        let allowed = &self.settings.allowed_sans;
        if !allowed.is_empty() {
            let names = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| sans(c))
                .unwrap_or_default();
            if !names.iter().any(|n| allowed.iter().any(|a| a == n.value())) {
                return Err(io::Error::other(
                    "the client certificate names none of allowed_sans",
                ));
            }
        }
        Ok(stream)
    }
}

/// A subject alternative name of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum San {
    Dns(String),
    Uri(String),
}

impl San {
    pub fn value(&self) -> &str {
        match self {
            San::Dns(s) | San::Uri(s) => s,
        }
    }
}

/// The DNS and URI names a certificate carries (none if it cannot be read).
pub fn sans(cert: &CertificateDer<'_>) -> Vec<San> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(San::Dns(d.to_string())),
            GeneralName::URI(u) => Some(San::Uri(u.to_string())),
            _ => None,
        })
        .collect()
}

fn build(s: &ServerTls) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = match s.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let chain = read_certs("certificate", &s.cert)?;
    let key = PrivateKeyDer::from_pem_file(&s.key).map_err(|e| TlsError::File {
        what: "private key",
        path: s.key.clone(),
        source: io::Error::other(e.to_string()),
    })?;
    let builder =
        ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions)?;
    let builder = match &s.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(read_certs("client CA", ca)?);
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| rustls::Error::General(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = s.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory, removed by the test's end (best effort).
    struct Dir(std::path::PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("amb-tls-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write_pair(dir: &std::path::Path, name: &str) -> ServerTls {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        ServerTls {
            cert: c,
            key: k,
            alpn: vec!["h2".into(), "http/1.1".into()],
            min_version: TlsVersion::V1_2,
            client_ca: None,
            allowed_sans: Vec::new(),
        }
    }

    #[test]
    fn a_key_that_is_not_pem_is_named() {
        let dir = Dir::new("key");
        let s = write_pair(dir.path(), "pod.test");
        std::fs::write(&s.key, "not a key").unwrap();
        let e = TlsTermination::new(&s).unwrap_err().to_string();
        assert!(e.contains("private key") && e.contains("tls.key"), "{e}");
    }

    #[test]
    fn a_certificate_file_without_certificates_is_named() {
        let dir = Dir::new("cert");
        let s = write_pair(dir.path(), "pod.test");
        std::fs::write(&s.cert, "").unwrap();
        let e = TlsTermination::new(&s).unwrap_err().to_string();
        assert!(e.contains("certificate") && e.contains("tls.crt"), "{e}");
    }

    #[test]
    fn alpn_is_offered_in_order() {
        let dir = Dir::new("alpn");
        let s = write_pair(dir.path(), "pod.test");
        let t = TlsTermination::new(&s).unwrap();
        assert_eq!(
            t.config().alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
