//! The HTTP ambassador in a simulated Pod: an unmodified curl in the app
//! container, real hyper upstreams (plain and TLS with certificates made here).

use std::{
    collections::HashMap,
    path::Path,
    process::Output,
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{
    upstream::{CertKind, HttpUpstream, TestCa, TlsVersions},
    *,
};

/// A name no resolver knows: the app reaches it only through the ambassador.
const PAYMENTS: &str = "payments.example.test";
/// The address the app "dials" for it (nothing there).
const NOWHERE: &str = "198.18.0.99";

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// curl in the app container, as the app would call: plain HTTP, no proxy
/// settings, no credentials.
fn curl(pod: &Pod, url: &str, extra: &[&str]) -> Reply {
    let mut args = vec!["-i"];
    args.extend_from_slice(extra);
    let out: Output = pod.curl(url, &args);
    assert!(
        out.status.success(),
        "curl failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let mut text = stdout(&out);
    // Interim responses (100 Continue) come first: skip them.
    while text.starts_with("HTTP/1.1 1") {
        text = text
            .split_once("\r\n\r\n")
            .expect("a response")
            .1
            .to_string();
    }
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.display().to_string()
}

#[test]
fn headers_are_injected_from_value_env_and_rotating_file() {
    let mut pod = Pod::new("");
    let dir = pod.shared_dir();
    let token = write(&dir, "token", "first-token\n");
    std::fs::write(
        &pod.config,
        format!(
            r#"
services:
  - name: api
    match: {{ cidr: {SERVER_V4}/32, port: 8080 }}
    protocol: http
    request:
      set_headers:
        authorization: {{ file: {token}, prefix: "Bearer " }}
        x-tenant: {{ value: acme }}
        x-from-env: {{ env: AMB_TEST_KEY }}
      remove_headers: [x-debug]
      rename_headers: {{ x-app-trace: x-trace }}
"#
        ),
    )
    .unwrap();
    pod.proxy_env
        .push(("AMB_TEST_KEY".into(), "env-value".into()));
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    let url = format!("http://{SERVER_V4}:8080/charge");

    let r = curl(
        &pod,
        &url,
        &[
            "-H",
            "authorization: Bearer spoofed",
            "-H",
            "x-debug: 1",
            "-H",
            "x-keep: yes",
            "-H",
            "x-app-trace: abc",
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.header("authorization"), Some("Bearer first-token"));
    assert_eq!(req.header("x-tenant"), Some("acme"));
    assert_eq!(req.header("x-from-env"), Some("env-value"));
    assert_eq!(
        req.header("x-debug"),
        None,
        "removed header reached the upstream"
    );
    assert_eq!(req.header("x-keep"), Some("yes"));
    assert_eq!(req.header("x-trace"), Some("abc"));
    assert_eq!(req.header("x-app-trace"), None);
    // The spoofed copy is gone, not just shadowed.
    let auths = req
        .headers
        .iter()
        .filter(|(k, _)| k == "authorization")
        .count();
    assert_eq!(auths, 1);

    // A Secret rotation: the new file replaces the old one atomically.
    let tmp = write(&dir, "token.new", "second-token");
    std::fs::rename(tmp, &token).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        curl(&pod, &url, &[]);
        let last = up.seen().pop().unwrap();
        if last.header("authorization") == Some("Bearer second-token") {
            break;
        }
        assert!(Instant::now() < deadline, "rotated token not picked up");
        thread::sleep(Duration::from_millis(200));
    }
    // Secrets never reach the logs.
    assert!(!pod.proxy_log().contains("first-token"));
    assert!(!pod.proxy_log().contains("second-token"));
}

/// A Pod whose config names `payments` by Host, sent over TLS to `upstream`.
/// The app's plain GET of `path` from the payments service, by Host.
fn payments_get(pod: &Pod, path: &str) -> Reply {
    curl(
        pod,
        &format!("http://{NOWHERE}{path}"),
        &["-H", &format!("Host: {PAYMENTS}")],
    )
}

fn payments_pod(ca_file: &str, port: u16) -> String {
    format!(
        r#"
default: deny
services:
  - name: payments
    match: {{ host: {PAYMENTS}, port: 80 }}
    protocol: http
    upstream:
      endpoints:
        - address: {SERVER_V4}:{port}
      tls:
        server_name: {PAYMENTS}
        ca_file: {ca_file}
"#
    )
}

#[test]
fn plain_http_is_upgraded_to_verified_https_and_http2() {
    let mut pod = Pod::new("");
    let ca = TestCa::new("payments-ca");
    let ca_file = ca.write_ca_file(&pod.shared_dir());
    std::fs::write(
        &pod.config,
        payments_pod(&ca_file.display().to_string(), 8443),
    )
    .unwrap();
    pod.start_proxy();
    let (cert, key) = ca.issue(CertKind::Valid, PAYMENTS, None);
    let up = HttpUpstream::tls(
        pod.server_listener(SERVER_V4, 8443),
        &cert,
        &key,
        &["h2", "http/1.1"],
        TlsVersions::default(),
    );

    // The app calls plain http://payments.example.test/charge.
    let r = payments_get(&pod, "/charge");
    assert_eq!(r.status, 200, "{:?} {}", r.headers, r.body);
    // HTTP/1.1 from the app, HTTP/2 over verified TLS to the upstream.
    assert_eq!(
        r.headers.get("x-upstream-version").map(String::as_str),
        Some("HTTP/2.0")
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, "HTTP/2.0");
    assert!(seen[0].uri.ends_with("/charge"), "{}", seen[0].uri);
    assert!(seen[0].uri.contains(PAYMENTS), "authority: {}", seen[0].uri);

    // Keep-alive toward the upstream: a second request reuses the connection.
    let r = payments_get(&pod, "/again");
    assert_eq!(r.status, 200);
    assert_eq!(up.accepted(), 1, "the pooled connection was not reused");

    // Any other host is denied, with the reason.
    let r = curl(
        &pod,
        &format!("http://{NOWHERE}/"),
        &["-H", "Host: elsewhere.example.test"],
    );
    assert_eq!(r.status, 403);
    let reason = r
        .headers
        .get("x-ambassador-error")
        .cloned()
        .unwrap_or_default();
    assert!(reason.contains("elsewhere.example.test"), "{reason}");
    assert!(reason.contains("deny"), "{reason}");
}

#[test]
fn bad_upstream_certificates_are_refused_with_the_reason_and_nothing_sent() {
    let ca = TestCa::new("payments-ca");
    let cases = [
        (CertKind::Expired, "certificate expired"),
        (CertKind::WrongName, "not valid for the server name"),
        (CertKind::SelfSigned, "unknown certificate authority"),
    ];
    let mut pod = Pod::new("");
    let ca_file = ca.write_ca_file(&pod.shared_dir());
    // One service per case, each on its own port.
    let mut config = String::from("default: deny\nservices:\n");
    for (i, _) in cases.iter().enumerate() {
        let port = 9443 + i as u16;
        config.push_str(&format!(
            r#"
  - name: case{i}
    match: {{ cidr: {NOWHERE}/32, port: {} }}
    protocol: http
    upstream:
      endpoints: [{{ address: "{SERVER_V4}:{port}" }}]
      tls: {{ server_name: {PAYMENTS}, ca_file: {} }}
"#,
            8000 + i,
            ca_file.display()
        ));
    }
    std::fs::write(&pod.config, config).unwrap();
    pod.start_proxy();
    for (i, (kind, want)) in cases.iter().enumerate() {
        let (cert, key) = ca.issue(*kind, PAYMENTS, None);
        let up = HttpUpstream::tls(
            pod.server_listener(SERVER_V4, 9443 + i as u16),
            &cert,
            &key,
            &["h2", "http/1.1"],
            TlsVersions::default(),
        );
        let r = curl(
            &pod,
            &format!("http://{NOWHERE}:{}/secret-path", 8000 + i),
            &["-H", "x-canary: do-not-leak"],
        );
        assert_eq!(r.status, 502, "{kind:?}: {}", r.body);
        let reason = r
            .headers
            .get("x-ambassador-error")
            .cloned()
            .unwrap_or_default();
        assert!(reason.contains(want), "{kind:?}: {reason}");
        assert!(up.seen().is_empty(), "{kind:?}: a request got through");
        assert!(up.tcp_bytes() > 0, "{kind:?}: no handshake happened");
        assert!(
            !up.plaintext_leaked(b"secret-path") && !up.plaintext_leaked(b"do-not-leak"),
            "{kind:?}: plaintext reached the upstream"
        );
        assert!(pod.wait_log(want), "{kind:?}: {}", pod.proxy_log());
    }
}

/// An OAuth2 token endpoint (client credentials): checks the client's Basic
/// credentials, answers `tok-N` with a short lifetime, slowly enough that
/// concurrent requests overlap its fetch.
struct TokenEndpoint {
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TokenEndpoint {
    fn start(listener: std::net::TcpListener, expires_in: u64) -> TokenEndpoint {
        use std::io::{BufRead, BufReader, Read, Write};
        use std::sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        };
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let (mut auth, mut len, mut line) = (String::new(), 0usize, String::new());
                while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                    if let Some((name, value)) = line.trim().split_once(':') {
                        match name.to_ascii_lowercase().as_str() {
                            "authorization" => auth = value.trim().to_string(),
                            "content-length" => len = value.trim().parse().unwrap_or(0),
                            _ => {}
                        }
                    }
                    line.clear();
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                // base64("app:s3cret") with RFC 6749 form encoding (no change here).
                let ok = auth == "Basic YXBwOnMzY3JldA=="
                    && String::from_utf8_lossy(&body).contains("grant_type=client_credentials");
                let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                thread::sleep(Duration::from_millis(300));
                let (status, json) = if ok {
                    (
                        "200 OK",
                        format!(
                            "{{\"access_token\":\"tok-{n}\",\"token_type\":\"Bearer\",\"expires_in\":{expires_in}}}"
                        ),
                    )
                } else {
                    (
                        "401 Unauthorized",
                        "{\"error\":\"invalid_client\"}".to_string(),
                    )
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
                    json.len()
                );
            }
        });
        TokenEndpoint { hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn oauth2_tokens_are_fetched_once_cached_and_refreshed() {
    let mut pod = Pod::new("");
    let secret = write(&pod.shared_dir(), "client-secret", "s3cret\n");
    std::fs::write(
        &pod.config,
        format!(
            r#"
services:
  - name: internal-api
    match: {{ cidr: {SERVER_V4}/32, port: 8080 }}
    protocol: http
    request:
      set_headers:
        authorization: {{ oauth2_client_credentials: {{ token_url: "http://{SERVER_V4}:9000/token", client_id: app, client_secret_file: {secret} }} }}
"#
        ),
    )
    .unwrap();
    pod.start_proxy();
    // A 2 s lifetime: refreshed after 1.6 s.
    let tokens = TokenEndpoint::start(pod.server_listener(SERVER_V4, 9000), 2);
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));

    // 100 concurrent requests, one token fetch.
    let out = pod.client(&["http-many", SERVER_V4, "8080", "100"]);
    assert_eq!(
        stdout(&out).trim(),
        "200x100",
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(tokens.hits(), 1, "concurrent requests must share one fetch");
    let seen = up.seen();
    assert_eq!(seen.len(), 100);
    assert!(
        seen.iter()
            .all(|r| r.header("authorization") == Some("Bearer tok-1"))
    );

    // After the refresh point a new token is fetched and used.
    thread::sleep(Duration::from_millis(2100));
    let r = curl(&pod, &format!("http://{SERVER_V4}:8080/later"), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(tokens.hits(), 2);
    assert_eq!(
        up.seen().pop().unwrap().header("authorization"),
        Some("Bearer tok-2")
    );
    // The client secret and tokens stay out of the log.
    let log = pod.proxy_log();
    assert!(!log.contains("s3cret") && !log.contains("tok-"), "{log}");
}

#[test]
fn http2_prior_knowledge_passes_through_as_http2() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: grpc
    match: {{ cidr: {SERVER_V4}/32, port: 8081 }}
    protocol: http
    request: {{ set_headers: {{ x-via: {{ value: ambassador }} }} }}
"#
    ));
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8081));
    // gRPC-style: HTTP/2 in the clear, `te: trailers` kept end to end; the
    // app names the service (curl sends its Host as `:authority`).
    let r = curl(
        &pod,
        &format!("http://{SERVER_V4}:8081/pkg.Service/Method"),
        &[
            "--http2-prior-knowledge",
            "-H",
            "host: grpc.example.test:8081",
            "-H",
            "te: trailers",
            "-d",
            "payload",
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, "HTTP/2.0");
    // The app's :authority arrives as it sent it (not the address it
    // dialled), and no Host beside it.
    assert_eq!(
        seen[0].uri,
        "http://grpc.example.test:8081/pkg.Service/Method"
    );
    assert_eq!(seen[0].header("host"), None);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].body_len, 7);
    assert_eq!(seen[0].header("te"), Some("trailers"));
    assert_eq!(seen[0].header("x-via"), Some("ambassador"));
}

