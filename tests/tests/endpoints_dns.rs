//! Endpoints from DNS: an endpoint named by host is every address its name
//! resolves to (a Kubernetes headless service), each balanced, ejected and
//! counted on its own, and the name is looked up again on its TTL. A real
//! dnsmasq in the servers' namespace answers the proxy (through the Pod's
//! own resolv.conf); the app is unmodified python in the Pod; the servers
//! are real and count what reaches them.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{
    dns::{Dnsmasq, ResolvConf},
    upstream::HttpUpstream,
    *,
};

/// The app's destination: nothing listens there, the service's endpoints
/// are where its connections go.
const NOWHERE: &str = "198.18.0.99";
const SERVER3_V4: &str = "198.18.0.4";
const SERVER4_V4: &str = "198.18.0.5";

/// More addresses for the servers' namespace, on the link the others are on.
fn add_server_addresses(pod: &Pod, addrs: &[&str]) {
    let out = Command::new("ip")
        .args(["-n", &pod.servers.name, "-o", "-4", "addr", "show"])
        .output()
        .expect("run ip");
    let dev = stdout(&out)
        .lines()
        .find(|l| l.contains(&format!("inet {SERVER_V4}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|d| d.split('@').next().unwrap_or(d).to_string())
        .expect("the servers' link");
    for a in addrs {
        pod.servers
            .ip(&["addr", "add", &format!("{a}/24"), "dev", &dev]);
    }
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// `endpoint_up` of `service`'s endpoints, by label.
fn endpoints_up(pod: &Pod, service: &str) -> Vec<(String, String)> {
    let prefix = format!("ambassador_endpoint_up{{service=\"{service}\",endpoint=\"");
    let mut out: Vec<(String, String)> = pod
        .metrics()
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(e, v)| (e.to_string(), v.to_string()))
        .collect();
    out.sort();
    out
}

fn up(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|(l, v)| (l.to_string(), v.to_string()))
        .collect()
}

fn lines(out: &std::process::Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

#[test]
fn a_name_with_three_addresses_spreads_load_and_ejects_the_one_that_fails() {
    const NAME: &str = "pool.endpoints.test";
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: pool
    match: {{ cidr: {NOWHERE}/32, port: 8300 }}
    protocol: http
    outlier: {{ consecutive_failures: 2, base_ejection: 60s }}
    upstream:
      balance: round_robin
      endpoints: [{{ address: "{NAME}:9300" }}]
"#
    ));
    add_server_addresses(&pod, &[SERVER3_V4]);
    let addrs = [SERVER_V4, SERVER2_V4, SERVER3_V4];
    let dns = Dnsmasq::start(&pod.servers, SERVER2_V4, &addrs.map(|a| (NAME, a)), 1);
    let resolv = ResolvConf::new(&[SERVER2_V4], &[]);
    pod.resolv_conf = Some(resolv.0.clone());
    let started = Instant::now();
    pod.start_proxy();
    let servers = addrs.map(|a| HttpUpstream::plain(pod.server_listener(a, 9300)));
    // Each address is an endpoint of its own, named after where it came from.
    let label = |a: &str| format!("{NAME}:9300@{a}");
    wait_until("three endpoints", Duration::from_secs(10), || {
        endpoints_up(&pod, "pool").len() == 3
    });
    let all_up: Vec<(String, String)> = addrs.iter().map(|a| (label(a), "1".into())).collect();
    assert_eq!(endpoints_up(&pod, "pool"), all_up);
    let (_, status) = pod.admin("GET", "/status", "");
    for a in addrs {
        assert!(status.contains(&label(a)), "{status}");
    }

    let many = |n: &str| pod.client(&["http-many", NOWHERE, "8300", n]);
    let out = many("30");
    assert_eq!(stdout(&out).trim(), "200x30", "{}", lines(&out));
    let counts = || servers.each_ref().map(|s| s.seen().len());
    assert_eq!(counts(), [10, 10, 10], "round robin over every address");

    // One of them dies: the app sees no error, the other two serve, and the
    // dead one is ejected on its own.
    let [first, second, third] = servers;
    drop(third);
    let out = many("30");
    assert_eq!(stdout(&out).trim(), "200x30", "{}", lines(&out));
    assert!(pod.wait_log("endpoint ejected"), "{}", pod.proxy_log());
    assert!(
        pod.proxy_log()
            .contains(&format!("endpoint={}", label(SERVER3_V4))),
        "{}",
        pod.proxy_log()
    );
    let before = (first.seen().len(), second.seen().len());
    let out = many("20");
    assert_eq!(stdout(&out).trim(), "200x20", "{}", lines(&out));
    let after = (first.seen().len(), second.seen().len());
    assert_eq!(after.0 - before.0 + after.1 - before.1, 20);
    assert!(
        after.0 - before.0 >= 5 && after.1 - before.1 >= 5,
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        endpoints_up(&pod, "pool"),
        up(&[
            (&label(SERVER_V4), "1"),
            (&label(SERVER2_V4), "1"),
            (&label(SERVER3_V4), "0"),
        ])
    );
    let metrics = pod.metrics();
    let ejections = format!(
        "ambassador_endpoint_ejections_total{{service=\"pool\",endpoint=\"{}\"}} 1",
        label(SERVER3_V4)
    );
    assert!(metrics.contains(&ejections), "{metrics}");
    // The stand-in for the name before it resolved is gone from /metrics.
    assert!(
        !metrics.contains(&format!("endpoint=\"{NAME}:9300\"")),
        "{metrics}"
    );

    // The records' TTL is 1 s, but `min_ttl` (5 s by default) bounds how
    // often the name is asked: A and AAAA per lookup.
    let lookups = dns.queries(NAME) / 2;
    let bound = started.elapsed().as_secs() as usize / 5 + 2;
    assert!(
        (1..=bound).contains(&lookups),
        "{lookups} lookups in {:?}",
        started.elapsed()
    );
}

/// An app that holds `n` connections open: it prints each one's greeting,
/// waits for a line on stdin, then pings each and prints the echo.
struct Holder {
    child: Child,
    out: BufReader<ChildStdout>,
}

const HOLD: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = [socket.create_connection((host, port), timeout=30) for _ in range(n)]
files = [c.makefile("rb") for c in conns]
for f in files:
    print("GREETING", f.readline().decode().strip(), flush=True)
sys.stdin.readline()
for c, f in zip(conns, files):
    try:
        c.sendall(b"ping\n")
        print("ECHO", f.readline().decode().strip(), flush=True)
    except OSError as e:
        print("ERROR", e, flush=True)
"#;

impl Holder {
    fn start(pod: &Pod, port: &str, n: usize) -> (Holder, Vec<String>) {
        let mut child = pod
            .app("python3")
            .args(["-c", HOLD, NOWHERE, port, &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the app");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut h = Holder { child, out };
        let greetings = h.read(n);
        (h, greetings)
    }

    fn read(&mut self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let mut line = String::new();
                let _ = self.out.read_line(&mut line);
                line.trim().to_string()
            })
            .collect()
    }

    fn ping(&mut self, n: usize) -> Vec<String> {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("tell the app");
        stdin.flush().expect("flush");
        self.read(n)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server address a `Greet` greeting names.
fn server_of(greeting: &str) -> &str {
    greeting
        .split_whitespace()
        .nth(2)
        .and_then(|a| a.rsplit_once(':'))
        .map_or("", |(ip, _)| ip)
}

#[test]
fn changed_records_are_picked_up_after_the_ttl_and_live_connections_stay() {
    const NAME: &str = "moving.endpoints.test";
    let mut pod = Pod::new(&format!(
        r#"
services:
  - name: moving
    match: {{ cidr: {NOWHERE}/32, port: 8310 }}
    upstream:
      balance: round_robin
      endpoints: [{{ address: "{NAME}:9310" }}]
      dns: {{ min_ttl: 1s, max_ttl: 10s }}
"#
    ));
    add_server_addresses(&pod, &[SERVER3_V4, SERVER4_V4]);
    let dns = Dnsmasq::start(
        &pod.servers,
        SERVER2_V4,
        &[(NAME, SERVER_V4), (NAME, SERVER2_V4)],
        1,
    );
    let resolv = ResolvConf::new(&[SERVER2_V4], &[]);
    pod.resolv_conf = Some(resolv.0.clone());
    pod.start_proxy();
    let _servers = [SERVER_V4, SERVER2_V4, SERVER3_V4, SERVER4_V4]
        .map(|a| pod.server(a, 9310, Behaviour::Greet));
    let label = |a: &str| format!("{NAME}:9310@{a}");
    let both = |a: &str, b: &str| up(&[(&label(a), "1"), (&label(b), "1")]);
    wait_until("two endpoints", Duration::from_secs(10), || {
        endpoints_up(&pod, "moving") == both(SERVER_V4, SERVER2_V4)
    });

    // Four long connections, spread over the two addresses.
    let (mut held, greetings) = Holder::start(&pod, "8310", 4);
    let mut went: Vec<&str> = greetings.iter().map(|g| server_of(g)).collect();
    went.sort();
    assert_eq!(
        went,
        [SERVER_V4, SERVER_V4, SERVER2_V4, SERVER2_V4],
        "{greetings:?}"
    );

    // The records change: both addresses go, two others come. With a 1 s
    // TTL the proxy has the new ones within a couple of seconds.
    let asked = dns.queries(NAME);
    let changed = Instant::now();
    dns.set_hosts(&[(NAME, SERVER3_V4), (NAME, SERVER4_V4)]);
    wait_until("the new addresses", Duration::from_secs(5), || {
        endpoints_up(&pod, "moving") == both(SERVER3_V4, SERVER4_V4)
    });
    assert!(changed.elapsed() < Duration::from_secs(4));
    assert!(dns.queries(NAME) > asked, "looked up again");
    assert!(pod.wait_log("endpoint addresses changed"));

    // New connections go to the new addresses only.
    for _ in 0..4 {
        let out = pod.client(&["greet", NOWHERE, "8310"]);
        let text = stdout(&out);
        let greeting = text
            .lines()
            .find(|l| l.starts_with("GREETING"))
            .unwrap_or_default();
        let to = server_of(greeting);
        assert!(to == SERVER3_V4 || to == SERVER4_V4, "{}", lines(&out));
    }

    // The connections to the addresses that went are still whole.
    let echoes = held.ping(4);
    assert_eq!(echoes, ["ECHO ping"; 4], "{}", pod.proxy_log());
    // Their endpoints' series go once nothing holds them.
    drop(held);
    wait_until(
        "the old endpoints' series to go",
        Duration::from_secs(5),
        || !pod.metrics().contains(&label(SERVER_V4)),
    );

    // The resolver goes away: the name keeps its last addresses.
    drop(dns);
    thread::sleep(Duration::from_secs(3));
    assert_eq!(endpoints_up(&pod, "moving"), both(SERVER3_V4, SERVER4_V4));
    let out = pod.client(&["greet", NOWHERE, "8310"]);
    assert!(stdout(&out).contains("GREETING HELLO"), "{}", lines(&out));
    assert!(
        pod.wait_log("endpoint name did not resolve"),
        "{}",
        pod.proxy_log()
    );

    // A reload's new table starts from the addresses the old one had: with
    // no resolver to ask, the name still reaches them.
    pod.hup_proxy();
    assert!(pod.wait_log("config reloaded"), "{}", pod.proxy_log());
    assert_eq!(endpoints_up(&pod, "moving"), both(SERVER3_V4, SERVER4_V4));
    for _ in 0..2 {
        let out = pod.client(&["greet", NOWHERE, "8310"]);
        let text = stdout(&out);
        let to = server_of(
            text.lines()
                .find(|l| l.starts_with("GREETING"))
                .unwrap_or_default(),
        );
        assert!(to == SERVER3_V4 || to == SERVER4_V4, "{}", lines(&out));
    }
}
