//! A simulated Pod on a real kernel, for the end-to-end tests.
//!
//! A Pod here is what the kubelet makes: a Pod cgroup with one child cgroup per
//! container (`app`, `proxy`), and a network namespace the containers share.
//! `ambassador init` attaches at the Pod cgroup; `ambassador proxy` runs as uid
//! 1337 in the proxy child; unmodified clients (curl, python3) run in the app
//! child. "Remote" servers live in a second namespace joined by a veth pair:
//! the Pod is 198.18.0.1 / fd00:a5::1, the servers 198.18.0.2-.9 / fd00:a5::2.
//! Everything is torn down on drop, panics included.

pub mod postgres;
pub mod upstream;

use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{fs::MetadataExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use ambassador_common::{ConnKey, OrigDst, counter, maps};
use aya::maps::{Map, MapData, PerCpuArray};

pub const POD_V4: &str = "198.18.0.1";
pub const SERVER_V4: &str = "198.18.0.2";
/// A second server address (for CIDR exclusion tests).
pub const SERVER2_V4: &str = "198.18.0.3";
pub const POD_V6: &str = "fd00:a5::1";
pub const SERVER_V6: &str = "fd00:a5::2";
pub const PROXY_UID: u32 = 1337;
pub const PROXY_PORT: u16 = 15001;

/// Tests that need root fail, loudly, rather than skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "simulated-Pod tests attach eBPF programs to cgroups and create network \
         namespaces: they must run as root (`sudo cargo xtask test`)"
    );
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// The `ambassador` binary under test.
pub fn bin() -> PathBuf {
    let p = std::env::var_os("AMBASSADOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/debug/ambassador"));
    assert!(
        p.is_file(),
        "ambassador binary {} not found: run the tests through `cargo xtask test`",
        p.display()
    );
    p
}

/// The python client used as the unmodified app.
pub fn client_py() -> PathBuf {
    workspace().join("tests/clients/client.py")
}