#[test]
fn secrets_never_reach_the_log_even_at_trace_level() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {SERVER_V4}/32, port: 8082 }}
    protocol: http
    request: {{ set_headers: {{ authorization: {{ value: canary-9f3e2d, prefix: "Bearer " }} }} }}
"#
    ));
    pod.start_proxy_as(Some(PROXY_UID), "trace");
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8082));
    for extra in [&[][..], &["--http2-prior-knowledge"][..]] {
        let r = curl(&pod, &format!("http://{SERVER_V4}:8082/x"), extra);
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        up.seen()[1].header("authorization"),
        Some("Bearer canary-9f3e2d")
    );
    assert!(pod.wait_log("connection closed") || !pod.proxy_log().is_empty());
    let log = pod.proxy_log();
    assert!(log.len() > 1000, "trace logging did not happen: {log}");
    assert!(!log.contains("canary-9f3e2d"), "secret in the log");
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn request_smuggling_is_refused_and_never_reaches_the_upstream() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {SERVER_V4}/32, port: 8083 }}
    protocol: http
"#
    ));
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8083));
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases = [
        // CL and TE together (CL.TE / TE.CL desync).
        format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        // Two different Content-Lengths.
        format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n{smuggled}"
        ),
        // An obfuscated Transfer-Encoding.
        format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        // Chunked, but not the final encoding.
        format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"
        ),
    ];
    for (i, case) in cases.iter().enumerate() {
        let before = up.seen().len();
        let out = pod.client(&["raw", SERVER_V4, "8083", &hex(case)]);
        let text = stdout(&out);
        let statuses: Vec<&str> = text.lines().filter(|l| l.starts_with("HTTP/1.")).collect();
        // Refused with 400, or at most the first request answered: never two.
        assert!(
            statuses.is_empty() || statuses == ["HTTP/1.1 400 Bad Request"] || statuses.len() == 1,
            "case {i}: {text}"
        );
        let seen = up.seen();
        assert!(
            seen.len() - before <= 1,
            "case {i}: {} requests upstream",
            seen.len() - before
        );
        assert!(
            seen.iter().all(|r| !r.uri.contains("smuggled")),
            "case {i}: the smuggled request reached the upstream"
        );
        // What was forwarded carries one framing only: the body as parsed.
        for r in &seen[before..] {
            let cl = r.header("content-length").unwrap_or("0");
            assert_eq!(
                cl,
                r.body_len.to_string(),
                "case {i}: conflicting framing forwarded"
            );
        }
    }
}

