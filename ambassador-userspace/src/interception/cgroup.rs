//! cgroup v2: finding the mount, checking a path, ids, creating and emptying
//! transient cgroups for `ambassador run`.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::InterceptError;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones. Read from /proc/mounts, never assumed.
pub fn cgroup2_mount() -> Result<PathBuf, InterceptError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|e| InterceptError::Environment {
        what: "cannot read /proc/mounts".into(),
        source: e,
    })?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
        })
        .next()
        .ok_or(InterceptError::NoCgroup2)
}

/// /proc/mounts writes spaces and tabs as octal escapes.
fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

/// Checks that `path` is a directory of a cgroup v2 hierarchy.
pub fn check_cgroup2(path: &Path) -> Result<(), InterceptError> {
    let meta = fs::metadata(path).map_err(|_| InterceptError::NoSuchCgroup(path.to_path_buf()))?;
    if !meta.is_dir() {
        return Err(InterceptError::NoSuchCgroup(path.to_path_buf()));
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| InterceptError::NoSuchCgroup(path.to_path_buf()))?;
    // SAFETY: c is a valid NUL-terminated path; st is plain data written by the kernel.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(InterceptError::NoSuchCgroup(path.to_path_buf()));
    }
    if st.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(InterceptError::NotCgroup2(path.to_path_buf()));
    }
    Ok(())
}

/// The cgroup id the kernel uses (bpf_get_current_cgroup_id, link info) is the
/// inode number of its directory.
pub fn cgroup_id(path: &Path) -> Result<u64, InterceptError> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|_| InterceptError::NoSuchCgroup(path.to_path_buf()))
}

/// The cgroup v2 path of a process, from /proc/PID/cgroup.
pub fn cgroup_of(pid: u32) -> io::Result<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
        .ok_or_else(|| io::Error::other("process has no cgroup v2 entry"))
}

/// Finds the directory of a cgroup id below the mount (for `status`).
pub fn find_by_id(mount: &Path, id: u64) -> Option<PathBuf> {
    let mut stack = vec![(mount.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        if fs::metadata(&dir).map(|m| m.ino()).ok() == Some(id) {
            return Some(dir);
        }
        if depth >= 12 {
            continue;
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    None
}

/// Removes `ambassador-run-<pid>` cgroups whose ambassador is gone (killed
/// with SIGKILL, so it could not clean up) and that are empty.
pub fn sweep_stale_runs(mount: &Path) {
    let Ok(entries) = fs::read_dir(mount) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ambassador-run-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && procs(&e.path()).is_empty() {
            let _ = fs::remove_dir(e.path());
        }
    }
}

/// A cgroup this process created and removes again.
#[derive(Debug)]
pub struct TransientCgroup {
    path: PathBuf,
}

impl TransientCgroup {
    pub fn create(path: PathBuf) -> Result<Self, InterceptError> {
        fs::create_dir(&path).map_err(|e| InterceptError::Environment {
            what: format!("cannot create cgroup {}", path.display()),
            source: e,
        })?;
        Ok(TransientCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Kills whatever is left in it (a command's background children) and
    /// removes it; waits up to `deadline` for the kernel to empty it.
    pub fn remove(self, deadline: Duration) -> io::Result<()> {
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::OpenOptions::new()
                .write(true)
                .open(&kill)
                .and_then(|mut f| f.write_all(b"1"));
        } else {
            for pid in procs(&self.path) {
                // SAFETY: plain syscall on a pid read from our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let start = Instant::now();
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

fn procs(path: &Path) -> Vec<i32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_unescape() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
    }
}