/// The hostile app's script (raw bytes, TLS with any SNI, held connections).
pub fn hostile_py() -> PathBuf {
    workspace().join("tests/clients/hostile.py")
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn sh(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    sh(Command::new("ip").args(args));
}

pub fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("cgroup v2 must be mounted for these tests")
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full);
    }

    pub fn fd(&self) -> OwnedFd {
        File::open(self.path()).expect("open netns").into()
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it makes
    /// stay in the namespace wherever they are used afterwards.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let fd = self.fd();
        thread::spawn(move || {
            // SAFETY: fd is an open netns file; CLONE_NEWNET only moves this thread.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Where and as whom a child process runs.
pub struct Placement<'a> {
    pub netns: &'a Netns,
    pub cgroup: &'a Path,
    pub uid: Option<u32>,
}

/// Builds a command that enters the namespace and cgroup (and drops to `uid`)
/// between fork and exec, so not one of its syscalls happens outside them.
pub fn placed(program: impl AsRef<std::ffi::OsStr>, at: &Placement<'_>) -> Command {
    let ns = at.netns.fd();
    let procs: OwnedFd = OpenOptions::new()
        .write(true)
        .open(at.cgroup.join("cgroup.procs"))
        .expect("open cgroup.procs")
        .into();
    let uid = at.uid;
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe syscalls on fds opened before the fork;
    // the fds are moved into the closure and live as long as the Command.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(uid) = uid
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A Pod: cgroups, namespaces, the config, and the interception `init` made.
pub struct Pod {
    pub cgroup: PathBuf,
    pub app_cgroup: PathBuf,
    pub proxy_cgroup: PathBuf,
    pub netns: Netns,
    pub servers: Netns,
    pub config: PathBuf,
    proxy: Option<Child>,
    proxy_log: Arc<Mutex<String>>,
    /// The proxy's stdout: its access log.
    proxy_stdout: Arc<Mutex<String>>,
    /// Environment for the proxy process (set before `start_proxy`).
    pub proxy_env: Vec<(String, String)>,
    /// Names the proxy resolves, `(name, address)`: given, the proxy runs
    /// in a mount namespace of its own with these as its `/etc/hosts`
    /// (set before `start_proxy`).
    pub proxy_hosts: Vec<(String, String)>,
    /// The proxy's open-files limit, soft and hard (set before `start_proxy`).
    pub proxy_fd_limit: Option<u64>,
}

impl Pod {
    /// A Pod with interception installed (`ambassador init`) but no proxy yet.
    pub fn new(config_yaml: &str) -> Pod {
        require_root();
        let name = unique("amb-test-");
        let cgroup = cgroup2_mount().join(&name);
        fs::create_dir(&cgroup).expect("create Pod cgroup");
        let app_cgroup = cgroup.join("app");
        let proxy_cgroup = cgroup.join("proxy");
        fs::create_dir(&app_cgroup).expect("create app cgroup");
        fs::create_dir(&proxy_cgroup).expect("create proxy cgroup");
        let netns = Netns::new("amb-pod-");
        let servers = Netns::new("amb-srv-");
        let (a, b) = (unique("ap"), unique("as"));
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        ip(&["link", "set", &a, "netns", &netns.name]);
        ip(&["link", "set", &b, "netns", &servers.name]);
        netns.ip(&["addr", "add", &format!("{POD_V4}/24"), "dev", &a]);
        netns.ip(&["addr", "add", &format!("{POD_V6}/64"), "dev", &a, "nodad"]);
        netns.ip(&["link", "set", &a, "up"]);
        for addr in [SERVER_V4, SERVER2_V4] {
            servers.ip(&["addr", "add", &format!("{addr}/24"), "dev", &b]);
        }
        servers.ip(&[
            "addr",
            "add",
            &format!("{SERVER_V6}/64"),
            "dev",
            &b,
            "nodad",
        ]);
        servers.ip(&["link", "set", &b, "up"]);
        let config = std::env::temp_dir().join(format!("{name}.yaml"));
        fs::write(&config, config_yaml).expect("write config");
        let pod = Pod {
            cgroup,
            app_cgroup,
            proxy_cgroup,
            netns,
            servers,
            config,
            proxy: None,
            proxy_log: Arc::new(Mutex::new(String::new())),
            proxy_stdout: Arc::new(Mutex::new(String::new())),
            proxy_env: Vec::new(),
            proxy_hosts: Vec::new(),
            proxy_fd_limit: None,
        };
        let out = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup));
        assert!(out.status.success(), "init failed: {}", stderr(&out));
        pod
    }

    /// Runs the ambassador CLI (as root, outside the Pod) with the Pod's config.
    pub fn ambassador(&self, args: &[&str], path_arg: Option<&Path>) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        if let Some(p) = path_arg {
            cmd.arg(p);
        }
        if args.first() == Some(&"init") {
            cmd.arg("--config").arg(&self.config);
        }
        cmd.output().expect("run ambassador")
    }

    /// Starts `ambassador proxy` as uid 1337 in the proxy container and waits
    /// until it listens.
    pub fn start_proxy(&mut self) {
        self.start_proxy_logging("ambassador_userspace=debug");
    }

    /// As `start_proxy`, with a log filter (the benchmark keeps it quiet).
    pub fn start_proxy_logging(&mut self, filter: &str) {
        self.start_proxy_as(Some(PROXY_UID), filter);
    }

    /// Starts the proxy as `uid` (`None`: root).
    pub fn start_proxy_as(&mut self, uid: Option<u32>, filter: &str) {
        assert!(self.proxy.is_none(), "proxy already running");
        if !self.proxy_hosts.is_empty() {
            return self.start_proxy_with_hosts(uid, filter);
        }
        let mut cmd = placed(
            bin(),
            &Placement {
                netns: &self.netns,
                cgroup: &self.proxy_cgroup,
                uid,
            },
        );
        cmd.args(["proxy", "--config"]).arg(&self.config);
        self.spawn_proxy(cmd, filter);
    }

    /// The proxy in a mount namespace of its own whose `/etc/hosts` holds
    /// `proxy_hosts` (the machine's own file is not touched).
    fn start_proxy_with_hosts(&mut self, uid: Option<u32>, filter: &str) {
        let hosts = std::env::temp_dir().join(format!(
            "{}-hosts",
            self.cgroup.file_name().unwrap().to_string_lossy()
        ));
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (name, addr) in &self.proxy_hosts {
            text.push_str(&format!("{addr} {name}\n"));
        }
        fs::write(&hosts, text).expect("write hosts file");
        let drop_to = match uid {
            Some(u) => format!("setpriv --reuid {u} --regid {u} --clear-groups "),
            None => String::new(),
        };
        let script = format!(
            "mount --bind {hosts} /etc/hosts && exec {drop_to}\"$@\"",
            hosts = hosts.display()
        );
        let mut cmd = placed(
            "unshare",
            &Placement {
                netns: &self.netns,
                cgroup: &self.proxy_cgroup,
                uid: None,
            },
        );
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(bin())
        .args(["proxy", "--config"])
        .arg(&self.config);
        self.spawn_proxy(cmd, filter);
    }

    /// As `start_proxy`, the way the sidecar runs in Kubernetes with the
    /// Pod's shared maps: `init --pod-uid` again (it shares them under
    /// `pod-<uid>/`), then the proxy as uid 1337 in a mount namespace of its
    /// own where only that directory is mounted (read-only), given with
    /// `--kernel-maps`.
    pub fn start_proxy_with_kernel_maps(&mut self, pod_uid: &str, extra: &[&str]) {
        let out = self.ambassador(
            &["init", "--pod-uid", pod_uid, "--cgroup"],
            Some(&self.cgroup.clone()),
        );
        assert!(
            out.status.success(),
            "init --pod-uid failed: {}",
            stderr(&out)
        );
        let shared = PathBuf::from(format!("/sys/fs/bpf/ambassador/pod-{pod_uid}"));
        let mount_at = std::env::temp_dir().join(format!(
            "{}-kernel-maps",
            self.cgroup.file_name().unwrap().to_string_lossy()
        ));
        fs::create_dir_all(&mount_at).expect("mount point");
        let script = format!(
            "mount --bind {shared} {at} && mount -o remount,bind,ro {at} && \
             exec setpriv --reuid {PROXY_UID} --regid {PROXY_UID} --clear-groups \"$@\"",
            shared = shared.display(),
            at = mount_at.display()
        );
        let mut cmd = placed(
            "unshare",
            &Placement {
                netns: &self.netns,
                cgroup: &self.proxy_cgroup,
                uid: None,
            },
        );
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(bin())
        .args(["proxy", "--config"])
        .arg(&self.config)
        .arg("--kernel-maps")
        .arg(&mount_at)
        .args(extra);
        self.spawn_proxy(cmd, "ambassador_userspace=debug");
    }

    fn spawn_proxy(&mut self, mut cmd: Command, filter: &str) {
        if let Some(n) = self.proxy_fd_limit {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe; lim is plain data.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.env("AMBASSADOR_LOG", filter)
            .envs(self.proxy_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start proxy");
        let out = child.stdout.take().expect("piped");
        let access = self.proxy_stdout.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut a = access.lock().unwrap();
                a.push_str(&line);
                a.push('\n');
            }
        });
        let stderr = child.stderr.take().expect("piped");
        let log = self.proxy_log.clone();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("proxy listening")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        self.proxy = Some(child);
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            panic!("proxy did not start listening:\n{}", self.proxy_log());
        }
    }

    /// The running proxy's PID.
    pub fn proxy_pid(&self) -> Option<u32> {
        self.proxy.as_ref().map(|c| c.id())
    }

    /// Kills the proxy outright (SIGKILL, by its PID), as a crash would.
    pub fn kill_proxy(&mut self) {
        if let Some(mut child) = self.proxy.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM to the proxy (by its PID), as Kubernetes does at Pod
    /// deletion; waits for it to exit and returns how long that took.
    pub fn terminate_proxy(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut child = self.proxy.take().expect("proxy running");
        let started = Instant::now();
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().expect("wait for proxy");
        (status, started.elapsed())
    }

    pub fn proxy_log(&self) -> String {
        self.proxy_log.lock().unwrap().clone()
    }

    /// The access-log lines the proxy wrote so far.
    pub fn access_log(&self) -> Vec<String> {
        self.proxy_stdout
            .lock()
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits (up to 5 s) for an access-log line containing `needle`.
    pub fn wait_access_log(&self, needle: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(l) = self.access_log().into_iter().find(|l| l.contains(needle)) {
                return Some(l);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// One request to the proxy's admin API (127.0.0.1:15020 in the Pod):
    /// (status, body).
    pub fn admin(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let text = self.netns.enter(move || {
            use std::io::{Read, Write};
            let mut s =
                std::net::TcpStream::connect("127.0.0.1:15020").expect("connect to the admin API");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).expect("admin response");
            out
        });
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        (status, body.to_string())
    }

    /// Where a test's config may put the proxy's admin socket
    /// (`proxy.admin_socket`): a directory the proxy makes itself.
    pub fn admin_socket_path(&self) -> PathBuf {
        std::env::temp_dir()
            .join(format!(
                "{}-admin",
                self.cgroup.file_name().unwrap().to_string_lossy()
            ))
            .join("admin.sock")
    }

    /// One request on the admin socket at `admin_socket_path`: (status, body).
    pub fn admin_socket(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(self.admin_socket_path())
            .expect("connect to the admin socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).expect("admin response");
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        (status, body.to_string())
    }

    /// `/metrics`, as text.
    pub fn metrics(&self) -> String {
        let (status, body) = self.admin("GET", "/metrics", "");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Replaces the config file the way Kubernetes updates a mounted
    /// ConfigMap: a new file renamed over the old one.
    pub fn rewrite_config(&self, yaml: &str) {
        let tmp = self.config.with_extension("yaml.new");
        fs::write(&tmp, yaml).expect("write config");
        fs::rename(&tmp, &self.config).expect("replace config");
    }

    /// SIGHUP to the proxy (by its PID): reload the config.
    pub fn hup_proxy(&self) {
        let child = self.proxy.as_ref().expect("proxy running");
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    }

    /// Waits (up to 5 s) for the proxy to log a line containing `needle`: it
    /// logs a connection when it closes, just after the app sees the close.
    pub fn wait_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.proxy_log().contains(needle) {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// A command running in the app container (root, like many app images).
    pub fn app(&self, program: &str) -> Command {
        placed(
            program,
            &Placement {
                netns: &self.netns,
                cgroup: &self.app_cgroup,
                uid: None,
            },
        )
    }

    /// Unmodified curl in the app container: no proxy settings, a bound on
    /// time, then `extra` and the URL.
    pub fn curl(&self, url: &str, extra: &[&str]) -> Output {
        self.app("curl")
            .args(["-sS", "--noproxy", "*", "--max-time", "10"])
            .args(extra)
            .arg(url)
            .output()
            .expect("run curl")
    }

    /// The HTTP status curl in the app container gets (`000` if none).
    pub fn http_status(&self, url: &str, extra: &[&str]) -> String {
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        args.extend_from_slice(extra);
        stdout(&self.curl(url, &args))
    }

    /// Runs the python client in the app container and returns its stdout.
    pub fn client(&self, args: &[&str]) -> Output {
        let mut cmd = self.app("python3");
        cmd.arg(client_py()).args(args);
        cmd.output().expect("run client")
    }

    /// Runs the hostile app script in the app container; its stdout.
    pub fn hostile(&self, args: &[&str]) -> String {
        let mut cmd = self.app("python3");
        cmd.arg(hostile_py()).args(args);
        let out = cmd.output().expect("run hostile.py");
        assert!(
            out.status.success(),
            "hostile.py {args:?}: {}",
            stderr(&out)
        );
        stdout(&out)
    }

    pub fn pin_dir(&self) -> PathBuf {
        let ino = fs::metadata(&self.cgroup).expect("cgroup").ino();
        PathBuf::from(format!("/sys/fs/bpf/ambassador/cgroup-{ino}"))
    }

    /// The kernel counters, by name.
    pub fn counters(&self) -> Counters {
        let data = MapData::from_pin(self.pin_dir().join(maps::COUNTERS)).expect("pinned counters");
        let arr = PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(data)).expect("counters map");
        let get = |i: u32| arr.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
        Counters {
            redirected: get(counter::REDIRECTED),
            bypassed: get(counter::BYPASSED),
            refused: get(counter::REFUSED),
            passed: get(counter::PASSED),
            accelerated: get(counter::ACCELERATED),
        }
    }

    /// Entries in the original-destination tables (AMB_CONNS, AMB_COOKIES).
    pub fn tracked(&self) -> (usize, usize) {
        let open = |name: &str| {
            Map::LruHashMap(MapData::from_pin(self.pin_dir().join(name)).expect("pinned table"))
        };
        let conns = aya::maps::HashMap::<_, ConnKey, OrigDst>::try_from(open(maps::CONNS))
            .expect("connection table");
        let cookies = aya::maps::HashMap::<_, u64, OrigDst>::try_from(open(maps::COOKIES))
            .expect("cookie table");
        (conns.keys().count(), cookies.keys().count())
    }

    /// A listener in the servers' namespace, for the caller's own server.
    pub fn server_listener(&self, addr: &str, port: u16) -> TcpListener {
        let sa: SocketAddr = format!("{addr}:{port}").parse().expect("address");
        self.servers
            .enter(move || TcpListener::bind(sa))
            .expect("bind server listener")
    }

    /// A directory the proxy (uid 1337) can read, removed with the Pod.
    pub fn shared_dir(&self) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "{}-files",
            self.cgroup.file_name().unwrap().to_string_lossy()
        ));
        fs::create_dir_all(&d).expect("create shared dir");
        d
    }

    /// A server in the servers' namespace.
    pub fn server(&self, addr: &str, port: u16, behaviour: Behaviour) -> Server {
        let sa: SocketAddr = if addr.contains(':') {
            format!("[{addr}]:{port}")
        } else {
            format!("{addr}:{port}")
        }
        .parse()
        .expect("address");
        let listener = self.servers.enter(move || TcpListener::bind(sa));
        Server::start_on(listener.expect("bind server"), behaviour)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.kill_proxy();
        let _ = self.ambassador(&["uninstall", "--cgroup"], Some(&self.cgroup.clone()));
        for cg in [&self.app_cgroup, &self.proxy_cgroup, &self.cgroup] {
            let _ = fs::write(cg.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(cg).is_err() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = fs::remove_file(&self.config);
        let _ = fs::remove_dir_all(std::env::temp_dir().join(format!(
            "{}-files",
            self.cgroup.file_name().unwrap_or_default().to_string_lossy()
        )));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub redirected: u64,
    pub bypassed: u64,
    pub refused: u64,
    pub passed: u64,
    /// app<->proxy byte streams (one per direction) on the sk_msg shortcut.
    pub accelerated: u64,
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What a test server does with each connection.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Writes "HELLO <its own address> <peer address>\n", then echoes until EOF.
    Greet,
    /// Answers one HTTP request with its own address in the body.
    Http,
    /// Records what the app sent until EOF or error, then replies "got N" and closes.
    ReadAll,
    /// Sends "bye", half-closes, then records what still arrives.
    CloseFirst,
    /// Resets the connection as soon as it is accepted and something arrives.
    Reset,
    /// Writes without reading until a write has blocked for a second, then
    /// records "flooded N" (how much the path took from it) and closes.
    Flood,
}

/// A server running on threads; its events are recorded for assertions.
pub struct Server {
    pub addr: SocketAddr,
    pub events: Arc<Mutex<Vec<String>>>,
    pub accepted: Arc<AtomicUsize>,
}

impl Server {
    pub fn start_on(listener: TcpListener, behaviour: Behaviour) -> Server {
        let addr = listener.local_addr().expect("addr");
        let events = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (ev, acc) = (events.clone(), accepted.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                acc.fetch_add(1, Ordering::Relaxed);
                let ev = ev.clone();
                thread::spawn(move || serve(conn, behaviour, addr, &ev));
            }
        });
        Server {
            addr,
            events,
            accepted,
        }
    }

    pub fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    /// Waits for an event containing `needle`.
    pub fn wait_event(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(e) = self.events().into_iter().find(|e| e.contains(needle)) {
                return Some(e);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

fn serve(mut conn: TcpStream, behaviour: Behaviour, me: SocketAddr, ev: &Mutex<Vec<String>>) {
    let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    let record = |s: String| ev.lock().unwrap().push(s);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    match behaviour {
        Behaviour::Greet => {
            let _ = conn.write_all(format!("HELLO {me} {peer}\n").as_bytes());
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
        Behaviour::Http => {
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let body = format!("served by {me}\n");
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
        Behaviour::ReadAll => {
            let mut got = Vec::new();
            match conn.read_to_end(&mut got) {
                Ok(_) => {
                    record(format!("eof after {} bytes", got.len()));
                    let _ = conn.write_all(format!("got {}\n", got.len()).as_bytes());
                }
                Err(e) => record(format!("error {:?}", e.kind())),
            }
        }
        Behaviour::CloseFirst => {
            let _ = conn.write_all(b"bye\n");
            let _ = conn.shutdown(std::net::Shutdown::Write);
            record("half-closed".into());
            let mut got = Vec::new();
            match conn.read_to_end(&mut got) {
                Ok(_) => record(format!("then read {:?}", String::from_utf8_lossy(&got))),
                Err(e) => record(format!("error {:?}", e.kind())),
            }
        }
        Behaviour::Flood => {
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let chunk = [b'y'; 65536];
            let mut total = 0usize;
            // At most 1 GiB: a path that never pushes back shows as that.
            while total < 1 << 30 {
                match conn.write(&chunk) {
                    Ok(n) => total += n,
                    Err(_) => break,
                }
            }
            record(format!("flooded {total}"));
        }
        Behaviour::Reset => {
            let mut buf = [0u8; 16];
            let _ = conn.read(&mut buf);
            let sock = socket_linger_zero(&conn);
            record(format!("resetting {sock}"));
            drop(conn);
        }
    }
}

fn socket_linger_zero(conn: &TcpStream) -> bool {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        ) == 0
    }
}

/// One HTTP/1.1 request head from a raw test server's reader: the request
/// line and the Content-Length (0 when absent); `None` at EOF.
pub fn read_request_head(reader: &mut impl BufRead) -> Option<(String, usize)> {
    let mut first = String::new();
    if reader.read_line(&mut first).ok()? == 0 {
        return None;
    }
    let mut len = 0;
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            len = value.trim().parse().unwrap_or(0);
        }
        line.clear();
    }
    Some((first.trim_end().to_string(), len))
}

/// Counts of BPF objects on the host (programs, maps, links).
pub fn bpf_object_counts() -> (usize, usize, usize) {
    (
        aya::programs::loaded_programs().count(),
        aya::maps::loaded_maps().count(),
        aya::programs::loaded_links().count(),
    )
}

/// `bpftool cgroup show` for one cgroup: the attached programs, one per line.
pub fn attached_programs(cgroup: &Path) -> String {
    let out = sh(Command::new("bpftool")
        .arg("cgroup")
        .arg("show")
        .arg(cgroup));
    stdout(&out)
}

/// A C string for syscalls in tests.
pub fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

/// An OTLP/HTTP collector stand-in: accepts `POST /v1/traces` (JSON) and
/// keeps each body, answering as a collector does.
pub struct OtlpReceiver {
    bodies: Arc<Mutex<Vec<String>>>,
}

impl OtlpReceiver {
    /// Listens on `addr` inside `netns`.
    pub fn start(netns: &Netns, addr: &str) -> OtlpReceiver {
        let sa: SocketAddr = addr.parse().expect("address");
        let listener = netns
            .enter(move || TcpListener::bind(sa))
            .expect("bind the OTLP receiver");
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let keep = bodies.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let keep = keep.clone();
                thread::spawn(move || otlp_conn(conn, keep));
            }
        });
        OtlpReceiver { bodies }
    }

    /// Every span received so far, as JSON objects.
    pub fn spans(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for body in self.bodies.lock().unwrap().iter() {
            let v: serde_json::Value = serde_json::from_str(body).expect("OTLP JSON");
            for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for span in ss["spans"].as_array().into_iter().flatten() {
                        let mut span = span.clone();
                        span["resource"] = rs["resource"].clone();
                        out.push(span);
                    }
                }
            }
        }
        out
    }

    /// Waits (up to 10 s) for a span matching `pred`.
    pub fn wait_span(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(s) = self.spans().into_iter().find(&pred) {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

fn otlp_conn(conn: std::net::TcpStream, keep: Arc<Mutex<Vec<String>>>) {
    use std::io::{BufRead, Read, Write};
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut conn = conn;
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        keep.lock()
            .unwrap()
            .push(String::from_utf8_lossy(&body).into_owned());
        let _ = conn.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        );
    }
}
