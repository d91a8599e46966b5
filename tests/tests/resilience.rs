//! Resilience in a simulated Pod: priority failover and re-admission,
//! circuit breaking, timeouts; real upstreams that the test kills or stalls.

use std::{
    io::{BufReader, Write},
    net::TcpListener,
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{upstream::HttpUpstream, *};

const NOWHERE: &str = "198.18.0.99";

fn lines(out: &std::process::Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

/// An HTTP server that answers every request after `delay`.
fn slow_server(listener: TcpListener, delay: Duration) {
    slow_server_body(listener, delay, b"slow\n".to_vec());
}

fn slow_server_body(listener: TcpListener, delay: Duration, body: Vec<u8>) {
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let body = body.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                read_request_head(&mut reader);
                thread::sleep(delay);
                let mut w = conn;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = w.write_all(head.as_bytes());
                let _ = w.write_all(&body);
            });
        }
    });
}

#[test]
fn a_dead_primary_fails_over_to_the_secondary_and_comes_back() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {NOWHERE}/32, port: 8200 }}
    protocol: http
    outlier: {{ consecutive_failures: 2, base_ejection: 1s, max_ejection: 10s }}
    upstream:
      endpoints:
        - {{ address: "{SERVER_V4}:9200", priority: 0 }}
        - {{ address: "{SERVER2_V4}:9200", priority: 1 }}
"#
    ));
    pod.start_proxy();
    let primary = HttpUpstream::plain(pod.server_listener(SERVER_V4, 9200));
    let secondary = HttpUpstream::plain(pod.server_listener(SERVER2_V4, 9200));

    let many = |n: &str| pod.client(&["http-many", NOWHERE, "8200", n]);
    let out = many("20");
    assert_eq!(stdout(&out).trim(), "200x20", "{}", lines(&out));
    assert_eq!((primary.seen().len(), secondary.seen().len()), (20, 0));

    // The primary dies: every request still succeeds, via the secondary.
    drop(primary);
    let out = many("50");
    assert_eq!(stdout(&out).trim(), "200x50", "{}", lines(&out));
    assert_eq!(secondary.seen().len(), 50);
    assert!(pod.wait_log("endpoint ejected"), "{}", pod.proxy_log());

    // It comes back: after its ejection it gets the traffic again.
    let primary = HttpUpstream::plain(pod.server_listener(SERVER_V4, 9200));
    thread::sleep(Duration::from_millis(1200));
    let out = many("20");
    assert_eq!(stdout(&out).trim(), "200x20", "{}", lines(&out));
    assert_eq!(
        primary.seen().len(),
        20,
        "the recovered primary was not used"
    );
    assert_eq!(secondary.seen().len(), 50);
}

#[test]
fn circuit_breaker_limits_answer_503_at_once() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {SERVER_V4}/32, port: 8210 }}
    protocol: http
    limits: {{ max_requests: 2 }}
"#
    ));
    pod.start_proxy();
    slow_server(
        pod.server_listener(SERVER_V4, 8210),
        Duration::from_millis(1500),
    );
    let started = Instant::now();
    let out = pod.client(&["http-many", SERVER_V4, "8210", "10"]);
    // Two get through (slowly); eight are refused without waiting.
    assert_eq!(stdout(&out).trim(), "200x2 503x8", "{}", lines(&out));
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(pod.wait_log("circuit breaker: max_requests (2) reached"));
}

#[test]
fn the_request_timeout_answers_504_and_names_itself() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {SERVER_V4}/32, port: 8220 }}
    protocol: http
    timeouts: {{ request: 500ms }}
"#
    ));
    pod.start_proxy();
    slow_server(pod.server_listener(SERVER_V4, 8220), Duration::from_secs(5));
    let started = Instant::now();
    let status = pod.http_status(&format!("http://{SERVER_V4}:8220/"), &[]);
    assert_eq!(status, "504", "{}", pod.proxy_log());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        pod.wait_log("request timeout (500ms) fired"),
        "{}",
        pod.proxy_log()
    );
}

#[test]
fn a_stalled_tcp_upstream_is_cut_by_the_idle_timeout() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: db
    match: {{ cidr: {SERVER_V4}/32, port: 8230 }}
    timeouts: {{ idle: 1s }}
