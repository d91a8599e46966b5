//! What the app learns of its caller, and how surely: mutual TLS with an
//! allowed SAN list, the PROXY protocol for TCP ports, and the caller's
//! trace continued through the proxy's span.

use std::{
    io::Read,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use ambassador_tests::{
    upstream::{CertKind, HttpUpstream, TestCa},
    *,
};

/// A Pod whose config `yaml` makes from its shared directory, initialised
/// and proxied.
fn pod_with(yaml: impl FnOnce(&std::path::Path) -> String) -> Pod {
    let mut pod = Pod::new("");
    pod.rewrite_config(&yaml(&pod.shared_dir()));
    let out = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup.clone()));
    assert!(out.status.success(), "{}", stderr(&out));
    pod.start_proxy_with_kernel_maps(&pod.name(), &[]);
    pod
}

#[test]
fn mutual_tls_admits_only_allowed_client_names_and_tells_the_app_who() {
    let ca = TestCa::new("pod CA");
    let clients = TestCa::new("clients CA");
    let outsider = TestCa::new("other CA");
    let mut dir = std::path::PathBuf::new();
    let pod = pod_with(|d| {
        dir = d.to_path_buf();
        write_files(d, &ca, &clients, &outsider)
    });
    let ca_file = dir.join("pod_CA-ca.pem");
    let app = HttpUpstream::plain(pod.app_listener(8443));
    let resolve = format!("pod.test:8443:{POD_V4}");
    let get = |cert: Option<&str>| {
        let mut args = vec![
            "--cacert".to_string(),
            ca_file.display().to_string(),
            "--resolve".into(),
            resolve.clone(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            "-H".into(),
            "X-Forwarded-Client-Cert: URI=\"spiffe://forged\"".into(),
        ];
        if let Some(c) = cert {
            args.extend([
                "--cert".into(),
                dir.join(format!("{c}.crt")).display().to_string(),
                "--key".into(),
                dir.join(format!("{c}.key")).display().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        stdout(&pod.caller_curl("https://pod.test:8443/", &args))
    };
    assert_eq!(get(Some("orders.client.test")), "200");
    let xfcc = app.seen()[0]
        .header("x-forwarded-client-cert")
        .unwrap()
        .to_string();
    assert!(xfcc.starts_with("Hash="), "{xfcc}");
    assert!(xfcc.contains(r#"DNS="orders.client.test""#), "{xfcc}");
    assert!(!xfcc.contains("forged"), "{xfcc}");
    for refused in [None, Some("intruder.client.test"), Some("outsider")] {
        assert_ne!(get(refused), "200", "{refused:?}");
    }
    assert_eq!(app.seen().len(), 1, "no refused caller reached the app");
    let m = pod.metrics();
    assert!(
        m.contains(r#"ambassador_tls_handshake_failures_total{service="inbound-8443",direction="inbound",reason="client_certificate"}"#),
        "{m}"
    );
}

/// The Pod's certificate, the client CA and three client certificates in
/// `d`; the config naming them.
fn write_files(d: &std::path::Path, ca: &TestCa, clients: &TestCa, outsider: &TestCa) -> String {
    let (cert, key) = ca.issue(CertKind::Valid, "pod.test", None);
    std::fs::write(d.join("tls.crt"), cert).unwrap();
    std::fs::write(d.join("tls.key"), key).unwrap();
    ca.write_ca_file(d);
    let client_ca = clients.write_ca_file(d);
    for name in ["orders.client.test", "intruder.client.test"] {
        let (c, k) = clients.issue_client(name);
        std::fs::write(d.join(format!("{name}.crt")), c).unwrap();
        std::fs::write(d.join(format!("{name}.key")), k).unwrap();
    }
    let (c, k) = outsider.issue_client("orders.client.test");
    std::fs::write(d.join("outsider.crt"), c).unwrap();
    std::fs::write(d.join("outsider.key"), k).unwrap();
    format!(
        r#"
inbound:
  ports: [8443]
  policies:
    - port: 8443
      tls:
        cert: {d}/tls.crt
        key: {d}/tls.key
        client_ca: {ca}
        allowed_sans: [orders.client.test]
"#,
        d = d.display(),
        ca = client_ca.display()
    )
}

#[test]
fn tcp_ports_can_tell_the_app_the_caller_with_the_proxy_protocol() {
    let pod = pod_with(|_| {
        "inbound:\n  ports: [5000]\n  policies: [{ port: 5000, protocol: tcp, proxy_protocol: true }]\n".into()
    });
    let listener = pod.app_listener(5000);
    let app = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = [0u8; 28];
        s.read_exact(&mut head).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        (peer, head, rest)
    });
    let addr: SocketAddr = format!("{POD_V4}:5000").parse().unwrap();
    let local = pod.servers.enter(move || {
        use std::io::Write;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.write_all(b"hello").unwrap();
        s.local_addr().unwrap()
    });
    let (peer, head, rest) = app.join().unwrap();
    assert_eq!(peer.ip().to_string(), "127.0.0.6");
    assert_eq!(&head[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(&head[12..16], &[0x21, 0x11, 0, 12]);
    assert_eq!(
        &head[16..20],
        &local
            .ip()
            .to_string()
            .parse::<std::net::Ipv4Addr>()
            .unwrap()
            .octets()
    );
    assert_eq!(
        &head[20..24],
        &POD_V4.parse::<std::net::Ipv4Addr>().unwrap().octets()
    );
    assert_eq!(u16::from_be_bytes([head[24], head[25]]), local.port());
    assert_eq!(u16::from_be_bytes([head[26], head[27]]), 5000);
    assert_eq!(rest, b"hello");
}

#[test]
fn a_callers_trace_continues_through_a_server_span_to_the_app() {
    let mut pod = Pod::new("");
    let collector = OtlpReceiver::start(&pod.netns, "127.0.0.1:4318");
    pod.rewrite_config(
        r#"
telemetry:
  tracing: { otlp_endpoint: "http://127.0.0.1:4318", service_name: pod-gateway }
inbound:
  ports: [8080]
  policies: [{ port: 8080, protocol: http }]
"#,
    );
    let out = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup.clone()));
    assert!(out.status.success(), "{}", stderr(&out));
    let app = HttpUpstream::plain(pod.app_listener(8080));
    pod.start_proxy_with_kernel_maps(&pod.name(), &[]);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let out = pod.caller_curl(
        &format!("http://{POD_V4}:8080/traced"),
        &[
            "-H",
            &format!("traceparent: 00-{trace}-{caller_span}-01"),
            "-o",
            "/dev/null",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let tp = app.seen()[0].header("traceparent").unwrap().to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[1], trace, "{tp}");
    assert_ne!(
        parts[2], caller_span,
        "the app's parent is the proxy's span"
    );
    let span = collector
        .wait_span(|s| s["traceId"] == trace)
        .unwrap_or_else(|| panic!("no span: {:?}", collector.spans()));
    assert_eq!(span["parentSpanId"], caller_span);
    assert_eq!(span["spanId"], parts[2]);
    assert_eq!(span["kind"], 2, "SPAN_KIND_SERVER");
    assert!(span["attributes"].to_string().contains("inbound-8080"));
}

/// What the HTTP/2 app saw of one request: (head, body).
type SeenH2 = std::sync::Arc<std::sync::Mutex<Vec<(http::request::Parts, Vec<u8>)>>>;

/// A gRPC-shaped app speaking HTTP/2 in the clear: each request's body is
/// echoed back between `application/grpc` headers and `grpc-status: 0`
/// trailers; it counts its connections.
fn grpc_app(
    listener: std::net::TcpListener,
) -> (SeenH2, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let seen: SeenH2 = Default::default();
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (log, count) = (seen.clone(), conns.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let log = log.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let log = log.clone();
                        tokio::spawn(async move {
                            let (parts, mut body) = req.into_parts();
                            let mut data = Vec::new();
                            while let Some(Ok(chunk)) = body.data().await {
                                let _ = body.flow_control().release_capacity(chunk.len());
                                data.extend_from_slice(&chunk);
                            }
                            log.lock().unwrap().push((parts, data.clone()));
                            let resp = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .unwrap();
                            let mut send = respond.send_response(resp, false).unwrap();
                            send.send_data(data.into(), false).unwrap();
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            trailers.insert("grpc-message", "echoed".parse().unwrap());
                            send.send_trailers(trailers).unwrap();
                        });
                    }
                });
            }
        });
    });
    (seen, conns)
}

