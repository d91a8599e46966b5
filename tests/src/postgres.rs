//! Real PostgreSQL servers for the database-ambassador tests.
//!
//! Debian's PostgreSQL (`/usr/lib/postgresql/<version>/bin`), run as `nobody`
//! (the server refuses root) from a temporary directory, listening on an
//! address of a Pod's servers namespace, with TLS certificates made by the
//! test. `PgServer::replica_of` makes a streaming replica with
//! `pg_basebackup`. Every server is stopped (by `pg_ctl`, which signals the
//! PID in `postmaster.pid`) and its directory removed on drop.

use std::{
    fs,
    os::unix::fs::{PermissionsExt, chown},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{Netns, Placement, cgroup2_mount, placed, stderr, stdout};

/// `nobody`: PostgreSQL will not run as root.
pub const PG_UID: u32 = 65534;

/// The directory of the newest installed PostgreSQL's programs.
pub fn pg_bin() -> PathBuf {
    let mut versions: Vec<u32> = fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_unstable();
    let v = versions.last().unwrap_or_else(|| {
        panic!("PostgreSQL is not installed (/usr/lib/postgresql): `cargo xtask test` installs it")
    });
    PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"))
}

/// Runs `cmd`, killing it (by PID) if it has not finished within `limit`;
/// returns its output and whether it finished in time.
pub fn output_within(cmd: &mut Command, limit: Duration) -> (Output, bool) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    wait_within(child, limit)
}

/// Waits for a spawned child (stdout/stderr piped) up to `limit`.
pub fn wait_within(mut child: Child, limit: Duration) -> (Output, bool) {
    let deadline = Instant::now() + limit;
    let mut in_time = true;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            in_time = false;
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().expect("collect output"), in_time)
}

/// How a server does TLS.
#[derive(Clone, Debug)]
pub enum PgTls {
    /// `ssl = off`: the server answers SSLRequest with `N`.
    Off,
    /// A certificate chain and key (PEM).
    On { cert_pem: String, key_pem: String },
}

/// One PostgreSQL server in a namespace.
pub struct PgServer {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub addr: String,
    pub port: u16,
    netns_path: PathBuf,
    stopped: bool,
}

fn unique_dir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "amb-pg-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("create postgres dir");
    chown(&d, Some(PG_UID), Some(PG_UID)).expect("chown postgres dir");
    d
}

impl PgServer {
    /// A server not yet created: its directories, where it will listen.
    fn at(ns: &Netns, addr: &str, port: u16) -> PgServer {
        let dir = unique_dir();
        PgServer {
            data: dir.join("data"),
            dir,
            addr: addr.to_string(),
            port,
            netns_path: ns.path(),
            stopped: true,
        }
    }

