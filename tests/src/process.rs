//! The processes the tests run and where they run them: the `ambassador`
//! binary under test and the client scripts, the root check, `placed` (a
//! command that enters a namespace and cgroup, and drops to a uid, before it
//! execs), and small helpers for commands' output.

use std::{
    ffi::{CString, OsStr},
    fs::{self, OpenOptions},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::Netns;

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

/// A name no other test (or test process) uses at the same time.
pub(crate) fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `cmd`, panicking with its output if it fails.
pub(crate) fn sh(cmd: &mut Command) -> Output {
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

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A C string for syscalls in tests.
pub fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL")
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

/// Where and as whom a child process runs.
pub struct Placement<'a> {
    pub netns: &'a Netns,
    pub cgroup: &'a Path,
    pub uid: Option<u32>,
}

/// Builds a command that enters the namespace and cgroup (and drops to `uid`)
/// between fork and exec, so not one of its syscalls happens outside them.
pub fn placed(program: impl AsRef<OsStr>, at: &Placement<'_>) -> Command {
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