#[test]
fn large_expect_continue_and_chunked_bodies_stream_through() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {SERVER_V4}/32, port: 8084 }}
    protocol: http
"#
    ));
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8084));
    let body = pod.shared_dir().join("body");
    std::fs::write(&body, vec![b'x'; 3 << 20]).unwrap();
    let at = format!("@{}", body.display());
    let url = format!("http://{SERVER_V4}:8084/upload");
    let r = curl(
        &pod,
        &url,
        &["-H", "Expect: 100-continue", "--data-binary", &at],
    );
    assert_eq!(r.status, 200);
    let r = curl(
        &pod,
        &url,
        &["-H", "Transfer-Encoding: chunked", "--data-binary", &at],
    );
    assert_eq!(r.status, 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|r| r.body_len == 3 << 20),
        "{:?}",
        seen.iter().map(|r| r.body_len).collect::<Vec<_>>()
    );
}

#[test]
fn protocol_upgrades_become_a_byte_relay() {
    use std::io::{BufRead, BufReader, Write};
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: ws
    match: {{ cidr: {SERVER_V4}/32, port: 8085 }}
    protocol: http
"#
    ));
    pod.start_proxy();
    let listener = pod.server_listener(SERVER_V4, 8085);
    let got_upgrade = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen = got_upgrade.clone();
    thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut head = String::new();
        let mut line = String::new();
        while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
            head.push_str(&line);
            line.clear();
        }
        *seen.lock().unwrap() = head;
        let mut w = conn;
        w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo-protocol\r\n\r\n")
            .unwrap();
        let mut l = String::new();
        while reader.read_line(&mut l).map(|n| n > 0).unwrap_or(false) {
            w.write_all(l.as_bytes()).unwrap();
            l.clear();
        }
    });
    let out = pod.client(&["upgrade", SERVER_V4, "8085"]);
    assert_eq!(
        stdout(&out),
        "HTTP/1.1 101 Switching Protocols\nECHO ping over the upgraded connection\n",
        "{}",
        stderr(&out)
    );
    let head = got_upgrade.lock().unwrap().to_ascii_lowercase();
    assert!(head.contains("upgrade: echo-protocol"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
}

#[test]
fn mutual_tls_and_minimum_version_toward_the_upstream() {
    let mut pod = Pod::new("");
    let dir = pod.shared_dir();
    let ca = TestCa::new("upstream-ca");
    let ca_file = ca.write_ca_file(&dir);
    let (ccert, ckey) = ca.issue_client("app.example.test");
    let ccert_file = write(&dir, "client.pem", &ccert);
    let ckey_file = write(&dir, "client-key.pem", &ckey);
    let tls = |extra: &str| {
        format!(
            "{{ server_name: {PAYMENTS}, ca_file: {}{extra} }}",
            ca_file.display()
        )
    };
    std::fs::write(
        &pod.config,
        format!(
            r#"
services:
  - name: mtls
    match: {{ cidr: {NOWHERE}/32, port: 8101 }}
    protocol: http
    upstream: {{ endpoints: [{{ address: "{SERVER_V4}:9101" }}], tls: {} }}
  - name: no-client-cert
    match: {{ cidr: {NOWHERE}/32, port: 8102 }}
    protocol: http
    upstream: {{ endpoints: [{{ address: "{SERVER_V4}:9101" }}], tls: {} }}
  - name: tls13-only
    match: {{ cidr: {NOWHERE}/32, port: 8103 }}
    protocol: http
    upstream: {{ endpoints: [{{ address: "{SERVER_V4}:9103" }}], tls: {} }}
"#,
            tls(&format!(
                ", client_cert: {ccert_file}, client_key: {ckey_file}"
            )),
            tls(""),
            tls(", min_version: \"1.3\""),
        ),
    )
    .unwrap();
    pod.start_proxy();
    let (cert, key) = ca.issue(CertKind::Valid, PAYMENTS, None);
    let mtls = HttpUpstream::tls_requiring_client_cert(
        pod.server_listener(SERVER_V4, 9101),
        &cert,
        &key,
        &ca.ca_pem(),
    );
    let old = HttpUpstream::tls(
        pod.server_listener(SERVER_V4, 9103),
        &cert,
        &key,
        &["http/1.1"],
        TlsVersions::Tls12Only,
    );

    let r = curl(&pod, &format!("http://{NOWHERE}:8101/"), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(mtls.seen().len(), 1);

    let r = curl(&pod, &format!("http://{NOWHERE}:8102/"), &[]);
    assert_eq!(r.status, 502, "{}", r.body);
    let reason = r
        .headers
        .get("x-ambassador-error")
        .cloned()
        .unwrap_or_default();
    assert!(
        reason.contains("requires a client certificate"),
        "{reason}\n{}",
        pod.proxy_log()
    );
    assert_eq!(mtls.seen().len(), 1);

    // The upstream only speaks TLS 1.2; the service asks for 1.3 at least.
    let r = curl(&pod, &format!("http://{NOWHERE}:8103/"), &[]);
    assert_eq!(r.status, 502, "{}", r.body);
    let reason = r
        .headers
        .get("x-ambassador-error")
        .cloned()
        .unwrap_or_default();
    assert!(reason.contains("protocol version"), "{reason}");
    assert!(old.seen().is_empty());
}

#[test]
fn a_tls_1_0_only_upstream_is_refused_with_the_reason() {
    let mut pod = Pod::new("");
    let dir = pod.shared_dir();
    let ca = TestCa::new("legacy-ca");
    let ca_file = ca.write_ca_file(&dir);
    let (cert, key) = ca.issue(CertKind::Valid, PAYMENTS, None);
    let cert_file = write(&dir, "legacy.pem", &cert);
    let key_file = write(&dir, "legacy-key.pem", &key);
    std::fs::write(
        &pod.config,
        format!(
            r#"
services:
  - name: legacy
    match: {{ cidr: {NOWHERE}/32, port: 8110 }}
    protocol: http
    upstream: {{ endpoints: [{{ address: "{SERVER_V4}:9110" }}], tls: {{ server_name: {PAYMENTS}, ca_file: {} }} }}
"#,
            ca_file.display()
        ),
    )
    .unwrap();
    pod.start_proxy();
    // A real TLS 1.0-only server: OpenSSL's s_server, at security level 0.
    let root = cgroup2_mount();
    let mut server = placed(
        "openssl",
        &Placement {
            netns: &pod.servers,
            cgroup: &root,
            uid: None,
        },
    )
    .args(["s_server", "-accept", &format!("{SERVER_V4}:9110")])
    .args(["-cert", &cert_file, "-key", &key_file, "-tls1"])
    .args(["-cipher", "DEFAULT:@SECLEVEL=0", "-www"])
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("openssl s_server");
    let deadline = Instant::now() + Duration::from_secs(5);
    while pod
        .servers
        .enter(|| std::net::TcpStream::connect((SERVER_V4, 9110)).is_err())
    {
        assert!(Instant::now() < deadline, "openssl s_server did not start");
        thread::sleep(Duration::from_millis(50));
    }
    let r = curl(&pod, &format!("http://{NOWHERE}:8110/"), &[]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(r.status, 502, "{}", r.body);
    let reason = r
        .headers
        .get("x-ambassador-error")
        .cloned()
        .unwrap_or_default();
    assert!(reason.contains("protocol version"), "{reason}");
}

#[test]
fn a_rotated_ca_file_is_picked_up_without_restart() {
    let mut pod = Pod::new("");
    let dir = pod.shared_dir();
    let old_ca = TestCa::new("old-ca");
    let new_ca = TestCa::new("new-ca");
    let ca_file = write(&dir, "ca.pem", &old_ca.ca_pem());
    std::fs::write(
        &pod.config,
        format!(
            r#"
services:
  - name: rotating
    match: {{ cidr: {NOWHERE}/32, port: 8120 }}
    protocol: http
    upstream: {{ endpoints: [{{ address: "{SERVER_V4}:9120" }}], tls: {{ server_name: {PAYMENTS}, ca_file: {ca_file} }} }}
"#
        ),
    )
    .unwrap();
    pod.start_proxy();
    // The upstream's certificate comes from the new CA, which is not trusted yet.
    let (cert, key) = new_ca.issue(CertKind::Valid, PAYMENTS, None);
    let up = HttpUpstream::tls(
        pod.server_listener(SERVER_V4, 9120),
        &cert,
        &key,
        &["h2", "http/1.1"],
        TlsVersions::default(),
    );
    let url = format!("http://{NOWHERE}:8120/");
    assert_eq!(curl(&pod, &url, &[]).status, 502);
    // Rotate the bundle the way a mounted Secret changes.
    let tmp = write(&dir, "ca.pem.new", &new_ca.ca_pem());
    std::fs::rename(tmp, &ca_file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if curl(&pod, &url, &[]).status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new CA file was not picked up"
        );
        thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(up.seen().len(), 1);
    assert!(
        pod.wait_log("TLS files changed: reloaded"),
        "{}",
        pod.proxy_log()
    );
}

#[test]
fn a_client_that_never_finishes_its_request_head_is_dropped() {
    let mut pod = Pod::new(&format!(
        r#"
proxy: {{ header_read_timeout: 1s }}
services:
  - name: api
    match: {{ cidr: {SERVER_V4}/32, port: 8130 }}
    protocol: http
"#
    ));
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8130));
    let out = pod.client(&["slow-head", SERVER_V4, "8130"]);
    let text = stdout(&out);
    let secs: f64 = text
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|t| t.trim_end_matches('s').parse().ok())
        .unwrap_or(99.0);
    assert!((0.9..5.0).contains(&secs), "{text}");
    assert!(up.seen().is_empty());
}