    /// initdb (superuser `postgres` with `superuser_password`, SCRAM), the
    /// config, and start; listens on `addr:port` in `ns`.
    pub fn start(
        ns: &Netns,
        addr: &str,
        port: u16,
        tls: PgTls,
        superuser_password: &str,
    ) -> PgServer {
        let mut server = PgServer::at(ns, addr, port);
        let pw = server.dir.join("pw");
        fs::write(&pw, format!("{superuser_password}\n")).expect("write pwfile");
        chown(&pw, Some(PG_UID), Some(PG_UID)).expect("chown pwfile");
        server.run_ok(
            server
                .cmd(ns, "initdb")
                .arg("-D")
                .arg(&server.data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    "--locale=C",
                    "-E",
                    "UTF8",
                    "-N",
                ])
                .arg(format!("--pwfile={}", pw.display())),
        );
        let _ = fs::remove_file(&pw);
        server.configure(&tls);
        server.pg_ctl_start(ns);
        server
    }

    /// A streaming replica of `primary` (pg_basebackup over TLS as
    /// `replicator`, which `primary` must have), listening on `addr:port`.
    pub fn replica_of(
        primary: &PgServer,
        ns: &Netns,
        addr: &str,
        port: u16,
        replicator_password: &str,
    ) -> PgServer {
        let mut server = PgServer::at(ns, addr, port);
        server.run_ok(
            server
                .cmd(ns, "pg_basebackup")
                .args(["-h", &primary.addr, "-p", &primary.port.to_string()])
                .args(["-U", "replicator", "-D"])
                .arg(&server.data)
                .args(["-R", "-X", "stream", "--no-sync", "--checkpoint=fast"])
                .env("PGPASSWORD", replicator_password)
                .env("PGSSLMODE", "require"),
        );
        // Later lines win: this server's own address and socket directory.
        let mut conf = fs::read_to_string(server.data.join("postgresql.conf")).expect("conf");
        conf.push_str(&server.own_settings());
        fs::write(server.data.join("postgresql.conf"), conf).expect("write conf");
        server.pg_ctl_start(ns);
        server
    }

    fn own_settings(&self) -> String {
        format!(
            "listen_addresses = '{}'\nport = {}\nunix_socket_directories = '{}'\n",
            self.addr,
            self.port,
            self.dir.display()
        )
    }

    fn configure(&self, tls: &PgTls) {
        let mut conf = fs::read_to_string(self.data.join("postgresql.conf")).expect("conf");
        conf.push_str(&self.own_settings());
        conf.push_str(
            "fsync = off\nlog_connections = on\nlog_disconnections = on\n\
             logging_collector = off\nwal_level = replica\nmax_wal_senders = 5\n\
             password_encryption = 'scram-sha-256'\n",
        );
        let hba = match tls {
            PgTls::Off => {
                conf.push_str("ssl = off\n");
                "local all all trust\nhost all all 0.0.0.0/0 scram-sha-256\n\
                 host all all ::/0 scram-sha-256\n"
            }
            PgTls::On { .. } => {
                conf.push_str(
                    "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
                );
                "local all all trust\n\
                 hostssl replication replicator 0.0.0.0/0 scram-sha-256\n\
                 hostssl all md5user 0.0.0.0/0 md5\n\
                 hostssl all clearuser 0.0.0.0/0 password\n\
                 hostssl all all 0.0.0.0/0 scram-sha-256\n\
                 hostssl all all ::/0 scram-sha-256\n"
            }
        };
        self.write_data("postgresql.conf", &conf, 0o600);
        self.write_data("pg_hba.conf", hba, 0o600);
        if let PgTls::On { cert_pem, key_pem } = tls {
            self.set_certificate(cert_pem, key_pem);
        }
    }

    /// Replaces the server certificate (takes effect at `reload`).
    pub fn set_certificate(&self, cert_pem: &str, key_pem: &str) {
        self.write_data("server.crt", cert_pem, 0o644);
        self.write_data("server.key", key_pem, 0o600);
    }

    /// Turns TLS off (takes effect at `reload`).
    pub fn disable_tls(&self) {
        let mut conf = fs::read_to_string(self.data.join("postgresql.conf")).expect("conf");
        conf.push_str("ssl = off\n");
        self.write_data("postgresql.conf", &conf, 0o600);
        self.write_data(
            "pg_hba.conf",
            "local all all trust\nhost all all 0.0.0.0/0 scram-sha-256\n",
            0o600,
        );
    }

    fn write_data(&self, name: &str, text: &str, mode: u32) {
        let p = self.data.join(name);
        fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        chown(&p, Some(PG_UID), Some(PG_UID)).expect("chown");
    }

    /// A PostgreSQL program (`pgbench`, `psql`, ...) as `nobody` in `ns`,
    /// run from this server's directory.
    pub fn cmd(&self, ns: &Netns, program: &str) -> Command {
        let root = cgroup2_mount();
        let mut c = placed(
            pg_bin().join(program),
            &Placement {
                netns: ns,
                cgroup: &root,
                uid: Some(PG_UID),
            },
        );
        c.current_dir(&self.dir)
            .env("LC_ALL", "C")
            .env("HOME", &self.dir)
            .env_remove("PGPASSWORD");
        c
    }

    fn ns(&self) -> Netns {
        // Borrow the namespace by name; `Netns` deletes on drop, so forget it.
        Netns {
            name: self
                .netns_path
                .file_name()
                .expect("netns name")
                .to_string_lossy()
                .into_owned(),
        }
    }

    fn with_ns<T>(&self, f: impl FnOnce(&Netns) -> T) -> T {
        let ns = self.ns();
        let r = f(&ns);
        std::mem::forget(ns);
        r
    }

    fn run_ok(&self, cmd: &mut Command) -> String {
        let (out, in_time) = output_within(cmd, Duration::from_secs(60));
        assert!(
            in_time && out.status.success(),
            "{cmd:?} failed: {}{}\nserver log:\n{}",
            stdout(&out),
            stderr(&out),
            self.log()
        );
        stdout(&out)
    }

    fn pg_ctl_start(&mut self, ns: &Netns) {
        let log = self.dir.join("server.log");
        self.run_ok(
            self.cmd(ns, "pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "30", "start"]),
        );
        self.stopped = false;
    }

    /// Re-reads the config files and certificates (SIGHUP via pg_ctl).
    pub fn reload(&self) {
        self.with_ns(|ns| {
            self.run_ok(
                self.cmd(ns, "pg_ctl")
                    .arg("-D")
                    .arg(&self.data)
                    .arg("reload"),
            );
        });
        // The postmaster applies it asynchronously.
        thread::sleep(Duration::from_millis(500));
    }

    /// SQL as the superuser over the Unix socket; the output unaligned.
    pub fn sql(&self, sql: &str) -> String {
        self.with_ns(|ns| {
            self.run_ok(
                self.cmd(ns, "psql")
                    .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
                    .arg(&self.dir)
                    .args([
                        "-p",
                        &self.port.to_string(),
                        "-U",
                        "postgres",
                        "-d",
                        "postgres",
                        "-c",
                        sql,
                    ]),
            )
        })
        .trim()
        .to_string()
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The postmaster's PID, from `postmaster.pid`.
    pub fn pid(&self) -> i32 {
        let text = fs::read_to_string(self.data.join("postmaster.pid")).expect("postmaster.pid");
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("pid line")
    }

    /// SIGKILL to the postmaster by its PID, as a crash would (its backends
    /// notice and exit on their own).
    pub fn kill(&mut self) {
        let pid = self.pid();
        // SAFETY: signalling a PID read from the server's own pid file.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        self.stopped = true;
    }

    /// `pg_ctl promote`, waiting until the server accepts writes.
    pub fn promote(&self) {
        self.with_ns(|ns| {
            self.run_ok(
                self.cmd(ns, "pg_ctl")
                    .arg("-D")
                    .arg(&self.data)
                    .args(["-w", "-t", "30", "promote"]),
            );
        });
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if !self.stopped && self.data.join("postmaster.pid").exists() {
            self.with_ns(|ns| {
                let _ = output_within(
                    self.cmd(ns, "pg_ctl").arg("-D").arg(&self.data).args([
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ]),
                    Duration::from_secs(30),
                );
            });
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Writes `text` where the proxy (uid 1337) can read it; returns the path.
pub fn write_readable(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).expect("write file");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
    p
}

/// Replaces a file the way a Secret rotation does: a new file renamed over it.
pub fn rotate(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    fs::write(&tmp, text).expect("write new file");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).expect("chmod");
    fs::rename(&tmp, path).expect("rename over");
}

/// A stand-in for PostgreSQL 17's direct TLS in front of a real server (Debian
/// 12 ships 15): TLS from the first byte with ALPN `postgresql` (or none,
/// `alpn` empty), then the plaintext protocol relayed to `backend`. It records,
/// per connection, the ALPN agreed and the first packet's code after TLS.
pub struct DirectTlsFront {
    pub addr: std::net::SocketAddr,
    events: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DirectTlsFront {
    pub fn start(
        ns: &Netns,
        listen: std::net::SocketAddr,
        backend: std::net::SocketAddr,
        cert_pem: &str,
        key_pem: &str,
        alpn: &[&str],
    ) -> DirectTlsFront {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        use std::{
            os::fd::AsRawFd,
            sync::{Arc, Mutex},
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .map(|c| c.expect("certificate PEM"))
                .collect();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key PEM");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("certificate and key");
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let events = Arc::new(Mutex::new(Vec::new()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let fd = ns.fd();
        let ev = events.clone();
        let thread = thread::spawn(move || {
            // SAFETY: fd is an open netns file; CLONE_NEWNET moves only this
            // thread, whose sockets then live in the servers' namespace.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .expect("bind front");
                ready_tx.send(()).expect("ready");
                let accept = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let (acceptor, ev) = (acceptor.clone(), ev.clone());
                        tokio::spawn(async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let record = |s: String| ev.lock().unwrap().push(s);
                            let mut tls = match acceptor.accept(tcp).await {
                                Ok(t) => t,
                                Err(e) => return record(format!("handshake failed: {e}")),
                            };
                            let agreed = tls
                                .get_ref()
                                .1
                                .alpn_protocol()
                                .map(|p| String::from_utf8_lossy(p).into_owned());
                            record(format!("alpn={}", agreed.as_deref().unwrap_or("none")));
                            let mut first = [0u8; 8];
                            if tls.read_exact(&mut first).await.is_err() {
                                return record("closed before a packet".into());
                            }
                            let code = i32::from_be_bytes([first[4], first[5], first[6], first[7]]);
                            record(format!("first packet code {code}"));
                            let Ok(mut back) = tokio::net::TcpStream::connect(backend).await else {
                                return record("backend unreachable".into());
                            };
                            if back.write_all(&first).await.is_ok() {
                                let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = stop_rx => {}
                    () = accept => {}
                }
            });
        });
        ready_rx.recv().expect("front started");
        DirectTlsFront {
            addr: listen,
            events,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
}

impl Drop for DirectTlsFront {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
