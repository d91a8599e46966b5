//! The database ambassador against real PostgreSQL (Debian's, run as
//! `nobody` in the Pod's servers namespace) with unmodified `psql` and a
//! python driver (psycopg 3) in the app container. The app connects to
//! 198.18.0.9:5432 (nothing listens there: the Pod's redirect takes it) in
//! plain TCP with no password.

use std::{
    io::{Read, Write},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{
    Pod, SERVER_V4, SERVER2_V4,
    postgres::{
        DirectTlsFront, PgServer, PgTls, output_within, rotate, wait_within, write_readable,
    },
    stderr, stdout,
    upstream::{CertKind, TestCa},
    workspace,
};

const VIP: &str = "198.18.0.9";
const SESSION_VIP: &str = "198.18.0.8";
const SERVER_NAME: &str = "orders-db.internal";

fn dsn(vip: &str, user: &str) -> String {
    format!("host={vip} port=5432 user={user} dbname=orders connect_timeout=10")
}

/// Unmodified psql in the app container: default sslmode (prefer), no
/// password; `-c SQL`, unaligned tuples only.
fn psql_cmd(pod: &Pod, vip: &str, user: &str, sql: &str) -> Command {
    let mut cmd = pod.app("psql");
    cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .arg(dsn(vip, user))
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE");
    cmd
}

fn psql(pod: &Pod, user: &str, sql: &str) -> Output {
    psql_env(pod, VIP, user, sql, &[])
}

fn psql_env(pod: &Pod, vip: &str, user: &str, sql: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = psql_cmd(pod, vip, user, sql);
    cmd.envs(env.iter().copied());
    finished(&mut cmd, "psql", 30)
}

/// An app-side command's output, which must come within `secs`.
fn finished(cmd: &mut Command, what: &str, secs: u64) -> Output {
    let (out, in_time) = output_within(cmd, Duration::from_secs(secs));
    assert!(in_time, "{what} hung: {}", stderr(&out));
    out
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "expected success: {}{}",
        stdout(out),
        stderr(out)
    );
    stdout(out).trim().to_string()
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got {}",
        stdout(out)
    );
    stderr(out)
}

/// The python app (psycopg 3 from Debian, so Debian's python).
fn py(pod: &Pod, args: &[&str]) -> Output {
    let mut cmd = pod.app("/usr/bin/python3");
    cmd.arg(workspace().join("tests/clients/pg_client.py"))
        .args(args);
    finished(&mut cmd, "python client", 30)
}

/// A postgres service on `vip` to `endpoints` with verified TLS.
fn service(
    name: &str,
    vip: &str,
    endpoints: &[&str],
    ca: &str,
    creds: &str,
    extra: &str,
    pool: &str,
) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| format!("        - {{ address: {e}, priority: 0 }}\n"))
        .collect();
    format!(
        "  - name: {name}\n    match: {{ cidr: {vip}/32, port: 5432 }}\n    protocol: postgres\n    \
         upstream:\n      endpoints:\n{}      tls: {{ server_name: {SERVER_NAME}, ca_file: {ca} }}\n{extra}    \
         postgres:\n      credentials_file: {creds}\n      pool: {pool}\n",
        eps.concat()
    )
}

struct Setup {
    pod: Pod,
    ca: TestCa,
    creds: std::path::PathBuf,
    ca_file: std::path::PathBuf,
}

fn setup(credentials: &str) -> Setup {
    let pod = Pod::new("");
    let ca = TestCa::new("pg-test-ca");
    let dir = pod.shared_dir();
    let ca_file = ca.write_ca_file(&dir);
    let creds = write_readable(&dir, "credentials.yaml", credentials);
    Setup {
        pod,
        ca,
        creds,
        ca_file,
    }
}

/// The usual arrangement: the `app` user's credentials, and one TLS server
/// with an `orders` database that user may log in to.
fn orders_app() -> (Setup, PgServer) {
    let s = setup("app: app-pass\n");
    let pg = PgServer::start(&s.pod.servers, SERVER_V4, 5432, s.server_tls(), "su-pass");
    pg.sql("CREATE DATABASE orders");
    pg.sql("CREATE ROLE app LOGIN PASSWORD 'app-pass'");
    (s, pg)
}

