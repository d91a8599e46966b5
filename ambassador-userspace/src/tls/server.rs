//! TLS termination toward callers of the Pod: the Pod's certificate and key,
//! re-read when their files change (a rotated Secret); connections already
//! open keep the config they started with.

use std::{io, sync::Arc};

use rustls::{
    ServerConfig,
    pki_types::{PrivateKeyDer, pem::PemObject},
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
        let files = [settings.cert.clone(), settings.key.clone()];
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

    /// The handshake with a caller.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        TlsAcceptor::from(self.config()).accept(tcp).await
    }
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
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
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
