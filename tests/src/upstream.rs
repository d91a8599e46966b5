//! Real HTTP upstreams for the TLS-origination tests.
//!
//! A test CA made with rcgen signs leaf certificates (valid, expired, for the
//! wrong name, or self-signed), and `HttpUpstream` serves HTTP/1.1 and HTTP/2
//! with hyper, either in the clear (h2c by prior knowledge included) or over
//! rustls with a chosen ALPN list and TLS versions. Each upstream records the
//! requests it answered and every raw byte that reached it before TLS, so a
//! test can prove what did (or did not) cross the wire.
//!
//! The tests are plain `#[test]` functions, so each upstream runs its own
//! tokio runtime on a background thread and stops when dropped.

use std::{
    convert::Infallible,
    fs, io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    task::{Context, Poll},
    thread::{self, JoinHandle},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::oneshot,
};
use tokio_rustls::TlsAcceptor;

/// The name `CertKind::WrongName` certificates are issued for.
pub const WRONG_NAME: &str = "wrong.example.test";

/// How much raw traffic an upstream keeps for `plaintext_leaked`.
const RAW_CAP: usize = 1 << 20;

/// A certificate authority the tests trust (and the proxy is told to trust).
pub struct TestCa {
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// What kind of server certificate `TestCa::issue` makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertKind {
    /// Signed by the CA for the requested name (and IP), valid now.
    Valid,
    /// Signed by the CA for the requested name, but valid only in the past.
    Expired,
    /// Signed by the CA and valid now, but for `WRONG_NAME` only.
    WrongName,
    /// For the requested name and valid now, but signed by its own key.
    SelfSigned,
}

impl TestCa {
    /// A fresh CA (new key) whose subject common name is `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.distinguished_name.remove(DnType::CommonName);
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - TimeDuration::days(1);
        params.not_after = now + TimeDuration::days(3650);
        let key = KeyPair::generate().expect("generate test CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign test CA");
        TestCa {
            name: name.to_string(),
            issuer,
        }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA private key, PEM (PKCS#8).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Writes the CA certificate to `<dir>/<name>-ca.pem` and returns the path,
    /// for configs and tools (curl --cacert) that want a file.
    pub fn write_ca_file(&self, dir: &Path) -> PathBuf {
        // The CA name is free text; keep the file name to safe characters.
        let stem: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("{stem}-ca.pem"));
        fs::write(&path, self.ca_pem())
            .unwrap_or_else(|e| panic!("write CA file {}: {e}", path.display()));
        path
    }