"#
    ));
    pod.start_proxy();
    // Accepts, greets, then never says another word.
    let l = pod.server_listener(SERVER_V4, 8230);
    thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.write_all(b"HELLO stalled\n").unwrap();
        thread::sleep(Duration::from_secs(30));
    });
    let started = Instant::now();
    let out = pod.client(&["readfirst", SERVER_V4, "8230"]);
    let elapsed = started.elapsed();
    assert!(
        stdout(&out).starts_with("READ HELLO stalled EOF True"),
        "{}",
        lines(&out)
    );
    assert!(
        elapsed > Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    assert!(pod.wait_log("idle timeout fired"), "{}", pod.proxy_log());
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {SERVER_V4}/32, port: 8240 }}
    protocol: http
"#
    ));
    pod.start_proxy();
    slow_server_body(
        pod.server_listener(SERVER_V4, 8240),
        Duration::from_millis(1500),
        vec![b'x'; 16 * 1024],
    );
    let client = pod
        .app("python3")
        .arg(client_py())
        .args(["http-many", SERVER_V4, "8240", "50", "16384"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // All 50 are waiting on the upstream when the proxy is told to stop.
    thread::sleep(Duration::from_millis(600));
    let (status, took) = pod.terminate_proxy();
    let out = client.wait_with_output().unwrap();
    assert_eq!(stdout(&out).trim(), "200x50", "{}", pod.proxy_log());
    assert!(status.success(), "proxy exit: {status}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(pod.proxy_log().contains("drained"), "{}", pod.proxy_log());
    // Nothing listens now: fail-closed refuses new connects at once.
    let out = pod.client(&["greet", SERVER_V4, "8240"]);
    assert!(stdout(&out).contains("ERROR EPERM"), "{}", lines(&out));
}

/// Answers 503 (or resets) the first `fail` requests, then 200; counts every
/// request it read, by method.
fn flaky_server(
    listener: TcpListener,
    fail: usize,
    reset: bool,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let log = log.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                while let Some((first, len)) = read_request_head(&mut reader) {
                    let mut body = vec![0u8; len];
                    let _ = std::io::Read::read_exact(&mut reader, &mut body);
                    let n = {
                        let mut l = log.lock().unwrap();
                        l.push(first.split_whitespace().next().unwrap_or("").to_string());
                        l.len()
                    };
                    let mut w = conn.try_clone().unwrap();
                    if n <= fail && reset {
                        // An abortive close: the proxy sees a reset.
                        let s = socket2::SockRef::from(&w);
                        let _ = s.set_linger(Some(Duration::ZERO));
                        return;
                    }
                    let (status, body) = if n <= fail {
                        ("503 Service Unavailable", "busy\n")
                    } else {
                        ("200 OK", "fine\n")
                    };
                    let _ = write!(
                        w,
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
        }
    });
    seen
}

#[test]
fn idempotent_requests_are_retried_and_a_sent_post_never_is() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {SERVER_V4}/32 }}
    protocol: http
    retries: {{ attempts: 2, backoff: 10ms, budget: 0.5 }}
"#
    ));
    pod.start_proxy();
    let code = |method: &str, port: u16| {
        let url = format!("http://{SERVER_V4}:{port}/");
        pod.http_status(&url, &["-X", method, "-d", "payload"])
    };
    // 503 once, then fine: a PUT (idempotent, small body) is retried.
    let seen = flaky_server(pod.server_listener(SERVER_V4, 8250), 1, false);
    assert_eq!(code("PUT", 8250), "200");
    assert_eq!(*seen.lock().unwrap(), ["PUT", "PUT"]);
    // A POST that reached the upstream is never sent twice.
    let seen = flaky_server(pod.server_listener(SERVER_V4, 8251), 1, false);
    assert_eq!(code("POST", 8251), "503");
    assert_eq!(*seen.lock().unwrap(), ["POST"]);
    // A reset after the request went out: the GET is retried, the POST not.
    let seen = flaky_server(pod.server_listener(SERVER_V4, 8252), 1, true);
    assert_eq!(code("GET", 8252), "200");
    assert_eq!(*seen.lock().unwrap(), ["GET", "GET"]);
    let seen = flaky_server(pod.server_listener(SERVER_V4, 8253), 1, true);
    assert_eq!(code("POST", 8253), "502");
    assert_eq!(*seen.lock().unwrap(), ["POST"]);
    // Attempts are bounded: three tries, then the 503 goes to the app.
    let seen = flaky_server(pod.server_listener(SERVER_V4, 8254), 10, false);
    assert_eq!(code("GET", 8254), "503");
    assert_eq!(seen.lock().unwrap().len(), 3);
    assert!(pod.wait_log("retrying"), "{}", pod.proxy_log());
}