#[test]
fn insecure_skip_verify_works_and_is_warned_about() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: lab
    match: {{ cidr: {NOWHERE}/32, port: 8140 }}
    protocol: http
    upstream: {{ endpoints: [{{ address: "{SERVER_V4}:9140" }}], tls: {{ server_name: {PAYMENTS}, insecure_skip_verify: true }} }}
"#
    ));
    pod.start_proxy();
    let ca = TestCa::new("unknown-ca");
    let (cert, key) = ca.issue(CertKind::SelfSigned, PAYMENTS, None);
    let up = HttpUpstream::tls(
        pod.server_listener(SERVER_V4, 9140),
        &cert,
        &key,
        &["http/1.1"],
        TlsVersions::default(),
    );
    assert_eq!(
        curl(&pod, &format!("http://{NOWHERE}:8140/"), &[]).status,
        200
    );
    assert_eq!(up.seen().len(), 1);
    assert!(
        pod.proxy_log().contains("insecure_skip_verify is ON"),
        "{}",
        pod.proxy_log()
    );
}

#[test]
fn plain_upstream_connections_are_pooled_across_app_connections() {
    let mut pod = Pod::new("");
    std::fs::write(
        &pod.config,
        format!(
            r#"
services:
  - name: plain
    match: {{ cidr: {SERVER_V4}/32, port: 8090 }}
    protocol: http
"#
        ),
    )
    .unwrap();
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8090));
    // Three app connections (one curl each), one upstream connection.
    for i in 0..3 {
        let r = curl(&pod, &format!("http://{SERVER_V4}:8090/n{i}?q={i}"), &[]);
        assert_eq!(r.status, 200, "{:?} {}", r.headers, r.body);
    }
    assert_eq!(up.accepted(), 1, "the pooled connection was not reused");
    // HTTP/1.1 to an origin server: the request line carries the path only.
    let uris: Vec<String> = up.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(uris, ["/n0?q=0", "/n1?q=1", "/n2?q=2"]);
    // The upstream closes after its answer: the next request gets a new
    // connection, and succeeds.
    let r = curl(&pod, &format!("http://{SERVER_V4}:8090/close"), &[]);
    assert_eq!(r.status, 200);
    let r = curl(&pod, &format!("http://{SERVER_V4}:8090/after"), &[]);
    assert_eq!(r.status, 200, "{:?} {}", r.headers, r.body);
    assert_eq!(up.accepted(), 2);
}