    /// A server certificate of `kind` for `dns_name` (and `ip`, if given), as
    /// `(cert_chain_pem, key_pem)`. The chain is the leaf alone: there is no
    /// intermediate, and a verifying client must already hold the CA.
    pub fn issue(&self, kind: CertKind, dns_name: &str, ip: Option<IpAddr>) -> (String, String) {
        let name = match kind {
            CertKind::WrongName => WRONG_NAME,
            _ => dns_name,
        };
        let mut params =
            CertificateParams::new(vec![name.to_string()]).expect("leaf subject alt name");
        if let (Some(ip), false) = (ip, kind == CertKind::WrongName) {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
        params.distinguished_name.remove(DnType::CommonName);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = match kind {
            CertKind::Expired => (now - TimeDuration::days(30), now - TimeDuration::days(1)),
            _ => (now - TimeDuration::days(1), now + TimeDuration::days(365)),
        };
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = match kind {
            CertKind::SelfSigned => params.self_signed(&key),
            _ => {
                params.use_authority_key_identifier_extension = true;
                params.signed_by(&key, &self.issuer)
            }
        }
        .expect("sign leaf certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// A client certificate for mutual TLS, signed by this CA, as
    /// `(cert_pem, key_pem)`.
    pub fn issue_client(&self, name: &str) -> (String, String) {
        let mut params = CertificateParams::new(vec![name.to_string()]).expect("client name");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) =
            (now - TimeDuration::days(1), now + TimeDuration::days(365));
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate client key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign client certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// Which TLS versions a TLS upstream accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsVersions {
    /// TLS 1.2 and 1.3.
    #[default]
    Tls12And13,
    /// TLS 1.2 only, like an old origin.
    Tls12Only,
}

/// One request an upstream answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    /// As hyper reports it: origin-form (`/path`) for HTTP/1.1, absolute
    /// (`https://host/path`) for HTTP/2, where `:authority` is part of it.
    pub uri: String,
    /// "HTTP/1.1" or "HTTP/2.0".
    pub version: String,
    /// Names lowercase, in arrival order, repeats kept.
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

impl SeenRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What every connection of one upstream shares.
#[derive(Clone, Default)]
struct Shared {
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    tcp_bytes: Arc<AtomicUsize>,
    raw: Arc<Mutex<Vec<u8>>>,
    accepted: Arc<AtomicUsize>,
}

/// An HTTP/1.1 + HTTP/2 server, plain or TLS, on its own runtime thread.
pub struct HttpUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    tcp_bytes: Arc<AtomicUsize>,
    raw: Arc<Mutex<Vec<u8>>>,
    accepted: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpUpstream {
    /// Serves cleartext HTTP/1.1 and h2c (prior knowledge) on `listener`.
    pub fn plain(listener: std::net::TcpListener) -> HttpUpstream {
        HttpUpstream::start(listener, None)
    }

    /// Serves HTTPS on `listener` with the given certificate chain and key,
    /// offering `alpn` (e.g. `&["h2", "http/1.1"]` or `&["http/1.1"]`).
    pub fn tls(
        listener: std::net::TcpListener,
        cert_chain_pem: &str,
        key_pem: &str,
        alpn: &[&str],
        versions: TlsVersions,
    ) -> HttpUpstream {
        HttpUpstream::tls_inner(listener, cert_chain_pem, key_pem, alpn, versions, None)
    }

    /// As `tls`, but the handshake requires a client certificate signed by
    /// `client_ca_pem` (mutual TLS).
    pub fn tls_requiring_client_cert(
        listener: std::net::TcpListener,
        cert_chain_pem: &str,
        key_pem: &str,
        client_ca_pem: &str,
    ) -> HttpUpstream {
        HttpUpstream::tls_inner(
            listener,
            cert_chain_pem,
            key_pem,
            &["h2", "http/1.1"],
            TlsVersions::default(),
            Some(client_ca_pem),
        )
    }

    fn tls_inner(
        listener: std::net::TcpListener,
        cert_chain_pem: &str,
        key_pem: &str,
        alpn: &[&str],
        versions: TlsVersions,
        client_ca_pem: Option<&str>,
    ) -> HttpUpstream {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("parse upstream certificate chain PEM");
        assert!(!chain.is_empty(), "upstream certificate chain PEM is empty");
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("parse upstream key PEM");
        let versions: &[&'static rustls::SupportedProtocolVersion] = match versions {
            TlsVersions::Tls12And13 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersions::Tls12Only => &[&rustls::version::TLS12],
        };
        // The provider is named rather than left to the process default: the
        // workspace builds rustls with ring only, and no default is installed.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .expect("ring supports the chosen TLS versions");
        let builder = match client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    roots.add(c.expect("client CA PEM")).expect("client CA");
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .expect("upstream certificate and key match");
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        HttpUpstream::start(listener, Some(TlsAcceptor::from(Arc::new(config))))
    }

    fn start(listener: std::net::TcpListener, tls: Option<TlsAcceptor>) -> HttpUpstream {
        let addr = listener.local_addr().expect("upstream listener address");
        let shared = Shared::default();
        let (stop_tx, stop_rx) = oneshot::channel();
        // Setup errors are reported back so they fail the test, not a thread.
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let state = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("upstream-{addr}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    // from_std registers with the reactor, so it must run here.
                    let listener = match listener
                        .set_nonblocking(true)
                        .and_then(|()| tokio::net::TcpListener::from_std(listener))
                    {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    tokio::select! {
                        _ = stop_rx => {}
                        () = accept_loop(listener, addr, tls, state) => {}
                    }
                });
                // Dropping the runtime here drops every connection task.
            })
            .expect("spawn upstream thread");
        ready_rx
            .recv()
            .expect("upstream thread exited during setup")
            .expect("start upstream listener");
        HttpUpstream {
            addr,
            seen: shared.seen,
            tcp_bytes: shared.tcp_bytes,
            raw: shared.raw,
            accepted: shared.accepted,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// The requests answered so far, in order.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Raw bytes received on all connections, counted below TLS.
    pub fn tcp_bytes(&self) -> usize {
        self.tcp_bytes.load(Ordering::SeqCst)
    }

    /// Whether `needle` appears in the raw bytes received (the first 1 MiB,
    /// all connections concatenated in arrival order). An empty needle is
    /// trivially found.
    pub fn plaintext_leaked(&self, needle: &[u8]) -> bool {
        if needle.is_empty() {
            return true;
        }
        self.raw
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .windows(needle.len())
            .any(|w| w == needle)
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Joined so the port is closed once the upstream is gone.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    me: SocketAddr,
    tls: Option<TlsAcceptor>,
    state: Shared,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            // Transient (e.g. EMFILE, ECONNABORTED): keep serving, without
            // spinning while the condition lasts.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        state.accepted.fetch_add(1, Ordering::SeqCst);
        let io = Counting {
            inner: stream,
            total: state.tcp_bytes.clone(),
            raw: state.raw.clone(),
        };
        let (tls, state) = (tls.clone(), state.clone());
        tokio::spawn(async move {
            match tls {
                None => serve(io, auto::Builder::new(TokioExecutor::new()), me, state).await,
                Some(acceptor) => {
                    // A failed handshake is an expected outcome for the
                    // certificate tests: the client refused us.
                    let Ok(stream) = acceptor.accept(io).await else {
                        return;
                    };
                    let builder = auto::Builder::new(TokioExecutor::new());
                    // Honour the negotiated protocol like a real origin does,
                    // rather than sniffing the preface.
                    let builder = match stream.get_ref().1.alpn_protocol() {
                        Some(b"h2") => builder.http2_only(),
                        Some(b"http/1.1") => builder.http1_only(),
                        _ => builder,
                    };
                    serve(stream, builder, me, state).await;
                }
            }
        });
    }
}

async fn serve<I>(io: I, builder: auto::Builder<TokioExecutor>, me: SocketAddr, state: Shared)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let seen = state.seen;
    let service = service_fn(move |req| handle(req, me, seen.clone()));
    // Connection errors (resets, bad prefaces) are part of what tests provoke.
    let _ = builder.serve_connection(TokioIo::new(io), service).await;
}

async fn handle(
    req: Request<Incoming>,
    me: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    // A body that fails mid-way is recorded as what did arrive: nothing.
    let body_len = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let version = format!("{:?}", parts.version);
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let text = if parts.uri.path() == "/echo-headers" {
        headers.iter().map(|(n, v)| format!("{n}: {v}\n")).collect()
    } else {
        format!("served by {me} via {version}\n")
    };
    // Recorded before answering, so a client that has its response can assert.
    let before = {
        let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
        let path = parts.uri.path();
        let before = seen
            .iter()
            .filter(|s| s.uri.split('?').next() == Some(path))
            .count();
        seen.push(SeenRequest {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            version: version.clone(),
            headers,
            body_len,
        });
        before
    };
    if crate::origin::is_origin(&parts) {
        return Ok(crate::origin::respond(&parts, before).await);
    }
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    if parts.uri.path() == "/close" {
        // hyper closes the connection after this answer.
        resp.headers_mut().insert(
            http::header::CONNECTION,
            "close".parse().expect("a header value"),
        );
    }
    resp.headers_mut().insert(
        "x-upstream-version",
        version
            .parse()
            .expect("HTTP version is a valid header value"),
    );
    Ok(resp)
}

/// A TCP stream that counts and keeps what it reads, beneath any TLS.
struct Counting {
    inner: TcpStream,
    total: Arc<AtomicUsize>,
    raw: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let got = &buf.filled()[before..];
        if !got.is_empty() {
            self.total.fetch_add(got.len(), Ordering::SeqCst);
            let mut raw = self.raw.lock().unwrap_or_else(PoisonError::into_inner);
            let room = RAW_CAP.saturating_sub(raw.len());
            raw.extend_from_slice(&got[..got.len().min(room)]);
        }
        res
    }
}

impl AsyncWrite for Counting {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
