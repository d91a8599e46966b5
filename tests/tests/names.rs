//! Names as users write them: `*.bucket.test` takes any name below it (not
//! the domain itself), a short `payments` takes the names the Pod's search
//! domains complete it to, a full name in the config takes the app's short
//! one; and a wildcard service still owns only the addresses names under it
//! resolve to. Unmodified curl in a simulated Pod, a real
//! upstream that shows which service's header arrived.

use ambassador_tests::{upstream::HttpUpstream, *};

const CONFIG: &str = r#"
proxy: { search_domains: [default.svc.cluster.local, svc.cluster.local, cluster.local] }
services:
  - name: buckets
    match: { host: "*.bucket.test", port: 8080 }
    protocol: http
    request: { set_headers: { x-svc: { value: buckets } } }
  - name: payments
    match: { host: payments, port: 8080 }
    protocol: http
    request: { set_headers: { x-svc: { value: payments } } }
  - name: ledger
    match: { host: ledger.default.svc.cluster.local, port: 8080 }
    protocol: http
    request: { set_headers: { x-svc: { value: ledger } } }
"#;

/// The status curl in the app gets for `GET /` to `addr:8080` with `host`.
fn status_of(pod: &Pod, addr: &str, host: &str) -> String {
    let host = format!("host: {host}");
    let args = ["-o", "/dev/null", "-w", "%{http_code}", "-H", &host];
    stdout(&pod.curl(&format!("http://{addr}:8080/"), &args))
}

#[test]
fn wildcards_and_short_names_match_as_users_write_them() {
    let mut pod = Pod::new(CONFIG);
    pod.proxy_hosts = [
        ("a.bucket.test", SERVER_V4),
        ("b.bucket.test", SERVER2_V4),
        ("payments", SERVER_V4),
        ("payments.default.svc.cluster.local", SERVER_V4),
        ("ledger", SERVER_V4),
        ("ledger.default.svc.cluster.local", SERVER_V4),
    ]
    .iter()
    .map(|(n, a)| (n.to_string(), a.to_string()))
    .collect();
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    let call = |host: &str| {
        let status = status_of(&pod, SERVER_V4, host);
        let svc = up
            .seen()
            .last()
            .and_then(|s| s.header("x-svc").map(str::to_string));
        (status, svc)
    };
    let cases: [(&str, &str, Option<&str>); 8] = [
        ("a.bucket.test", "200", Some("buckets")),
        ("payments", "200", Some("payments")),
        (
            "payments.default.svc.cluster.local",
            "200",
            Some("payments"),
        ),
        ("ledger", "200", Some("ledger")),
        ("ledger.default.svc.cluster.local", "200", Some("ledger")),
        // Not below the wildcard, nor completions: no service (passthrough).
        ("bucket.test", "200", None),
        ("payments.example.com", "200", None),
        ("ledger.other", "200", None),
    ];
    for (host, status, svc) in cases {
        let before = up.seen().len();
        let (got, seen) = call(host);
        assert_eq!(got, status, "{host}");
        assert_eq!(up.seen().len(), before + 1, "{host}");
        assert_eq!(seen.as_deref(), svc, "{host}");
    }
    // A wildcard service owns the addresses the names under it resolve to,
    // learned as requests come: toward another address, a name that
    // resolves elsewhere (or nowhere) is refused, never sent with the
    // service's header; one that resolves there goes.
    let up2 = HttpUpstream::plain(pod.server_listener(SERVER2_V4, 8080));
    let call2 = |host: &str| status_of(&pod, SERVER2_V4, host);
    assert_eq!(call2("c.bucket.test"), "403");
    assert_eq!(call2("a.bucket.test"), "403");
    assert!(up2.seen().is_empty());
    assert_eq!(call2("b.bucket.test"), "200");
    assert_eq!(up2.seen()[0].header("x-svc"), Some("buckets"));
}
