//! The standing hostile-input suite: the app as an attacker (spoofed Host and
//! SNI, framing tricks, silent and slow connections), a hostile upstream, and
//! a careless operator. Each case names what must hold.

use ambassador_tests::{
    framing::framing_cases,
    upstream::{HttpUpstream, SeenRequest},
    *,
};

const CANARY: &str = "hostile-canary-7f3a9";

/// A service named by host with no endpoints: it owns the addresses its
/// name resolves to (here, through the proxy's own /etc/hosts), and carries
/// a credential.
fn named_service_pod() -> Pod {
    let mut pod = Pod::new(&format!(
        r#"
default: deny
services:
  - name: api
    match: {{ host: api.allowed.test, port: 8080 }}
    protocol: http
    request:
      set_headers:
        authorization: {{ value: "Bearer {CANARY}" }}
  - name: api-tls
    match: {{ host: api.allowed.test, port: 8443 }}
"#
    ));
    pod.proxy_hosts = vec![("api.allowed.test".into(), SERVER_V4.into())];
    pod.start_proxy();
    pod
}

fn authorized(seen: &[SeenRequest]) -> usize {
    seen.iter()
        .filter(|r| {
            r.header("authorization")
                .is_some_and(|v| v.contains(CANARY))
        })
        .count()
}

#[test]
fn a_services_name_toward_an_address_it_does_not_own_is_refused() {
    let pod = named_service_pod();
    let owned = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    let other = HttpUpstream::plain(pod.server_listener(SERVER2_V4, 8080));
    let host = ["-H", "Host: api.allowed.test"];

    // The name's own address: the credential is added.
    let ok = pod.http_status(&format!("http://{SERVER_V4}:8080/"), &host);
    assert_eq!(ok, "200", "{}", pod.proxy_log());
    assert_eq!(authorized(&owned.seen()), 1);

    // The same Host toward any other address: refused, nothing sent.
    let out = pod.curl(
        &format!("http://{SERVER2_V4}:8080/"),
        &["-i", host[0], host[1]],
    );
    let text = stdout(&out);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("does not resolve to 198.18.0.3"), "{text}");
    assert_eq!(other.accepted(), 0, "the other address was reached");
    assert_eq!(authorized(&other.seen()), 0);
    let m = pod.metrics();
    assert!(
        m.contains(r#"ambassador_denied_total{protocol="http",reason="not_owned"} 1"#),
        "{m}"
    );

    // An absolute URI naming the allowed host with another Host, two Host
    // fields, a Host that is no host: 400 before any policy.
    for (request, why) in [
        (
            "GET http://api.allowed.test:8080/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
            "another host",
        ),
        (
            "GET / HTTP/1.1\r\nHost: api.allowed.test\r\nHost: evil.test\r\n\r\n",
            "more than one Host",
        ),
        (
            "GET / HTTP/1.1\r\nHost: api.allowed.test\r\nHost: api.allowed.test\r\n\r\n",
            "more than one Host",
        ),
        ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "not a valid"),
    ] {
        let hex: String = request.bytes().map(|b| format!("{b:02x}")).collect();
        let out = pod.hostile(&["raw", SERVER_V4, "8080", &hex]);
        assert!(out.contains("STATUS 400"), "{request:?}: {out}");
        assert!(out.contains(why), "{request:?}: {out}");
    }
    assert_eq!(
        owned.seen().len(),
        1,
        "a refused request reached the upstream"
    );

    // TLS naming the allowed host toward another address: reset, no tunnel.
    let tls_other = pod.server(SERVER2_V4, 8443, Behaviour::ReadAll);
    let out = pod.hostile(&["tls", SERVER2_V4, "8443", "api.allowed.test"]);
    assert!(!out.contains("HANDSHAKE ok"), "{out}");
    assert_eq!(
        tls_other.accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the SNI tunnel reached another address"
    );
    let m = pod.metrics();
    assert!(
        m.contains(r#"ambassador_denied_total{protocol="tcp",reason="not_owned"} 1"#),
        "{m}"
    );
}

