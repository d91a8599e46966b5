//! `cargo xtask soak --minutes N`: mixed traffic through one proxy for a long
//! while, with trouble on a schedule, and what the proxy holds over time.
//! Not a test (CI does not run it): a report to read for leaks and errors.
//!
//! A simulated Pod, the release binary. Every round (10 s) the app runs, at
//! once: HTTP GETs on new connections to a service with two endpoints
//! (retries on), TCP echo sessions to a TCP service, and pgbench through a
//! PostgreSQL service (transaction pooling, TLS to a real server). Between
//! rounds, in turn: one HTTP endpoint is killed, then brought back; the
//! config is reloaded (a changed header value). After each round the
//! proxy's RSS and open files are read.

use std::{
    fs,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use ambassador_tests::{
    Behaviour, Pod, SERVER_V4, SERVER2_V4, hostile_py,
    postgres::{PgServer, PgTls, output_within, pg_bin},
    upstream::{CertKind, HttpUpstream, TestCa},
};
use anyhow::{Context as _, ensure};

const ROUND: u64 = 10;
const HTTP_VIP: &str = "198.18.0.50";
const TCP_VIP: &str = "198.18.0.51";
const PG_VIP: &str = "198.18.0.52";
const PG_NAME: &str = "soak-db.internal";

fn config(generation: u32, ca: &str, creds: &str) -> String {
    format!(
        r#"
proxy: {{ workers: 1 }}
telemetry: {{ access_log: false }}
services:
  - name: web
    match: {{ cidr: {HTTP_VIP}/32, port: 80 }}
    protocol: http
    upstream:
      endpoints: [{{ address: "{SERVER_V4}:8181" }}, {{ address: "{SERVER2_V4}:8181" }}]
    request: {{ set_headers: {{ x-generation: {{ value: "{generation}" }} }} }}
  - name: echo
    match: {{ cidr: {TCP_VIP}/32, port: 7000 }}
    upstream: {{ endpoints: [{{ address: "{SERVER_V4}:7000" }}] }}
  - name: db
    match: {{ cidr: {PG_VIP}/32, port: 5432 }}
    protocol: postgres
    upstream:
      endpoints: [{{ address: "{SERVER_V4}:5432" }}]
      tls: {{ server_name: {PG_NAME}, ca_file: {ca} }}
    postgres: {{ credentials_file: {creds}, pool: {{ mode: transaction, size: 4 }} }}
"#
    )
}

/// What one round saw.
struct Round {
    at_s: u64,
    action: &'static str,
    http: (u64, u64),
    tcp: (u64, u64),
    pg: (u64, u64),
    rss_kib: u64,
    fds: usize,
}

pub fn run(bin: &std::path::Path, minutes: u64) -> anyhow::Result<()> {
    crate::bench::require_root()?;
    crate::toolchain::ensure_test_tools()?;
    crate::toolchain::apt_install(&["postgresql", "postgresql-client"])?;
    crate::bench::use_binary(bin);
    let mut pod = Pod::new("");
    crate::bench::reuse_time_wait_ports(&pod)?;
    let dir = pod.shared_dir();
    let ca = TestCa::new("soak-ca");
    let ca_file = ca.write_ca_file(&dir).display().to_string();
    let (cert_pem, key_pem) = ca.issue(CertKind::Valid, PG_NAME, None);
    let pg = PgServer::start(
        &pod.servers,
        SERVER_V4,
        5432,
        PgTls::On { cert_pem, key_pem },
        "su-pass",
    );
    pg.sql("CREATE ROLE soak LOGIN PASSWORD 'soak-pass'");
    pg.sql("CREATE DATABASE soak OWNER soak");
    let creds = dir.join("credentials.yaml");
    fs::write(&creds, "soak: soak-pass\n")?;
    let creds = creds.display().to_string();
    let select = dir.join("select.sql");
    fs::write(&select, "SELECT 1;\n")?;
    fs::write(&pod.config, config(0, &ca_file, &creds))?;
    // Quiet, but for the line that says it listens.
    pod.start_proxy_logging("warn,ambassador_userspace::proxy=info");
    let pid = pod.proxy_pid().context("proxy pid")?;
    let mut first = Some(HttpUpstream::plain(pod.server_listener(SERVER_V4, 8181)));
    let _second = HttpUpstream::plain(pod.server_listener(SERVER2_V4, 8181));
    let _echo = pod.server(SERVER_V4, 7000, Behaviour::Greet);

    let rounds = (minutes * 60).div_ceil(ROUND).max(1);
    let started = Instant::now();
    let mut seen = Vec::new();
    for r in 0..rounds {
        let action = match r % 4 {
            1 => {
                first = None;
                "killed endpoint 1"
            }
            2 => {
                first = Some(HttpUpstream::plain(pod.server_listener(SERVER_V4, 8181)));
                "endpoint 1 back"
            }
            3 => {
                pod.rewrite_config(&config(r as u32, &ca_file, &creds));
                pod.hup_proxy();
                "reloaded"
            }
            _ => "",
        };
        let secs = ROUND.to_string();
        let http = spawn_app(&pod, &["rate", HTTP_VIP, "80", &secs, "50"])?;
        let tcp = spawn_app(&pod, &["echo", TCP_VIP, "7000", &secs, "50"])?;
        let mut bench = pod.app(pg_bin().join("pgbench").to_str().context("path")?);
        bench
            .args(["-n", "-c", "4", "-j", "2", "-T", &secs, "-f"])
            .arg(&select)
            .args(["-h", PG_VIP, "-U", "soak", "soak"])
            .env("PGSSLMODE", "disable")
            .env_remove("PGPASSWORD");
        let (pg_out, in_time) = output_within(&mut bench, Duration::from_secs(ROUND + 30));
        ensure!(in_time, "pgbench hung");
        let pg_text = String::from_utf8_lossy(&pg_out.stdout);
        let field = |p: &str| -> u64 {
            pg_text
                .lines()
                .find_map(|l| l.trim().strip_prefix(p))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        };
        let pg_failed = if pg_out.status.success() {
            field("number of failed transactions: ")
        } else {
            1
        };
        seen.push(Round {
            at_s: started.elapsed().as_secs(),
            action,
            http: counts(http)?,
            tcp: counts(tcp)?,
            pg: (
                field("number of transactions actually processed: "),
                pg_failed,
            ),
            rss_kib: status_kib(pid, "VmRSS:")?,
            fds: fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
        });
        let last = seen.last().expect("pushed");
        println!(
            "soak: {:>5} s  http {:>5} ({} err)  tcp {:>5} ({} err)  pg {:>6} ({} err)  RSS {:>6} KiB  fds {:>4}  {}",
            last.at_s,
            last.http.0,
            last.http.1,
            last.tcp.0,
            last.tcp.1,
            last.pg.0,
            last.pg.1,
            last.rss_kib,
            last.fds,
            last.action
        );
    }
    drop(first);
    println!("{}", report(&seen, &pod.proxy_log()));
    Ok(())
}

fn spawn_app(pod: &Pod, args: &[&str]) -> anyhow::Result<Child> {
    pod.app("python3")
        .arg(hostile_py())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("start a load generator")
}

/// `REQUESTS n ERRORS e ...` or `CONNS n ERRORS e ...`: (n, e).
fn counts(child: Child) -> anyhow::Result<(u64, u64)> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let w: Vec<&str> = text.split_whitespace().collect();
    ensure!(w.len() >= 4, "a load generator said: {text}");
    Ok((w[1].parse()?, w[3].parse()?))
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no such field")
}