#[test]
fn https_upstreams_offering_only_http1_are_pooled_too() {
    // ALPN without h2: every connection is HTTP/1.1, so the HTTP/1.1 pool
    // serves it, over verified TLS.
    let mut pod = Pod::new("");
    let ca = TestCa::new("payments-ca");
    let ca_file = ca.write_ca_file(&pod.shared_dir());
    let config = payments_pod(&ca_file.display().to_string(), 8444) + "        alpn: [http/1.1]\n";
    std::fs::write(&pod.config, config).unwrap();
    pod.start_proxy();
    let (cert, key) = ca.issue(CertKind::Valid, PAYMENTS, None);
    let up = HttpUpstream::tls(
        pod.server_listener(SERVER_V4, 8444),
        &cert,
        &key,
        &["http/1.1"],
        TlsVersions::default(),
    );
    for path in ["/one", "/two", "/three"] {
        let r = payments_get(&pod, path);
        assert_eq!(r.status, 200, "{:?} {}", r.headers, r.body);
        assert_eq!(
            r.headers.get("x-upstream-version").map(String::as_str),
            Some("HTTP/1.1")
        );
    }
    assert_eq!(up.accepted(), 1, "the pooled TLS connection was not reused");
    let uris: Vec<String> = up.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(uris, ["/one", "/two", "/three"]);
    assert!(
        !up.plaintext_leaked(b"GET /one"),
        "plaintext reached the upstream"
    );
}
