//! DNS capture: the app's unmodified resolvers (dig, glibc's through
//! python, a hand-made query over `sendto`) ask the Pod's resolver, a real
//! dnsmasq in the servers' namespace; the kernel hands the queries to the
//! proxy's forwarder, which answers `dns.hosts` itself, refuses unknown
//! names under `deny_unknown` (dnsmasq never sees them), forwards the rest,
//! and learns what the names services are named by resolve to: a plain TCP
//! connection (no Host, no SNI) to such an address then matches its
//! service under `default: deny`, even a wildcard service's the proxy
//! could not resolve itself.

use ambassador_tests::{dns::*, *};

/// Sends one A query for argv[2] to argv[1]:53 (`c:` first: on a
/// connected socket) and prints the answer's sender (recvfrom, or the
/// connected socket's peer), its rcode and its address count.
const RAW: &str = r#"
import socket, struct, sys, random
spec, name = sys.argv[1], sys.argv[2]
connect = spec.startswith("c:")
host = spec[2:] if connect else spec
qid = random.randrange(65536)
q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
for label in name.split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\0" + struct.pack(">HH", 1, 1)
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(3)
if connect:
    s.connect((host, 53))
    s.send(q)
    data = s.recv(2048)
    frm = s.getpeername()
else:
    s.sendto(q, (host, 53))
    data, frm = s.recvfrom(2048)
rid, flags, qd, an = struct.unpack(">HHHH", data[:8])
print(f"from={frm[0]}:{frm[1]} id_ok={rid == qid} rcode={flags & 15} answers={an}")
"#;

/// Connects to `ip:port` (python, plain TCP: no Host, no SNI), sends a
/// line and prints what came back, or the error.
const TCP: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    print(s.recv(200).decode().split(" ")[0])
except Exception as e:
    print(type(e).__name__)
"#;

fn dig(pod: &Pod, args: &[&str]) -> String {
    let out = pod
        .app("dig")
        .args(["+short", "+tries=1", "+time=3"])
        .args(args)
        .output()
        .expect("dig");
    stdout(&out).trim().to_string()
}

