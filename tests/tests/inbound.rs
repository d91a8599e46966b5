//! The inbound half in a simulated Pod: callers in the servers' namespace
//! dial the Pod's address; the sk_lookup program `init` attached to the
//! Pod's network namespace hands their connections to the proxy, which
//! forwards to the app on loopback from 127.0.0.6. Unmodified curl as the
//! caller; the app is a plain server in the Pod's namespace.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use ambassador_tests::{
    upstream::{CertKind, HttpUpstream, TestCa},
    *,
};

/// What a greeting server at the Pod's `addr` says to a caller: its line
/// `HELLO <listener> <the peer it saw>`.
fn greeting(pod: &Pod, addr: SocketAddr) -> std::io::Result<String> {
    pod.servers.enter(move || {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim().to_string())
    })
}

fn peer_of(greeting: &str) -> String {
    greeting.rsplit(' ').next().unwrap_or_default().to_string()
}

#[test]
fn callers_reach_the_app_through_the_proxy_and_the_app_sees_its_source() {
    let mut pod = Pod::new(
        r#"
inbound:
  ports: [8080]
"#,
    );
    let _app = Server::start_on(pod.app_listener(8080), Behaviour::Greet);
    let _other = Server::start_on(pod.app_listener(8081), Behaviour::Greet);
    pod.start_proxy_with_kernel_maps("inbound-tcp", &[]);

    // Both families reach the app through the proxy: its peer is 127.0.0.6.
    let v4 = greeting(&pod, format!("{POD_V4}:8080").parse().unwrap()).unwrap();
    assert!(peer_of(&v4).starts_with("127.0.0.6:"), "{v4}");
    let v6 = greeting(&pod, format!("[{POD_V6}]:8080").parse().unwrap()).unwrap();
    assert!(peer_of(&v6).starts_with("127.0.0.6:"), "{v6}");
    // A port not listed goes to the app as it is.
    let direct = greeting(&pod, format!("{POD_V4}:8081").parse().unwrap()).unwrap();
    assert!(peer_of(&direct).starts_with(SERVER_V4), "{direct}");

    // Lines are written as connections close: the IPv6 caller's may come
    // first. The IPv4 caller's line:
    let line = pod
        .wait_access_log(&format!(r#""client":"{SERVER_V4}:"#))
        .expect("an inbound access-log line for the IPv4 caller");
    assert!(line.contains(r#""direction":"inbound""#), "{line}");
    assert!(line.contains(r#""kind":"tcp""#), "{line}");
    assert!(
        line.contains(&format!(r#""dst":"{POD_V4}:8080""#)),
        "{line}"
    );
    assert!(line.contains(r#""service":"inbound-8080""#), "{line}");

    let status = pod.ambassador(&["status"], None);
    let text = stdout(&status);
    assert!(
        text.contains("inbound  sk_lookup attached, ports 8080"),
        "{text}"
    );
    assert!(text.contains("fail-closed, redirected 2"), "{text}");
}

#[test]
fn a_callers_bulk_bytes_are_spliced_to_the_app_intact_both_ways() {
    let mut pod = Pod::new("inbound:\n  ports: [8090]\n");
    let _app = Server::start_on(pod.app_listener(8090), Behaviour::Greet);
    pod.start_proxy_with_kernel_maps("inbound-bulk", &[]);
    const LEN: usize = 12 << 20;
    // Every 4-byte word its own index: a lost or reordered chunk shows.
    let sent: Vec<u8> = (0..LEN as u32 / 4).flat_map(u32::to_le_bytes).collect();
    let addr: SocketAddr = format!("{POD_V4}:8090").parse().unwrap();
    let data = sent.clone();
    let echoed = pod.servers.enter(move || -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Write};
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut hello = String::new();
        r.read_line(&mut hello)?;
        let mut w = s;
        let writer = std::thread::spawn(move || {
            w.write_all(&data)?;
            w.shutdown(std::net::Shutdown::Write)
        });
        let mut back = Vec::with_capacity(LEN);
        r.read_to_end(&mut back)?;
        writer.join().expect("writer thread")?;
        Ok(back)
    });
    let echoed = echoed.expect("the echo through the inbound relay");
    assert_eq!(echoed.len(), LEN);
    assert!(echoed == sent, "the echoed bytes differ from the sent ones");
    let spliced = pod.spliced_bytes_above(16 << 20);
    assert!(spliced > 16 << 20, "{spliced} bytes spliced of 2 x 12 MiB");
}

#[test]
fn http_callers_are_named_to_the_app_and_cannot_pose_as_others() {
    let mut pod = Pod::new(
        r#"
inbound:
  ports: [8080]
  policies:
    - { port: 8080, protocol: http }
"#,
    );
    let app = HttpUpstream::plain(pod.app_listener(8080));
    pod.start_proxy_with_kernel_maps("inbound-http", &[]);

    let url = format!("http://{POD_V4}:8080/orders?id=7");
    let spoof = [
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        "-H",
        "Forwarded: for=6.6.6.6",
        "-H",
        "X-Real-IP: 6.6.6.6",
        "-H",
        "Host: orders.pod.test",
    ];
    for _ in 0..3 {
        let out = pod.caller_curl(&url, &spoof);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let seen = app.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let r = &seen[0];
    assert_eq!(r.uri, "/orders?id=7");
    assert_eq!(r.header("host"), Some("orders.pod.test"));
    assert_eq!(r.header("x-forwarded-for"), Some(SERVER_V4));
    assert_eq!(
        r.header("forwarded"),
        Some(format!("for={SERVER_V4};proto=http").as_str())
    );
    assert_eq!(r.header("x-forwarded-proto"), Some("http"));
    assert_eq!(r.header("x-real-ip"), None);
    assert_eq!(
        r.headers
            .iter()
            .filter(|(n, _)| n == "x-forwarded-for")
            .count(),
        1
    );
    // Keep-alive toward the app: three requests, one connection.
    assert_eq!(app.accepted(), 1);

    let metrics = pod.metrics();
    assert!(
        metrics.contains(
            r#"ambassador_http_requests_total{service="inbound-8080",direction="inbound",status_class="2xx"} 3"#
        ),
        "{metrics}"
    );
    let line = pod
        .wait_access_log(r#""path":"/orders""#)
        .expect("an inbound request line");
    assert!(line.contains(r#""direction":"inbound""#), "{line}");
    assert!(!line.contains("id=7"), "queries stay out of logs: {line}");

    // Two Hosts are refused before the app sees anything.
    let addr: SocketAddr = format!("{POD_V4}:8080").parse().unwrap();
    let answer = pod.servers.enter(move || {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(app.seen().len(), 3);

    // The app gone: the caller gets a 502 that says why.
    drop(app);
    let out = pod.caller_curl(&url, &["-i"]);
    let text = stdout(&out);
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    assert!(
        text.contains("x-ambassador-error: the app at 127.0.0.1:8080 did not answer"),
        "{text}"
    );
}

#[test]
fn tls_is_terminated_with_a_certificate_that_rotates_under_load() {
    let mut pod = Pod::new("");
    let dir = pod.shared_dir();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let ca1 = TestCa::new("inbound CA one");
    let (c, k) = ca1.issue(CertKind::Valid, "pod.test", None);
    std::fs::write(&cert, c).unwrap();
    std::fs::write(&key, k).unwrap();
    pod.rewrite_config(&format!(
        r#"
proxy: {{ header_read_timeout: 1s }}
inbound:
  ports: [8443]
  policies:
    - port: 8443
      protocol: http
      tls: {{ cert: {}, key: {} }}
"#,
        cert.display(),
        key.display()
    ));
    let out = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup.clone()));
    assert!(out.status.success(), "{}", stderr(&out));
    let app = HttpUpstream::plain(pod.app_listener(8443));
    pod.start_proxy_with_kernel_maps("inbound-tls", &[]);

    // A caller that connects and never says hello is let go after the
    // header-read timeout: the handshake is under it too.
    let addr: SocketAddr = format!("{POD_V4}:8443").parse().unwrap();
    let (read, held) = pod.servers.enter(move || {
        use std::io::Read;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let t = Instant::now();
        let r = s.read(&mut [0u8; 16]).map_err(|e| e.kind());
        (r, t.elapsed())
    });
    assert!(
        matches!(read, Ok(0) | Err(std::io::ErrorKind::ConnectionReset)),
        "a silent caller was held: {read:?} after {held:?}"
    );
    assert!(held < Duration::from_secs(4), "held for {held:?}");

    let ca1_file = ca1.write_ca_file(&dir);
    let resolve = format!("pod.test:8443:{POD_V4}");
    let url = "https://pod.test:8443/secure";
    let get = |ca: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["--cacert", ca.to_str().unwrap(), "--resolve", &resolve];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", "/dev/null", "-w", "%{http_code} %{http_version}"]);
        pod.caller_curl(url, &args)
    };
    let out = get(&ca1_file, &["--http1.1"]);
    assert_eq!(stdout(&out), "200 1.1", "{}", stderr(&out));
    // HTTP/2 by ALPN from the caller; the app still gets HTTP/1.1.
    let out = get(&ca1_file, &["--http2"]);
    assert_eq!(stdout(&out), "200 2", "{}", stderr(&out));
    let seen = app.seen();
    assert!(seen.iter().all(|r| r.version == "HTTP/1.1"), "{seen:?}");
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));

    // Cleartext to the TLS port is a failed handshake, counted by reason.
    let out = pod.caller_curl(&format!("http://{POD_V4}:8443/"), &[]);
    assert!(!out.status.success());
    let metrics = pod.metrics();
    assert!(
        metrics.contains(r#"ambassador_tls_handshake_failures_total{service="inbound-8443",direction="inbound",reason="#),
        "{metrics}"
    );

    // A new certificate from another CA, swapped in as a Secret update does:
    // new connections get it, without a restart.
    let ca2 = TestCa::new("inbound CA two");
    let (c, k) = ca2.issue(CertKind::Valid, "pod.test", None);
    std::fs::write(dir.join("tls.crt.new"), c).unwrap();
    std::fs::write(dir.join("tls.key.new"), k).unwrap();
    std::fs::rename(dir.join("tls.key.new"), &key).unwrap();
    std::fs::rename(dir.join("tls.crt.new"), &cert).unwrap();
    let ca2_file = ca2.write_ca_file(&dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = get(&ca2_file, &[]);
        if stdout(&out).starts_with("200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = get(&ca1_file, &[]);
    assert!(!out.status.success(), "the old certificate is still served");
    assert!(pod.wait_log("inbound certificate changed: reloaded"));
}

#[test]
fn fail_closed_refuses_callers_at_once_and_probe_ports_stay_open() {
    let mut pod = Pod::new(
        r#"
inbound:
  ports: all
  exclude_ports: [9090]
  fail: closed
"#,
    );
    let _app = Server::start_on(pod.app_listener(8080), Behaviour::Greet);
    let _probe = Server::start_on(pod.app_listener(9090), Behaviour::Greet);
    pod.start_proxy_with_kernel_maps("inbound-closed", &[]);
    let through = greeting(&pod, format!("{POD_V4}:8080").parse().unwrap()).unwrap();
    assert!(peer_of(&through).starts_with("127.0.0.6:"), "{through}");

    pod.kill_proxy();
    let start = Instant::now();
    let refused = greeting(&pod, format!("{POD_V4}:8080").parse().unwrap());
    let err = refused.expect_err("a caller reached the app past the dead proxy");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "refused only after {:?}",
        start.elapsed()
    );
    // The kubelet's probe port is excluded: it answers whatever the proxy.
    let probe = greeting(&pod, format!("{POD_V4}:9090").parse().unwrap()).unwrap();
    assert!(peer_of(&probe).starts_with(SERVER_V4), "{probe}");
    let text = stdout(&pod.ambassador(&["status"], None));
    assert!(text.contains("ports all (not "), "{text}");
    assert!(text.contains("refused 1"), "{text}");
}

/// The Pod annotations `ambassador.io/inbound-ports` and
/// `exclude-inbound-ports` as `inject` passes them: the same flags to `init`
/// and the proxy, with no `inbound` in the file at all; a reload keeps them.
#[test]
fn inbound_ports_from_the_pods_flags_reach_the_kernel_and_the_proxy_across_reloads() {
    let mut pod = Pod::new("");
    let _app = Server::start_on(pod.app_listener(8080), Behaviour::Greet);
    let _probe = Server::start_on(pod.app_listener(9090), Behaviour::Greet);
    let flags = ["--inbound-ports", "all", "--exclude-inbound-ports", "9090"];
    pod.start_proxy_with_kernel_maps("inbound-flags", &flags);
    let check = |pod: &Pod| {
        let through = greeting(pod, format!("{POD_V4}:8080").parse().unwrap()).unwrap();
        assert!(peer_of(&through).starts_with("127.0.0.6:"), "{through}");
        let probe = greeting(pod, format!("{POD_V4}:9090").parse().unwrap()).unwrap();
        assert!(peer_of(&probe).starts_with(SERVER_V4), "{probe}");
    };
    check(&pod);

    pod.rewrite_config("telemetry: { access_log: true }\n");
    pod.hup_proxy();
    assert!(pod.wait_log("config reloaded"), "{}", pod.proxy_log());
    check(&pod);
    let log = pod.proxy_log();
    assert!(!log.contains("inbound ports and fail mode"), "{log}");
    let text = stdout(&pod.ambassador(&["status"], None));
    assert!(text.contains("ports all (not "), "{text}");

    // A flag that contradicts the file is refused at start, naming both.
    pod.kill_proxy();
    pod.rewrite_config("inbound: { ports: [9090], policies: [{ port: 9090 }] }\n");
    let out = pod.ambassador(
        &["init", "--exclude-inbound-ports", "9090", "--cgroup"],
        Some(&pod.cgroup.clone()),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("with the Pod's flags: "), "{err}");
    assert!(err.contains("port 9090 is not intercepted"), "{err}");
}

/// The sidecar writes its Pod's shared inbound maps on reload: a port
/// added and the fail mode changed apply at once, without `init`.
#[test]
fn inbound_ports_and_fail_mode_follow_a_reload_without_init() {
    let mut pod = Pod::new("inbound: { ports: [8080] }\n");
    let _a = Server::start_on(pod.app_listener(8080), Behaviour::Greet);
    let _b = Server::start_on(pod.app_listener(8081), Behaviour::Greet);
    pod.start_proxy_with_kernel_maps("inbound-reload", &[]);
    let peer = |pod: &Pod, port: u16| {
        let g = greeting(pod, format!("{POD_V4}:{port}").parse().unwrap()).unwrap();
        peer_of(&g)
    };
    assert!(peer(&pod, 8081).starts_with(SERVER_V4));

    pod.rewrite_config("inbound: { ports: [8080, 8081], fail: open }\n");
    pod.hup_proxy();
    // A full suite's load once kept the reload past wait_log's 5 s: the file
    // watcher (every 2 s) and the signal get 15 s between them.
    let reloaded = (0..3).any(|_| pod.wait_log("config reloaded"));
    assert!(reloaded, "{}", pod.proxy_log());
    assert!(peer(&pod, 8081).starts_with("127.0.0.6:"));
    let log = pod.proxy_log();
    assert!(
        !log.contains("next start") && !log.contains("next init"),
        "{log}"
    );
    let text = stdout(&pod.ambassador(&["status"], None));
    assert!(text.contains("ports 8080,8081 "), "{text}");
    assert!(text.contains("fail-open"), "{text}");

    // Fail open now: with the proxy gone, callers reach the app directly.
    pod.kill_proxy();
    assert!(peer(&pod, 8080).starts_with(SERVER_V4));
}

#[test]
fn fail_open_delivers_to_the_app_while_the_proxy_is_down() {
    let mut pod = Pod::new("inbound: { ports: [8080], fail: open }");
    let _app = Server::start_on(pod.app_listener(8080), Behaviour::Greet);
    pod.start_proxy_with_kernel_maps("inbound-open", &[]);
    let through = greeting(&pod, format!("{POD_V4}:8080").parse().unwrap()).unwrap();
    assert!(peer_of(&through).starts_with("127.0.0.6:"), "{through}");
    pod.kill_proxy();
    let direct = greeting(&pod, format!("{POD_V4}:8080").parse().unwrap()).unwrap();
    assert!(peer_of(&direct).starts_with(SERVER_V4), "{direct}");
}

#[test]
fn outbound_and_inbound_in_one_pod_do_not_loop_and_uninstall_leaves_nothing() {
    let mut pod = Pod::new(
        r#"
inbound:
  ports: [8080]
  policies: [{ port: 8080, protocol: http }]
"#,
    );
    let app = HttpUpstream::plain(pod.app_listener(8080));
    pod.start_proxy_with_kernel_maps("inbound-both", &[]);
    // The app calls its own Pod address: out through the proxy, in again
    // through the proxy, to itself once.
    let status = pod.http_status(&format!("http://{POD_V4}:8080/self"), &[]);
    assert_eq!(status, "200", "{}", pod.proxy_log());
    assert_eq!(app.seen().len(), 1);
    assert_eq!(app.seen()[0].header("x-forwarded-for"), Some(POD_V4));

    let before = stdout(
        &Command::new("bpftool")
            .args(["link", "show"])
            .output()
            .unwrap(),
    );
    assert!(before.contains("sk_lookup"), "{before}");
    pod.kill_proxy();
    let out = pod.ambassador(&["uninstall", "--cgroup"], Some(&pod.cgroup.clone()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!pod.pin_dir().exists());
    // No program left in the Pod's namespace: callers reach the app itself.
    let out = pod.caller_curl(&format!("http://{POD_V4}:8080/after"), &["-o", "/dev/null"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let last = app.seen().pop().unwrap();
    assert_eq!(last.uri, "/after");
    assert_eq!(last.header("x-forwarded-for"), None);
}

#[test]
fn run_serves_the_inbound_half_of_its_network_namespace() {
    let pod = Pod::new("");
    let cfg = pod.shared_dir().join("run-inbound.yaml");
    std::fs::write(
        &cfg,
        "inbound:\n  ports: [8088]\n  policies: [{ port: 8088, protocol: http }]\n",
    )
    .unwrap();
    // nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroups.
    let run = Command::new("nsenter")
        .arg(format!("--net={}", pod.netns.path().display()))
        .arg(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .args([
            "--",
            "python3",
            "-m",
            "http.server",
            "8088",
            "--bind",
            "0.0.0.0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ambassador run");
    let url = format!("http://{POD_V4}:8088/");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        let out = pod.caller_curl(&url, &["-o", "/dev/null", "-w", "%{http_code}"]);
        last = format!("{} {}", stdout(&out), stderr(&out));
        if stdout(&out) == "200" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let out = run.wait_with_output().expect("run ends");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(last.starts_with("200"), "{last}\n{log}");
    // python's access log names the client: the proxy's source address.
    assert!(log.contains("127.0.0.6 - -"), "{log}");
}
