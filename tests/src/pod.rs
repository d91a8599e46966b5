//! The simulated Pod: its addresses, the `Pod` itself (cgroups, the Pod's
//! and the servers' namespaces joined by a veth pair, the config file, the
//! interception `ambassador init` made), the app container's commands and the
//! servers' listeners, and the tear-down on drop. The proxy's life, the admin
//! API and the kernel's maps are `impl Pod` blocks in the submodules.

mod admin;
mod kernel;
mod proxy;

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

pub use kernel::{Counters, attached_programs, bpf_object_counts};

use crate::{
    Behaviour, Netns, Placement, Server, bin, cgroup2_mount, client_py, hostile_py, netns::ip,
    placed, process::unique, require_root, stderr, stdout,
};

pub const POD_V4: &str = "198.18.0.1";
pub const SERVER_V4: &str = "198.18.0.2";
/// A second server address (for CIDR exclusion tests).
pub const SERVER2_V4: &str = "198.18.0.3";
pub const POD_V6: &str = "fd00:a5::1";
pub const SERVER_V6: &str = "fd00:a5::2";
pub const PROXY_UID: u32 = 1337;
pub const PROXY_PORT: u16 = 15001;

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
    /// The Pod's `/etc/resolv.conf` (the app's and the proxy's), when the
    /// test has its own (set before `start_proxy`).
    pub resolv_conf: Option<PathBuf>,
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
            resolv_conf: None,
        };
        let out = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup));
        assert!(out.status.success(), "init failed: {}", stderr(&out));
        pod
    }

    /// The Pod's own name (its cgroup's), unique in this run: what tests
    /// give as its UID so Pods of parallel tests never share maps.
    pub fn name(&self) -> String {
        self.cgroup
            .file_name()
            .expect("a cgroup name")
            .to_string_lossy()
            .into_owned()
    }

    /// Runs the ambassador CLI (as root, outside the Pod) with the Pod's config.
    pub fn ambassador(&self, args: &[&str], path_arg: Option<&Path>) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        if let Some(p) = path_arg {
            cmd.arg(p);
        }
        if args.first() == Some(&"init") {
            // The init container shares the Pod's network namespace.
            cmd.arg("--config")
                .arg(&self.config)
                .arg("--netns")
                .arg(self.netns.path());
        }
        cmd.output().expect("run ambassador")
    }

    /// Replaces the config file the way Kubernetes updates a mounted
    /// ConfigMap: a new file renamed over the old one.
    pub fn rewrite_config(&self, yaml: &str) {
        let tmp = self.config.with_extension("yaml.new");
        fs::write(&tmp, yaml).expect("write config");
        fs::rename(&tmp, &self.config).expect("replace config");
    }

    /// A command running in the app container (root, like many app images).
    pub fn app(&self, program: &str) -> Command {
        let mut cmd = placed(
            program,
            &Placement {
                netns: &self.netns,
                cgroup: &self.app_cgroup,
                uid: None,
            },
        );
        if let Some(resolv) = &self.resolv_conf {
            crate::dns::with_resolv_conf(&mut cmd, resolv);
        }
        cmd
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

    /// A listener for the app in the Pod's namespace, on every address: the
    /// app callers of the Pod reach.
    pub fn app_listener(&self, port: u16) -> TcpListener {
        self.netns
            .enter(move || TcpListener::bind(("0.0.0.0", port)))
            .expect("bind the app's port")
    }

    /// Unmodified curl in the servers' namespace: a caller of the Pod.
    pub fn caller_curl(&self, url: &str, extra: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.servers.name, "curl", "-sS"])
            .args(["--noproxy", "*", "--max-time", "10"])
            .args(extra)
            .arg(url)
            .output()
            .expect("run curl")
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