impl Setup {
    /// A postgres service on VIP to the one server, with verified TLS.
    fn orders_service(&self, name: &str, pool: &str) -> String {
        let (ca, creds) = self.paths();
        service(name, VIP, &["198.18.0.2:5432"], &ca, &creds, "", pool)
    }

    /// The CA file and the credentials file, as config values.
    fn paths(&self) -> (String, String) {
        (
            self.ca_file.display().to_string(),
            self.creds.display().to_string(),
        )
    }

    fn start(&mut self, services: &[String]) {
        std::fs::write(
            &self.pod.config,
            format!("services:\n{}", services.concat()),
        )
        .expect("write config");
        self.pod.start_proxy();
    }

    fn server_tls(&self) -> PgTls {
        let (cert_pem, key_pem) = self.ca.issue(CertKind::Valid, SERVER_NAME, None);
        PgTls::On { cert_pem, key_pem }
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn verify_full_refuses_wrong_name_unknown_ca_and_plaintext_servers() {
    let mut s = setup("app: app-pass-1\n");
    let (cert_pem, key_pem) = s.ca.issue(CertKind::WrongName, SERVER_NAME, None);
    let pg = PgServer::start(
        &s.pod.servers,
        SERVER_V4,
        5432,
        PgTls::On { cert_pem, key_pem },
        "su-pass",
    );
    pg.sql("CREATE DATABASE orders");
    pg.sql("CREATE ROLE app LOGIN PASSWORD 'app-pass-1'");
    // A raw server that declines TLS and records every byte it is sent.
    let raw = s.pod.server_listener(SERVER2_V4, 5432);
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for _ in 0..1 {
            let (mut c, _) = raw.accept().expect("accept");
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut req = [0u8; 8];
            c.read_exact(&mut req).expect("SSLRequest");
            c.write_all(b"N").unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
            tx.send((req, rest)).unwrap();
        }
    });
    let (ca, creds) = s.paths();
    s.start(&[
        s.orders_service("orders-db", "{ mode: transaction }"),
        service(
            "plain-db",
            SESSION_VIP,
            &["198.18.0.3:5432"],
            &ca,
            &creds,
            "",
            "{ mode: session }",
        ),
    ]);

    let e = failed(&psql(&s.pod, "app", "select 1"));
    assert!(
        e.contains("FATAL:  ambassador: TLS with server 198.18.0.2:5432 failed: certificate not valid for the server name"),
        "{e}"
    );

    let other = TestCa::new("someone-else");
    let (cert, key) = other.issue(CertKind::Valid, SERVER_NAME, None);
    pg.set_certificate(&cert, &key);
    pg.reload();
    let e = failed(&psql(&s.pod, "app", "select 1"));
    assert!(e.contains("unknown certificate authority"), "{e}");

    pg.disable_tls();
    pg.reload();
    let e = failed(&psql(&s.pod, "app", "select 1"));
    assert!(
        e.contains(
            "server 198.18.0.2:5432 does not support TLS: refusing to continue in plaintext"
        ),
        "{e}"
    );
    // The server saw connections but never a startup message: no user name,
    // no authentication, in any of the three.
    let log = pg.log();
    assert_eq!(
        count(&log, "connection received: host=198.18.0.1"),
        3,
        "{log}"
    );
    assert!(!log.contains("connection authorized: user=app"), "{log}");
    assert!(
        !log.contains("user=app") && !log.contains("\"app\""),
        "{log}"
    );

    // Byte for byte: after the declined SSLRequest nothing else was sent.
    let e = failed(&psql_env(&s.pod, SESSION_VIP, "app", "select 1", &[]));
    assert!(e.contains("does not support TLS"), "{e}");
    let (req, rest) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("raw server");
    assert_eq!(req, [0, 0, 0, 8, 4, 210, 22, 47], "an SSLRequest");
    assert!(rest.is_empty(), "sent in plaintext after N: {rest:?}");
}