/// Answers `/healthz` with 200 or 503 as `healthy` says, anything else 200
/// with `name` in the body.
fn health_server(
    listener: TcpListener,
    name: &'static str,
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let healthy = healthy.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                while let Some((first, _)) = read_request_head(&mut reader) {
                    let ok = healthy.load(std::sync::atomic::Ordering::SeqCst);
                    let (status, body) = if first.contains("/healthz") && !ok {
                        ("503 Service Unavailable", "sick\n".to_string())
                    } else {
                        ("200 OK", format!("{name}\n"))
                    };
                    let _ = write!(
                        w,
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
        }
    });
}

#[test]
fn active_health_checks_move_traffic_before_any_request_fails() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {NOWHERE}/32, port: 8260 }}
    protocol: http
    upstream:
      endpoints:
        - {{ address: "{SERVER_V4}:9260", priority: 0 }}
        - {{ address: "{SERVER2_V4}:9260", priority: 1 }}
      health_check: {{ interval: 100ms, unhealthy_threshold: 2, healthy_threshold: 2, http: {{ path: /healthz, expect: 200 }} }}
"#
    ));
    let primary_ok = Arc::new(AtomicBool::new(true));
    health_server(
        pod.server_listener(SERVER_V4, 9260),
        "primary",
        primary_ok.clone(),
    );
    health_server(
        pod.server_listener(SERVER2_V4, 9260),
        "secondary",
        Arc::new(AtomicBool::new(true)),
    );
    pod.start_proxy();
    let body = |pod: &Pod| stdout(&pod.curl(&format!("http://{NOWHERE}:8260/work"), &[]));
    assert_eq!(body(&pod), "primary\n");
    // The primary says it is sick: checks take it out; the app never sees it.
    primary_ok.store(false, Ordering::SeqCst);
    assert!(
        pod.wait_log("health check failing: endpoint marked down"),
        "{}",
        pod.proxy_log()
    );
    assert_eq!(body(&pod), "secondary\n");
    primary_ok.store(true, Ordering::SeqCst);
    assert!(pod.wait_log("endpoint back in"), "{}", pod.proxy_log());
    assert_eq!(body(&pod), "primary\n");
}

/// A primary that died is ejected for 30 s by outlier detection, but when
/// it comes back the active check (500 ms) re-admits it at once: traffic
/// returns within about an interval, not after the whole ejection.
#[test]
fn a_returning_primary_is_readmitted_by_its_health_check_not_after_the_ejection() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {NOWHERE}/32, port: 8265 }}
    protocol: http
    retries: {{ attempts: 0 }}
    outlier: {{ consecutive_failures: 1, base_ejection: 30s }}
    upstream:
      endpoints:
        - {{ address: "{SERVER_V4}:9265", priority: 0 }}
        - {{ address: "{SERVER2_V4}:9265", priority: 1 }}
      health_check: {{ interval: 500ms, unhealthy_threshold: 3, healthy_threshold: 1, tcp: {{}} }}
"#
    ));
    // Listening before the first check; the checks need three failures to
    // mark the primary down, so the first request after its death (a connect
    // failure) ejects it first, for 30 s.
    let primary = HttpUpstream::plain(pod.server_listener(SERVER_V4, 9265));
    let _secondary = HttpUpstream::plain(pod.server_listener(SERVER2_V4, 9265));
    pod.start_proxy();
    let served_by = |pod: &Pod| {
        stdout(&pod.curl(&format!("http://{NOWHERE}:8265/"), &[]))
            .split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(served_by(&pod), format!("{SERVER_V4}:9265"));
    drop(primary);
    // Requests go to the secondary; the primary is ejected (connect failure).
    let deadline = Instant::now() + Duration::from_secs(5);
    while served_by(&pod) != format!("{SERVER2_V4}:9265") {
        assert!(Instant::now() < deadline, "{}", pod.proxy_log());
        thread::sleep(Duration::from_millis(50));
    }
    assert!(pod.wait_log("endpoint ejected"), "{}", pod.proxy_log());

    let _back = HttpUpstream::plain(pod.server_listener(SERVER_V4, 9265));
    let returned = Instant::now();
    while served_by(&pod) != format!("{SERVER_V4}:9265") {
        assert!(
            returned.elapsed() < Duration::from_secs(5),
            "the primary stayed out: {}",
            pod.proxy_log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        returned.elapsed() < Duration::from_secs(2),
        "back after {:?}",
        returned.elapsed()
    );
    assert!(
        pod.wait_log("ejected endpoint re-admitted"),
        "{}",
        pod.proxy_log()
    );
}

#[test]
fn killing_the_primary_under_steady_load_fails_no_request() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {NOWHERE}/32, port: 8270 }}
    protocol: http
    upstream:
      endpoints:
        - {{ address: "{SERVER_V4}:9270", priority: 0 }}
        - {{ address: "{SERVER2_V4}:9270", priority: 1 }}