/// CLOCK_MONOTONIC in seconds, the clock `hostile.py loop` stamps with.
fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// `hostile.py loop`'s file: its PID and the (time, outcome) of each connect.
fn connect_log(path: &std::path::Path) -> (Option<i32>, Vec<(f64, String)>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut pid = None;
    let mut tries = Vec::new();
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("PID ") {
            pid = p.trim().parse().ok();
        } else if let Some((t, what)) = line.split_once(' ')
            && let Ok(t) = t.parse()
        {
            tries.push((t, what.to_string()));
        }
    }
    (pid, tries)
}

/// Alive and not a zombie.
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `ambassador run` whose command leaves a grandchild connecting in a loop.
fn run_with_grandchild(
    cfg: &std::path::Path,
    port: u16,
    log: &std::path::Path,
) -> std::process::Child {
    let script = format!(
        "python3 {} loop 127.0.0.1 {port} {} & wait",
        hostile_py().display(),
        log.display()
    );
    let child = std::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(cfg)
        .args(["--", "sh", "-c", &script])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "the grandchild's first connect through the proxy",
        10,
        || connect_log(log).1.iter().any(|(_, w)| w == "OK"),
    );
    child
}

fn sigkill(pid: i32) {
    // SAFETY: a plain signal to a process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Kills what a test started and is still running when the test ends, so a
/// failed assertion leaves nothing behind.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            if running(*pid) {
                sigkill(*pid);
            }
        }
    }
}

#[test]
fn killing_run_outright_never_lets_its_command_tree_go_direct() {
    require_root();
    let dir = std::env::temp_dir().join(format!("amb-hostile-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.yaml");
    std::fs::write(&cfg, "intercept: { loopback: true, fail: closed }\n").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _server = Server::start_on(listener, Behaviour::Greet);

    // kill -9 of `run` alone: its reaper kills the whole tree at once.
    let log = dir.join("first.log");
    let mut run = run_with_grandchild(&cfg, port, &log);
    let cg = cgroup2_mount().join(format!("ambassador-run-{}", run.id()));
    // Seen missing once in a full suite run (not reproduced alone): wait
    // for it, and say so plainly if it never shows.
    wait_until("run's cgroup", 5, || cg.exists());
    let pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/ambassador/cgroup-{}",
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cg).unwrap())
    ));
    let grandchild = connect_log(&log).0.expect("the loop's PID");
    let _cleanup = KillOnDrop(vec![run.id() as i32, grandchild]);
    sigkill(run.id() as i32);
    run.wait().unwrap();
    let killed_at = monotonic();
    wait_until("the grandchild killed by the reaper", 5, || {
        !running(grandchild)
    });
    let (_, tries) = connect_log(&log);
    let direct: Vec<_> = tries
        .iter()
        .filter(|(t, w)| *t > killed_at + 0.05 && w == "OK")
        .collect();
    assert!(
        direct.is_empty(),
        "connected after the proxy died: {direct:?}"
    );
    wait_until("the run's cgroup and pins removed", 5, || {
        !cg.exists() && !pins.exists()
    });

    // kill -9 of `run` and its reaper: the tree lives on, and every
    // connect it makes is refused (fail: closed), until `gc`.
    let log = dir.join("second.log");
    let mut run = run_with_grandchild(&cfg, port, &log);
    let run_pid = run.id() as i32;
    let children =
        std::fs::read_to_string(format!("/proc/{run_pid}/task/{run_pid}/children")).unwrap();
    let reaper: i32 = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|p: &i32| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("reap-run"))
        })
        .expect("run's reaper among its children");
    let cg = cgroup2_mount().join(format!("ambassador-run-{run_pid}"));
    let pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/ambassador/cgroup-{}",
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cg).unwrap())
    ));
    let grandchild = connect_log(&log).0.expect("the loop's PID");
    let _cleanup = KillOnDrop(vec![run_pid, reaper, grandchild]);
    assert!(
        pins.join("link_ambassador_connect4").exists(),
        "run pins its links"
    );
    sigkill(reaper);
    sigkill(run_pid);
    run.wait().unwrap();
    let killed_at = monotonic();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(running(grandchild), "nothing should have killed it");
    let (_, tries) = connect_log(&log);
    let after: Vec<_> = tries
        .iter()
        .filter(|(t, _)| *t > killed_at + 0.05)
        .collect();
    assert!(after.len() >= 5, "{after:?}");
    assert!(
        after.iter().all(|(_, w)| w == "ERR EPERM"),
        "fail: closed must hold for the orphaned tree: {after:?}"
    );
    let out = std::process::Command::new(bin())
        .arg("gc")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("ambassador-run-{run_pid}")),
        "{}",
        stdout(&out)
    );
    wait_until("gc kills the orphaned tree", 5, || !running(grandchild));
    assert!(
        !cg.exists() && !pins.exists(),
        "gc leaves {cg:?} or {pins:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `CLOSED n OF m LAST s` from `hostile.py hold`.
fn closed_of(out: &str) -> (usize, usize, f64) {
    let out = out.trim_start_matches("HELD").trim_start();
    let w: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(w.first(), Some(&"CLOSED"), "{out}");
    (
        w[1].parse().unwrap(),
        w[3].parse().unwrap(),
        w[5].parse().unwrap(),
    )
}

#[test]
fn silent_slow_and_idle_http_connections_are_closed_on_time() {
    let mut pod = Pod::new(&format!(
        r#"
proxy: {{ header_read_timeout: 2s, idle_timeout: 3s }}
services:
  - name: web
    match: {{ cidr: {SERVER_V4}/32, port: 8080 }}
    protocol: http
"#
    ));
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    let full_preface: Vec<u8> = [PREFACE, &settings[..]].concat();
    for (what, bytes) in [
        ("nothing at all", &b""[..]),
        ("a part of the HTTP/2 preface", &PREFACE[..16]),
        (
            "the HTTP/2 preface and SETTINGS, no request",
            &full_preface[..],
        ),
        (
            "a part of an HTTP/1.1 head",
            &b"GET / HTTP/1.1\r\nHost: x\r\n"[..],
        ),
    ] {
        let out = pod.hostile(&["hold", SERVER_V4, "8080", "20", "8", &hex(bytes)]);
        let (closed, of, last) = closed_of(&out);
        assert_eq!(closed, of, "{what}: {out}");
        assert!(last < 4.0, "{what}: closed at {last} s, the timeout is 2 s");
    }
    assert!(up.seen().is_empty());

    // An HTTP/2 connection that made a request, then went quiet: closed
    // once idle for idle_timeout (3 s), with a GOAWAY first.
    let out = pod.hostile(&["h2", SERVER_V4, "8080", "198.18.0.2:8080", "10"]);
    assert!(out.contains("STATUS 200"), "{out}");
    assert!(out.contains("GOAWAY"), "{out}");
    let after: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("CLOSED AFTER "))
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("not closed: {out}"));
    assert!((2.5..6.0).contains(&after), "closed after {after} s: {out}");
}