#[test]
fn scram_md5_and_cleartext_offload_rotation_and_unlisted_users() {
    let mut s = setup("app: app-pass-1\nmd5user: md5-pass\nclearuser: clear-pass\n");
    let pg = PgServer::start(&s.pod.servers, SERVER_V4, 5432, s.server_tls(), "su-pass");
    pg.sql("CREATE DATABASE orders");
    pg.sql("CREATE ROLE app LOGIN PASSWORD 'app-pass-1'");
    pg.sql("SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5-pass'");
    pg.sql("CREATE ROLE clearuser LOGIN PASSWORD 'clear-pass'");
    s.start(&[s.orders_service("orders-db", "{ mode: session, size: 4 }")]);
    let who = "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()";
    assert_eq!(ok(&psql(&s.pod, "app", who)), "app|t");
    assert_eq!(ok(&psql(&s.pod, "md5user", who)), "md5user|t");
    assert_eq!(ok(&psql(&s.pod, "clearuser", who)), "clearuser|t");
    let log = pg.log();
    for method in ["method=scram-sha-256", "method=md5", "method=password"] {
        assert!(
            log.contains(method),
            "{method} not in the server log:\n{log}"
        );
    }
    // A python driver, as unmodified.
    let out = py(&s.pod, &["query", &dsn(VIP, "app"), "select 40 + 2"]);
    assert_eq!(ok(&out), "42");

    // Not listed: refused with an ErrorResponse psql shows.
    let e = failed(&psql(&s.pod, "mallory", "select 1"));
    assert!(
        e.contains("FATAL:  ambassador: user \"mallory\" is not allowed through the ambassador for service orders-db"),
        "{e}"
    );

    // The password changes on the server: new server logins (a new pool:
    // another application_name) fail with the server's reason until the
    // file is rotated, then succeed.
    pg.sql("ALTER ROLE app PASSWORD 'app-pass-2'");
    let e = failed(&psql_env(
        &s.pod,
        VIP,
        "app",
        "select 1",
        &[("PGAPPNAME", "before")],
    ));
    assert!(
        e.contains("password authentication failed for user \"app\""),
        "{e}"
    );
    rotate(&s.creds, "app: app-pass-2\n");
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        ok(&psql_env(
            &s.pod,
            VIP,
            "app",
            "select current_setting('application_name')",
            &[("PGAPPNAME", "after")]
        )),
        "after"
    );
    assert!(s.pod.wait_log("credentials file changed: reloaded"));
    let plog = s.pod.proxy_log();
    for secret in [
        "app-pass-1",
        "app-pass-2",
        "md5-pass",
        "clear-pass",
        "su-pass",
    ] {
        assert!(!plog.contains(secret), "{secret} in the proxy log");
    }
}

