//! Network namespaces: `Netns`, a named namespace made with `ip netns` and
//! deleted on drop, which can run code on a thread inside it (sockets made
//! there stay there), and the `ip` helper the Pod's set-up uses.

use std::{
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    process::Command,
    thread,
};

use crate::process::{sh, unique};

/// Runs `ip` with `args`, panicking if it fails.
pub(crate) fn ip(args: &[&str]) {
    sh(Command::new("ip").args(args));
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