/// A pod whose one HTTP service has one endpoint that three consecutive
/// failures would eject.
fn ejectable_pod(port: u16) -> Pod {
    let mut pod = Pod::new(&format!(
        r#"
default: deny
services:
  - name: api
    match: {{ cidr: 198.18.0.99/32, port: 80 }}
    protocol: http
    upstream:
      endpoints: [{{ address: "{SERVER_V4}:{port}" }}]
    outlier: {{ consecutive_failures: 3 }}
    request:
      set_headers:
        authorization: {{ value: "Bearer {CANARY}" }}
"#
    ));
    pod.start_proxy();
    pod
}

#[test]
fn the_apps_own_bad_requests_are_its_own_and_never_eject_an_endpoint() {
    let pod = ejectable_pod(8081);
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8081));
    let bad_chunked = "POST / HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n\r\n";
    for _ in 0..6 {
        let out = pod.hostile(&["raw", "198.18.0.99", "80", &hex(bad_chunked.as_bytes())]);
        assert!(out.contains("STATUS 400"), "{out}");
        assert!(
            out.contains("reading the request body from the app"),
            "{out}"
        );
    }
    // Six app-side failures later the endpoint is still in.
    assert_eq!(pod.http_status("http://198.18.0.99/ok", &[]), "200");
    let m = pod.metrics();
    assert!(
        m.contains(&format!(
            "ambassador_endpoint_up{{service=\"api\",endpoint=\"{SERVER_V4}:8081\"}} 1"
        )),
        "{m}"
    );
    assert!(
        !m.contains(
            "ambassador_endpoint_ejections_total{service=\"api\",endpoint=\"198.18.0.2:8081\"} 1"
        ),
        "{m}"
    );

    // A GET with a chunked body: the body goes upstream too.
    let get = "GET /with-body HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let out = pod.hostile(&["raw", "198.18.0.99", "80", &hex(get.as_bytes())]);
    assert!(out.contains("STATUS 200"), "{out}");
    let seen = up.seen();
    let with_body = seen
        .iter()
        .find(|r| r.uri.ends_with("/with-body"))
        .expect("sent");
    assert_eq!(with_body.body_len, 5, "the GET's body was dropped");

    // CONNECT is never sent on, with or without the credential.
    let before = up.seen().len();
    let connect = "CONNECT elsewhere.test:443 HTTP/1.1\r\nHost: elsewhere.test:443\r\n\r\n";
    let out = pod.hostile(&["raw", "198.18.0.99", "80", &hex(connect.as_bytes())]);
    assert!(out.contains("STATUS 405"), "{out}");
    assert_eq!(up.seen().len(), before, "CONNECT reached the upstream");
}

