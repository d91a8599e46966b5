//! A port's gateway rules against unmodified curl callers: who may call
//! what, how often, how much, and callers that try to step around them.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use ambassador_tests::{framing, upstream::HttpUpstream, *};

/// A Pod whose port 8080 has `policy` (YAML flow map entries after `port`).
fn gate(policy: &str) -> (Pod, HttpUpstream) {
    let pod = Pod::new("");
    let dir = pod.shared_dir();
    std::fs::write(
        dir.join("keys.yaml"),
        "billing: billing-key-0123456789\nops: ops-key-0123456789abc\n",
    )
    .unwrap();
    let policy = policy.replace("KEYS", &dir.join("keys.yaml").display().to_string());
    pod.rewrite_config(&format!(
        "proxy: {{ header_read_timeout: 1s }}\ninbound:\n  ports: [8080]\n  policies:\n    - {{ port: 8080, {policy} }}\n"
    ));
    let out = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup.clone()));
    assert!(out.status.success(), "{}", stderr(&out));
    let app = HttpUpstream::plain(pod.app_listener(8080));
    let mut pod = pod;
    pod.start_proxy_with_kernel_maps(&pod.name(), &[]);
    (pod, app)
}

/// `status reason` for one curl call (`-w` prints the status, `-D -` the
/// head, whose x-ambassador-error is taken).
fn call(pod: &Pod, method: &str, path: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "-X",
        method,
        "--path-as-is",
        "-o",
        "/dev/null",
        "-D",
        "-",
        "-w",
        "%{http_code}",
    ];
    args.extend_from_slice(extra);
    let out = pod.caller_curl(&format!("http://{POD_V4}:8080{path}"), &args);
    let text = stdout(&out);
    let status = text.lines().last().unwrap_or_default().to_string();
    let reason = text
        .lines()
        .find_map(|l| l.strip_prefix("x-ambassador-error: "))
        .unwrap_or_default()
        .trim()
        .to_string();
    (status, reason)
}

fn refusals(pod: &Pod, reason: &str) -> f64 {
    let prefix = format!(
        r#"ambassador_refusals_total{{service="inbound-8080",direction="inbound",reason="{reason}"}} "#
    );
    pod.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[test]
fn access_rules_let_billing_read_invoices_but_never_delete_them() {
    let (pod, app) = gate(
        "auth: { api_keys: { file: KEYS } }, access: { default: deny, rules: [\
         { action: deny, path_prefix: /v1/invoices, methods: [DELETE] }, \
         { action: allow, path_prefix: /v1/invoices, methods: [GET], clients: [billing] }, \
         { action: allow, path_prefix: /ops, clients: [ops] }] }",
    );
    let billing = ["-H", "X-Api-Key: billing-key-0123456789"];
    let ops = ["-H", "X-Api-Key: ops-key-0123456789abc"];
    assert_eq!(call(&pod, "GET", "/v1/invoices/7", &billing).0, "200");
    let (s, why) = call(&pod, "DELETE", "/v1/invoices/7", &billing);
    assert_eq!(
        (s.as_str(), why.as_str()),
        ("403", "denied by inbound-8080's access rule 1")
    );
    assert_eq!(call(&pod, "DELETE", "/v1/invoices/7", &ops).0, "403");
    assert_eq!(call(&pod, "GET", "/v1/invoices", &ops).0, "403");
    let (s, why) = call(&pod, "GET", "/ops/restart", &billing);
    assert_eq!(
        (s.as_str(), why.as_str()),
        ("403", "denied by inbound-8080's default access rule")
    );
    assert_eq!(call(&pod, "POST", "/ops/restart", &ops).0, "200");
    // Paths that another server could read as /ops/...: refused before any rule.
    for sneaky in [
        "/v1/invoices/../../ops/restart",
        "/v1/invoices/%2e%2e/%2e%2e/ops/restart",
        "/v1/invoices/..%2f..%2fops/restart",
        "/v1/invoices//../ops",
        "/v1/invoices/.%2E/ops",
        // %6f is `o`: a server may decode it, and then it is /ops/restart.
        "/%6fps/restart",
    ] {
        let (s, why) = call(&pod, "GET", sneaky, &billing);
        assert_eq!(s, "400", "{sneaky}");
        assert!(why.contains("normal form"), "{sneaky}: {why}");
    }
    assert_eq!(refusals(&pod, "forbidden"), 4.0);
    assert_eq!(refusals(&pod, "path_not_normal"), 6.0);
    let seen: Vec<String> = app
        .seen()
        .iter()
        .map(|r| format!("{} {}", r.method, r.uri))
        .collect();
    assert_eq!(seen, ["GET /v1/invoices/7", "POST /ops/restart"]);
}

#[test]
fn a_burst_gets_exactly_its_allowance_then_429_with_retry_after() {
    let (pod, app) = gate("rate_limit: { requests_per_second: 0.1, burst: 5, key: client_ip }");
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(call(&pod, "GET", "/", &[]).0);
    }
    let ok = statuses.iter().filter(|s| *s == "200").count();
    let limited = statuses.iter().filter(|s| *s == "429").count();
    assert_eq!((ok, limited), (5, 15), "{statuses:?}");
    assert_eq!(app.seen().len(), 5);
    let out = pod.caller_curl(&format!("http://{POD_V4}:8080/"), &["-i"]);
    let head = stdout(&out).to_ascii_lowercase();
    assert!(head.contains("retry-after: "), "{head}");
    assert_eq!(refusals(&pod, "rate_limited"), 16.0);
}