fn report(seen: &[Round], log: &str) -> String {
    let sum = |f: fn(&Round) -> (u64, u64)| {
        seen.iter()
            .map(f)
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let (http, tcp, pg) = (sum(|r| r.http), sum(|r| r.tcp), sum(|r| r.pg));
    let rss: Vec<u64> = seen.iter().map(|r| r.rss_kib).collect();
    let fds: Vec<usize> = seen.iter().map(|r| r.fds).collect();
    let (first, last) = (seen.first(), seen.last());
    format!(
        "\nsoak report ({} rounds of {ROUND} s; endpoint kills, returns and reloads in turn)\n\
         HTTP requests {} (errors {}), TCP sessions {} (errors {}), PostgreSQL transactions {} (failed {})\n\
         RSS KiB: first {} last {} max {}; open files: first {} last {} max {}\n\
         proxy log lines at warn or above: {}\n",
        seen.len(),
        http.0,
        http.1,
        tcp.0,
        tcp.1,
        pg.0,
        pg.1,
        first.map_or(0, |r| r.rss_kib),
        last.map_or(0, |r| r.rss_kib),
        rss.iter().max().unwrap_or(&0),
        first.map_or(0, |r| r.fds),
        last.map_or(0, |r| r.fds),
        fds.iter().max().unwrap_or(&0),
        log.lines().count(),
    )
}
