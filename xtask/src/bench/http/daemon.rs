//! The servers the HTTP section starts besides ambassador: nginx (the
//! origin, and as a proxy) and HAProxy, each a `Daemon` stopped by its PID on
//! drop; and the versions of the tools, for the report.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{Netns, Placement, placed};
use anyhow::{Context as _, bail};

pub(in crate::bench) fn nginx(
    name: &'static str,
    at: &Placement<'_>,
    dir: &Path,
    config: &str,
) -> anyhow::Result<Daemon> {
    let conf = dir.join("nginx.conf");
    fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = placed("nginx", at);
    // -e: errors before the config is read go here too, not to /var/log.
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"]);
    Daemon::spawn(name, cmd, dir.join("stderr.log"))
}

pub(in crate::bench) fn haproxy(
    at: &Placement<'_>,
    dir: &Path,
    config: &str,
) -> anyhow::Result<Daemon> {
    let conf = dir.join("haproxy.cfg");
    fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = placed("haproxy", at);
    // -db: stay in the foreground, one process, so its PID is the one to stop.
    cmd.arg("-db").arg("-f").arg(&conf);
    Daemon::spawn("haproxy", cmd, dir.join("stderr.log"))
}

pub(in crate::bench) fn subdir(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let d = dir.join(name);
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

pub(in crate::bench) fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}")
        .parse()
        .expect("a literal address and a port")
}

/// A server the benchmark started, stopped by its PID on drop.
pub(in crate::bench) struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Daemon> {
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Daemon { name, child, log })
    }

    /// The process and its children (nginx's workers).
    pub(in crate::bench) fn pids(&self) -> Vec<u32> {
        let pid = self.child.id();
        let children =
            fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        std::iter::once(pid)
            .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
            .collect()
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Waits until every address accepts a connection from `netns`.
    pub(in crate::bench) fn wait_listening(
        &mut self,
        netns: &Netns,
        addrs: &[SocketAddr],
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} did not start ({status}): {}", self.name, self.output());
            }
            let probe = addrs.to_vec();
            let up = netns.enter(move || {
                probe
                    .iter()
                    .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
            });
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {addrs:?} within 10 s: {}",
                    self.name,
                    self.output()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id();
        // nginx's master stops its workers on SIGTERM; its children are
        // noted first in case it has to be killed outright and leaves them.
        let children =
            fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        // SAFETY: kill(2) touches no memory, and `pid` is our own unreaped
        // child, so it cannot name another process.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        for child in children
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            // Only if the PID still names the same program.
            if fs::read_to_string(format!("/proc/{child}/comm")).ok() == Some(comm.clone()) {
                // SAFETY: as above; the PID was just checked to still be the
                // program's.
                unsafe { libc::kill(child, libc::SIGKILL) };
            }
        }
    }
}

/// The versions of the tools the section ran, for the report.
pub(in crate::bench) struct Versions {
    pub(in crate::bench) oha: String,
    pub(in crate::bench) haproxy: String,
    pub(in crate::bench) nginx: String,
}

impl Versions {
    pub(in crate::bench) fn find(oha: &Path) -> anyhow::Result<Versions> {
        let text = |cmd: &mut Command| -> anyhow::Result<String> {
            let out = cmd
                .output()
                .with_context(|| format!("cannot run {cmd:?}"))?;
            // nginx -v prints to stderr.
            Ok(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        };
        let word_after = |s: &str, prefix: &str| {
            s.split_whitespace()
                .skip_while(|w| *w != prefix)
                .nth(1)
                .unwrap_or("?")
                .to_string()
        };
        let oha_v = text(Command::new(oha).arg("--version"))?;
        let haproxy_v = text(Command::new("haproxy").arg("-v"))?;
        let nginx_v = text(Command::new("nginx").arg("-v"))?;
        Ok(Versions {
            oha: word_after(&oha_v, "oha"),
            // "HAProxy version 2.6.12-1+deb12u4 ..." -> 2.6.12
            haproxy: word_after(&haproxy_v, "version")
                .split('-')
                .next()
                .unwrap_or("?")
                .to_string(),
            // "nginx version: nginx/1.22.1"
            nginx: nginx_v
                .split_once("nginx/")
                .map(|(_, v)| v.split_whitespace().next().unwrap_or("?").to_string())
                .unwrap_or_else(|| "?".into()),
        })
    }
}