#[test]
fn pooling_reuses_server_connections_and_exhaustion_is_a_clear_error() {
    let (mut s, pg) = orders_app();
    s.start(&[s.orders_service(
        "orders-db",
        "{ mode: transaction, size: 1, queue_timeout: 1s }",
    )]);
    let mut pids = Vec::new();
    for _ in 0..5 {
        pids.push(ok(&psql(&s.pod, "app", "select pg_backend_pid()")));
    }
    pids.dedup();
    assert_eq!(
        pids.len(),
        1,
        "five sessions, one server connection: {pids:?}"
    );
    assert_eq!(count(&pg.log(), "connection authorized: user=app"), 1);

    // One transaction holds the only server connection; another app waits
    // queue_timeout and is told why.
    let holder = psql_cmd(&s.pod, VIP, "app", "select pg_sleep(3)")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    thread::sleep(Duration::from_millis(700));
    let started = Instant::now();
    let e = failed(&psql(&s.pod, "app", "select 1"));
    let waited = started.elapsed();
    assert!(
        e.contains("FATAL:  ambassador: service orders-db: no server connection free for app@orders within 1s (postgres.pool.size 1)"),
        "{e}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    let (out, in_time) = wait_within(holder, Duration::from_secs(10));
    assert!(in_time);
    ok(&out);
    // Free again.
    assert_eq!(ok(&psql(&s.pod, "app", "select 1")), "1");

    // What operators see: the pool in /metrics, /status and the access log.
    let m = s.pod.metrics();
    let get = |series: &str| {
        m.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {series} in\n{m}"))
    };
    assert_eq!(
        get(r#"ambassador_pg_pool_server_connections{service="orders-db"}"#),
        1.0
    );
    assert_eq!(
        get(r#"ambassador_pg_server_connections_opened_total{service="orders-db"}"#),
        1.0
    );
    assert_eq!(
        get(r#"ambassador_pg_pool_exhausted_total{service="orders-db"}"#),
        1.0
    );
    // The wait: most checkouts found the connection free; the refused one
    // waited its 1 s queue timeout.
    let waits = get(r#"ambassador_pg_pool_wait_seconds_count{service="orders-db"}"#);
    let waited_s = get(r#"ambassador_pg_pool_wait_seconds_sum{service="orders-db"}"#);
    assert!(waits >= 7.0, "{waits} checkouts");
    assert!((0.9..3.0).contains(&waited_s), "{waited_s} s waited");
    assert_eq!(
        get(r#"ambassador_connections_total{service="orders-db",direction="outbound"}"#),
        8.0
    );
    let (status, body) = s.pod.admin("GET", "/status", "");
    assert_eq!(status, 200);
    assert!(body.contains("\"pool\": \"app@orders\""), "{body}");
    let line = s
        .pod
        .wait_access_log("\"service\":\"orders-db\"")
        .expect("an access-log line per session");
    assert!(line.contains("\"kind\":\"tcp\""), "{line}");
    assert!(!line.contains("app-pass"), "{line}");
}

#[test]
fn cancel_goes_through_the_ambassador() {
    let (mut s, pg) = orders_app();
    s.start(&[s.orders_service("orders-db", "{ mode: transaction }")]);
    let sleeper = psql_cmd(&s.pod, VIP, "app", "select pg_sleep(30)")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg.sql("select count(*) from pg_stat_activity where query = 'select pg_sleep(30)'") != "1"
    {
        assert!(Instant::now() < deadline, "the query never started");
        thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    // Ctrl-C: psql sends a CancelRequest to where it connected (by its PID).
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(sleeper.id() as i32, libc::SIGINT) };
    let (out, in_time) = wait_within(sleeper, Duration::from_secs(10));
    assert!(in_time, "cancel did not end the query");
    assert!(started.elapsed() < Duration::from_secs(5));
    let e = failed(&out);
    assert!(e.contains("canceling statement due to user request"), "{e}");
    assert!(s.pod.wait_log("cancel request passed on"));
}

/// The driver workloads of tests/clients/pg_drivers.py (asyncpg, psycopg 3).
fn drivers(pod: &Pod, args: &[&str]) -> Output {
    let mut cmd = pod.app("/usr/bin/python3");
    cmd.arg(workspace().join("tests/clients/pg_drivers.py"))
        .args(args);
    finished(&mut cmd, "driver workload", 120)
}

/// One sample of a counter in the proxy's /metrics.
fn metric(pod: &Pod, line_start: &str) -> u64 {
    let (_, text) = pod.admin("GET", "/metrics", "");
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn drivers_that_prepare_statements_share_few_server_connections_in_transaction_mode() {
    let (mut s, pg) = orders_app();
    pg.sql("ALTER DATABASE orders OWNER TO app");
    let (ca, creds) = s.paths();
    let small = "198.18.0.7";
    s.start(&[
        s.orders_service("tx", "{ mode: transaction, size: 2 }"),
        service(
            "small",
            small,
            &["198.18.0.2:5432"],
            &ca,
            &creds,
            "",
            "{ mode: transaction, size: 1, max_prepared_statements: 2 }",
        ),
        service(
            "session",
            SESSION_VIP,
            &["198.18.0.2:5432"],
            &ca,
            &creds,
            "",
            "{ mode: session }",
        ),
    ]);
    // asyncpg prepares everything (its statement cache, prepare(),
    // executemany in a transaction): 20 connections over 2 servers.
    assert_eq!(
        ok(&drivers(&s.pod, &["asyncpg", VIP, "20", "20"])),
        "ok 1200"
    );
    let app_servers = || {
        pg.sql("select count(*) from pg_stat_activity where usename = 'app'")
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    assert!(app_servers() <= 2, "{}", app_servers());
    // psycopg 3 with its default prepare_threshold and a cache of two: it
    // sends DEALLOCATE by name as it rotates, DEALLOCATE ALL after a rollback.
    assert_eq!(ok(&drivers(&s.pod, &["psycopg", VIP, "8", "20"])), "ok 480");
    // A pool per user, database and startup parameters: psycopg's differ
    // from asyncpg's.
    assert!(app_servers() <= 4, "{}", app_servers());
    let prepared = metric(
        &s.pod,
        r#"ambassador_pg_prepared_statements_total{service="tx",event="prepared"} "#,
    );
    let reused = metric(
        &s.pod,
        r#"ambassador_pg_prepared_statements_total{service="tx",event="reused"} "#,
    );
    // Prepared once per server connection and statement, reused after.
    assert!(
        prepared > 0 && reused > 10 * prepared,
        "{prepared} prepared, {reused} reused"
    );
    let (_, text) = s.pod.admin("GET", "/metrics", "");
    let cached = text
        .lines()
        .find(|l| {
            l.starts_with("ambassador_pg_prepared_statements_cached")
                && l.contains(r#"service="tx""#)
        })
        .unwrap_or_else(|| panic!("no cached-statements gauge: {text}"));
    let cached: u64 = cached.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        cached > 0 && cached <= prepared,
        "{cached} cached, {prepared} prepared"
    );

    // Five statements through a connection that keeps two: closed and
    // prepared again as they come back, unseen by the app.
    assert_eq!(
        ok(&drivers(&s.pod, &["distinct", small, "5", "4"])),
        "ok 20"
    );
    let evicted = metric(
        &s.pod,
        r#"ambassador_pg_prepared_statements_total{service="small",event="evicted"} "#,
    );
    assert!(evicted >= 15, "{evicted}");
    eprintln!(
        "prepared statements: {prepared} prepared, {reused} reused (tx), {evicted} evicted (small)"
    );

    // SQL-level PREPARE would be bound to one server connection: refused.
    let e = failed(&drivers(&s.pod, &["sql-prepare", VIP]));
    assert!(
        e.contains("SQL PREPARE is not supported in transaction pooling"),
        "{e}"
    );
    // Unnamed statements pass as they are.
    assert_eq!(
        ok(&py(&s.pod, &["query", &dsn(VIP, "app"), "select 1 + 1"])),
        "2"
    );
    // Session mode passes named statements straight through; a session
    // reused after DISCARD ALL prepares the same names again.
    for _ in 0..2 {
        assert_eq!(
            ok(&py(&s.pod, &["prepared", &dsn(SESSION_VIP, "app"), "3"])),
            "2 3 4"
        );
    }
}

/// pgx's load (tests/clients/pgx_load), built from source against Debian's
/// pgx v4 (GOPATH mode: nothing is downloaded).
fn pgx_load() -> std::path::PathBuf {
    let out = workspace().join("target/clients/pgx_load");
    let build = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(workspace().join("tests/clients/pgx_load/main.go"))
        .env("GOPATH", "/usr/share/gocode")
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOCACHE", workspace().join("target/clients/go-cache"))
        .output()
        .expect("go (golang-go, installed by cargo xtask test)");
    assert!(build.status.success(), "go build: {}", stderr(&build));
    out
}

#[test]
fn jdbc_and_pgx_with_their_defaults_work_in_transaction_pooling() {
    let (mut s, pg) = orders_app();
    s.start(&[s.orders_service("tx", "{ mode: transaction, size: 2 }")]);
    // pgx v4 prepares every query (its statement cache): 10 connections.
    let pgx = pgx_load();
    let mut cmd = s.pod.app(pgx.to_str().unwrap());
    cmd.args([VIP, "10", "30"]);
    assert_eq!(ok(&finished(&mut cmd, "pgx", 120)), "ok 600");
    // JDBC: server-side statements from the fifth execution on (prepareThreshold 5).
    let mut cmd = s.pod.app("java");
    cmd.arg("-cp")
        .arg("/usr/share/java/postgresql.jar")
        .arg(workspace().join("tests/clients/PgJdbc.java"))
        .args([VIP, "6", "20"]);
    assert_eq!(ok(&finished(&mut cmd, "java", 120)), "ok 240");
    let servers = pg.sql("select count(*) from pg_stat_activity where usename = 'app'");
    // One pool per startup parameters: pgx's and JDBC's differ.
    assert!(servers.trim().parse::<u32>().unwrap() <= 4, "{servers}");
    let reused = metric(
        &s.pod,
        r#"ambassador_pg_prepared_statements_total{service="tx",event="reused"} "#,
    );
    assert!(reused > 300, "{reused}");
}

/// A primary with the `orders` database and a streaming replica of it.
fn primary_and_replica(s: &Setup) -> (PgServer, PgServer) {
    let primary = PgServer::start(&s.pod.servers, SERVER_V4, 5432, s.server_tls(), "su-pass");
    primary.sql("CREATE ROLE app LOGIN PASSWORD 'app-pass'");
    primary.sql("CREATE DATABASE orders OWNER app");
    primary.sql("CREATE ROLE replicator REPLICATION LOGIN PASSWORD 'rep-pass'");
    let replica = PgServer::replica_of(&primary, &s.pod.servers, SERVER2_V4, 5432, "rep-pass");
    let deadline = Instant::now() + Duration::from_secs(20);
    while primary.sql("select count(*) from pg_stat_replication where state = 'streaming'") != "1" {
        assert!(Instant::now() < deadline, "replica is not streaming");
        thread::sleep(Duration::from_millis(100));
    }
    (primary, replica)
}

#[test]
fn failover_to_a_promoted_replica() {
    let mut s = setup("app: app-pass\n");
    let (primary, replica) = primary_and_replica(&s);
    assert_eq!(replica.sql("select pg_is_in_recovery()"), "t");
    let (ca, creds) = s.paths();
    s.start(&[service(
        "orders-db",
        VIP,
        &["198.18.0.2:5432", "198.18.0.3:5432"],
        &ca,
        &creds,
        "      target: read-write\n",
        "{ mode: transaction, size: 4 }",
    )]);
    let q = "select host(inet_server_addr()), pg_is_in_recovery()";
    for _ in 0..4 {
        assert_eq!(ok(&psql(&s.pod, "app", q)), "198.18.0.2|f");
    }
    // A session in the middle of a query on the primary.
    let victim = psql_cmd(&s.pod, VIP, "app", "select pg_sleep(30)")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    let deadline = Instant::now() + Duration::from_secs(10);
    while primary.sql("select count(*) from pg_stat_activity where query = 'select pg_sleep(30)'")
        != "1"
    {
        assert!(Instant::now() < deadline, "the query never started");
        thread::sleep(Duration::from_millis(50));
    }
    let mut primary = primary;
    primary.kill();
    let killed = Instant::now();
    let (out, in_time) = wait_within(victim, Duration::from_secs(10));
    assert!(in_time, "the session on the dead server hung");
    let e = failed(&out);
    assert!(
        e.contains("server connection to 198.18.0.2:5432 lost")
            || e.contains("terminating connection"),
        "{e}"
    );
    eprintln!(
        "session on the dead server got its error after {:?}",
        killed.elapsed()
    );
    // Before the promotion there is no read-write server: said so at once.
    let e = failed(&psql(&s.pod, "app", q));
    assert!(
        e.contains("no endpoint is a reachable read-write server"),
        "{e}"
    );

    replica.promote();
    let promoted = Instant::now();
    let result = loop {
        let out = psql(&s.pod, "app", q);
        if out.status.success() {
            break stdout(&out).trim().to_string();
        }
        assert!(
            promoted.elapsed() < Duration::from_secs(5),
            "no session on the promoted server: {}",
            stderr(&out)
        );
        thread::sleep(Duration::from_millis(100));
    };
    let took = promoted.elapsed();
    eprintln!("first session on the promoted server {took:?} after promotion");
    assert_eq!(result, "198.18.0.3|f");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // A python driver writes there too.
    let out = py(
        &s.pod,
        &[
            "query",
            &dsn(VIP, "app"),
            "create table t (x int); insert into t values (7); select host(inet_server_addr()), x from t",
        ],
    );
    assert_eq!(ok(&out), "198.18.0.3|7");
}

#[test]
fn a_reader_service_sends_sessions_to_the_replica_and_falls_back_to_the_primary() {
    let mut s = setup("app: app-pass\n");
    let (_primary, mut replica) = primary_and_replica(&s);
    let (ca, creds) = s.paths();
    let reader = "198.18.0.6";
    let both = ["198.18.0.2:5432", "198.18.0.3:5432"];
    s.start(&[
        service(
            "writer",
            VIP,
            &both,
            &ca,
            &creds,
            "      target: read-write\n",
            "{ mode: transaction, size: 2 }",
        ),
        service(
            "reader",
            reader,
            &both,
            &ca,
            &creds,
            "      target: prefer-standby\n",
            "{ mode: transaction, size: 2 }",
        ),
    ]);
    let q = "select host(inet_server_addr()), pg_is_in_recovery()";
    for _ in 0..3 {
        assert_eq!(ok(&psql(&s.pod, "app", q)), "198.18.0.2|f");
        assert_eq!(ok(&psql_env(&s.pod, reader, "app", q, &[])), "198.18.0.3|t");
    }
    // The reader's sessions are on the replica: writes are refused there.
    let e = failed(&psql_env(
        &s.pod,
        reader,
        "app",
        "create table t (i int)",
        &[],
    ));
    assert!(e.contains("read-only transaction"), "{e}");
    // With the replica gone, readers go to the primary (prefer-standby).
    replica.kill();
    let since = Instant::now();
    loop {
        let out = psql_env(&s.pod, reader, "app", q, &[]);
        if out.status.success() && stdout(&out).trim() == "198.18.0.2|f" {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "readers never moved to the primary: {}{}",
            stdout(&out),
            stderr(&out)
        );
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "readers on the primary {:?} after the replica died",
        since.elapsed()
    );
}

#[test]
fn direct_tls_with_alpn_postgresql() {
    let mut s = setup("app: app-pass\n");
    let pg = PgServer::start(&s.pod.servers, SERVER_V4, 5432, PgTls::Off, "su-pass");
    pg.sql("CREATE DATABASE orders");
    pg.sql("CREATE ROLE app LOGIN PASSWORD 'app-pass'");
    let (cert, key) = s.ca.issue(CertKind::Valid, SERVER_NAME, None);
    let backend = format!("{SERVER_V4}:5432").parse().unwrap();
    let front = DirectTlsFront::start(
        &s.pod.servers,
        format!("{SERVER2_V4}:5432").parse().unwrap(),
        backend,
        &cert,
        &key,
        &["postgresql"],
    );
    // A TLS server that does not speak ALPN `postgresql` (a pre-17 server's
    // TLS port, say): direct TLS must not go on.
    let no_alpn = DirectTlsFront::start(
        &s.pod.servers,
        format!("{SERVER2_V4}:5433").parse().unwrap(),
        backend,
        &cert,
        &key,
        &[],
    );
    let (ca, creds) = s.paths();
    let direct = "    postgres:\n      direct_tls: true\n";
    let with_direct = |name: &str, vip: &str, ep: &str| {
        service(name, vip, &[ep], &ca, &creds, "", "{ mode: session }")
            .replace("    postgres:\n", direct)
    };
    s.start(&[
        with_direct("pg17", VIP, "198.18.0.3:5432"),
        with_direct("no-alpn", SESSION_VIP, "198.18.0.3:5433"),
    ]);
    assert_eq!(ok(&psql(&s.pod, "app", "select current_user")), "app");
    let ev = front.events();
    assert_eq!(ev[0], "alpn=postgresql", "{ev:?}");
    // The startup message (protocol 3.0) came first: no SSLRequest round trip.
    assert_eq!(ev[1], "first packet code 196608", "{ev:?}");

    let e = failed(&psql_env(&s.pod, SESSION_VIP, "app", "select 1", &[]));
    assert!(e.contains("did not agree to ALPN `postgresql`"), "{e}");
    assert_eq!(no_alpn.events(), ["alpn=none", "closed before a packet"]);
}

/// Apps that insist on TLS (`sslmode=require`, `verify-full`): with
/// `app_tls` the ambassador answers their SSLRequest and ends their TLS with
/// the Pod-local certificate; without it they are told no, and `check` says
/// what that means.
#[test]
fn apps_asking_for_tls_get_it_with_app_tls_and_a_clear_no_without() {
    let (mut s, _pg) = orders_app();
    let dir = s.pod.shared_dir();
    let ip = VIP.parse().ok();
    let (cert, key) = s.ca.issue(CertKind::Valid, "orders-db.pod.local", ip);
    let cert_file = write_readable(&dir, "app-cert.pem", &cert);
    let key_file = write_readable(&dir, "app-key.pem", &key);
    let app_tls = format!(
        "    postgres:\n      app_tls: {{ cert: {}, key: {} }}\n",
        cert_file.display(),
        key_file.display()
    );
    let with_tls = s
        .orders_service("orders", "{ mode: transaction }")
        .replace("    postgres:\n", &app_tls);
    let (ca, creds) = s.paths();
    let plain = service(
        "plain",
        SESSION_VIP,
        &["198.18.0.2:5432"],
        &ca,
        &creds,
        "",
        "{ mode: session }",
    );
    s.start(&[with_tls, plain]);

    // verify-full: the app checks the ambassador's certificate against its CA.
    let ca_path = s.ca_file.display().to_string();
    let strict = [
        ("PGSSLMODE", "verify-full"),
        ("PGSSLROOTCERT", ca_path.as_str()),
    ];
    let out = psql_env(&s.pod, VIP, "app", "select current_user", &strict);
    assert_eq!(ok(&out), "app");
    let info = ok(&psql_env(
        &s.pod,
        VIP,
        "app",
        "\\conninfo",
        &[("PGSSLMODE", "require")],
    ));
    assert!(info.contains("SSL connection (protocol: TLSv1.3"), "{info}");
    // sslmode=prefer (psql's default) takes TLS now too.
    let info = ok(&psql_env(&s.pod, VIP, "app", "\\conninfo", &[]));
    assert!(info.contains("SSL connection"), "{info}");

    // Without app_tls: require fails with the server's "no", prefer goes on.
    let e = failed(&psql_env(
        &s.pod,
        SESSION_VIP,
        "app",
        "select 1",
        &[("PGSSLMODE", "require")],
    ));
    assert!(e.contains("server does not support SSL"), "{e}");
    assert_eq!(
        ok(&psql_env(&s.pod, SESSION_VIP, "app", "select 1", &[])),
        "1"
    );

    let out = Command::new(ambassador_tests::bin())
        .arg("check")
        .arg(&s.pod.config)
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(text.contains("app side: TLS when the app asks"), "{text}");
    assert!(
        text.contains("sslmode=require fails: set postgres.app_tls"),
        "{text}"
    );
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

#[test]
fn a_huge_message_streams_through_and_is_never_held_whole() {
    use std::io::{BufRead, BufReader};
    let (mut s, _pg) = orders_app();
    let svc = s.orders_service("orders", "{ mode: transaction }");
    s.start(&[svc]);
    let pid = s.pod.proxy_pid().unwrap();
    let before = rss_kib(pid);
    // A Query declared 100 MB long, 48 MB of it sent: the server reads it as
    // it comes; the proxy must not keep it.
    let mut app = s
        .pod
        .app("python3")
        .arg(workspace().join("tests/clients/hostile.py"))
        .args([
            "pgbig",
            VIP,
            "5432",
            "app",
            "orders",
            "100000000",
            "48000000",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let first = BufReader::new(app.stdout.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(first, "SENT");
    let grew_mib = rss_kib(pid).saturating_sub(before) / 1024;
    let _ = app.kill();
    let _ = app.wait();
    assert!(
        grew_mib < 16,
        "the proxy held {grew_mib} MiB of one message"
    );
}

#[test]
fn a_reload_lets_the_old_pools_server_connections_go() {
    let (mut s, pg) = orders_app();
    let (ca, creds) = s.paths();
    // Each generation names the service anew: a new table, new pools.
    let config = |generation: &str| {
        let svc = service(
            &format!("orders-{generation}"),
            VIP,
            &["198.18.0.2:5432"],
            &ca,
            &creds,
            "",
            "{ mode: transaction }",
        );
        format!("services:\n{svc}")
    };
    let first = config("a");
    std::fs::write(&s.pod.config, &first).unwrap();
    s.pod.start_proxy();
    let servers = || {
        pg.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
            .trim()
            .to_string()
    };
    assert_eq!(ok(&psql(&s.pod, "app", "SELECT 1")), "1");
    assert_eq!(servers(), "1", "one pooled server connection");
    for (i, name) in ["b", "c", "d"].into_iter().enumerate() {
        s.pod.rewrite_config(&config(name));
        s.pod.hup_proxy();
        let reloaded = Instant::now();
        while count(&s.pod.proxy_log(), "config reloaded") <= i {
            assert!(reloaded.elapsed() < Duration::from_secs(10), "no reload");
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(ok(&psql(&s.pod, "app", "SELECT 1")), "1");
    }
    // The replaced pools' idle connections are closed, not kept for good.
    let deadline = Instant::now() + Duration::from_secs(10);
    while servers() != "1" {
        assert!(
            Instant::now() < deadline,
            "server connections kept: {}",
            servers()
        );
        thread::sleep(Duration::from_millis(100));
    }
}