fn python(pod: &Pod, script: &str, args: &[&str]) -> String {
    let out = pod
        .app("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

#[test]
fn the_apps_dns_goes_through_the_forwarder_and_teaches_the_table() {
    let resolv = ResolvConf::new(&[SERVER2_V4], &[]);
    let mut pod = Pod::new(&format!(
        r#"
default: deny
proxy: {{ dns_refresh: 1h }}
intercept: {{ udp: {{ resolvers_from: {resolv} }} }}
dns:
  deny_unknown: true
  hosts: {{ vault.internal: ["{SERVER_V4}"] }}
services:
  - {{ name: db, match: {{ host: db.test, port: 7000 }} }}
  - {{ name: wild, match: {{ host: "*.svc.test", port: 7000 }} }}
"#,
        resolv = resolv.0.display()
    ));
    let dnsmasq = Dnsmasq::start(
        &pod.servers,
        SERVER2_V4,
        &[
            ("db.test", SERVER_V4),
            ("a.svc.test", SERVER2_V4),
            ("other.test", SERVER_V4),
        ],
        5,
    );
    pod.resolv_conf = Some(resolv.0.clone());
    pod.start_proxy();
    let _db = pod.server(SERVER_V4, 7000, Behaviour::Greet);
    let _wild = pod.server(SERVER2_V4, 7000, Behaviour::Greet);
    let before = pod.counters();

    // A wildcard's name the proxy never resolved: refused by IP until the
    // app's own lookup teaches the table.
    assert_eq!(
        python(&pod, TCP, &[SERVER2_V4, "7000"]),
        "ConnectionResetError"
    );
    assert_eq!(dig(&pod, &["a.svc.test"]), SERVER2_V4);
    assert_eq!(python(&pod, TCP, &[SERVER2_V4, "7000"]), "HELLO");
    assert_eq!(dnsmasq.queries("a.svc.test"), 1);

    // glibc (python's getaddrinfo) takes the forwarder's answers: the
    // kernel names the resolver as their sender.
    let resolved = python(
        &pod,
        "import socket;print(socket.getaddrinfo('db.test', 7000, socket.AF_INET)[0][4][0])",
        &[],
    );
    assert_eq!(resolved, SERVER_V4);
    for spec in [SERVER2_V4.to_string(), format!("c:{SERVER2_V4}")] {
        assert_eq!(
            python(&pod, RAW, &[&spec, "db.test"]),
            format!("from={SERVER2_V4}:53 id_ok=True rcode=0 answers=1"),
            "{spec}"
        );
    }

    // Unknown names never leave the Pod; dns.hosts names neither.
    assert_eq!(
        python(&pod, RAW, &[SERVER2_V4, "other.test"]),
        format!("from={SERVER2_V4}:53 id_ok=True rcode=3 answers=0")
    );
    assert_eq!(dnsmasq.queries("other.test"), 0, "{}", dnsmasq.log());
    assert_eq!(dig(&pod, &["vault.internal"]), SERVER_V4);
    assert_eq!(dig(&pod, &["AAAA", "vault.internal"]), "");
    assert_eq!(dnsmasq.queries("vault.internal"), 0);

    // Over TCP too (the app's resolver retries there after a truncation).
    assert_eq!(dig(&pod, &["+tcp", "db.test"]), SERVER_V4);
    assert!(
        pod.wait_access_log(r#""transport":"tcp""#).is_some(),
        "{:?}",
        pod.access_log()
    );
    let line = pod
        .wait_access_log(r#""name":"other.test""#)
        .expect("a DNS access-log line");
    for want in [
        r#""kind":"dns""#,
        r#""outcome":"denied""#,
        r#""rcode":"NXDOMAIN""#,
    ] {
        assert!(line.contains(want), "{line}");
    }

    // A record changed upstream: the app's next lookup moves the name.
    dnsmasq.set_hosts(&[("db.test", SERVER2_V4), ("a.svc.test", SERVER2_V4)]);
    assert_eq!(
        python(&pod, TCP, &[SERVER2_V4, "7001"]),
        "ConnectionResetError"
    );
    assert_eq!(dig(&pod, &["db.test"]), SERVER2_V4);

    // check and status say where the app's DNS goes.
    let check = stdout(&pod.ambassador(&["check"], Some(&pod.config.clone())));
    assert!(
        check.contains(&format!(
            "dns        the app's queries go to the forwarder ({SERVER2_V4} -> 127.0.0.1:15053); 1 name(s) answered from dns.hosts; names no service names: NXDOMAIN, never asked upstream"
        )),
        "{check}"
    );
    let status = stdout(&pod.ambassador(&["status"], None));
    assert!(
        status.contains(&format!(
            "dns      captured ({SERVER2_V4} -> 127.0.0.1:15053), "
        )),
        "{status}"
    );
    let after = pod.counters();
    assert!(
        after.dns_redirected - before.dns_redirected >= 8,
        "{after:?}"
    );
    let m = pod.metrics();
    for series in [
        r#"ambassador_dns_queries_total{outcome="hosts"} 2"#,
        r#"ambassador_dns_queries_total{outcome="denied"} 1"#,
        r#"ambassador_dns_answers_total{rcode="NXDOMAIN"} 1"#,
    ] {
        assert!(m.contains(series), "{series}\n{m}");
    }
    assert!(
        m.contains("ambassador_dns_upstream_duration_seconds_count"),
        "{m}"
    );
}

/// Under `fail: open` with no forwarder listening (no proxy), the app's
/// DNS goes straight to its resolver; with the proxy, through it.
#[test]
fn without_the_forwarder_dns_goes_direct_under_fail_open() {
    let resolv = ResolvConf::new(&[SERVER2_V4], &[]);
    let pod = Pod::new(&format!(
        "intercept: {{ fail: open, udp: {{ resolvers_from: {} }} }}\n",
        resolv.0.display()
    ));
    let _dnsmasq = Dnsmasq::start(&pod.servers, SERVER2_V4, &[("db.test", SERVER_V4)], 5);
    let before = pod.counters();
    assert_eq!(
        python(&pod, RAW, &[SERVER2_V4, "db.test"]),
        format!("from={SERVER2_V4}:53 id_ok=True rcode=0 answers=1")
    );
    assert_eq!(pod.counters().dns_redirected, before.dns_redirected);
}