#[test]
fn bodies_past_the_limit_are_refused_declared_or_streamed() {
    let (pod, app) = gate("limits: { max_body_bytes: 1024 }");
    let dir = pod.shared_dir();
    let big = dir.join("big");
    std::fs::write(&big, vec![b'x'; 4000]).unwrap();
    let data = format!("@{}", big.display());
    let (s, why) = call(&pod, "POST", "/upload", &["--data-binary", &data]);
    assert_eq!(
        (s.as_str(), why.as_str()),
        ("413", "the request body is larger than 1024 bytes")
    );
    assert!(
        app.seen().is_empty(),
        "a declared oversize body reached the app"
    );
    let chunked = [
        "--data-binary",
        data.as_str(),
        "-H",
        "Transfer-Encoding: chunked",
    ];
    assert_eq!(call(&pod, "POST", "/upload", &chunked).0, "413");
    assert!(app.seen().iter().all(|r| r.body_len <= 1024));
    assert_eq!(
        call(&pod, "POST", "/upload", &["--data-binary", "small"]).0,
        "200"
    );
    assert_eq!(refusals(&pod, "body_too_large"), 2.0);
}

#[test]
fn connections_past_the_limit_are_reset_and_silent_callers_let_go() {
    let (pod, _app) = gate("limits: { max_connections: 2 }");
    let addr: SocketAddr = format!("{POD_V4}:8080").parse().unwrap();
    let (third, after) = pod.servers.enter(move || {
        let open = |a| {
            let s = TcpStream::connect_timeout(&a, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        };
        let a = open(addr);
        let _b = open(addr);
        std::thread::sleep(Duration::from_millis(200));
        // Reset at once: by the connect, the first setsockopt or the read.
        let third = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .and_then(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                c.read(&mut [0u8; 8])
            })
            .map_err(|e| e.kind());
        drop(a);
        std::thread::sleep(Duration::from_millis(200));
        let mut d = open(addr);
        d.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = d.read_to_string(&mut out);
        (third, out)
    });
    assert!(
        matches!(third, Err(std::io::ErrorKind::ConnectionReset) | Ok(0)),
        "{third:?}"
    );
    assert!(after.starts_with("HTTP/1.1 200"), "{after}");
    assert_eq!(refusals(&pod, "max_connections"), 1.0);
    // The two silent ones above were let go after the header-read timeout
    // (1 s): a slowloris holds nothing.
    let start = Instant::now();
    let read = pod.servers.enter(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
        s.read(&mut [0u8; 64]).map_err(|e| e.kind())
    });
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{read:?} after {:?}",
        start.elapsed()
    );
}

#[test]
fn framing_tricks_never_smuggle_a_request_past_the_gateway() {
    // The same cases the app's side stands against, now from a caller.
    let (pod, app) = gate("limits: { max_body_bytes: 100000 }");
    let cases = framing::framing_cases();
    let file = pod.shared_dir().join("framing-case");
    let arg = format!("@{}", file.display());
    for c in &cases {
        let before = app.seen().len();
        std::fs::write(&file, &c.bytes).unwrap();
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &pod.servers.name, "python3"])
            .arg(hostile_py())
            .args(["raw", POD_V4, "8080", &arg, "1"])
            .output()
            .unwrap();
        let out = stdout(&out);
        let seen = app.seen();
        let new = &seen[before..];
        assert!(
            new.len() <= c.max_upstream,
            "{}: {} requests reached the app: {out}",
            c.what,
            new.len()
        );
        // A request may still be on its way (bodies stream to the app: a
        // body shorter than its length is forwarded as far as it goes).
        let statuses = out.lines().filter(|l| l.starts_with("STATUS")).count();
        let pending = usize::from(out.contains("END OPEN"));
        assert!(
            new.len() <= statuses + pending,
            "{}: the app saw {} requests, the caller got {statuses} answers: {out}",
            c.what,
            new.len()
        );
        for r in new {
            assert!(
                r.header("transfer-encoding").is_none() || r.header("content-length").is_none(),
                "{}: two framings forwarded",
                c.what
            );
            let cl: usize = r.header("content-length").map_or(0, |v| v.parse().unwrap());
            assert!(
                r.header("content-length").is_none() || r.body_len <= cl,
                "{}: more body than its length",
                c.what
            );
        }
    }
    assert!(!pod.proxy_log().contains("panicked"), "{}", pod.proxy_log());
}