#[test]
fn an_upstream_reset_mid_body_reaches_the_app_as_a_reset() {
    use std::io::{BufReader, Write};
    let pod = ejectable_pod(8082);
    let listener = pod.server_listener(SERVER_V4, 8082);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let _ = read_request_head(&mut r);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
            let _ = conn.write_all(&[b'x'; 1000]);
            std::thread::sleep(std::time::Duration::from_millis(200));
            // Both handles go at the end of this turn: a reset, mid-body.
            let _ = socket2::SockRef::from(&conn).set_linger(Some(std::time::Duration::ZERO));
        }
    });
    let req = "GET /big HTTP/1.1\r\nHost: api\r\n\r\n";
    let out = pod.hostile(&["raw", "198.18.0.99", "80", &hex(req.as_bytes()), "5"]);
    assert!(out.contains("STATUS 200"), "{out}");
    assert!(
        out.contains("END RESET"),
        "a truncated body must end in a reset: {out}"
    );
}

/// 10,000 services (half named by host, half by address) and the one the
/// test uses; `generation` changes them all.
fn ten_thousand_services(generation: u32) -> String {
    let mut c = format!(
        r#"
proxy: {{ workers: 1 }}
services:
  - name: web
    match: {{ cidr: {SERVER_V4}/32, port: 8090 }}
    protocol: http
"#
    );
    for i in 0..10_000u32 {
        let (a, b) = (i / 256, i % 256);
        if i % 2 == 0 {
            c.push_str(&format!(
                "  - name: s{generation}-{i}\n    match: {{ host: h{i}.g{generation}.test, port: 80 }}\n    protocol: http\n    upstream: {{ endpoints: [{{ address: \"10.9.{a}.{b}:8080\" }}] }}\n"
            ));
        } else {
            c.push_str(&format!(
                "  - name: s{generation}-{i}\n    match: {{ cidr: 10.8.{a}.{b}/32, port: 5432 }}\n"
            ));
        }
    }
    c
}

