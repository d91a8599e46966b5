//! Operating the ambassador in a simulated Pod: the admin API, metrics that
//! follow the traffic, access-log lines, hot reload (good and bad files), and
//! secrets kept out of everything an operator can read.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{upstream::HttpUpstream, *};

/// A service on SERVER_V4:8080 that adds `x-ver: {ver}`.
fn api_config(ver: &str) -> String {
    format!(
        r#"
services:
  - name: api
    match: {{ cidr: {SERVER_V4}/32, port: 8080 }}
    protocol: http
    request:
      set_headers:
        x-ver: {{ value: {ver} }}
"#
    )
}

/// The value of one series in a metrics text (exact labels as rendered).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

#[test]
fn admin_api_answers_live_ready_config_status_and_log_level() {
    let mut pod = Pod::new("");
    let socket = pod.admin_socket_path();
    pod.rewrite_config(&format!(
        "proxy: {{ admin_socket: {} }}\n{}",
        socket.display(),
        api_config("one")
    ));
    pod.start_proxy();
    assert_eq!(pod.admin("GET", "/live", ""), (200, "live\n".into()));
    assert_eq!(pod.admin("GET", "/ready", ""), (200, "ready\n".into()));

    let (s, body) = pod.admin("GET", "/config", "");
    assert_eq!(s, 200);
    let cfg = json(&body);
    assert_eq!(cfg["services"][0]["name"], "api");
    assert_eq!(cfg["proxy"]["connect_timeout"], "10s");

    let (s, body) = pod.admin("GET", "/status", "");
    assert_eq!(s, 200);
    let st = json(&body);
    assert_eq!(st["ready"], true);
    assert_eq!(st["services"][0]["name"], "api");
    assert_eq!(st["services"][0]["protocol"], "http");

    let (s, body) = pod.admin("GET", "/log-level", "");
    assert_eq!(s, 200);
    assert!(body.contains("ambassador_userspace=debug"), "{body}");
    // Changes are not taken on TCP, which the app shares.
    for (method, path) in [
        ("PUT", "/log-level"),
        ("POST", "/log-level"),
        ("POST", "/reload"),
    ] {
        let (s, body) = pod.admin(method, path, "ambassador_userspace=trace");
        assert_eq!(s, 403, "{method} {path}: {body}");
        assert!(body.contains("admin socket"), "{body}");
    }
    assert_eq!(
        pod.admin("GET", "/log-level", "").1.trim(),
        "ambassador_userspace=debug"
    );
    // An operator opens the socket (here the test, as root; in a Pod,
    // `kubectl exec` into the sidecar, whose emptyDir the app does not mount).
    assert_eq!(
        pod.admin_socket("PUT", "/log-level", "ambassador_userspace=trace"),
        (200, "ambassador_userspace=trace\n".into())
    );
    assert_eq!(
        pod.admin("GET", "/log-level", "").1.trim(),
        "ambassador_userspace=trace"
    );
    let (s, body) = pod.admin_socket("PUT", "/log-level", "[[[nonsense");
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("bad log filter"), "{body}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // The CLI, as the proxy's own user would run it in its container.
    let out = Command::new(bin())
        .args(["log-level", "info", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "info");
    let out = Command::new(bin())
        .args(["reload", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("reloaded"), "{}", stdout(&out));
    // Another user is refused even past the file mode.
    let mut other = Command::new("setpriv");
    other
        .args(["--reuid", "4242", "--regid", "4242", "--clear-groups"])
        .arg(bin())
        .args(["reload", "--socket"])
        .arg(&socket);
    let out = other.output().unwrap();
    assert!(!out.status.success(), "{}", stdout(&out));
    assert_eq!(pod.admin("GET", "/nope", "").0, 404);
    assert_eq!(pod.admin("POST", "/metrics", "").0, 405);
}

#[test]
fn metrics_follow_the_traffic() {
    let mut pod = Pod::new(&format!(
        r#"
{}    upstream:
      endpoints: [{{ address: "{SERVER_V4}:8080" }}]
"#,
        api_config("one")
    ));
    pod.start_proxy();
    let _up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    let _echo = pod.server(SERVER_V4, 7000, Behaviour::Greet);
    for _ in 0..5 {
        assert_eq!(
            pod.http_status(&format!("http://{SERVER_V4}:8080/x"), &[]),
            "200"
        );
    }
    assert_eq!(
        pod.http_status(&format!("http://{SERVER_V4}:8080/x"), &["-d", "0123456789"]),
        "200"
    );
    // A TCP session no service claims: passthrough.
    let out = pod.client(&["greet", SERVER_V4, "7000"]);
    assert!(stdout(&out).contains("ECHO ping"), "{}", stdout(&out));
    thread::sleep(Duration::from_millis(200));

    let m = pod.metrics();
    let get = |s: &str| metric(&m, s).unwrap_or_else(|| panic!("no {s} in\n{m}"));
    assert_eq!(
        get(
            r#"ambassador_http_requests_total{service="api",direction="outbound",status_class="2xx"}"#
        ),
        6.0
    );
    assert_eq!(
        get(
            r#"ambassador_http_request_duration_seconds_count{service="api",direction="outbound"}"#
        ),
        6.0
    );
    assert_eq!(
        get(r#"ambassador_connections_total{service="api",direction="outbound"}"#),
        6.0
    );
    assert_eq!(
        get(r#"ambassador_active_connections{service="api",direction="outbound"}"#),
        0.0
    );
    assert_eq!(
        get(r#"ambassador_transferred_bytes_total{service="api",direction="from_app"}"#),
        10.0
    );
    assert!(get(r#"ambassador_transferred_bytes_total{service="api",direction="to_app"}"#) > 0.0);
    assert_eq!(
        get(&format!(
            r#"ambassador_endpoint_requests_total{{service="api",endpoint="{SERVER_V4}:8080",outcome="success"}}"#
        )),
        6.0
    );
    assert_eq!(
        get(&format!(
            r#"ambassador_endpoint_up{{service="api",endpoint="{SERVER_V4}:8080"}}"#
        )),
        1.0
    );
    assert_eq!(
        get(r#"ambassador_connections_total{service="passthrough",direction="outbound"}"#),
        1.0
    );
    // "ping\n" from the app, the greeting and the echo back.
    assert_eq!(
        get(r#"ambassador_transferred_bytes_total{service="passthrough",direction="from_app"}"#),
        5.0
    );
    // Bounded labels: the app's own address never becomes one.
    assert!(!m.contains(POD_V4), "the app's address is in the metrics");
    // The proxy runs unprivileged: no kernel counters, and it said why.
    assert!(!m.contains("ambassador_kernel_connects_total"));
    assert!(
        pod.proxy_log()
            .contains("kernel counters are not in /metrics")
    );
    assert!(m.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
}

#[test]
fn kernel_counters_are_in_metrics_when_the_proxy_may_read_them() {
    // Root with a mark (so its own connects are skipped) may read the pins.
    let mut pod = Pod::new(&format!("proxy: {{ mark: 4242 }}\n{}", api_config("one")));
    pod.start_proxy_as(None, "ambassador_userspace=debug");
    let _up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    for _ in 0..3 {
        assert_eq!(
            pod.http_status(&format!("http://{SERVER_V4}:8080/"), &[]),
            "200"
        );
    }
    let m = pod.metrics();
    let redirected = metric(
        &m,
        r#"ambassador_kernel_connects_total{outcome="redirected"}"#,
    )
    .unwrap_or_else(|| panic!("no kernel counters in\n{m}"));
    assert_eq!(redirected as u64, pod.counters().redirected);
    assert!(redirected >= 3.0);
}

#[test]
fn access_log_has_one_json_line_per_request_and_session() {
    let mut pod = Pod::new(&api_config("one"));
    pod.start_proxy();
    let _up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    let _echo = pod.server(SERVER_V4, 7000, Behaviour::Greet);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    assert_eq!(
        pod.http_status(
            &format!("http://{SERVER_V4}:8080/orders/7?token=QUERY-SECRET"),
            &[
                "-H",
                &format!("traceparent: 00-{trace}-00f067aa0ba902b7-01")
            ]
        ),
        "200"
    );
    let line = pod
        .wait_access_log("/orders/7")
        .unwrap_or_else(|| panic!("no access-log line: {:?}", pod.access_log()));
    let v = json(&line);
    assert_eq!(v["kind"], "http");
    assert_eq!(v["service"], "api");
    assert_eq!(v["dst"], format!("{SERVER_V4}:8080"));
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/orders/7");
    assert_eq!(v["status"], 200);
    assert_eq!(v["retries"], 0);
    assert_eq!(v["trace_id"], trace);
    assert!(v["bytes_out"].as_u64().unwrap() > 0);
    assert!(v["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(v["time"].as_str().unwrap().ends_with('Z'));
    assert!(
        !line.contains("QUERY-SECRET"),
        "query strings are not logged"
    );
    assert!(!line.contains("x-ver"), "injected headers are not logged");

    let out = pod.client(&["greet", SERVER_V4, "7000"]);
    assert!(stdout(&out).contains("ECHO ping"));
    let line = pod
        .wait_access_log("\"kind\":\"tcp\"")
        .unwrap_or_else(|| panic!("no TCP line: {:?}", pod.access_log()));
    let v = json(&line);
    assert_eq!(v["service"], "passthrough");
    assert_eq!(v["dst"], format!("{SERVER_V4}:7000"));
    assert_eq!(v["bytes_in"], 5);
    assert_eq!(v["outcome"], "closed");

    // Switched off: no more lines.
    pod.rewrite_config(&format!(
        "telemetry: {{ access_log: false }}\n{}",
        api_config("one")
    ));
    pod.hup_proxy();
    assert!(pod.wait_log("config reloaded"), "{}", pod.proxy_log());
    let before = pod.access_log().len();
    assert_eq!(
        pod.http_status(&format!("http://{SERVER_V4}:8080/quiet"), &[]),
        "200"
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(pod.access_log().len(), before, "{:?}", pod.access_log());
}

#[test]
fn a_bad_reload_keeps_the_old_config_serving_and_a_good_one_applies() {
    let mut pod = Pod::new(&api_config("one"));
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    let url = format!("http://{SERVER_V4}:8080/");
    let last_ver = |up: &HttpUpstream| {
        up.seen()
            .last()
            .and_then(|r| r.header("x-ver").map(str::to_string))
    };
    assert_eq!(pod.http_status(&url, &[]), "200");
    assert_eq!(last_ver(&up).as_deref(), Some("one"));

    // A typo: rejected, logged with the field, counted; "one" keeps serving.
    pod.rewrite_config(&api_config("one").replace("protocol: http", "protocl: http"));
    pod.hup_proxy();
    assert!(
        pod.wait_log("config reload rejected"),
        "{}",
        pod.proxy_log()
    );
    assert!(pod.proxy_log().contains("protocl"), "{}", pod.proxy_log());
    assert_eq!(pod.http_status(&url, &[]), "200");
    assert_eq!(last_ver(&up).as_deref(), Some("one"));
    let m = pod.metrics();
    assert!(
        metric(&m, r#"ambassador_config_reloads_total{result="failure"}"#).unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    let st = json(&pod.admin("GET", "/status", "").1);
    assert!(
        st["last_reload_error"]
            .as_str()
            .unwrap()
            .contains("protocl"),
        "{st}"
    );

    // A good file is picked up without a signal (the file changed).
    pod.rewrite_config(&api_config("two"));
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        assert_eq!(pod.http_status(&url, &[]), "200");
        if last_ver(&up).as_deref() == Some("two") {
            break;
        }
        assert!(Instant::now() < deadline, "the new config never applied");
        thread::sleep(Duration::from_millis(200));
    }
    let m = pod.metrics();
    assert!(
        metric(&m, r#"ambassador_config_reloads_total{result="success"}"#).unwrap_or(0.0) >= 1.0
    );
    assert!(json(&pod.admin("GET", "/status", "").1)["last_reload_error"].is_null());
}

#[test]
fn a_live_connection_keeps_the_config_it_started_with() {
    let mut pod = Pod::new(&api_config("one"));
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    // Two requests on one keep-alive connection, with a reload between them.
    let script = format!(
        r#"
import socket,time,sys
s=socket.create_connection(('{SERVER_V4}',8080))
def get():
    s.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
    d=b''
    while b'\r\n\r\n' not in d: d+=s.recv(4096)
    h,b=d.split(b'\r\n\r\n',1)
    n=int([l.split(b':')[1] for l in h.split(b'\r\n') if l.lower().startswith(b'content-length')][0])
    while len(b)<n: b+=s.recv(4096)
get(); print('first', flush=True)
sys.stdin.readline()
get(); print('second', flush=True)
"#
    );
    let mut child = pod
        .app("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "first");
    pod.rewrite_config(&api_config("two"));
    pod.hup_proxy();
    assert!(pod.wait_log("config reloaded"), "{}", pod.proxy_log());
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "second");
    child.wait().unwrap();
    let vers: Vec<_> = up
        .seen()
        .iter()
        .map(|r| r.header("x-ver").unwrap_or("").to_string())
        .collect();
    assert_eq!(vers, ["one", "one"], "the old connection kept its config");
    // A new connection gets the new one.
    assert_eq!(
        pod.http_status(&format!("http://{SERVER_V4}:8080/"), &[]),
        "200"
    );
    assert_eq!(up.seen().last().unwrap().header("x-ver"), Some("two"));
}

#[test]
fn a_canary_secret_is_in_no_log_metric_or_config_dump() {
    const LITERAL: &str = "CANARY-LITERAL-5b1e";
    const FROM_FILE: &str = "CANARY-FILE-77c2";
    const FROM_ENV: &str = "CANARY-ENV-09af";
    let mut pod = Pod::new("");
    let dir = pod.shared_dir();
    let file = dir.join("token");
    std::fs::write(&file, FROM_FILE).unwrap();
    pod.rewrite_config(&format!(
        r#"
services:
  - name: api
    match: {{ cidr: {SERVER_V4}/32, port: 8080 }}
    protocol: http
    request:
      set_headers:
        authorization: {{ value: {LITERAL}, prefix: "Bearer " }}
        x-file: {{ file: {} }}
        x-env: {{ env: AMB_CANARY }}
"#,
        file.display()
    ));
    pod.proxy_env.push(("AMB_CANARY".into(), FROM_ENV.into()));
    pod.start_proxy_logging("trace");
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    assert_eq!(
        pod.http_status(&format!("http://{SERVER_V4}:8080/"), &[]),
        "200"
    );
    // They did reach the upstream...
    let seen = up.seen();
    let r = seen.last().unwrap();
    assert_eq!(
        r.header("authorization"),
        Some(&*format!("Bearer {LITERAL}"))
    );
    assert_eq!(r.header("x-file"), Some(FROM_FILE));
    assert_eq!(r.header("x-env"), Some(FROM_ENV));
    // ...and nowhere else.
    let config = pod.admin("GET", "/config", "").1;
    assert!(config.contains("<redacted>"), "{config}");
    assert!(config.contains("AMB_CANARY"), "the env var's name is shown");
    let status = pod.admin("GET", "/status", "").1;
    let metrics = pod.metrics();
    thread::sleep(Duration::from_millis(300));
    let access = pod.access_log().join("\n");
    assert!(!access.is_empty());
    let logs = pod.proxy_log();
    for secret in [LITERAL, FROM_FILE, FROM_ENV] {
        for (what, text) in [
            ("/config", &config),
            ("/status", &status),
            ("/metrics", &metrics),
            ("the access log", &access),
            ("the process log (trace level)", &logs),
        ] {
            assert!(!text.contains(secret), "{secret} leaked into {what}");
        }
    }
}

/// Malformed files: each gets one line naming the field, fast, and no panic.
#[test]
fn fifty_malformed_configs_each_get_a_one_line_error_naming_the_field() {
    let svc = |body: &str| {
        format!("services:\n  - name: api\n    match: {{ cidr: 10.0.0.0/8, port: 80 }}\n{body}")
    };
    let cases: Vec<(String, &str)> = vec![
        ("proxy: { port: 0 }".into(), "proxy.port"),
        ("proxy: { port: 70000 }".into(), "proxy.port"),
        ("proxy: { port: eighty }".into(), "proxy.port"),
        ("proxy: { uid: -1 }".into(), "proxy.uid"),
        ("proxy: { mark: 0 }".into(), "proxy.mark"),
        (
            "proxy: { connect_timeout: soon }".into(),
            "proxy.connect_timeout",
        ),
        (
            "proxy: { connect_timeout: 0s }".into(),
            "proxy.connect_timeout",
        ),
        ("proxy: { idle_timeout: 5 }".into(), "proxy.idle_timeout"),
        (
            "proxy: { header_read_timeout: 0ms }".into(),
            "proxy.header_read_timeout",
        ),
        (
            "proxy: { drain_timeout: [1] }".into(),
            "proxy.drain_timeout",
        ),
        ("proxy: { dns_refresh: 0s }".into(), "proxy.dns_refresh"),
        ("proxy: { workers: many }".into(), "proxy.workers"),
        ("proxy: { admin: localhost }".into(), "proxy.admin"),
        ("proxy: { prot: 1 }".into(), "prot"),
        ("intercept: { fail: sideways }".into(), "intercept.fail"),
        (
            "intercept: { exclude_ports: [0] }".into(),
            "intercept.exclude_ports",
        ),
        (
            "intercept: { exclude_ports: [http] }".into(),
            "intercept.exclude_ports",
        ),
        (
            "intercept: { exclude_cidrs: [10.0.0.0/33] }".into(),
            "intercept.exclude_cidrs",
        ),
        (
            "intercept: { loopback: maybe }".into(),
            "intercept.loopback",
        ),
        (
            "intercept: { table_size: 10 }".into(),
            "intercept.table_size",
        ),
        ("default: allow".into(), "default"),
        ("services: {}".into(), "services"),
        (
            "services:\n  - match: { cidr: 10.0.0.0/8 }".into(),
            "services[0]",
        ),
        ("services:\n  - name: api".into(), "services[0]"),
        (
            "services:\n  - name: api\n    match: {}".into(),
            "services[0].match",
        ),
        (
            "services:\n  - name: api\n    match: { cidr: nowhere }".into(),
            "services[0].match.cidr",
        ),
        (
            "services:\n  - name: api\n    match: { host: 'a b' }".into(),
            "services[0].match",
        ),
        (
            "services:\n  - name: api\n    match: { cidr: 10.0.0.0/8, port: 0 }".into(),
            "services[0].match",
        ),
        (svc("    protocol: udp"), "services[0].protocol"),
        (svc("    colour: red"), "colour"),
        (
            svc("    upstream: { endpoints: [{ address: nohost }] }"),
            "services[0].upstream.endpoints[0].address",
        ),
        (
            svc("    upstream: { endpoints: [{ address: 'a:0' }] }"),
            "services[0].upstream.endpoints[0].address",
        ),
        (
            svc("    upstream: { endpoints: [{ address: 'a:1', priority: -1 }] }"),
            "services[0].upstream.endpoints[0].priority",
        ),
        (
            svc("    upstream: { balance: random }"),
            "services[0].upstream.balance",
        ),
        (
            svc("    upstream: { tls: { min_version: '1.1' } }"),
            "services[0].upstream.tls",
        ),
        (
            svc("    upstream: { tls: { alpn: [spdy] } }"),
            "services[0].upstream.tls",
        ),
        (
            svc("    upstream: { tls: { client_cert: /c.pem } }"),
            "services[0].upstream.tls",
        ),
        (
            svc("    upstream: { health_check: { interval: 0s, tcp: {} } }"),
            "services[0].upstream.health_check",
        ),
        (
            svc("    upstream: { health_check: { interval: 1s } }"),
            "services[0].upstream.health_check",
        ),
        (
            svc("    upstream: { health_check: { interval: 1s, http: { path: nope } } }"),
            "services[0].upstream.health_check",
        ),
        (
            svc("    protocol: http\n    request: { set_headers: { 'bad header': { value: x } } }"),
            "services[0].request.set_headers",
        ),
        (
            svc("    protocol: http\n    request: { set_headers: { x-a: { value: x, env: Y } } }"),
            "services[0].request.set_headers",
        ),
        (
            svc("    protocol: http\n    request: { set_headers: { x-a: {} } }"),
            "services[0].request.set_headers",
        ),
        (
            svc("    protocol: http\n    request: { remove_headers: ['a b'] }"),
            "services[0].request.remove_headers",
        ),
        (
            svc("    timeouts: { request: never }"),
            "services[0].timeouts.request",
        ),
        (
            svc("    limits: { max_requests: 0 }"),
            "services[0].limits.max_requests",
        ),
        (
            svc("    retries: { attempts: -2 }"),
            "services[0].retries.attempts",
        ),
        (
            svc("    retries: { budget: 2 }"),
            "services[0].retries.budget",
        ),
        (
            svc("    outlier: { max_ejected: 1.5 }"),
            "services[0].outlier.max_ejected",
        ),
        (
            "telemetry: { tracing: { otlp_endpoint: 'ftp://x' } }".into(),
            "telemetry.tracing.otlp_endpoint",
        ),
        (
            "telemetry: { tracing: { otlp_endpoint: 'http://x:4318', sample_ratio: 3 } }".into(),
            "telemetry.tracing.sample_ratio",
        ),
        (
            "telemetry: { access_log: loud }".into(),
            "telemetry.access_log",
        ),
        ("proxy: [1, 2]\n".into(), "proxy"),
        ("{ unclosed".into(), "line"),
    ];
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let dir = std::env::temp_dir().join(format!("amb-malformed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (yaml, field)) in cases.iter().enumerate() {
        let file = dir.join(format!("case{i}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        let started = Instant::now();
        let out = Command::new(bin())
            .arg("check")
            .arg(&file)
            .output()
            .unwrap();
        let took = started.elapsed();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "case {i} ({yaml}): {err}");
        assert!(!err.contains("panicked"), "case {i} panicked: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "case {i}: not one line: {err}"
        );
        assert!(
            err.contains(field),
            "case {i} ({yaml}): `{field}` not named in: {err}"
        );
        assert!(took < Duration::from_secs(1), "case {i} took {took:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn spans_reach_an_otlp_collector_with_the_apps_trace_id() {
    let mut pod = Pod::new(&format!(
        r#"
telemetry:
  tracing: {{ otlp_endpoint: "http://127.0.0.1:4318", service_name: pod-ambassador }}
{}"#,
        api_config("one")
    ));
    let collector = OtlpReceiver::start(&pod.netns, "127.0.0.1:4318");
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let app_span = "b7ad6b7169203331";
    assert_eq!(
        pod.http_status(
            &format!("http://{SERVER_V4}:8080/traced"),
            &[
                "-H",
                &format!("traceparent: 00-{trace}-{app_span}-01"),
                "-H",
                "tracestate: vendor=opaque"
            ]
        ),
        "200"
    );
    // The upstream sees the same trace, with the ambassador's span as parent.
    let seen = up.seen();
    let tp = seen
        .last()
        .unwrap()
        .header("traceparent")
        .unwrap()
        .to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[1], trace, "{tp}");
    assert_ne!(
        parts[2], app_span,
        "the upstream's parent is the ambassador's span"
    );
    assert_eq!(
        seen.last().unwrap().header("tracestate"),
        Some("vendor=opaque")
    );

    let span = collector
        .wait_span(|s| s["traceId"] == trace)
        .unwrap_or_else(|| panic!("no span with the app's trace id: {:?}", collector.spans()));
    assert_eq!(span["parentSpanId"], app_span);
    assert_eq!(span["spanId"], parts[2]);
    assert_eq!(span["kind"], 3, "SPAN_KIND_CLIENT");
    let attrs = span["attributes"].to_string();
    assert!(attrs.contains("http.response.status_code"), "{attrs}");
    assert!(attrs.contains("\"api\""), "{attrs}");
    assert!(span["resource"].to_string().contains("pod-ambassador"));

    // No traceparent from the app: a new trace starts here, and the access
    // log names it.
    assert_eq!(
        pod.http_status(&format!("http://{SERVER_V4}:8080/fresh"), &[]),
        "200"
    );
    let tp = up
        .seen()
        .last()
        .unwrap()
        .header("traceparent")
        .unwrap()
        .to_string();
    let new_trace = tp.split('-').nth(1).unwrap().to_string();
    assert_ne!(new_trace, trace);
    assert!(
        collector
            .wait_span(|s| s["traceId"] == new_trace.as_str())
            .is_some()
    );
    let line = pod.wait_access_log("/fresh").expect("access-log line");
    assert_eq!(json(&line)["trace_id"], new_trace);
}

#[test]
fn without_a_collector_requests_are_not_touched() {
    let mut pod = Pod::new(&api_config("one"));
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    assert_eq!(
        pod.http_status(&format!("http://{SERVER_V4}:8080/"), &[]),
        "200"
    );
    assert_eq!(up.seen().last().unwrap().header("traceparent"), None);
}

#[test]
fn ambassador_status_shows_the_proxys_services_and_endpoints() {
    let mut pod = Pod::new(&format!(
        r#"
{}    upstream:
      endpoints:
        - {{ address: "{SERVER_V4}:8080" }}
        - {{ address: "{SERVER2_V4}:8080", priority: 1 }}
"#,
        api_config("one")
    ));
    pod.start_proxy();
    // Run where an operator would: in the Pod (kubectl exec).
    let out = pod
        .app(bin().to_str().unwrap())
        .arg("status")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("proxy 127.0.0.1:15020: ready"), "{text}");
    assert!(text.contains("service api (http)"), "{text}");
    assert!(
        text.contains(&format!("up       {SERVER_V4}:8080 (priority 0")),
        "{text}"
    );
    assert!(
        text.contains(&format!("{SERVER2_V4}:8080 (priority 1")),
        "{text}"
    );
    // The node's view is there too (root here).
    assert!(text.contains("attached"), "{text}");
}

/// The Kubernetes arrangement: `init --pod-uid` shares the Pod's counters and
/// exclusion maps with the proxy's uid; the unprivileged sidecar, which sees
/// only that directory, serves the kernel counters and applies exclusion
/// changes on reload, without re-attaching anything.
#[test]
fn the_sidecar_serves_its_pods_kernel_counters_and_applies_exclusions_on_reload() {
    let mut pod = Pod::new(&api_config("one"));
    let uid = format!("c0ffee-{}", std::process::id());
    pod.start_proxy_with_kernel_maps(&uid, &["--exclude-ports", "7100"]);
    let _up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    let _a = pod.server(SERVER_V4, 7000, Behaviour::Greet);
    let _b = pod.server(SERVER_V4, 7100, Behaviour::Greet);
    assert_eq!(
        pod.http_status(&format!("http://{SERVER_V4}:8080/"), &[]),
        "200"
    );

    let m = pod.metrics();
    let redirected = metric(
        &m,
        r#"ambassador_kernel_connects_total{outcome="redirected"}"#,
    )
    .unwrap_or_else(|| panic!("no kernel counters in\n{m}\n{}", pod.proxy_log()));
    assert_eq!(redirected as u64, pod.counters().redirected);

    let greet = |port: &str| {
        let out = pod.client(&["greet", SERVER_V4, port]);
        assert!(stdout(&out).contains("ECHO ping"), "{}", stdout(&out));
    };
    // The command line's exclusion (a Pod annotation's) is in the kernel.
    let before = pod.counters();
    greet("7100");
    greet("7000");
    let after = pod.counters();
    assert_eq!(after.bypassed, before.bypassed + 1, "7100 excluded");
    assert_eq!(after.redirected, before.redirected + 1, "7000 intercepted");

    // A reload excludes 7000 as well, and keeps the command line's 7100.
    let links_before = links_of(&pod);
    pod.rewrite_config(&format!(
        "intercept: {{ exclude_ports: [22, 7000] }}\n{}",
        api_config("one")
    ));
    pod.hup_proxy();
    assert!(pod.wait_log("config reloaded"), "{}", pod.proxy_log());
    let before = pod.counters();
    greet("7000");
    greet("7100");
    let after = pod.counters();
    assert_eq!(after.bypassed, before.bypassed + 2, "{}", pod.proxy_log());
    assert_eq!(after.redirected, before.redirected);
    assert_eq!(links_of(&pod), links_before, "nothing re-attached");
    // status reads the exemptions back from the kernel maps.
    let text = stdout(&pod.ambassador(&["status"], None));
    assert!(
        text.contains("exempt   TCP to port 22, 7000, 7100 of any host; UDP: not under policy"),
        "{text}"
    );
    let m = pod.metrics();
    assert_eq!(
        metric(
            &m,
            r#"ambassador_kernel_connects_total{outcome="bypassed"}"#
        )
        .unwrap() as u64,
        after.bypassed
    );
}

/// `check` says what leaves the Pod with no policy at all; under `default:
/// deny` the default port 22 exemption is gone.
#[test]
fn check_lists_what_is_not_under_policy() {
    let dir = std::env::temp_dir().join(format!("amb-exempt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (yaml, want) in [
        (
            "intercept: { exclude_cidrs: [10.0.0.0/8] }\ninbound: { ports: all, exclude_ports: [9090] }\n",
            "exempt     TCP to port 22 of any host (intercept.exclude_ports); TCP to 10.0.0.0/8 on any port (intercept.exclude_cidrs); \
             UDP (policed only under default: deny); callers of port 9090 (inbound.exclude_ports): not under policy",
        ),
        (
            "default: deny\n",
            "exempt     nothing: every TCP connect is policed",
        ),
    ] {
        let file = dir.join("c.yaml");
        std::fs::write(&file, yaml).unwrap();
        let out = Command::new(bin())
            .arg("check")
            .arg(&file)
            .output()
            .unwrap();
        let text = stdout(&out);
        assert!(out.status.success(), "{text}{}", stderr(&out));
        assert!(text.contains(want), "{want}\n{text}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The ids of the links pinned for the Pod.
fn links_of(pod: &Pod) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&pod.cgroup).unwrap());
    let mut ids: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["cgroup_id"].as_u64() == Some(ino))
        .map(|l| l["id"].to_string())
        .collect();
    ids.sort();
    assert!(!ids.is_empty(), "no links for the Pod's cgroup");
    ids
}