"#
    ));
    pod.start_proxy();
    let primary = HttpUpstream::plain(pod.server_listener(SERVER_V4, 9270));
    let secondary = HttpUpstream::plain(pod.server_listener(SERVER2_V4, 9270));
    let client = pod
        .app("python3")
        .arg(client_py())
        .args(["http-steady", NOWHERE, "8270", "150", "10"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(700));
    let before = primary.seen().len();
    drop(primary);
    let out = client.wait_with_output().unwrap();
    assert_eq!(stdout(&out).trim(), "200x150", "{}", pod.proxy_log());
    assert!(before > 10, "the primary served {before} before it died");
    assert!(secondary.seen().len() > 10);
}

#[test]
fn consecutive_5xx_eject_an_endpoint_which_is_readmitted_later() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {NOWHERE}/32, port: 8280 }}
    protocol: http
    outlier: {{ consecutive_failures: 5, base_ejection: 2s }}
    upstream:
      balance: round_robin
      endpoints:
        - {{ address: "{SERVER_V4}:9280" }}
        - {{ address: "{SERVER2_V4}:9280" }}
"#
    ));
    pod.start_proxy();
    // One endpoint always answers 503, the other is fine.
    let bad = flaky_server(pod.server_listener(SERVER_V4, 9280), usize::MAX, false);
    let good = HttpUpstream::plain(pod.server_listener(SERVER2_V4, 9280));
    let steady = |n: &str| pod.client(&["http-steady", NOWHERE, "8280", n, "5"]);
    // Every request succeeds (a 503 is retried on the other endpoint), and
    // after five 503s in a row the bad endpoint gets nothing more.
    let out = steady("40");
    assert_eq!(stdout(&out).trim(), "200x40", "{}", pod.proxy_log());
    assert_eq!(bad.lock().unwrap().len(), 5);
    assert!(pod.wait_log("endpoint ejected"), "{}", pod.proxy_log());
    let out = steady("10");
    assert_eq!(stdout(&out).trim(), "200x10");
    assert_eq!(
        bad.lock().unwrap().len(),
        5,
        "an ejected endpoint got traffic"
    );
    // After the ejection time it is tried again.
    thread::sleep(Duration::from_millis(2200));
    let out = steady("10");
    assert_eq!(stdout(&out).trim(), "200x10");
    assert!(bad.lock().unwrap().len() > 5, "never re-admitted");
    assert!(good.seen().len() >= 60);
}

#[test]
fn an_upstream_reset_mid_body_is_passed_on_not_hidden() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {SERVER_V4}/32, port: 8290 }}
    protocol: http
"#
    ));
    pod.start_proxy();
    let l = pod.server_listener(SERVER_V4, 8290);
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            read_request_head(&mut reader);
            let mut w = conn;
            // Promises 1 MiB, sends 1 KiB, then resets.
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n");
            let _ = w.write_all(&[b'x'; 1024]);
            let _ = w.flush();
            thread::sleep(Duration::from_millis(100));
            let _ = socket2::SockRef::from(&w).set_linger(Some(Duration::ZERO));
        }
    });
    let started = Instant::now();
    let out = pod.curl(&format!("http://{SERVER_V4}:8290/"), &["-o", "/dev/null"]);
    // The app learns the body broke (no silent truncation, no hang), and the
    // response had started, so nothing was retried.
    assert!(!out.status.success(), "{}", lines(&out));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A Pod whose `grpc` service (HTTP, h2c from the app passed through as
/// HTTP/2) is the server at `port`, and that server's listener. The server is
/// the service's endpoint, so the requests of all app connections share the
/// endpoint's pool (one HTTP/2 connection).
fn grpc_pod(port: u16) -> (Pod, std::net::TcpListener) {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: grpc
    match: {{ cidr: {SERVER_V4}/32, port: {port} }}
    protocol: http
    upstream: {{ endpoints: [ {{ address: "{SERVER_V4}:{port}" }} ] }}
"#
    ));
    pod.start_proxy();
    let listener = pod.server_listener(SERVER_V4, port);
    (pod, listener)
}

