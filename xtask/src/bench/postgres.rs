//! The PostgreSQL part of `cargo xtask bench`: pgbench select-only (`-S`) on
//! a real PostgreSQL server that requires TLS and SCRAM, three ways side by
//! side: direct (the client does TLS verify-full and SCRAM itself), through
//! the ambassador (the app in the simulated Pod, plain and password-less,
//! redirected by eBPF; transaction pooling), and through Debian's PgBouncer
//! (a sidecar in the Pod's namespace on 127.0.0.1:6432, transaction pooling,
//! server TLS verify-full). Each with persistent connections, with a new
//! connection per transaction (`-C`), and with named prepared statements
//! (`-M prepared`: the ambassador prepares them on its pooled server
//! connections; PgBouncer 1.18 cannot in transaction pooling, and its run is
//! shown failing). Ratios are to direct.

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::{PermissionsExt, chown},
    path::Path,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{
    Placement, Pod, SERVER_V4, cgroup2_mount, placed,
    postgres::{PG_UID, PgServer, PgTls, output_within, pg_bin},
    upstream::{CertKind, TestCa},
};
use anyhow::{Context as _, bail, ensure};

use super::{
    Guard, Pass, client_at,
    machine::{cpu_ticks, ticks_per_second},
    report, reuse_time_wait_ports,
};

const VIP: &str = "198.18.0.9";
const NAME: &str = "orders-db.internal";
const PASSWORD: &str = "bench-pass";
pub(super) const CLIENTS: &str = "8";
pub(super) const SECONDS: &str = "5";
/// Rounds of every (path, load) run, interleaved: the ratios are paired
/// round by round, so a slow stretch of the machine moves both sides.
pub(super) const ROUNDS: usize = 4;
const BOUNCER_PORT: u16 = 6432;

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Via {
    Direct,
    Ambassador,
    PgBouncer,
}

impl Via {
    pub(super) fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct (TLS verify-full + SCRAM)",
            Via::Ambassador => "eBPF -> ambassador (transaction pool)",
            Via::PgBouncer => "PgBouncer 1.18 (transaction pool)",
        }
    }
}

/// What pgbench sends.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Load {
    /// `-M simple`, persistent connections.
    Simple,
    /// `-M simple -C`: a new connection per transaction.
    NewConn,
    /// `-M prepared`: named statements, prepared once per connection.
    Prepared,
}

pub(super) const LOADS: [Load; 3] = [Load::Simple, Load::NewConn, Load::Prepared];

pub(super) struct Run {
    pub(super) tps: f64,
    pub(super) latency_ms: f64,
    pub(super) failed: u64,
    /// The pooler's CPU (user + system) per transaction, in microseconds
    /// (NaN for direct).
    pub(super) cpu_us: f64,
    /// How long pgbench ran.
    pub(super) seconds: f64,
}

