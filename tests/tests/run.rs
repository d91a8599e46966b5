//! `ambassador run -- CMD` on the host, and the CLI's answers to bad input.

use std::{
    net::TcpListener,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::*;

/// Loopback servers stand in for remote ones, so intercept loopback.
fn loopback_config() -> PathBuf {
    let p = std::env::temp_dir().join(format!("amb-run-test-{}.yaml", std::process::id()));
    std::fs::write(&p, "intercept:\n  loopback: true\n").unwrap();
    p
}

fn greet_server() -> (Server, u16) {
    // Servers here run in the test process, outside any intercepted cgroup.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (Server::start_on(l, Behaviour::Greet), port)
}

fn run_cmd(config: &PathBuf) -> Command {
    let mut c = Command::new(bin());
    c.args(["run", "--summary", "--config"])
        .arg(config)
        .arg("--");
    c
}

#[test]
fn run_redirects_a_command_and_reports_counters() {
    require_root();
    let cfg = loopback_config();
    let (server, port) = greet_server();
    let out = run_cmd(&cfg)
        .arg("python3")
        .arg(client_py())
        .args(["greet", "127.0.0.1", &port.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("GREETING HELLO 127.0.0.1:{port} 127.0.0.1:")),
        "{text}"
    );
    // getpeername shows the app the original destination.
    assert!(text.contains(&format!("PEER 127.0.0.1 {port}")), "{text}");
    // stdout is the command's: no access-log lines unless asked for.
    assert!(!text.contains("\"kind\""), "{text}");
    assert!(stderr(&out).contains("redirected=1 "), "{}", stderr(&out));
    assert_eq!(
        server.accepted.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn run_shows_the_kernel_programs_log_when_asked() {
    require_root();
    let cfg = loopback_config();
    let (_server, port) = greet_server();
    let out = Command::new(bin())
        .args(["run", "--bpf-log", "debug", "--config"])
        .arg(&cfg)
        .arg("--")
        .arg("python3")
        .arg(client_py())
        .args(["greet", "127.0.0.1", &port.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let want = format!("ambassador_ebpf: redirected connect to 127.0.0.1:{port}");
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));
}

#[test]
fn run_passes_on_the_exit_code() {
    require_root();
    let cfg = loopback_config();
    let out = run_cmd(&cfg).args(["sh", "-c", "exit 7"]).output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let out = run_cmd(&cfg)
        .args(["sh", "-c", "kill -TERM $$"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    let out = run_cmd(&cfg).arg("/nonexistent/cmd").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot start /nonexistent/cmd"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn two_runs_at_once_do_not_interfere() {
    require_root();
    let cfg = loopback_config();
    let (_s, port) = greet_server();
    // Each run holds its interception for a while, overlapping the other's.
    let script = format!(
        r#"
import socket,time
for i in range(5):
    s=socket.create_connection(('127.0.0.1',{port}));assert s.recv(64).startswith(b'HELLO');s.close();time.sleep(0.1)
"#
    );
    let spawn = || {
        run_cmd(&cfg)
            .args(["python3", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        // Each run counts its own five connects only.
        assert!(stderr(&out).contains("redirected=5 "), "{}", stderr(&out));
    }
}

fn run_cgroup_of(pid: u32) -> PathBuf {
    cgroup2_mount().join(format!("ambassador-run-{pid}"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ctrl_c_and_sigterm_clean_everything_up() {
    require_root();
    let cfg = loopback_config();
    // Ctrl-C: the terminal signals the whole foreground group.
    let mut child = run_cmd(&cfg)
        .args(["sleep", "30"])
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id();
    let cg = run_cgroup_of(pid);
    wait_for("the transient cgroup", || {
        cg.join("cgroup.procs").exists() && procs(&cg) > 0
    });
    // SAFETY: signalling the process group we just created.
    unsafe { libc::kill(-(pid as i32), libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(!cg.exists(), "transient cgroup left behind");

    // SIGTERM to ambassador alone is passed on to the command.
    let mut child = run_cmd(&cfg).args(["sleep", "30"]).spawn().unwrap();
    let pid = child.id();
    let cg = run_cgroup_of(pid);
    wait_for("the transient cgroup", || {
        cg.join("cgroup.procs").exists() && procs(&cg) > 0
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert!(!cg.exists(), "transient cgroup left behind");
}

fn procs(cg: &std::path::Path) -> usize {
    std::fs::read_to_string(cg.join("cgroup.procs"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn one_line_error(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "must fail: {}", stdout(out));
    let err = stderr(out);
    assert_eq!(err.lines().count(), 1, "one line expected:\n{err}");
    err
}

#[test]
fn bad_input_gets_one_line_and_a_nonzero_exit() {
    require_root();
    let bad = std::env::temp_dir().join(format!("amb-bad-{}.yaml", std::process::id()));
    std::fs::write(
        &bad,
        "proxy:\n  port: 15001\nintercept:\n  fail: sometimes\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["proxy", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(
        err.contains("line 4") && err.contains("intercept.fail"),
        "{err}"
    );

    let out = Command::new(bin())
        .args(["init", "--cgroup", "/sys/fs/cgroup/unified/does-not-exist"])
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("does not exist"), "{err}");

    let out = Command::new(bin())
        .args(["init", "--cgroup", "/tmp"])
        .output()
        .unwrap();
    assert!(one_line_error(&out).contains("not in a cgroup v2 hierarchy"));

    // Not root.
    let mut cmd = Command::new(bin());
    cmd.args(["init", "--cgroup"]).arg(cgroup2_mount());
    // SAFETY: only setgid/setuid between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let err = one_line_error(&cmd.output().unwrap());
    assert!(err.contains("must run as root"), "{err}");

    // Port in use.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    std::fs::write(&bad, format!("proxy:\n  port: {port}\n  uid: 0\n")).unwrap();
    let out = Command::new(bin())
        .args(["proxy", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(
        err.contains(&format!("port {port} on 127.0.0.1 is in use")),
        "{err}"
    );

    let out = Command::new(bin()).args(["run"]).output().unwrap();
    assert!(!out.status.success());
    let _ = std::fs::remove_file(&bad);
}

fn check(file: &std::path::Path) -> std::process::Output {
    Command::new(bin()).arg("check").arg(file).output().unwrap()
}

#[test]
fn check_validates_everything_the_proxy_would_and_summarises() {
    use ambassador_tests::upstream::{CertKind, TestCa};
    let dir = std::env::temp_dir().join(format!("amb-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new("check-ca");
    let ca_file = ca.write_ca_file(&dir);
    let config = |ca: &std::path::Path| {
        format!(
            r#"
default: deny
services:
  - name: payments
    match: {{ host: payments.example.test, port: 80 }}
    protocol: http
    upstream:
      endpoints: [{{ address: "127.0.0.1:8443" }}]
      tls: {{ server_name: payments.example.test, ca_file: {} }}
    request: {{ set_headers: {{ authorization: {{ value: s3cret-canary }} }} }}
"#,
            ca.display()
        )
    };
    let file = dir.join("ok.yaml");
    std::fs::write(&file, config(&ca_file)).unwrap();
    let out = check(&file);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("valid"), "{text}");
    assert!(
        text.contains(
            "service    payments: payments.example.test port 80 (http) -> 127.0.0.1:8443"
        ),
        "{text}"
    );
    assert!(
        text.contains("TLS verified") && text.contains("refused (default: deny)"),
        "{text}"
    );
    assert!(
        !text.contains("s3cret-canary"),
        "a secret in the summary: {text}"
    );

    // An expired certificate in the CA bundle is caught before start-up.
    let (expired, _) = ca.issue(CertKind::Expired, "payments.example.test", None);
    let expired_file = dir.join("expired.pem");
    std::fs::write(&expired_file, expired).unwrap();
    std::fs::write(&file, config(&expired_file)).unwrap();
    let out = check(&file);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not valid now"),
        "{}",
        stderr(&out)
    );

    // A missing file, with the service named.
    std::fs::write(&file, config(&dir.join("missing.pem"))).unwrap();
    let out = check(&file);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("service payments: TLS: CA file"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A changed `intercept` section reaches the kernel maps of a running
/// `ambassador run` without re-attaching: the next connect is bypassed.
#[test]
fn run_applies_new_exclusions_on_reload_without_reattaching() {
    use std::io::{BufRead, BufReader};
    require_root();
    let (server, port) = greet_server();
    let dir = std::env::temp_dir().join(format!("amb-run-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, "intercept:\n  loopback: true\n").unwrap();
    let flag = dir.join("go");
    let client = format!("python3 {} greet 127.0.0.1 {port}", client_py().display());
    let script = format!(
        "{client} && while [ ! -e {f} ]; do sleep 0.05; done && {client}",
        f = flag.display()
    );
    let mut child = run_cmd(&cfg)
        .args(["sh", "-c", &script])
        .env("AMBASSADOR_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (err, keep) = (child.stderr.take().unwrap(), log.clone());
    let reader = thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let mut l = keep.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(20));
        }
    };
    wait("the first connect", &|| {
        server.accepted.load(std::sync::atomic::Ordering::Relaxed) == 1
    });
    std::fs::write(
        &cfg,
        format!("intercept:\n  loopback: true\n  exclude_ports: [{port}]\n"),
    )
    .unwrap();
    wait("the reload", &|| {
        log.lock().unwrap().contains("config reloaded")
    });
    std::fs::write(&flag, "").unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let log = log.lock().unwrap().clone();
    assert!(status.success(), "{log}");
    assert!(log.contains("redirected=1 bypassed=1"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
