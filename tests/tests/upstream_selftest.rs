//! The HTTP test upstreams themselves, on loopback: no root, no namespaces.
//! A verifying rustls client checks what the proxy's TLS origination will
//! rely on: the right certificates pass, the broken ones fail, and the
//! upstream's records say what arrived.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    sync::Arc,
    time::Duration,
};

use ambassador_tests::upstream::{CertKind, HttpUpstream, SeenRequest, TestCa, TlsVersions};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    CertificateError, ClientConfig, ProtocolVersion, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

const NAME: &str = "svc.example.test";
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind loopback")
}

/// Each test drives its client on a runtime of its own; the upstreams have theirs.
fn run<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime")
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(5), f)
                .await
                .expect("client timed out")
        })
}

struct Reply {
    status: u16,
    upstream_version: String,
    body: String,
}

/// One request over `io`, HTTP/2 when `h2` (absolute URI), else HTTP/1.1.
async fn request<I>(io: I, h2: bool, authority: &str, path: &str, body: &'static str) -> Reply
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let method = if body.is_empty() { "GET" } else { "POST" };
    let builder = Request::builder()
        .method(method)
        .header("x-test", "selftest");
    let req = if h2 {
        builder
            .uri(format!("https://{authority}{path}"))
            .version(Version::HTTP_2)
    } else {
        builder.uri(path).header("host", authority)
    }
    .body(Full::new(Bytes::from_static(body.as_bytes())))
    .expect("request");
    let io = TokioIo::new(io);
    let resp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        send.send_request(req).await.expect("h2 request")
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        send.send_request(req).await.expect("h1 request")
    };
    let status = resp.status().as_u16();
    let upstream_version = resp
        .headers()
        .get("x-upstream-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.into_body().collect().await.expect("response body");
    Reply {
        status,
        upstream_version,
        body: String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    }
}

fn client_config(ca: &TestCa, alpn: &[&str]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.ca_pem().as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("add CA root");
    }
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

async fn tls_connect(
    ca: &TestCa,
    addr: SocketAddr,
    server_name: ServerName<'static>,
    alpn: &[&str],
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(client_config(ca, alpn))
        .connect(server_name, tcp)
        .await
}

fn name() -> ServerName<'static> {
    ServerName::try_from(NAME).expect("server name")
}

fn tls_upstream(ca: &TestCa, kind: CertKind, alpn: &[&str], v: TlsVersions) -> HttpUpstream {
    let (chain, key) = ca.issue(kind, NAME, Some(LOCALHOST));
    HttpUpstream::tls(listener(), &chain, &key, alpn, v)
}

fn only(seen: Vec<SeenRequest>) -> SeenRequest {
    assert_eq!(seen.len(), 1, "{seen:?}");
    seen.into_iter().next().expect("one request")
}

#[test]
fn plain_upstream_serves_http1_and_h2c_prior_knowledge() {
    let up = HttpUpstream::plain(listener());
    let addr = up.addr;
    let authority = addr.to_string();

    let r = run(async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        request(tcp, false, &authority, "/hello", "").await
    });
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!("served by {addr} via HTTP/1.1\n"));
    assert_eq!(r.upstream_version, "HTTP/1.1");

    let r = run(async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        request(tcp, true, &authority, "/h2c", "hello").await
    });
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!("served by {addr} via HTTP/2.0\n"));
    assert_eq!(r.upstream_version, "HTTP/2.0");

    let seen = up.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].uri.as_str()),
        ("GET", "/hello")
    );
    assert_eq!(seen[0].version, "HTTP/1.1");
    assert_eq!(seen[0].header("host"), Some(authority.as_str()));
    assert_eq!(seen[0].header("X-Test"), Some("selftest"));
    assert_eq!(seen[0].body_len, 0);
    assert_eq!(seen[1].method, "POST");
    assert_eq!(seen[1].version, "HTTP/2.0");
    assert!(seen[1].uri.ends_with("/h2c"), "{}", seen[1].uri);
    assert_eq!(seen[1].body_len, 5);
    assert_eq!(up.accepted(), 2);
    assert!(up.tcp_bytes() > 0);
    // In the clear, the request line is on the wire.
    assert!(up.plaintext_leaked(b"GET /hello HTTP/1.1"));
}