#[test]
fn reloading_ten_thousand_services_does_not_stall_traffic() {
    let mut pod = Pod::new(&ten_thousand_services(0));
    pod.start_proxy_logging("ambassador_userspace=info");
    let _up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8090));
    let load = pod
        .app("python3")
        .arg(hostile_py())
        .args(["rate", SERVER_V4, "8090", "10", "50"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    pod.rewrite_config(&ten_thousand_services(1));
    pod.hup_proxy();
    let out = load.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(
        pod.proxy_log().contains("config reloaded"),
        "the reload did not finish while traffic ran:\n{}",
        pod.proxy_log()
    );
    let w: Vec<&str> = text.split_whitespace().collect();
    let (n, errors, worst): (u32, u32, u32) = (
        w[1].parse().unwrap(),
        w[3].parse().unwrap(),
        w[5].parse().unwrap(),
    );
    eprintln!("during a 10,000-service reload: {text}");
    assert!(n > 200, "{text}");
    assert_eq!(errors, 0, "{text}");
    // The old reload held the only worker for seconds.
    assert!(
        worst < 1000,
        "a request waited {worst} ms during the reload: {text}"
    );
}

#[test]
fn under_deny_nothing_unnamed_leaves_by_any_way_of_dialling() {
    let mut pod = Pod::new(&format!(
        r#"
default: deny
services:
  - name: db
    match: {{ cidr: {SERVER_V4}/32, port: 7001 }}
    protocol: tcp
"#
    ));
    pod.start_proxy();
    let allowed = pod.server(SERVER_V4, 7001, Behaviour::Greet);
    let ssh = pod.server(SERVER_V4, 22, Behaviour::Greet);
    let other = pod.server(SERVER_V4, 7002, Behaviour::Greet);
    let other6 = pod.server(SERVER_V6, 7002, Behaviour::Greet);
    let ping = hex(b"ping\n");
    let out = pod.hostile(&["raw", SERVER_V4, "7001", &ping]);
    assert!(out.contains("DATA HELLO"), "the allowed service: {out}");
    for (host, port, why) in [
        (
            SERVER_V4,
            "22",
            "port 22 is excluded only when the file says so",
        ),
        (SERVER_V4, "7002", "an unnamed port"),
        (SERVER_V6, "7002", "IPv6"),
        ("::ffff:198.18.0.2", "7002", "an IPv4-mapped IPv6 address"),
    ] {
        let out = pod.hostile(&["raw", host, port, &ping]);
        assert!(
            !out.contains("DATA HELLO") && (out.contains("RESET") || out.contains("CONNECT")),
            "{why}: {out}"
        );
    }
    // The proxy's own port is never a way round it, by any local name.
    let out = pod.hostile(&["raw", "127.0.0.1", &PROXY_PORT.to_string(), &ping]);
    assert!(out.contains("CONNECT EPERM"), "{out}");
    for local in ["0.0.0.0", "::1", "::"] {
        let out = pod.hostile(&["raw", local, &PROXY_PORT.to_string(), &ping]);
        assert!(!out.contains("DATA"), "{local}: {out}");
    }
    // TCP Fast Open: the data in the SYN is policy-checked like the rest.
    let out = pod.client(&["tfo", SERVER_V4, "7002"]);
    assert!(!stdout(&out).starts_with("ok"), "{}", stdout(&out));
    let accepted = |s: &Server| s.accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(accepted(&allowed), 1);
    assert_eq!(
        (accepted(&ssh), accepted(&other), accepted(&other6)),
        (0, 0, 0),
        "a denied destination was reached"
    );
}

#[test]
fn near_the_fd_limit_new_relays_are_refused_and_the_admin_api_answers() {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: web
    match: {{ cidr: {SERVER_V4}/32, port: 7003 }}
    protocol: http
"#
    ));
    // 128 files: 96 for app connections and their upstreams, 32 kept back.
    pod.proxy_fd_limit = Some(128);
    pod.start_proxy();
    // 200 silent HTTP connections (each holds a file until the header-read
    // timeout) would take them all.
    let hold = pod
        .app("python3")
        .arg(hostile_py())
        .args(["hold", SERVER_V4, "7003", "200", "4", ""])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // The admin API and the probes still answer.
    assert_eq!(pod.admin("GET", "/ready", "").0, 200);
    let out = pod
        .app(bin().to_str().unwrap())
        .args(["probe", "ready"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let m = pod.metrics();
    let out = hold.wait_with_output().unwrap();
    let (closed, of, _) = closed_of(&stdout(&out));
    assert_eq!(of, 200);
    assert!(
        (20..200).contains(&closed),
        "some were refused, not all: {closed}"
    );
    let refused: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("ambassador_fd_limit_refusals_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(refused >= 20, "{m}");
    assert!(
        pod.wait_log("near the open-files limit"),
        "{}",
        pod.proxy_log()
    );
}

#[test]
fn framing_tricks_never_smuggle_a_request_past_the_proxy() {
    let pod = ejectable_pod(8083);
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8083));
    let cases = framing_cases();
    assert!(cases.len() >= 30);
    let file = pod.shared_dir().join("framing-case");
    let arg = format!("@{}", file.display());
    for c in &cases {
        let before = up.seen().len();
        std::fs::write(&file, &c.bytes).unwrap();
        let out = pod.hostile(&["raw", "198.18.0.99", "80", &arg, "1"]);
        let seen = up.seen();
        let new = &seen[before..];
        assert!(
            new.len() <= c.max_upstream,
            "{}: {} requests reached the upstream: {out}",
            c.what,
            new.len()
        );
        let statuses = out.lines().filter(|l| l.starts_with("STATUS")).count();
        assert!(
            new.len() <= statuses,
            "{}: the upstream saw {} requests, the app got {statuses} answers: {out}",
            c.what,
            new.len()
        );
        for r in new {
            let cl = r.header("content-length").unwrap_or("0");
            assert_eq!(
                cl,
                r.body_len.to_string(),
                "{}: two framings forwarded",
                c.what
            );
            assert!(
                r.header("upgrade").is_none_or(|u| !u.contains("h2c")),
                "{}: an h2c upgrade was passed on",
                c.what
            );
        }
    }
    // The proxy lived through it all, and its endpoint is still in.
    assert_eq!(pod.http_status("http://198.18.0.99/after", &[]), "200");
    assert!(!pod.proxy_log().contains("panicked"), "{}", pod.proxy_log());
}