/// Runs an async upstream on a thread of its own (a current-thread runtime).
fn spawn_upstream<F, Fut>(listener: std::net::TcpListener, serve: F)
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            serve(tokio::net::TcpListener::from_std(listener).unwrap()).await;
        });
    });
}

/// An HTTP/2 server, one connection after another: each stream is reset
/// with the reason `each` returns for its method, or answered `ok`.
async fn serve_h2(
    listener: tokio::net::TcpListener,
    mut each: impl FnMut(&http::Method) -> Option<h2::Reason>,
) {
    while let Ok((tcp, _)) = listener.accept().await {
        let Ok(mut conn) = h2::server::handshake(tcp).await else {
            continue;
        };
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            match each(req.method()) {
                Some(reason) => respond.send_reset(reason),
                None => {
                    let resp = http::Response::new(());
                    let mut send = respond.send_response(resp, false).unwrap();
                    let _ = send.send_data(bytes::Bytes::from_static(b"ok\n"), true);
                }
            }
        }
    }
}

#[test]
fn a_refused_http2_stream_is_sent_again_even_for_a_post() {
    let (pod, listener) = grpc_pod(8310);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    // An HTTP/2 server that refuses the first stream unprocessed.
    spawn_upstream(listener, move |listener| async move {
        let mut n = 0;
        serve_h2(listener, |method| {
            n += 1;
            log.lock().unwrap().push(format!("{method} {n}"));
            (n == 1).then_some(h2::Reason::REFUSED_STREAM)
        })
        .await;
    });
    let out = pod.curl(
        &format!("http://{SERVER_V4}:8310/pkg.Service/Create"),
        &["--http2-prior-knowledge", "-d", "once"],
    );
    assert_eq!(stdout(&out), "ok\n", "{}{}", stderr(&out), pod.proxy_log());
    assert_eq!(*seen.lock().unwrap(), ["POST 1", "POST 2"]);
    assert!(pod.wait_log("failure=Refused"), "{}", pod.proxy_log());
}

/// A gRPC-shaped HTTP/2 server: each stream is answered by `status` for its
/// number (1, 2, ...): `Some(code)` trailers-only with that grpc-status, or
/// `None` a message and `grpc-status: 0` trailers.
async fn serve_grpc(
    listener: tokio::net::TcpListener,
    status: impl Fn(usize) -> Option<u16> + Send + 'static,
) {
    let mut n = 0;
    while let Ok((tcp, _)) = listener.accept().await {
        let Ok(mut conn) = h2::server::handshake(tcp).await else {
            continue;
        };
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            n += 1;
            let head = http::Response::builder().header("content-type", "application/grpc");
            match status(n) {
                Some(code) => {
                    let resp = head
                        .header("grpc-status", code.to_string())
                        .body(())
                        .unwrap();
                    let _ = respond.send_response(resp, true);
                }
                None => {
                    let mut send = respond
                        .send_response(head.body(()).unwrap(), false)
                        .unwrap();
                    let _ = send.send_data(bytes::Bytes::from_static(b"\0\0\0\0\x02ok"), false);
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", "0".parse().unwrap());
                    let _ = send.send_trailers(t);
                }
            }
        }
    }
}

#[test]
fn grpc_statuses_are_counted_and_unavailable_is_retried_where_listed() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: grpc
    match: {{ cidr: {SERVER_V4}/32, port: 8312 }}
    protocol: http
    upstream: {{ endpoints: [ {{ address: "{SERVER_V4}:8312" }} ] }}
    retries: {{ grpc_on: [unavailable] }}