/// The app's side of a WebSocket-style upgrade: each connection's head is
/// recorded; an upgrade is answered `101` and its lines echoed, anything
/// else a `200` and closed.
fn upgrade_app(listener: std::net::TcpListener) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::{BufRead, BufReader};
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let (mut head, mut line) = (String::new(), String::new());
                while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                    head.push_str(&line.to_ascii_lowercase());
                    line.clear();
                }
                let upgrade = head.contains("upgrade: websocket");
                seen.lock().unwrap().push(head);
                let mut w = conn;
                if !upgrade {
                    let _ = w.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    );
                    return;
                }
                w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                    .unwrap();
                line.clear();
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    let _ = w.write_all(line.as_bytes());
                    line.clear();
                }
            });
        }
    });
    heads
}

#[test]
fn websocket_upgrades_are_admitted_like_requests_and_held_until_closed() {
    let mut pod = Pod::new("");
    pod.rewrite_config(
        "inbound:\n  ports: [8080]\n  policies:\n    - port: 8080\n      \
         access: { default: allow, rules: [{ action: deny, path_prefix: /admin }] }\n      \
         limits: { max_connections: 1 }\n",
    );
    let heads = upgrade_app(pod.app_listener(8080));
    pod.start_proxy_with_kernel_maps(&pod.name(), &[]);
    let upgrade = ["-H", "Connection: Upgrade", "-H", "Upgrade: websocket"];

    // An upgrade the access rules refuse never reaches the app.
    let (status, reason) = call(&pod, "GET", "/admin/live", &upgrade);
    assert_eq!(status, "403", "{reason}");
    assert!(heads.lock().unwrap().is_empty());

    // An admitted one is relayed both ways once the app agrees.
    let addr: SocketAddr = format!("{POD_V4}:8080").parse().unwrap();
    let mut ws = pod
        .servers
        .enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    ws.write_all(
        b"GET /live HTTP/1.1\r\nHost: pod\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") && ws.read(&mut byte).unwrap() == 1 {
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    ws.write_all(b"ping over the relay\n").unwrap();
    let mut echo = [0u8; 20];
    ws.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping over the relay\n");
    let app_head = heads.lock().unwrap()[0].clone();
    assert!(app_head.contains("connection: upgrade"), "{app_head}");
    assert!(
        app_head.contains(&format!("x-forwarded-for: {SERVER_V4}")),
        "{app_head}"
    );

    // The relay holds the port's one connection: another caller is turned
    // away until it closes.
    let (status, _) = call(&pod, "GET", "/plain", &[]);
    assert_eq!(status, "000", "a second caller got past max_connections");
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, reason) = call(&pod, "GET", "/plain", &[]);
        if status == "200" {
            break;
        }
        assert!(Instant::now() < deadline, "{status} {reason}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The route model of services, on a port: after the gateway's rules, a
/// route answers by itself, redirects, denies, or forwards with a rewrite
/// and header changes both ways.
#[test]
fn a_ports_routes_answer_redirect_deny_and_rewrite_for_callers() {
    let (pod, app) = gate(
        r#"routes: [
          { name: health, match: { path: /healthz }, direct_response: { status: 200, body: "gateway ok" } },
          { name: moved, match: { path_prefix: /v0 }, redirect: { location: "https://pod.example/v1", status: 308 } },
          { name: no-admin, match: { path_prefix: /admin }, deny: true },
          { name: v1, match: { path_prefix: /v1 }, rewrite: { path_prefix: /api/v1 },
            request_headers: { set: { x-gateway-route: v1 } }, response_headers: { set: { x-api-version: "1" } } }
        ]"#,
    );
    let body = stdout(&pod.caller_curl(&format!("http://{POD_V4}:8080/healthz"), &[]));
    assert_eq!(body, "gateway ok");
    let head = stdout(&pod.caller_curl(&format!("http://{POD_V4}:8080/v0/x"), &["-i"]));
    assert!(head.starts_with("HTTP/1.1 308"), "{head}");
    assert!(head.contains("location: https://pod.example/v1"), "{head}");
    let (s, why) = call(&pod, "GET", "/admin/users", &[]);
    assert_eq!(
        (s.as_str(), why.as_str()),
        ("403", "denied by route no-admin of inbound-8080")
    );
    assert!(app.seen().is_empty(), "{:?}", app.seen());
    assert_eq!(refusals(&pod, "forbidden"), 1.0);

    let head = stdout(&pod.caller_curl(
        &format!("http://{POD_V4}:8080/v1/orders?page=2"),
        &["-i", "-H", "x-gateway-route: forged"],
    ));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("x-api-version: 1"), "{head}");
    let seen = app.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/api/v1/orders?page=2");
    assert_eq!(seen[0].header("x-gateway-route"), Some("v1"));
    // Not routed: to the app as it came.
    assert_eq!(call(&pod, "GET", "/other", &[]).0, "200");
    assert_eq!(app.seen()[1].uri, "/other");
}