/// Runs the section; returns its report (empty for [`Pass::Train`], which
/// runs the ambassador's pgbench runs only, for 3 s each).
pub fn run(pass: Pass) -> anyhow::Result<String> {
    crate::toolchain::apt_install(&["postgresql", "postgresql-client", "pgbouncer"])?;
    let mut pod = Pod::new("");
    // A connection per transaction for 10 s.
    reuse_time_wait_ports(&pod)?;
    let dir = pod.shared_dir();
    let ca = TestCa::new("pg-bench-ca");
    let ca_file = ca.write_ca_file(&dir);
    let server_ip = SERVER_V4.parse().ok();
    let (cert_pem, key_pem) = ca.issue(CertKind::Valid, NAME, server_ip);
    let pg = PgServer::start(
        &pod.servers,
        SERVER_V4,
        5432,
        PgTls::On { cert_pem, key_pem },
        "su-pass",
    );
    pg.sql(&format!("CREATE ROLE bench LOGIN PASSWORD '{PASSWORD}'"));
    pg.sql("CREATE DATABASE bench OWNER bench");
    let (out, in_time) = output_within(
        pg.cmd(&pod.servers, "pgbench")
            .args([
                "-i", "-s", "1", "-q", "-h", SERVER_V4, "-U", "bench", "bench",
            ])
            .env("PGPASSWORD", PASSWORD)
            .env("PGSSLMODE", "require"),
        Duration::from_secs(120),
    );
    ensure!(
        in_time && out.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let creds = dir.join("credentials.yaml");
    fs::write(&creds, format!("bench: {PASSWORD}\n"))?;
    fs::write(
        &pod.config,
        // One worker and no access log: PgBouncer is single-threaded and
        // logs no connections here either.
        format!(
            r#"
proxy: {{ workers: 1 }}
telemetry: {{ access_log: false }}
services:
  - name: orders-db
    match: {{ cidr: {VIP}/32, port: 5432 }}
    protocol: postgres
    upstream:
      endpoints: [ {{ address: "{SERVER_V4}:5432" }} ]
      tls: {{ server_name: {NAME}, ca_file: {} }}
    postgres:
      credentials_file: {}
      pool: {{ mode: transaction, size: {CLIENTS}, max_clients: 500 }}
"#,
            ca_file.display(),
            creds.display()
        ),
    )?;
    pod.start_proxy_logging("warn,ambassador_userspace::proxy=info");
    let bouncer = pgbouncer(&pod, &dir, &ca_file)?;

    let root = cgroup2_mount();
    let vias: &[Via] = match pass {
        Pass::Measure => &[Via::Direct, Via::Ambassador, Via::PgBouncer],
        Pass::Train => &[Via::Ambassador],
    };
    let rounds = if pass == Pass::Train { 1 } else { ROUNDS };
    let mut rows: Vec<Row> = Vec::new();
    for round in 0..rounds {
        for load in LOADS {
            if pass == Pass::Train && load == Load::Prepared {
                continue;
            }
            for i in 0..vias.len() {
                let via = vias[(i + round) % vias.len()];
                let pids: Vec<u32> = match via {
                    Via::Direct => Vec::new(),
                    Via::Ambassador => pod.proxy_pid().into_iter().collect(),
                    Via::PgBouncer => vec![bouncer.0.id()],
                };
                let before = cpu_ticks(&pids);
                let r = pgbench(&pod, &root, &ca_file, via, load, pass).map(|mut run| {
                    if let (Some(b), Some(a)) = (before, cpu_ticks(&pids)) {
                        let secs = (a.0 + a.1 - b.0 - b.1) as f64 / ticks_per_second();
                        run.cpu_us = secs * 1e6 / (run.tps * run.seconds);
                    }
                    run
                });
                let r = match (r, via, load) {
                    // What PgBouncer 1.18 does with named statements in
                    // transaction pooling: shown, not hidden.
                    (Err(e), Via::PgBouncer, Load::Prepared) => Err(first_error(&format!("{e:#}"))),
                    (r, _, _) => Ok(r.with_context(|| {
                        let log = fs::read_to_string(dir.join("pgbouncer/pgbouncer.log"))
                            .unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(5).collect();
                        format!("pgbench {} (PgBouncer's last words: {tail:?})", via.name())
                    })?),
                };
                record(&mut rows, via, load, r);
            }
        }
        eprintln!("xtask: bench postgres round {}/{rounds} done", round + 1);
    }
    drop(bouncer);
    if pass == Pass::Train {
        pod.terminate_proxy();
        return Ok(String::new());
    }
    drop(pg);
    drop(pod);

    Ok(report::postgres_table(&rows))
}

/// One (path, load)'s runs, round by round; an error once is its result.
pub(super) type Row = (Via, Load, Result<Vec<Run>, String>);

fn record(rows: &mut Vec<Row>, via: Via, load: Load, r: Result<Run, String>) {
    let i = match rows.iter().position(|(v, l, _)| *v == via && *l == load) {
        Some(i) => i,
        None => {
            rows.push((via, load, Ok(Vec::new())));
            rows.len() - 1
        }
    };
    match (&mut rows[i].2, r) {
        (Ok(runs), Ok(run)) => runs.push(run),
        (slot @ Ok(_), Err(e)) => *slot = Err(e),
        (Err(_), _) => {}
    }
}

impl Load {
    pub(super) fn flags(self) -> &'static str {
        match self {
            Load::Simple => "-M simple",
            Load::NewConn => "-M simple -C",
            Load::Prepared => "-M prepared",
        }
    }
}

/// pgbench's first error line, for a run that could not be done.
fn first_error(text: &str) -> String {
    text.lines()
        .find(|l| l.contains("ERROR") || l.contains("error"))
        .unwrap_or(text)
        .trim()
        .chars()
        .take(120)
        .collect()
}