"#
    ));
    pod.start_proxy();
    let listener = pod.server_listener(SERVER_V4, 8312);
    // UNAVAILABLE first (retried), then a message; the third call INTERNAL
    // (not listed: the app gets it).
    spawn_upstream(listener, |l| {
        serve_grpc(l, |n| match n {
            1 => Some(14),
            3 => Some(13),
            _ => None,
        })
    });
    let call = |pod: &Pod| {
        pod.curl(
            &format!("http://{SERVER_V4}:8312/shop.Orders/Create"),
            &[
                "--http2-prior-knowledge",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "--data-binary",
                "x",
                "-D",
                "-",
                "-o",
                "/dev/null",
            ],
        )
    };
    let first = stdout(&call(&pod));
    assert!(first.starts_with("HTTP/2 200"), "{first}");
    let second = stdout(&call(&pod));
    assert!(second.contains("grpc-status: 13"), "{second}");

    let ok = pod
        .wait_access_log(r#""grpc_status":0"#)
        .unwrap_or_else(|| panic!("{:?}", pod.access_log()));
    assert!(ok.contains(r#""retries":1"#), "{ok}");
    let internal = pod
        .wait_access_log(r#""grpc_status":13"#)
        .unwrap_or_else(|| panic!("{:?}", pod.access_log()));
    assert!(internal.contains(r#""retries":0"#), "{internal}");
    let m = pod.metrics();
    for code in ["OK", "INTERNAL"] {
        let series = format!(
            r#"ambassador_grpc_responses_total{{service="grpc",direction="outbound",grpc_code="{code}"}} 1"#
        );
        assert!(m.contains(&series), "{series}\n{m}");
    }
    assert!(!m.contains(r#"grpc_code="UNAVAILABLE""#), "{m}");
}

/// One HTTP/2 frame: 24-bit length, type, flags, stream id, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn streams_a_graceful_goaway_left_unprocessed_go_again_on_a_new_connection() {
    // nginx ends an HTTP/2 connection after keepalive_requests (1000) with
    // GOAWAY(NO_ERROR) naming the last stream it took; streams the client
    // had sent after that were not processed (RFC 9113 §6.8) and must not
    // reach the app as 502s, POSTs included.
    let (pod, listener) = grpc_pod(8311);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    spawn_upstream(listener, move |listener| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The first connection, framed by hand (h2's server counts every
        // stream it has read as processed): once two requests are in,
        // GOAWAY naming the first, answer it, close.
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut preface = [0u8; 24];
        tcp.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        tcp.write_all(&h2_frame(0x4, 0, 0, &[])).await.unwrap();
        let (mut streams, mut ended) = (Vec::new(), Vec::new());
        while streams.len() < 2 || !ended.contains(&streams[0]) {
            let mut head = [0u8; 9];
            tcp.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.unwrap();
            match kind {
                // SETTINGS, not an ack: acknowledge.
                0x4 if flags & 0x1 == 0 => {
                    tcp.write_all(&h2_frame(0x4, 0x1, 0, &[])).await.unwrap();
                }
                0x1 => {
                    if !streams.contains(&stream) {
                        streams.push(stream);
                    }
                    if flags & 0x1 != 0 {
                        ended.push(stream);
                    }
                }
                0x0 if flags & 0x1 != 0 => ended.push(stream),
                _ => {}
            }
        }
        log.lock()
            .unwrap()
            .push("first connection: 1 of 2".to_string());
        let mut goaway = streams[0].to_be_bytes().to_vec();
        goaway.extend_from_slice(&0u32.to_be_bytes());
        tcp.write_all(&h2_frame(0x7, 0, 0, &goaway)).await.unwrap();
        // :status 200 (HPACK static index 8), then the body.
        tcp.write_all(&h2_frame(0x1, 0x4, streams[0], &[0x88]))
            .await
            .unwrap();
        tcp.write_all(&h2_frame(0x0, 0x1, streams[0], b"ok\n"))
            .await
            .unwrap();
        tcp.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut rest)).await;
        drop(tcp);
        // Then an ordinary server.
        serve_h2(listener, |method| {
            log.lock().unwrap().push(format!("again: {method}"));
            None
        })
        .await;
    });
    // Two POSTs at once from two app connections; the ambassador sends both
    // on its one HTTP/2 connection to the upstream.
    let curl = format!(
        "curl -sS --noproxy '*' --max-time 10 --http2-prior-knowledge -d once \
         http://{SERVER_V4}:8311/pkg.Service/Create"
    );
    let out = pod
        .app("sh")
        .args(["-c", &format!("{curl} & {curl} & wait")])
        .output()
        .unwrap();
    assert_eq!(
        stdout(&out),
        "ok\nok\n",
        "{}{}",
        stderr(&out),
        pod.proxy_log()
    );
    assert_eq!(
        *seen.lock().unwrap(),
        ["first connection: 1 of 2", "again: POST"]
    );
    assert!(pod.wait_log("failure=GoneAway"), "{}", pod.proxy_log());
}