/// How a hostile upstream answers one request (after reading it whole).
#[derive(Clone, Copy, Debug)]
enum Fault {
    CloseAtOnce,
    ResetAtOnce,
    Garbage,
    HalfAHead,
    HugeHead,
    ClAndTe,
    EndlessContinues,
    Stall,
    BadStatus,
    TrailingResponse,
}

impl Fault {
    fn answer(self, conn: &mut std::net::TcpStream) {
        use std::io::Write;
        let reset = |c: &std::net::TcpStream| {
            let _ = socket2::SockRef::from(c).set_linger(Some(std::time::Duration::ZERO));
        };
        let w: Vec<u8> = match self {
            Fault::CloseAtOnce => Vec::new(),
            Fault::ResetAtOnce => {
                reset(conn);
                Vec::new()
            }
            Fault::Garbage => b"NOT HTTP AT ALL\r\n\r\n".to_vec(),
            Fault::HalfAHead => b"HTTP/1.1 200 OK\r\nContent-Le".to_vec(),
            Fault::HugeHead => {
                let mut h = b"HTTP/1.1 200 OK\r\n".to_vec();
                for i in 0..2000 {
                    h.extend_from_slice(format!("x-big-{i}: {}\r\n", "v".repeat(64)).as_bytes());
                }
                h.extend_from_slice(b"Content-Length: 0\r\n\r\n");
                h
            }
            Fault::ClAndTe => {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected"
                    .to_vec()
            }
            Fault::EndlessContinues => b"HTTP/1.1 100 Continue\r\n\r\n".repeat(5000),
            Fault::Stall => {
                std::thread::sleep(std::time::Duration::from_secs(5));
                Vec::new()
            }
            Fault::BadStatus => b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
            Fault::TrailingResponse => {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected"
                    .to_vec()
            }
        };
        let _ = conn.write_all(&w);
    }
}

