//! Services in a simulated Pod: what the ambassador recognises and what it
//! does with the rest (`default: deny | passthrough`).

use ambassador_tests::*;

fn lines(out: &std::process::Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

#[test]
fn default_deny_refuses_what_no_service_claims() {
    let mut pod = Pod::new(&format!(
        "default: deny\n\
         services:\n\
         \x20 - name: db\n\
         \x20   match: {{ cidr: {SERVER_V4}/32, port: 7701 }}\n\
         \x20   protocol: tcp\n"
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
        "services:\n\
         \x20 - name: moved\n\
         \x20   match: {{ cidr: 198.18.0.99/32, port: 7703 }}\n\
         \x20   upstream:\n\
         \x20     endpoints:\n\
         \x20       - address: {SERVER_V4}:7704\n"
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
