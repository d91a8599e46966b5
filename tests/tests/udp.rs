//! UDP under `default: deny`: the app's unmodified python sends datagrams
//! (`sendto`, and `send` on a connected socket, IPv4, IPv6 and v4-mapped)
//! to echo servers in the servers' namespace. Allowed destinations
//! (`intercept.udp.allow`, and the resolver its resolv.conf names, on port
//! 53) answer; everything else fails at once with EPERM, QUIC's port 443
//! included, counted by the kernel; loopback stays the app's own. Under
//! `passthrough` UDP is left alone.

use std::{net::UdpSocket, thread};

use ambassador_tests::*;

/// Sends "ping" to each `HOST:PORT` argument (`c:` first: on a connected
/// socket) and prints one line each: `echo:ping`, `EPERM`, `unreachable`
/// (the host answered ICMP port unreachable) or `timeout`.
const APP: &str = r#"
import socket, sys
for spec in sys.argv[1:]:
    connect = spec.startswith("c:")
    spec = spec[2:] if connect else spec
    host, port = spec.rsplit(":", 1)
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(1.5)
    try:
        if connect:
            s.connect((host, int(port)))
            s.send(b"ping")
        else:
            s.sendto(b"ping", (host, int(port)))
        print("echo:" + s.recv(100).decode())
    except PermissionError:
        print("EPERM")
    except ConnectionRefusedError:
        print("unreachable")
    except socket.timeout:
        print("timeout")
"#;

/// A UDP echo server on `addr` in the namespace `ns`, until the test ends.
fn echo(ns: &Netns, addr: &str) {
    let addr = addr.to_string();
    let sock = ns
        .enter(move || UdpSocket::bind(&addr))
        .expect("bind a UDP echo server");
    thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

fn sends(pod: &Pod, specs: &[&str]) -> Vec<String> {
    let out = pod
        .app("python3")
        .arg("-c")
        .arg(APP)
        .args(specs)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).lines().map(str::to_string).collect()
}

#[test]
fn deny_refuses_datagrams_to_what_is_not_allowed() {
    // The Pod's resolv.conf, as init reads it (a file of the test's own).
    let resolv = std::env::temp_dir().join(format!("ambassador-udp-resolv-{}", std::process::id()));
    std::fs::write(
        &resolv,
        format!("search default.svc.cluster.local\nnameserver {SERVER2_V4}\n"),
    )
    .expect("write resolv.conf");
    let cfg = format!(
        r#"
default: deny
intercept:
  udp:
    allow: ["{SERVER_V4}:5353", "[{SERVER_V6}]:5353"]
    resolvers_from: {}
# The resolver's port 53 as a plain allowed destination (the echo server
# there speaks no DNS): capture is tests/tests/dns.rs's.
dns: {{ capture: false }}
"#,
        resolv.display()
    );
    let mut pod = Pod::new(&cfg);
    pod.start_proxy();
    for a in [
        format!("{SERVER_V4}:5353"),
        format!("{SERVER_V4}:9999"),
        format!("{SERVER_V4}:443"),
        format!("[{SERVER_V6}]:5353"),
        format!("[{SERVER_V6}]:9999"),
        format!("{SERVER2_V4}:53"),
        format!("{SERVER2_V4}:54"),
    ] {
        echo(&pod.servers, &a);
    }
    echo(&pod.netns, "127.0.0.1:7777");

    let before = pod.counters();
    let got = sends(
        &pod,
        &[
            &format!("{SERVER_V4}:5353"),
            &format!("c:{SERVER_V4}:5353"),
            &format!("{SERVER_V4}:9999"),
            &format!("c:{SERVER_V4}:9999"),
            &format!("{SERVER_V4}:443"),
            &format!("[{SERVER_V6}]:5353"),
            &format!("[{SERVER_V6}]:9999"),
            &format!("[::ffff:{SERVER_V4}]:5353"),
            &format!("[::ffff:{SERVER_V4}]:9999"),
            &format!("{SERVER2_V4}:53"),
            &format!("{SERVER2_V4}:54"),
            "127.0.0.1:7777",
        ],
    );
    let want = [
        "echo:ping",
        "echo:ping",
        "EPERM",
        "EPERM",
        "EPERM",
        "echo:ping",
        "EPERM",
        "echo:ping",
        "EPERM",
        "echo:ping",
        "EPERM",
        "echo:ping",
    ];
    assert_eq!(got, want);
    let after = pod.counters();
    assert_eq!(after.udp_refused - before.udp_refused, 6, "{after:?}");
    assert!(after.udp_allowed - before.udp_allowed >= 5, "{after:?}");

    // check says where UDP may go.
    let out = pod.ambassador(&["check"], Some(&pod.config.clone()));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "udp        only to {SERVER_V4}:5353, [{SERVER_V6}]:5353, the nameservers of {} on port 53 ({SERVER2_V4}:53 here);",
            resolv.display()
        )),
        "{text}"
    );
    // status reads the same from the kernel's maps.
    let status = stdout(&pod.ambassador(&["status"], None));
    assert!(
        status.contains(&format!(
            "UDP only to {SERVER_V4}:5353, {SERVER2_V4}:53, [{SERVER_V6}]:5353"
        )),
        "{status}"
    );
    let _ = std::fs::remove_file(&resolv);
}

#[test]
fn passthrough_leaves_udp_alone() {
    let mut pod = Pod::new("");
    pod.start_proxy();
    echo(&pod.servers, &format!("{SERVER_V4}:9999"));
    let got = sends(
        &pod,
        &[&format!("{SERVER_V4}:9999"), &format!("c:{SERVER_V4}:443")],
    );
    assert_eq!(got[0], "echo:ping");
    // Nothing listens on 443: the host says so; the kernel did not refuse.
    assert_eq!(got[1], "unreachable");
    assert_eq!(pod.counters().udp_refused, 0);
}

/// The sidecar, given its Pod's maps, writes a reloaded allow list into the
/// kernel, and `/metrics` counts the verdicts.
#[test]
fn a_reload_changes_where_udp_may_go() {
    let yaml = |allow: &str| {
        format!(
            "default: deny\nintercept: {{ udp: {{ allow: [{allow}], resolvers_from: null }} }}\n"
        )
    };
    let mut pod = Pod::new(&yaml(&format!("\"{SERVER_V4}:5353\"")));
    let uid = format!("udp-{}", std::process::id());
    pod.start_proxy_with_kernel_maps(&uid, &[]);
    echo(&pod.servers, &format!("{SERVER_V4}:5353"));
    echo(&pod.servers, &format!("{SERVER_V4}:6000"));
    let targets = [format!("{SERVER_V4}:5353"), format!("{SERVER_V4}:6000")];
    let specs: Vec<&str> = targets.iter().map(String::as_str).collect();
    assert_eq!(sends(&pod, &specs), ["echo:ping", "EPERM"]);

    pod.rewrite_config(&yaml(&format!("\"{SERVER_V4}:6000\"")));
    pod.hup_proxy();
    assert!(pod.wait_log("config reloaded"), "{}", pod.proxy_log());
    assert_eq!(sends(&pod, &specs), ["EPERM", "echo:ping"]);
    let m = pod.metrics();
    for (outcome, n) in [("allowed", 2), ("refused", 2)] {
        let series = format!(r#"ambassador_kernel_udp_total{{outcome="{outcome}"}} {n}"#);
        assert!(m.contains(&series), "{series}\n{m}");
    }
}