#[test]
fn a_hostile_upstream_gets_the_app_a_clear_error_and_never_a_second_post() {
    use std::io::{BufReader, Read};
    let faults = [
        Fault::CloseAtOnce,
        Fault::ResetAtOnce,
        Fault::Garbage,
        Fault::HalfAHead,
        Fault::HugeHead,
        Fault::ClAndTe,
        Fault::EndlessContinues,
        Fault::Stall,
        Fault::BadStatus,
        Fault::TrailingResponse,
    ];
    let mut cfg = String::from("services:\n");
    for (i, _) in faults.iter().enumerate() {
        cfg.push_str(&format!(
            "  - name: f{i}\n    match: {{ cidr: 198.18.0.98/32, port: {} }}\n    protocol: http\n    timeouts: {{ request: 2s }}\n    upstream: {{ endpoints: [{{ address: \"{SERVER_V4}:{}\" }}] }}\n    request: {{ set_headers: {{ authorization: {{ value: \"Bearer {CANARY}\" }} }} }}\n",
            9100 + i,
            9200 + i
        ));
    }
    let mut pod = Pod::new(&cfg);
    pod.start_proxy_logging("trace");
    let counts: Vec<_> = faults
        .iter()
        .enumerate()
        .map(|(i, fault)| {
            let listener = pod.server_listener(SERVER_V4, 9200 + i as u16);
            let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let (seen2, fault) = (seen.clone(), *fault);
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { return };
                    let seen = seen2.clone();
                    std::thread::spawn(move || {
                        let mut r = BufReader::new(conn.try_clone().unwrap());
                        while let Some((_, len)) = read_request_head(&mut r) {
                            let mut body = vec![0; len];
                            let _ = r.read_exact(&mut body);
                            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            fault.answer(&mut conn);
                            if !matches!(fault, Fault::TrailingResponse | Fault::ClAndTe) {
                                return;
                            }
                        }
                    });
                }
            });
            seen
        })
        .collect();
    for (i, fault) in faults.iter().enumerate() {
        let port = (9100 + i).to_string();
        // Two POSTs on one app connection: each gets its own clear answer.
        let two = "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhiPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi";
        let out = pod.hostile(&["raw", "198.18.0.98", &port, &hex(two.as_bytes()), "4"]);
        assert!(
            !out.contains("injected"),
            "{fault:?}: a response was smuggled to the app: {out}"
        );
        let statuses: Vec<&str> = out.lines().filter(|l| l.starts_with("STATUS")).collect();
        assert!(statuses.len() <= 2, "{fault:?}: {out}");
        // A response followed by more bytes than it said (a second,
        // "injected" one) may reach the app whole, or be cut with a reset
        // when the upstream connection's error wins the race: never the
        // injected one. Every other fault is a clear 502 or 504.
        if !matches!(fault, Fault::TrailingResponse | Fault::ClAndTe) {
            assert!(!statuses.is_empty(), "{fault:?}: {out}");
            assert!(
                statuses
                    .iter()
                    .all(|s| *s == "STATUS 502" || *s == "STATUS 504"),
                "{fault:?}: {out}"
            );
            assert!(
                out.contains("REASON"),
                "{fault:?}: the reason is missing: {out}"
            );
        }
        let sent = counts[i].load(std::sync::atomic::Ordering::SeqCst);
        assert!(sent <= 2, "{fault:?}: a POST was sent {sent} times for two");
    }
    // No secret in anything an operator or the app could read.
    let everything = format!(
        "{}{}{}{}",
        pod.proxy_log(),
        pod.access_log().join("\n"),
        pod.metrics(),
        pod.admin("GET", "/config", "").1
    );
    assert!(!everything.contains(CANARY), "the canary secret leaked");
    assert!(!pod.proxy_log().contains("panicked"), "{}", pod.proxy_log());
}

/// The proxy's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// Holds `n` connections from the app to `port` (sending `first`), and
/// returns the proxy's RSS growth per connection while they are open.
fn rss_per_connection(pod: &Pod, host: &str, port: u16, n: usize, first: &[u8]) -> f64 {
    use std::io::{BufRead, BufReader};
    let pid = pod.proxy_pid().unwrap();
    let before = rss_kib(pid);
    let mut hold = pod
        .app("python3")
        .arg(hostile_py())
        .args([
            "hold",
            host,
            &port.to_string(),
            &n.to_string(),
            "4",
            &hex(first),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(hold.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "HELD");
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let during = rss_kib(pid);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    hold.wait().unwrap();
    let (closed, of, _) = closed_of(&rest.join("\n"));
    assert_eq!((closed, of), (0, n), "all held open");
    (during.saturating_sub(before)) as f64 / n as f64
}

/// A fresh proxy, warmed up (the runtime's first allocations are not per
/// connection), then `n` idle connections to one service of `protocol`.
fn rss_of_idle(protocol: &str, first: &[u8]) -> f64 {
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: s
    match: {{ cidr: {SERVER_V4}/32, port: 7010 }}
    protocol: {protocol}
"#
    ));
    pod.start_proxy_logging("ambassador_userspace=info");
    let _s = pod.server(SERVER_V4, 7010, Behaviour::ReadAll);
    rss_per_connection(&pod, SERVER_V4, 7010, 100, first);
    rss_per_connection(&pod, SERVER_V4, 7010, 1000, first)
}