/// A caller's HTTP/2 (prior knowledge) gRPC-shaped call to the Pod: the
/// answer's status, body and trailers.
fn grpc_call(pod: &Pod, path: &str, body: &'static [u8]) -> (u16, Vec<u8>, http::HeaderMap) {
    let addr: SocketAddr = format!("{POD_V4}:8080").parse().unwrap();
    let tcp = pod
        .servers
        .enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        tcp.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::post(format!("http://orders.pod.test{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        send.send_data(bytes::Bytes::from_static(body), true)
            .unwrap();
        let (parts, mut incoming) = resp.await.unwrap().into_parts();
        let mut data = Vec::new();
        while let Some(Ok(chunk)) = incoming.data().await {
            let _ = incoming.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = incoming.trailers().await.unwrap().unwrap_or_default();
        (parts.status.as_u16(), data, trailers)
    })
}

#[test]
fn an_http2_app_gets_grpc_calls_with_their_trailers_on_one_connection() {
    let pod = pod_with(|_| {
        "inbound:\n  ports: [8080]\n  policies:\n    - { port: 8080, app_protocol: http2 }\n".into()
    });
    let (seen, conns) = grpc_app(pod.app_listener(8080));

    for n in 0..3 {
        let (status, body, trailers) = grpc_call(&pod, "/shop.Orders/Get", b"\0\0\0\0\x02hi");
        assert_eq!(status, 200, "call {n}");
        assert_eq!(body, b"\0\0\0\0\x02hi");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert_eq!(trailers.get("grpc-message").unwrap(), "echoed");
    }
    // An HTTP/1.1 caller is served by the same HTTP/2 app.
    let out = pod.caller_curl(
        &format!("http://{POD_V4}:8080/shop.Orders/List"),
        &["-o", "/dev/null", "-w", "%{http_code}"],
    );
    assert_eq!(stdout(&out), "200");

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    let (head, body) = &seen[0];
    assert_eq!(head.version, http::Version::HTTP_2);
    assert_eq!(head.uri.path(), "/shop.Orders/Get");
    assert_eq!(body, b"\0\0\0\0\x02hi");
    assert_eq!(head.headers.get("te").unwrap(), "trailers");
    assert_eq!(
        head.headers.get("x-forwarded-host").unwrap(),
        "orders.pod.test"
    );
    assert!(head.headers.get("host").is_none());
    assert_eq!(head.uri.authority().unwrap().as_str(), "127.0.0.1:8080");
    assert_eq!(
        head.headers.get("x-forwarded-for").unwrap(),
        SERVER_V4,
        "{:?}",
        head.headers
    );
    // Four callers' connections, one HTTP/2 connection to the app.
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The app's grpc-status trailers are counted, each call once.
    let m = pod.metrics();
    assert!(
        m.contains(r#"ambassador_grpc_responses_total{service="inbound-8080",direction="inbound",grpc_code="OK"} 4"#),
        "{m}"
    );
}
