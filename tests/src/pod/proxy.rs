//! The Pod's proxy over its life: starting `ambassador proxy` in the proxy
//! container (as uid 1337 or root, with its own `/etc/hosts` or the shared
//! kernel maps when asked), its stderr log and stdout access log kept for
//! assertions, and stopping it by signal (kill, SIGTERM, SIGHUP to reload).

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use super::{PROXY_UID, Pod};
use crate::{Placement, bin, placed, stderr};

impl Pod {
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
        if !self.proxy_hosts.is_empty() || self.resolv_conf.is_some() {
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
    /// `proxy_hosts` and whose `/etc/resolv.conf` is the Pod's
    /// `resolv_conf` (the machine's own files are not touched).
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
        let resolv = match &self.resolv_conf {
            Some(r) => format!("mount --bind {} /etc/resolv.conf && ", r.display()),
            None => String::new(),
        };
        let script = format!(
            "mount --bind {hosts} /etc/hosts && {resolv}exec {drop_to}\"$@\"",
            hosts = hosts.display()
        );
        let cmd = self.proxy_in_mount_ns(&script);
        self.spawn_proxy(cmd, filter);
    }

    /// As `start_proxy`, the way the sidecar runs in Kubernetes with the
    /// Pod's shared maps: `init --pod-uid` again (it shares them under
    /// `pod-<uid>/`), then the proxy as uid 1337 in a mount namespace of its
    /// own where only that directory is mounted (read-only), given with
    /// `--kernel-maps`; `extra` (the Pod's annotation flags) go to both.
    pub fn start_proxy_with_kernel_maps(&mut self, pod_uid: &str, extra: &[&str]) {
        self.start_proxy_with_kernel_maps_logging(pod_uid, extra, "ambassador_userspace=debug");
    }

    /// As `start_proxy_with_kernel_maps`, with a log filter (the bench keeps
    /// it quiet).
    pub fn start_proxy_with_kernel_maps_logging(
        &mut self,
        pod_uid: &str,
        extra: &[&str],
        filter: &str,
    ) {
        // `extra` are the Pod's flags, which `inject` gives both containers.
        let init: Vec<&str> = ["init", "--pod-uid", pod_uid]
            .into_iter()
            .chain(extra.iter().copied())
            .chain(["--cgroup"])
            .collect();
        let out = self.ambassador(&init, Some(&self.cgroup.clone()));
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
        let mut cmd = self.proxy_in_mount_ns(&script);
        cmd.arg("--kernel-maps").arg(&mount_at).args(extra);
        self.spawn_proxy(cmd, filter);
    }

    /// `ambassador proxy --config …` in the proxy container, in a private
    /// mount namespace where `script` (a `sh -c` whose `"$@"` is the proxy's
    /// command line) runs first, as root.
    fn proxy_in_mount_ns(&self, script: &str) -> Command {
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
            script,
            "sh",
        ])
        .arg(bin())
        .args(["proxy", "--config"])
        .arg(&self.config);
        cmd
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
    pub fn terminate_proxy(&mut self) -> (ExitStatus, Duration) {
        let mut child = self.proxy.take().expect("proxy running");
        let started = Instant::now();
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().expect("wait for proxy");
        (status, started.elapsed())
    }

    /// SIGHUP to the proxy (by its PID): reload the config.
    pub fn hup_proxy(&self) {
        let child = self.proxy.as_ref().expect("proxy running");
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    }

    pub fn proxy_log(&self) -> String {
        self.proxy_log.lock().unwrap().clone()
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

    /// Waits (up to 5 s) until the proxy has logged `needle` `n` times (a
    /// second reload, say).
    pub fn wait_log_count(&self, needle: &str, n: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.proxy_log().matches(needle).count() >= n {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
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
}
