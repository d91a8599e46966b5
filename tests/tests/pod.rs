//! End-to-end interception in a simulated Pod: real programs on a real cgroup,
//! the real proxy as uid 1337, unmodified curl and python as the app.

use std::time::{Duration, Instant};

use ambassador_tests::*;

const DEFAULTS: &str = "";

fn lines(out: &std::process::Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

#[test]
fn ipv4_and_ipv6_original_destinations_are_recovered() {
    let mut pod = Pod::new(DEFAULTS);
    pod.start_proxy();
    let v4 = pod.server(SERVER_V4, 7001, Behaviour::Greet);
    let v6 = pod.server(SERVER_V6, 7001, Behaviour::Greet);

    let out = pod.client(&["greet", SERVER_V4, "7001"]);
    assert!(out.status.success(), "{}", lines(&out));
    let text = stdout(&out);
    // The server says which of its addresses was dialled: the original one.
    assert!(
        text.contains(&format!("GREETING HELLO {SERVER_V4}:7001 {POD_V4}:")),
        "{text}"
    );
    assert!(text.contains("ECHO ping"), "{text}");
    // getpeername4 hands the app the original destination, not 127.0.0.1:15001.
    assert!(text.contains(&format!("PEER {SERVER_V4} 7001")), "{text}");

    let out = pod.client(&["greet", SERVER_V6, "7001"]);
    assert!(out.status.success(), "{}", lines(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("GREETING HELLO [{SERVER_V6}]:7001 [{POD_V6}]:")),
        "{text}"
    );
    assert!(text.contains(&format!("PEER {SERVER_V6} 7001")), "{text}");

    // A dual-stack socket dialling an IPv4-mapped address is an IPv4 connection.
    let out = pod.client(&["greet", SERVER_V4, "7001", "mapped"]);
    assert!(out.status.success(), "{}", lines(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("GREETING HELLO {SERVER_V4}:7001")),
        "{text}"
    );
    assert!(
        text.contains(&format!("PEER ::ffff:{SERVER_V4} 7001")),
        "{text}"
    );

    // All three went through the proxy: the kernel counted them, the proxy
    // logged their original destinations.
    assert_eq!(pod.counters().redirected, 3);
    assert_eq!(v4.accepted.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(v6.accepted.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(
        pod.wait_log(&format!("dst={SERVER_V4}:7001")),
        "{}",
        pod.proxy_log()
    );
    assert!(
        pod.wait_log(&format!("dst=[{SERVER_V6}]:7001")),
        "{}",
        pod.proxy_log()
    );
}

#[test]
fn unmodified_curl_goes_through_the_proxy() {
    let mut pod = Pod::new(DEFAULTS);
    pod.start_proxy();
    let _http = pod.server(SERVER_V4, 8080, Behaviour::Http);
    let out = pod.curl(&format!("http://{SERVER_V4}:8080/"), &[]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(stdout(&out), format!("served by {SERVER_V4}:8080\n"));
    assert_eq!(pod.counters().redirected, 1);
    assert!(
        pod.wait_log(&format!("dst={SERVER_V4}:8080")),
        "{}",
        pod.proxy_log()
    );
}

#[test]
fn excluded_ports_and_cidrs_bypass_the_proxy() {
    let pod = Pod::new(&format!(
        "intercept:\n  exclude_ports: [7002]\n  exclude_cidrs: [{SERVER2_V4}/32]\n"
    ));
    // No proxy at all, fail-closed: only what is excluded can connect.
    let _a = pod.server(SERVER_V4, 7002, Behaviour::Greet);
    let _b = pod.server(SERVER2_V4, 7003, Behaviour::Greet);
    let _c = pod.server(SERVER_V4, 7003, Behaviour::Greet);

    let out = pod.client(&["greet", SERVER_V4, "7002"]);
    assert!(out.status.success(), "excluded port: {}", lines(&out));
    let out = pod.client(&["greet", SERVER2_V4, "7003"]);
    assert!(out.status.success(), "excluded CIDR: {}", lines(&out));
    let out = pod.client(&["greet", SERVER_V4, "7003"]);
    assert!(
        !out.status.success(),
        "not excluded, proxy down: must be refused"
    );
    assert!(stdout(&out).contains("ERROR EPERM"), "{}", lines(&out));

    let c = pod.counters();
    assert_eq!((c.bypassed, c.refused, c.redirected), (2, 1, 0), "{c:?}");
}

#[test]
fn no_loop_and_the_proxy_port_is_refused_to_the_app() {
    // Loopback interception on: the hardest case for loops.
    let mut pod = Pod::new("intercept:\n  loopback: true\n");
    pod.start_proxy();
    let _s = pod.server(SERVER_V4, 7001, Behaviour::Greet);
    // The proxy (uid 1337) connects on to the original destination itself; were
    // that connect redirected, it would come back to the proxy and fail.
    let out = pod.client(&["greet", SERVER_V4, "7001"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert!(!pod.proxy_log().contains("refusing the loop"));

    // The app dialling the proxy port directly is refused at connect().
    for host in ["127.0.0.1", "::1"] {
        let out = pod.client(&["greet", host, &PROXY_PORT.to_string()]);
        assert!(!out.status.success(), "{host}: {}", lines(&out));
        assert!(
            stdout(&out).contains("ERROR EPERM"),
            "{host}: {}",
            lines(&out)
        );
    }
    let c = pod.counters();
    assert_eq!((c.redirected, c.refused), (1, 2), "{c:?}");
}

#[test]
fn fail_closed_refuses_within_a_second_when_the_proxy_dies() {
    let mut pod = Pod::new("intercept:\n  fail: closed\n");
    pod.start_proxy();
    let _s = pod.server(SERVER_V4, 7001, Behaviour::Greet);
    let out = pod.client(&["greet", SERVER_V4, "7001"]);
    assert!(out.status.success(), "{}", lines(&out));

    pod.kill_proxy();
    let started = Instant::now();
    let out = pod.client(&["greet", SERVER_V4, "7001"]);
    assert!(
        !out.status.success(),
        "must not connect with the proxy gone"
    );
    assert!(stdout(&out).contains("ERROR EPERM"), "{}", lines(&out));
    // python's own start-up is most of this; the connect itself fails at once.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // The proxy comes back: the next connect uses it (decided per connect).
    pod.start_proxy();
    let out = pod.client(&["greet", SERVER_V4, "7001"]);
    assert!(out.status.success(), "{}", lines(&out));
    let c = pod.counters();
    assert_eq!((c.redirected, c.refused), (2, 1), "{c:?}");
}

#[test]
fn fail_open_goes_direct_when_the_proxy_is_absent() {
    let mut pod = Pod::new("intercept:\n  fail: open\n");
    let s = pod.server(SERVER_V4, 7001, Behaviour::Greet);
    let out = pod.client(&["greet", SERVER_V4, "7001"]);
    assert!(out.status.success(), "{}", lines(&out));
    // Direct: the server saw the app's own connection.
    assert!(stdout(&out).contains(&format!("PEER {SERVER_V4} 7001")));
    let c = pod.counters();
    assert_eq!((c.passed, c.redirected), (1, 0), "{c:?}");

    pod.start_proxy();
    let out = pod.client(&["greet", SERVER_V4, "7001"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(pod.counters().redirected, 1);
    assert_eq!(s.accepted.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
fn uninstall_leaves_nothing_attached_or_pinned() {
    let pod = Pod::new(DEFAULTS);
    let attached = attached_programs(&pod.cgroup);
    for kind in [
        "connect4",
        "connect6",
        "sock_ops",
        "getsockopt",
        "getpeername4",
        "getpeername6",
        "sendmsg4",
        "sendmsg6",
    ] {
        assert!(attached.contains(kind), "{kind} missing:\n{attached}");
    }
    let status = pod.ambassador(&["status"], None);
    let text = stdout(&status);
    assert!(text.contains(&pod.cgroup.display().to_string()), "{text}");
    assert!(text.contains("redirected 0"), "{text}");

    // Re-running init upgrades in place: still exactly one of each.
    let again = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup));
    assert!(again.status.success(), "{}", lines(&again));
    assert!(stdout(&again).contains("upgraded"), "{}", lines(&again));
    // The kernel releases an unpinned link from a work queue: the old ones
    // go a moment after `init` returns.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut attached = attached_programs(&pod.cgroup);
    while attached.matches("connect4").count() != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        attached = attached_programs(&pod.cgroup);
    }
    assert_eq!(attached.matches("connect4").count(), 1, "{attached}");

    let out = pod.ambassador(&["uninstall", "--cgroup"], Some(&pod.cgroup));
    assert!(out.status.success(), "{}", lines(&out));
    assert!(
        !pod.pin_dir().exists(),
        "pins left in {}",
        pod.pin_dir().display()
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut attached = attached_programs(&pod.cgroup);
    while attached.contains("ambassador") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        attached = attached_programs(&pod.cgroup);
    }
    assert!(
        !attached.contains("ambassador"),
        "still attached:\n{attached}"
    );
    for kind in ["connect4", "sock_ops", "getsockopt"] {
        assert!(
            !attached.contains(kind),
            "{kind} still attached:\n{attached}"
        );
    }
    // Uninstalling again is harmless and says so.
    let out = pod.ambassador(&["uninstall", "--cgroup"], Some(&pod.cgroup));
    assert!(out.status.success() && stdout(&out).contains("nothing installed"));
}

#[test]
fn two_thousand_connections_through_a_small_table_are_never_misrouted() {
    let mut pod = Pod::new("intercept:\n  table_size: 1024\n");
    pod.start_proxy();
    let ports: Vec<u16> = (7100..7110).collect();
    let _servers: Vec<Server> = ports
        .iter()
        .map(|p| pod.server(SERVER_V4, *p, Behaviour::Greet))
        .collect();
    let list = ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    // 2,000 connections held open at once, opened 100 at a time.
    let out = pod.client(&["many", SERVER_V4, &list, "2000", "100"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(
        stdout(&out).trim(),
        "ok 2000 misrouted 0 failed 0 open 2000",
        "{}",
        lines(&out)
    );
    assert_eq!(pod.counters().redirected, 2000);
}

#[test]
fn fin_propagates_both_ways() {
    let mut pod = Pod::new(DEFAULTS);
    pod.start_proxy();
    // App half-closes after sending: the upstream sees EOF, answers, the app
    // reads the answer and then EOF.
    let s = pod.server(SERVER_V4, 7201, Behaviour::ReadAll);
    let out = pod.client(&["halfclose", SERVER_V4, "7201", "100000"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(stdout(&out), "REPLY got 100000\nEOF\n");
    assert!(
        s.wait_event("eof after 100000 bytes", Duration::from_secs(5))
            .is_some()
    );

    // Upstream half-closes first: the app reads EOF and can still send.
    let s = pod.server(SERVER_V4, 7202, Behaviour::CloseFirst);
    let out = pod.client(&["readfirst", SERVER_V4, "7202"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(stdout(&out), "READ bye EOF True\n");
    let ev = s.wait_event("then read", Duration::from_secs(5));
    assert_eq!(
        ev.as_deref(),
        Some("then read \"after-fin\""),
        "{:?}",
        s.events()
    );

    // Closed connections leave nothing behind in the kernel's tables.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pod.tracked() != (0, 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        pod.tracked(),
        (0, 0),
        "(connections, cookies) still tracked"
    );
}

#[test]
fn rst_propagates_both_ways() {
    let mut pod = Pod::new(DEFAULTS);
    pod.start_proxy();
    // App resets: the upstream's read fails with a reset, not a clean EOF.
    let s = pod.server(SERVER_V4, 7301, Behaviour::ReadAll);
    let out = pod.client(&["rst", SERVER_V4, "7301"]);
    assert!(out.status.success(), "{}", lines(&out));
    let ev = s.wait_event("error", Duration::from_secs(5));
    assert_eq!(
        ev.as_deref(),
        Some("error ConnectionReset"),
        "{:?}",
        s.events()
    );

    // Upstream resets: the app sees a reset.
    let _r = pod.server(SERVER_V4, 7302, Behaviour::Reset);
    let out = pod.client(&["expect-rst", SERVER_V4, "7302"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(stdout(&out), "RESET\n");
}

#[test]
fn upstream_refusing_resets_the_app_at_once() {
    let mut pod = Pod::new(DEFAULTS);
    pod.start_proxy();
    // Nothing listens on 7401: the proxy's connect is refused and the app's
    // connection is reset right away rather than left hanging.
    let started = Instant::now();
    let out = pod.client(&["expect-rst", SERVER_V4, "7401"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(stdout(&out), "RESET\n");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        pod.wait_log("connect to 198.18.0.2:7401 failed"),
        "{}",
        pod.proxy_log()
    );
}

#[test]
fn the_proxy_can_be_recognised_by_its_socket_mark() {
    // The proxy runs as root here, so the uid rule does not cover it: only the
    // mark on its upstream sockets keeps them from coming back to it.
    let mut pod = Pod::new("proxy:\n  uid: 4242\n  mark: 1337\n");
    pod.start_proxy_as(None, "ambassador_userspace=debug");
    let _s = pod.server(SERVER_V4, 7501, Behaviour::Greet);
    let out = pod.client(&["greet", SERVER_V4, "7501"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert!(stdout(&out).contains(&format!("GREETING HELLO {SERVER_V4}:7501")));
    let c = pod.counters();
    assert_eq!((c.redirected, c.refused), (1, 0), "{c:?}");
    let status = stdout(&pod.ambassador(&["status"], None));
    assert!(status.contains("own uid 4242, own mark 1337"), "{status}");
}

#[test]
fn a_proxy_under_the_wrong_uid_refuses_to_start() {
    let mut pod = Pod::new("proxy:\n  uid: 4242\n");
    let mut cmd = placed(
        bin(),
        &Placement {
            netns: &pod.netns,
            cgroup: &pod.proxy_cgroup,
            uid: Some(PROXY_UID),
        },
    );
    let out = cmd
        .args(["proxy", "--config"])
        .arg(&pod.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("runs as uid 1337 but proxy.uid is 4242"),
        "{}",
        lines(&out)
    );
    pod.kill_proxy();
}

#[test]
fn bpf_log_follows_the_installed_programs() {
    use std::io::{BufRead, BufReader};
    let mut pod = Pod::new(DEFAULTS);
    // Re-run init with kernel logging on (an in-place upgrade).
    let out = pod.ambassador(
        &["init", "--bpf-log", "debug", "--cgroup"],
        Some(&pod.cgroup.clone()),
    );
    assert!(out.status.success(), "{}", lines(&out));
    pod.start_proxy();
    let _s = pod.server(SERVER_V4, 7601, Behaviour::Greet);
    let mut follow = std::process::Command::new(bin())
        .args(["bpf-log", "--cgroup"])
        .arg(&pod.cgroup)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = follow.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let out = pod.client(&["greet", SERVER_V4, "7601"]);
    assert!(out.status.success(), "{}", lines(&out));
    let want = format!("redirected connect to {SERVER_V4}:7601");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            if line.contains(&want) {
                break;
            }
            seen.push(line);
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(Instant::now() < deadline, "no {want:?} in {seen:?}");
}

#[test]
fn app_and_proxy_bytes_take_the_sk_msg_shortcut_intact() {
    let mut pod = Pod::new(DEFAULTS);
    pod.start_proxy();
    let _s = pod.server(SERVER_V4, 7401, Behaviour::Greet);
    // Many short connections that write the moment connect() returns (the
    // proxy's end may not have joined yet: that direction keeps to TCP whole),
    // then one long stream (past 256 KiB one way, a direction moves to TCP
    // mid-stream: the order must survive the move).
    let out = pod.client(&["echo", SERVER_V4, "7401", "60", "65536"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(stdout(&out).trim(), "ok 60 mismatched 0", "{}", lines(&out));
    let out = pod.client(&["echo", SERVER_V4, "7401", "1", "16777216"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(stdout(&out).trim(), "ok 1 mismatched 0", "{}", lines(&out));
    // Both directions of that stream went on by splice(2): the app's after
    // its socket left the shortcut and the proxy had read what came by it.
    let spliced = pod.spliced_bytes_above(24 << 20);
    assert!(spliced > 24 << 20, "{spliced} bytes spliced of 2 x 16 MiB");
    // sendfile(2) takes the kernel's splice path into the same program.
    let out = pod.client(&["echo", SERVER_V4, "7401", "3", "200000", "sendfile"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(stdout(&out).trim(), "ok 3 mismatched 0", "{}", lines(&out));

    let c = pod.counters();
    assert_eq!(c.redirected, 64, "{c:?}");
    // Every connection's proxy-to-app direction took the shortcut (the app's
    // end joined before connect() returned); app-to-proxy did too unless the
    // app wrote before the proxy's end had joined.
    assert!(
        (c.redirected..=2 * c.redirected).contains(&c.accelerated),
        "streams on the shortcut: {c:?}"
    );
    let out = pod.ambassador(&["status"], None);
    assert!(
        stdout(&out).contains(&format!(
            "sk_msg   on, {} byte stream(s) took the shortcut",
            c.accelerated
        )),
        "{}",
        lines(&out)
    );
}

#[test]
fn an_init_rerun_replaces_a_pinned_map_whose_layout_changed() {
    let mut pod = Pod::new(DEFAULTS);
    // What an older version left pinned: AMB_ACCEL with an 8-byte value
    // (before it counted the bytes sent by the shortcut).
    let accel = pod.pin_dir().join("AMB_ACCEL");
    std::fs::remove_file(&accel).unwrap();
    let made = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&accel)
        .args([
            "type", "lru_hash", "key", "44", "value", "8", "entries", "64",
        ])
        .args(["name", "AMB_ACCEL"])
        .output()
        .expect("bpftool");
    assert!(made.status.success(), "{}", lines(&made));
    let out = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup));
    assert!(out.status.success(), "{}", lines(&out));
    let info = aya::maps::MapInfo::from_pin(&accel).expect("AMB_ACCEL pinned again");
    assert_eq!(info.value_size(), 16, "the old map was reused");
    // And the new programs work on it: bytes through the shortcut, spliced.
    pod.start_proxy();
    let _s = pod.server(SERVER_V4, 7405, Behaviour::Greet);
    let out = pod.client(&["echo", SERVER_V4, "7405", "1", "4194304"]);
    assert_eq!(stdout(&out).trim(), "ok 1 mismatched 0", "{}", lines(&out));
    assert!(pod.counters().accelerated > 0);
}

#[test]
fn without_acceleration_bytes_take_loopback_tcp() {
    let mut pod = Pod::new("intercept:\n  accelerate: false\n");
    pod.start_proxy();
    let _s = pod.server(SERVER_V4, 7402, Behaviour::Greet);
    let out = pod.client(&["echo", SERVER_V4, "7402", "5", "1048576"]);
    assert!(out.status.success(), "{}", lines(&out));
    assert_eq!(stdout(&out).trim(), "ok 5 mismatched 0", "{}", lines(&out));
    let c = pod.counters();
    assert_eq!((c.redirected, c.accelerated), (5, 0), "{c:?}");
    // Off the shortcut, the app's bytes are spliced once a read fills the
    // buffer; how much is copied first depends on how the echo's reads fall.
    let spliced = pod.spliced_bytes_above(5 << 20);
    assert!(spliced > 5 << 20, "{spliced} bytes spliced of 2 x 5 MiB");
    let out = pod.ambassador(&["status"], None);
    assert!(stdout(&out).contains("sk_msg   off"), "{}", lines(&out));
}

#[test]
fn a_reader_that_stops_pushes_back_on_the_shortcut_too() {
    // A redirect into a receive queue is not limited by the receiver's buffer:
    // a direction goes back to TCP flow control after 256 KiB sent while the
    // other side says nothing (without that, both of these reach the 1 GiB
    // cap).
    const BOUND: usize = 64 << 20;
    let mut pod = Pod::new(DEFAULTS);
    pod.start_proxy();
    // Upload to an upstream that does not read: the app is held back.
    let _s = pod.server(SERVER_V4, 7403, Behaviour::Greet);
    let out = pod.client(&["flood", SERVER_V4, "7403"]);
    let text = stdout(&out);
    let sent: usize = text
        .trim()
        .strip_prefix("buffered ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", lines(&out)));
    assert!(
        (1 << 20..BOUND).contains(&sent),
        "the app wrote {sent} bytes into a stalled path"
    );
    // Download to an app that does not read: the upstream is held back.
    let s = pod.server(SERVER_V4, 7404, Behaviour::Flood);
    let out = pod.client(&["readfirst-stall", SERVER_V4, "7404"]);
    assert!(out.status.success(), "{}", lines(&out));
    let ev = s
        .wait_event("flooded", Duration::from_secs(20))
        .expect("the upstream's writes stalled");
    let flooded: usize = ev["flooded ".len()..].parse().unwrap();
    assert!(
        (1 << 20..BOUND).contains(&flooded),
        "the upstream wrote {flooded} bytes towards an app that reads nothing"
    );
    let c = pod.counters();
    assert!(c.accelerated >= 2, "{c:?}");
}

#[test]
fn tcp_fast_open_bytes_are_never_overtaken_on_the_shortcut() {
    // The app's first bytes leave inside sendto(MSG_FASTOPEN), by TCP, before
    // its socket joins the sockhash: none of its later bytes may take the
    // shortcut past them. Both ways a client sends them: after the handshake
    // (no cookie yet, the default) and in the SYN itself (tcp_fastopen 0x4:
    // no cookie needed); each try must come back whole and in order.
    let mut pod = Pod::new(DEFAULTS);
    pod.start_proxy();
    let _s = pod.server(SERVER_V4, 7405, Behaviour::Greet);
    for tfo in ["1", "5"] {
        let set = std::process::Command::new("ip")
            .args(["netns", "exec", &pod.netns.name, "sysctl", "-qw"])
            .arg(format!("net.ipv4.tcp_fastopen={tfo}"))
            .status()
            .expect("ip netns exec sysctl");
        assert!(set.success(), "cannot set net.ipv4.tcp_fastopen={tfo}");
        for _ in 0..3 {
            let out = pod.client(&["tfo", SERVER_V4, "7405"]);
            assert_eq!(
                stdout(&out).trim(),
                "ok HELLO",
                "tcp_fastopen={tfo}: {}",
                lines(&out)
            );
        }
    }
}
