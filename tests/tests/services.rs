//! Services in a simulated Pod: what the ambassador recognises and what it
//! does with the rest (`default: deny | passthrough`).

use ambassador_tests::*;

fn lines(out: &std::process::Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

#[test]
fn default_deny_refuses_what_no_service_claims() {
    let mut pod = Pod::new(&format!(
        r#"
default: deny
services:
  - name: db
    match: {{ cidr: {SERVER_V4}/32, port: 7701 }}
    protocol: tcp
"#
    ));
    pod.start_proxy();
    let _a = pod.server(SERVER_V4, 7701, Behaviour::Greet);
    let b = pod.server(SERVER_V4, 7702, Behaviour::Greet);

    let out = pod.client(&["greet", SERVER_V4, "7701"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert!(stdout(&out).contains(&format!("GREETING HELLO {SERVER_V4}:7701")));

    // Unmatched: the app's connection is reset and nothing reaches the server.
    let out = pod.client(&["expect-rst", SERVER_V4, "7702"]);
    assert_eq!(stdout(&out), "RESET\n", "{}", lines(&out));
    assert_eq!(b.accepted.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(
        pod.wait_log("denied: no service matches"),
        "{}",
        pod.proxy_log()
    );
}

#[test]
fn default_passthrough_relays_what_no_service_claims() {
    let mut pod = Pod::new("default: passthrough\n");
    pod.start_proxy();
    let _b = pod.server(SERVER_V4, 7705, Behaviour::Greet);
    let out = pod.client(&["greet", SERVER_V4, "7705"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(pod.counters().redirected, 1);
}

#[test]
fn a_tcp_service_can_send_connections_elsewhere() {
    // The app dials an address nobody has; the service's endpoint answers.
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: moved
    match: {{ cidr: 198.18.0.99/32, port: 7703 }}
    upstream:
      endpoints:
        - address: {SERVER_V4}:7704
"#
    ));
    pod.start_proxy();
    let _s = pod.server(SERVER_V4, 7704, Behaviour::Greet);
    let out = pod.client(&["greet", "198.18.0.99", "7703"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert!(
        stdout(&out).contains(&format!("GREETING HELLO {SERVER_V4}:7704")),
        "{}",
        lines(&out)
    );
    // The app still believes it talks to what it dialled.
    assert!(
        stdout(&out).contains("PEER 198.18.0.99 7703"),
        "{}",
        lines(&out)
    );
}

#[test]
fn tls_from_the_app_is_routed_by_sni_and_relayed_untouched() {
    use ambassador_tests::upstream::{CertKind, HttpUpstream, TestCa, TlsVersions};
    let mut pod = Pod::new(&format!(
        r#"
default: deny
services:
  - name: api
    match: {{ host: api.example.test, port: 443 }}
    upstream:
      endpoints:
        - address: {SERVER_V4}:9443
"#
    ));
    pod.start_proxy();
    let ca = TestCa::new("app-ca");
    let ca_file = ca.write_ca_file(&pod.shared_dir());
    let (cert, key) = ca.issue(CertKind::Valid, "api.example.test", None);
    let up = HttpUpstream::tls(
        pod.server_listener(SERVER_V4, 9443),
        &cert,
        &key,
        &["h2", "http/1.1"],
        TlsVersions::default(),
    );
    // The app verifies the upstream itself, end to end through the ambassador.
    let ca = ca_file.display().to_string();
    let curl = |name: &str| {
        let resolve = format!("{name}:443:198.18.0.99");
        pod.curl(
            &format!("https://{name}/hello"),
            &["--cacert", &ca, "--resolve", &resolve],
        )
    };
    let out = curl("api.example.test");
    assert!(out.status.success(), "{}", lines(&out));
    assert!(stdout(&out).starts_with("served by"), "{}", lines(&out));
    assert_eq!(up.seen().len(), 1);
    assert_eq!(up.seen()[0].version, "HTTP/2.0", "ALPN is the app's own");

    // Another name: no service, default deny.
    let out = curl("other.example.test");
    assert!(!out.status.success(), "{}", lines(&out));
    assert_eq!(up.seen().len(), 1);
}

#[test]
fn auto_detects_http_and_leaves_server_first_protocols_alone() {
    use ambassador_tests::upstream::HttpUpstream;
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: mixed
    match: {{ cidr: {SERVER_V4}/32 }}
    protocol: auto
    request: {{ set_headers: {{ x-via: {{ value: ambassador }} }} }}
"#
    ));
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8090));
    let out = pod.curl(&format!("http://{SERVER_V4}:8090/"), &[]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(up.seen()[0].header("x-via"), Some("ambassador"));

    // The server speaks first (like SMTP or MySQL): after a short wait the
    // connection is relayed as bytes, and the greeting gets through.
    let _greeter = pod.server(SERVER_V4, 8091, Behaviour::Greet);
    let started = std::time::Instant::now();
    let out = pod.client(&["greet", SERVER_V4, "8091"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert!(stdout(&out).contains(&format!("GREETING HELLO {SERVER_V4}:8091")));
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn a_service_named_by_host_also_matches_the_addresses_it_resolves_to() {
    // `localhost` is the one name every machine resolves (from /etc/hosts).
    let mut pod = Pod::new(&format!(
        r#"
intercept: {{ loopback: true }}
default: deny
services:
  - name: named
    match: {{ host: localhost, port: 8095 }}
    upstream:
      endpoints:
        - address: {SERVER_V4}:7706
"#
    ));
    pod.start_proxy();
    let _s = pod.server(SERVER_V4, 7706, Behaviour::Greet);
    // Raw TCP to the name's address: no Host header, no SNI, yet recognised.
    let out = pod.client(&["greet", "127.0.0.1", "8095"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert!(
        stdout(&out).contains(&format!("GREETING HELLO {SERVER_V4}:7706")),
        "{}",
        lines(&out)
    );
    // Another loopback port is not the service: denied.
    let out = pod.client(&["expect-rst", "127.0.0.1", "8096"]);
    assert_eq!(stdout(&out), "RESET\n", "{}", lines(&out));
}