#[test]
fn echo_headers_returns_what_arrived() {
    let up = HttpUpstream::plain(listener());
    let addr = up.addr;
    let r = run(async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        request(tcp, false, "echo.example.test", "/echo-headers", "").await
    });
    assert_eq!(r.status, 200);
    assert!(r.body.contains("host: echo.example.test\n"), "{}", r.body);
    assert!(r.body.contains("x-test: selftest\n"), "{}", r.body);
    assert_eq!(only(up.seen()).uri, "/echo-headers");
}

#[test]
fn tls_upstream_negotiates_h2_and_keeps_the_request_off_the_wire() {
    let ca = TestCa::new("selftest CA");
    let up = tls_upstream(
        &ca,
        CertKind::Valid,
        &["h2", "http/1.1"],
        TlsVersions::default(),
    );
    let addr = up.addr;
    let r = run(async {
        let tls = tls_connect(&ca, addr, name(), &["h2", "http/1.1"])
            .await
            .expect("valid certificate is accepted");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(ProtocolVersion::TLSv1_3)
        );
        request(tls, true, NAME, "/secret-path", "").await
    });
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!("served by {addr} via HTTP/2.0\n"));
    let seen = only(up.seen());
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(seen.uri, format!("https://{NAME}/secret-path"));
    assert!(up.tcp_bytes() > 0);
    assert!(!up.plaintext_leaked(b"/secret-path"));
    // The SNI is in the ClientHello, which shows the raw capture works.
    assert!(up.plaintext_leaked(NAME.as_bytes()));
}

#[test]
fn tls_upstream_with_http11_alpn_and_tls12_only() {
    let ca = TestCa::new("selftest CA");
    let up = tls_upstream(&ca, CertKind::Valid, &["http/1.1"], TlsVersions::Tls12Only);
    let addr = up.addr;
    let r = run(async {
        // By IP: the valid certificate carries the IP too.
        let tls = tls_connect(&ca, addr, ServerName::from(LOCALHOST), &["h2", "http/1.1"])
            .await
            .expect("valid certificate is accepted for its IP");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(ProtocolVersion::TLSv1_2)
        );
        request(tls, false, NAME, "/old", "").await
    });
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream_version, "HTTP/1.1");
    assert_eq!(only(up.seen()).uri, "/old");
}

#[test]
fn broken_certificates_are_rejected_by_a_verifying_client() {
    let ca = TestCa::new("selftest CA");
    type Expected = fn(&CertificateError) -> bool;
    let cases: [(CertKind, Expected); 3] = [
        (CertKind::Expired, |e| {
            matches!(
                e,
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        }),
        (CertKind::WrongName, |e| {
            matches!(
                e,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        }),
        (CertKind::SelfSigned, |e| {
            matches!(e, CertificateError::UnknownIssuer)
        }),
    ];
    for (kind, expected) in cases {
        let up = tls_upstream(&ca, kind, &["h2", "http/1.1"], TlsVersions::default());
        let addr = up.addr;
        let err = run(async { tls_connect(&ca, addr, name(), &["h2"]).await })
            .err()
            .unwrap_or_else(|| panic!("{kind:?} certificate was accepted"));
        let cert_err = match err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(c)) => c.clone(),
            other => panic!("{kind:?}: not a certificate error: {err} ({other:?})"),
        };
        assert!(expected(&cert_err), "{kind:?}: {cert_err:?}");
        // The handshake reached the upstream; no request did.
        assert!(up.tcp_bytes() > 0, "{kind:?}");
        assert_eq!(up.accepted(), 1, "{kind:?}");
        assert!(up.seen().is_empty(), "{kind:?}");
    }
}

#[test]
fn ca_file_is_written_and_upstream_stops_on_drop() {
    let ca = TestCa::new("selftest CA/1");
    let dir = std::env::temp_dir();
    let path = ca.write_ca_file(&dir);
    assert!(path.starts_with(&dir));
    let text = std::fs::read_to_string(&path).expect("read CA file");
    assert_eq!(text, ca.ca_pem());
    assert!(text.starts_with("-----BEGIN CERTIFICATE-----"));
    std::fs::remove_file(&path).expect("remove CA file");
    assert!(ca.key_pem().contains("PRIVATE KEY"));

    let up = HttpUpstream::plain(listener());
    let addr = up.addr;
    drop(up);
    // The listener went with the runtime thread.
    assert!(std::net::TcpStream::connect(addr).is_err());
}