/// One pgbench run; the client is in the app container for the ambassador
/// (its connects are redirected), in the Pod's namespace otherwise.
fn pgbench(
    pod: &Pod,
    root: &Path,
    ca_file: &Path,
    via: Via,
    load: Load,
    pass: Pass,
) -> anyhow::Result<Run> {
    let seconds = match pass {
        Pass::Measure => SECONDS,
        Pass::Train => "3",
    };
    let at = client_at(pod, root, via == Via::Ambassador);
    let mut cmd = placed(pg_bin().join("pgbench"), &at);
    match (pass, load) {
        (Pass::Measure, Load::Prepared) => cmd.args(["-S", "-M", "prepared"]),
        (Pass::Measure, _) => cmd.args(["-S", "-M", "simple"]),
        // Other traffic than the measured run's through the same pool:
        // read-write transactions over the extended protocol.
        (Pass::Train, _) => cmd.args(["-b", "tpcb-like", "-M", "extended"]),
    };
    cmd.args(["-n", "-c", CLIENTS, "-j", "2", "-T", seconds]);
    if load == Load::NewConn {
        cmd.arg("-C");
    }
    let (host, port) = match via {
        Via::Direct => (SERVER_V4.to_string(), 5432),
        Via::Ambassador => (VIP.to_string(), 5432),
        Via::PgBouncer => ("127.0.0.1".to_string(), BOUNCER_PORT),
    };
    cmd.args(["-h", &host, "-p", &port.to_string(), "-U", "bench", "bench"])
        .env_remove("PGPASSWORD")
        .env("PGSSLMODE", "disable");
    if via == Via::Direct {
        cmd.env("PGPASSWORD", PASSWORD)
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", ca_file);
    }
    let (out, in_time) = output_within(&mut cmd, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(in_time, "pgbench did not finish within 60 s: {text}");
    ensure!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Ok(Run {
        tps: field("tps = ").context("no tps in pgbench output")?,
        latency_ms: field("latency average = ").unwrap_or(0.0),
        failed: field("number of failed transactions: ").unwrap_or(0.0) as u64,
        cpu_us: f64::NAN,
        seconds: seconds.parse().unwrap_or(1.0),
    })
}

/// PgBouncer as a sidecar: in the Pod's namespace, outside the Pod's cgroup
/// (so its own connects go straight out), as `nobody` (it refuses root).
fn pgbouncer(pod: &Pod, dir: &Path, ca_file: &Path) -> anyhow::Result<Guard> {
    let bdir = dir.join("pgbouncer");
    fs::create_dir_all(&bdir)?;
    chown(&bdir, Some(PG_UID), Some(PG_UID))?;
    let users = bdir.join("userlist.txt");
    fs::write(&users, "\"bench\" \"\"\n")?;
    let ini = bdir.join("pgbouncer.ini");
    fs::write(
        &ini,
        format!(
            "[databases]\n\
             bench = host={SERVER_V4} port=5432 dbname=bench user=bench password={PASSWORD}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {BOUNCER_PORT}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {}\n\
             pool_mode = transaction\ndefault_pool_size = {CLIENTS}\nmax_client_conn = 500\n\
             server_tls_sslmode = verify-full\nserver_tls_ca_file = {}\n\
             logfile = {}\nignore_startup_parameters = extra_float_digits\n\
             log_connections = 0\nlog_disconnections = 0\n",
            users.display(),
            ca_file.display(),
            bdir.join("pgbouncer.log").display()
        ),
    )?;
    for f in [&users, &ini] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o644))?;
    }
    let root = cgroup2_mount();
    let child = placed(
        "pgbouncer",
        &Placement {
            netns: &pod.netns,
            cgroup: &root,
            uid: Some(PG_UID),
        },
    )
    .arg(&ini)
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .context("cannot start pgbouncer")?;
    let mut guard = Guard(child);
    let addr: SocketAddr = format!("127.0.0.1:{BOUNCER_PORT}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pod.netns.enter(move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    }) {
        if let Some(status) = guard.0.try_wait()? {
            bail!(
                "pgbouncer did not start ({status}): {}",
                fs::read_to_string(bdir.join("pgbouncer.log")).unwrap_or_default()
            );
        }
        ensure!(Instant::now() < deadline, "pgbouncer did not listen");
        thread::sleep(Duration::from_millis(50));
    }
    Ok(guard)
}