#[test]
fn idle_connections_cost_a_few_kib_each() {
    let tcp = rss_of_idle("tcp", b"x");
    // HTTP waiting for its first request.
    let http = rss_of_idle("http", b"");
    eprintln!("RSS per idle connection: TCP relay {tcp:.1} KiB, silent HTTP {http:.1} KiB");
    // Measured on the test VM (debug build): 5.4 KiB and 5.2 KiB.
    assert!(tcp < 12.0, "an idle TCP relay costs {tcp:.1} KiB");
    assert!(http < 12.0, "a silent HTTP connection costs {http:.1} KiB");
}

#[test]
fn a_careless_or_hostile_config_gets_one_short_line_and_no_panic() {
    require_root();
    let dir = std::env::temp_dir().join(format!("amb-hostile-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A billion laughs: nine levels of ten aliases each.
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..9 {
        let p = i - 1;
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    bomb.push_str("services: *a8\n");
    let deep = format!("{}1{}", "[".repeat(20_000), "]".repeat(20_000));
    let huge = format!("default: {}\n", "x".repeat(8 << 20));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an alias bomb", bomb.into_bytes()),
        ("deep nesting", deep.into_bytes()),
        ("an 8 MiB value", huge.into_bytes()),
        ("not UTF-8", b"proxy: { port: \xff\xfe }\n".to_vec()),
        ("NUL bytes", b"proxy:\0\0\0 port: 1\n".to_vec()),
        ("a duration past any clock", b"proxy: { idle_timeout: 99999999999999999999999h }\n".to_vec()),
        ("a port past u16", b"proxy: { port: 70000 }\n".to_vec()),
        ("a negative count", b"proxy: { workers: -1 }\n".to_vec()),
        ("a million workers", b"proxy: { workers: 1000000 }\n".to_vec()),
        ("an IPv6 CIDR past /128", b"services: [{ name: a, match: { cidr: \"fd00::/200\" } }]\n".to_vec()),
        ("a host with a NUL", b"services: [{ name: a, match: { host: \"a\\0b\" } }]\n".to_vec()),
        ("a header name with a newline", b"services: [{ name: a, protocol: http, match: { cidr: 10.0.0.0/8 }, request: { set_headers: { \"a\\nb\": { value: x } } } }]\n".to_vec()),
        ("a header value with a newline", b"services: [{ name: a, protocol: http, match: { cidr: 10.0.0.0/8 }, request: { set_headers: { x-a: { value: \"a\\r\\nx-b: c\" } } } }]\n".to_vec()),
        ("a limit past usize", b"services: [{ name: a, match: { cidr: 10.0.0.0/8 }, limits: { max_requests: 99999999999999999999999 } }]\n".to_vec()),
        ("a missing CA file", b"services: [{ name: a, match: { cidr: 10.0.0.0/8 }, upstream: { endpoints: [{ address: \"10.0.0.1:443\" }], tls: { server_name: a.test, ca_file: /nonexistent/ca.pem } } }]\n".to_vec()),
    ];
    for (what, bytes) in cases {
        let file = dir.join("bad.yaml");
        std::fs::write(&file, &bytes).unwrap();
        let started = std::time::Instant::now();
        let out = std::process::Command::new(bin())
            .arg("check")
            .arg(&file)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: one line expected: {err}");
        assert!(err.len() < 700, "{what}: a {}-byte error", err.len());
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn killing_the_sidecar_outright_keeps_the_pod_closed() {
    let mut pod = Pod::new("intercept: { fail: closed }\n");
    pod.start_proxy();
    let server = pod.server(SERVER_V4, 7012, Behaviour::Greet);
    let ping = hex(b"ping\n");
    assert!(
        pod.hostile(&["raw", SERVER_V4, "7012", &ping])
            .contains("DATA HELLO")
    );
    pod.kill_proxy();
    for _ in 0..5 {
        let out = pod.hostile(&["raw", SERVER_V4, "7012", &ping]);
        assert!(out.contains("CONNECT EPERM"), "{out}");
    }
    assert_eq!(server.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}
