//! DNS for the tests: a real dnsmasq serving names from a hosts file in a
//! test namespace (re-read on SIGHUP, so a test can change what a name
//! resolves to), and a `resolv.conf` of the test's own for the app and the
//! proxy (bind-mounted over `/etc/resolv.conf` in a mount namespace of their
//! own; the machine's file is never touched).

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{Netns, process::unique};

/// dnsmasq answering from `hosts` with a fixed TTL, until dropped.
pub struct Dnsmasq {
    child: Child,
    hosts: PathBuf,
    log: PathBuf,
    pub addr: String,
}

impl Dnsmasq {
    /// Starts dnsmasq in `ns` on `addr` port 53 (UDP and TCP), answering
    /// the names of `hosts` (`(name, address)`, a name may repeat) with
    /// `ttl` seconds and NXDOMAIN for everything else (no upstream).
    pub fn start(ns: &Netns, addr: &str, hosts: &[(&str, &str)], ttl: u32) -> Dnsmasq {
        Dnsmasq::start_with(ns, addr, hosts, ttl, true)
    }

    /// As `start`; `log_queries` false for the benchmark (a line per query
    /// would be most of its work), so `queries` counts nothing.
    pub fn start_with(
        ns: &Netns,
        addr: &str,
        hosts: &[(&str, &str)],
        ttl: u32,
        log_queries: bool,
    ) -> Dnsmasq {
        let base = std::env::temp_dir().join(unique("amb-dnsmasq-"));
        let hosts_file = base.with_extension("hosts");
        let log = base.with_extension("log");
        write_hosts(&hosts_file, hosts);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, "dnsmasq", "--keep-in-foreground"])
            .args([
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
            ])
            .arg("--bind-interfaces")
            .arg(format!("--listen-address={addr}"))
            .arg("--port=53")
            .arg("--user=root")
            .arg(format!("--addn-hosts={}", hosts_file.display()))
            .arg(format!("--local-ttl={ttl}"))
            .args(log_queries.then_some("--log-queries"))
            .arg(format!("--log-facility={}", log.display()))
            .arg("--pid-file=")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setsid only; dnsmasq gets a session of its own so a test's
        // terminal signals do not reach it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("start dnsmasq (apt-get install dnsmasq-base)");
        let d = Dnsmasq {
            child,
            hosts: hosts_file,
            log,
            addr: addr.to_string(),
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if fs::read_to_string(&self.log).is_ok_and(|l| l.contains("read ")) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("dnsmasq did not start: {}", self.log());
    }

    /// Replaces the names it answers (from the next query on).
    pub fn set_hosts(&self, hosts: &[(&str, &str)]) {
        let before = self.log().matches(" read ").count();
        write_hosts(&self.hosts, hosts);
        // SAFETY: kill with a PID this test started and still owns.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.log().matches(" read ").count() <= before && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many queries for `name` it has seen.
    pub fn queries(&self, name: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("query[") && l.contains(&format!(" {name} from")))
            .count()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.hosts);
        let _ = fs::remove_file(&self.log);
    }
}

fn write_hosts(path: &Path, hosts: &[(&str, &str)]) {
    let text: String = hosts.iter().map(|(n, a)| format!("{a} {n}\n")).collect();
    fs::write(path, text).expect("write dnsmasq hosts");
}

/// A resolv.conf naming `nameservers` with `search` domains, in a file of
/// the test's own (removed on drop).
pub struct ResolvConf(pub PathBuf);

impl ResolvConf {
    pub fn new(nameservers: &[&str], search: &[&str]) -> ResolvConf {
        let path = std::env::temp_dir().join(unique("amb-resolv-"));
        let mut text = String::new();
        if !search.is_empty() {
            text.push_str(&format!("search {}\n", search.join(" ")));
        }
        for ns in nameservers {
            text.push_str(&format!("nameserver {ns}\n"));
        }
        // One try, short: a test that expects an answer gets it at once.
        text.push_str("options timeout:2 attempts:1\n");
        fs::write(&path, text).expect("write resolv.conf");
        ResolvConf(path)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Makes `cmd` (which must run as root until exec) see `resolv` as its
/// `/etc/resolv.conf`, in a mount namespace of its own. Registered after
/// `placed`, it runs after the namespace and cgroup are entered.
pub fn with_resolv_conf(cmd: &mut Command, resolv: &Path) {
    let src = crate::cstr(resolv.to_str().expect("utf-8 path"));
    let dst = crate::cstr("/etc/resolv.conf");
    let root = crate::cstr("/");
    // SAFETY: unshare and mount are plain syscalls on strings made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
