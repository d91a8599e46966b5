//! cgroup v2: finding the mount, checking a path, ids, creating and emptying
//! transient cgroups for `ambassador run`.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::error::InterceptError;

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

/// A cgroup2 mount as /proc/self/mountinfo shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// The cgroup shown at the top of the mount, as a path in this process's
    /// cgroup namespace: `/` for the namespace root, `/../..` for an ancestor
    /// of it (a host cgroupfs mounted into a container).
    pub root: String,
    pub dir: PathBuf,
}

/// Every cgroup2 mount visible here, in mount order.
pub fn cgroup2_mounts() -> Result<Vec<Cgroup2Mount>, InterceptError> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").map_err(|e| InterceptError::Environment {
            what: "cannot read /proc/self/mountinfo".into(),
            source: e,
        })?;
    Ok(parse_mountinfo(&text))
}

fn parse_mountinfo(text: &str) -> Vec<Cgroup2Mount> {
    text.lines()
        .filter_map(|l| {
            // id parent major:minor root mount-point options [optional...] - fstype ...
            let (before, after) = l.split_once(" - ")?;
            if after.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut f = before.split_whitespace().skip(3);
            let (root, dir) = (f.next()?, f.next()?);
            Some(Cgroup2Mount {
                root: unescape_mount_path(root),
                dir: PathBuf::from(unescape_mount_path(dir)),
            })
        })
        .collect()
}

/// This process's cgroup as /proc/self/cgroup names it (relative to its cgroup
/// namespace: `/` inside a container with a private one).
fn own_cgroup_name() -> Result<String, InterceptError> {
    let text =
        fs::read_to_string("/proc/self/cgroup").map_err(|e| InterceptError::Environment {
            what: "cannot read /proc/self/cgroup".into(),
            source: e,
        })?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .ok_or_else(|| InterceptError::PodCgroup("/proc/self/cgroup has no cgroup v2 entry".into()))
}

/// Where `name` (a /proc/self/cgroup path) is under `m`, and the part of the
/// path below the mount's top (empty when the mount shows it at its top).
fn locate(m: &Cgroup2Mount, name: &str) -> Option<(PathBuf, String)> {
    let root = m.root.trim_end_matches('/');
    let rel = if root.is_empty() {
        name.trim_start_matches('/')
    } else if name == root {
        ""
    } else {
        name.strip_prefix(root)?.strip_prefix('/')?
    };
    let dir = if rel.is_empty() {
        m.dir.clone()
    } else {
        m.dir.join(rel)
    };
    dir.is_dir().then(|| (dir, rel.to_string()))
}

/// How `init --cgroup auto` found the Pod's cgroup, for its report.
#[derive(Debug)]
pub struct PodCgroup {
    pub path: PathBuf,
    pub how: String,
}

/// Finds the Pod's cgroup from inside one of its containers (the init
/// container): the parent of this process's own cgroup. Kubelets put every
/// container of a Pod in a child of the Pod's cgroup (`kubepods.../pod<uid>/
/// <container>`), with either cgroup driver.
///
/// Inside a private cgroup namespace (the default with containerd and CRI-O on
/// cgroup v2) /proc/self/cgroup says `0::/` and the container's own
/// /sys/fs/cgroup shows only its own cgroup, so the parent is not reachable
/// there. Its inode (the cgroup id) is: the directory with that inode in the
/// node's cgroupfs, mounted into the container from the host, is this
/// container's cgroup as the host sees it, and its parent is the Pod's.
///
/// `pod_uid` (from the downward API) is a cross-check, and the way in when the
/// own cgroup cannot be seen at all: the Pod's cgroup is named after it
/// (`pod<uid>` or `kubepods-<qos>-pod<uid_with_underscores>.slice`).
pub fn find_pod_cgroup(pod_uid: Option<&str>) -> Result<PodCgroup, InterceptError> {
    let mounts = cgroup2_mounts()?;
    if mounts.is_empty() {
        return Err(InterceptError::NoCgroup2);
    }
    let name = own_cgroup_name()?;
    let found = by_own_cgroup(&mounts, &name)?;
    match (found, pod_uid) {
        (Some(pod), Some(uid)) if !named_after(&pod.path, uid) => {
            Err(InterceptError::PodCgroup(format!(
                "the parent of this container's cgroup is {}, which is not named after Pod UID {uid}: \
                 is this an unusual cgroup layout? pass --cgroup PATH",
                pod.path.display()
            )))
        }
        (Some(pod), _) => Ok(pod),
        (None, Some(uid)) => by_pod_uid(&mounts, uid),
        (None, None) => Err(InterceptError::PodCgroup(format!(
            "this process's cgroup ({name}) is not visible through any cgroup2 mount's \
             subdirectories: mount the node's /sys/fs/cgroup into the container (hostPath), \
             or pass --pod-uid (downward API metadata.uid), or --cgroup PATH"
        ))),
    }
}

fn by_own_cgroup(mounts: &[Cgroup2Mount], name: &str) -> Result<Option<PodCgroup>, InterceptError> {
    let Some((own, rel)) = mounts.iter().find_map(|m| locate(m, name)) else {
        return Ok(None);
    };
    let guard = |pod: &Path, how: String| -> Result<Option<PodCgroup>, InterceptError> {
        // Never the top of a tree: on a node that would intercept everything.
        if mounts.iter().any(|m| m.root == "/" && m.dir == pod) {
            return Err(InterceptError::PodCgroup(format!(
                "the parent of this process's cgroup ({name}) is the top of the cgroup tree \
                 seen here: `--cgroup auto` is for a Pod's init container; pass --cgroup PATH"
            )));
        }
        Ok(Some(PodCgroup {
            path: pod.to_path_buf(),
            how,
        }))
    };
    if !rel.is_empty() {
        let pod = own.parent().expect("a subdirectory has a parent");
        return guard(
            pod,
            format!("parent of this container's cgroup {}", own.display()),
        );
    }
    // The own cgroup is the top of the mount that shows it (cgroup namespace):
    // look for its inode under the other mounts.
    let id = cgroup_id(&own)?;
    for m in mounts {
        if let Some(dir) = find_by_id(&m.dir, id)
            && dir != m.dir
            && let Some(pod) = dir.parent()
        {
            return guard(
                pod,
                format!(
                    "parent of this container's cgroup (id {id}, found as {})",
                    dir.display()
                ),
            );
        }
    }
    Ok(None)
}

/// True when a directory is the kubelet's name for the Pod `uid` (either
/// cgroup driver), or podman's for the pod `uid` (`kube play` gives its pod
/// ID as `metadata.uid`): `libpod_parent/<id>` with cgroupfs,
/// `machine-libpod_pod_<id>.slice` with systemd.
fn named_after(dir: &Path, uid: &str) -> bool {
    let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let in_libpod_parent = dir
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|p| p == "libpod_parent");
    if in_libpod_parent && name == uid {
        return true;
    }
    let name = name.strip_suffix(".slice").unwrap_or(name);
    [uid.to_string(), uid.replace('-', "_")].iter().any(|u| {
        name.strip_suffix(u.as_str())
            .is_some_and(|p| p.ends_with("pod") || p.ends_with("-libpod_pod_"))
    })
}

fn by_pod_uid(mounts: &[Cgroup2Mount], uid: &str) -> Result<PodCgroup, InterceptError> {
    if uid.is_empty() || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(InterceptError::PodCgroup(format!(
            "`{uid}` is not a Pod UID"
        )));
    }
    for m in mounts {
        let mut stack = vec![(m.dir.clone(), 0)];
        while let Some((dir, depth)) = stack.pop() {
            if named_after(&dir, uid) {
                return Ok(PodCgroup {
                    how: format!("named after Pod UID {uid}"),
                    path: dir,
                });
            }
            if depth >= 6 {
                continue;
            }
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    Err(InterceptError::PodCgroup(format!(
        "no cgroup named after Pod UID {uid} under {}: mount the node's /sys/fs/cgroup into \
         the container (hostPath)",
        mounts
            .iter()
            .map(|m| m.dir.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
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

/// The inode of the initial PID namespace (`PROC_PID_INIT_INO`, a kernel
/// constant): only there do the PIDs in `ambassador-run-<pid>` names mean
/// the processes this one sees.
const INIT_PID_NS: u64 = 0xEFFF_FFFC;

fn in_initial_pid_namespace() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() == INIT_PID_NS)
}

/// Removes the `ambassador-run-<pid>` cgroups whose `ambassador run` is gone
/// (killed outright, its reaper too, so nothing cleaned up): what is left of
/// its command tree is killed (the pins kept it from going direct, but its
/// proxy is gone for good), then the cgroup goes, and with it the links'
/// hold. Returns the cgroups removed, with their ids (what their pins are
/// named by). Outside the initial PID namespace a PID says nothing about the
/// host's processes: only empty cgroups are removed there.
pub fn sweep_stale_runs(mount: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(entries) = fs::read_dir(mount) else {
        return Vec::new();
    };
    let pids_are_ours = in_initial_pid_namespace();
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ambassador-run-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let gone = pids_are_ours && !Path::new(&format!("/proc/{pid}")).exists();
        let empty = procs(&e.path()).is_empty();
        let Ok(id) = cgroup_id(&e.path()) else {
            continue;
        };
        if (gone || (empty && !pids_are_ours))
            && TransientCgroup::adopt(e.path())
                .remove(Duration::from_secs(5))
                .is_ok()
        {
            removed.push((e.path(), id));
        }
    }
    removed
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

    /// One this process did not create (a dead `run`'s, for its reaper).
    pub fn adopt(path: PathBuf) -> Self {
        TransientCgroup { path }
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

    /// What a containerd container with a private cgroup namespace and the
    /// node's cgroupfs mounted from the host sees.
    const CONTAINER_MOUNTINFO: &str = "\
1418 1396 0:38 /../../.. /host/sys/fs/cgroup ro,relatime master:9 - cgroup2 cgroup2 rw,nsdelegate
1402 1399 0:38 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup ro,nsdelegate
1403 1396 0:25 / /sys/fs/bpf rw,relatime master:10 - bpf bpf rw,mode=700
1404 1396 253:1 /var/lib/kubelet/pods/x/volumes/kubernetes.io~configmap/c /etc/a\\040b ro - ext4 /dev/vda1 rw
";

    #[test]
    fn mountinfo_lists_cgroup2_mounts_with_their_roots() {
        assert_eq!(
            parse_mountinfo(CONTAINER_MOUNTINFO),
            vec![
                Cgroup2Mount {
                    root: "/../../..".into(),
                    dir: "/host/sys/fs/cgroup".into()
                },
                Cgroup2Mount {
                    root: "/".into(),
                    dir: "/sys/fs/cgroup".into()
                },
            ]
        );
    }

    #[test]
    fn pod_uid_names_both_cgroup_drivers() {
        let uid = "0b6ad8e2-4b1c-4d8e-9e0f-2f6f1c1c2a3b";
        for name in [
            "/sys/fs/cgroup/kubepods/burstable/pod0b6ad8e2-4b1c-4d8e-9e0f-2f6f1c1c2a3b",
            "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod0b6ad8e2_4b1c_4d8e_9e0f_2f6f1c1c2a3b.slice",
        ] {
            assert!(named_after(Path::new(name), uid), "{name}");
        }
        // podman (`kube play`), whose pod ID is the Pod's `metadata.uid`.
        let id = "04ccee82c07c268cebf6ea07595526b8cf53301beacbda52c8d22a1d80427558";
        for name in [
            format!("/sys/fs/cgroup/libpod_parent/{id}"),
            format!("/sys/fs/cgroup/machine.slice/machine-libpod_pod_{id}.slice"),
        ] {
            assert!(named_after(Path::new(&name), id), "{name}");
        }
        for name in [
            format!("/sys/fs/cgroup/other/{id}"),
            format!("/sys/fs/cgroup/libpod_parent/x{id}"),
        ] {
            assert!(!named_after(Path::new(&name), id), "{name}");
        }
        for name in [
            "/sys/fs/cgroup/kubepods/burstable/pod1b6ad8e2-4b1c-4d8e-9e0f-2f6f1c1c2a3b",
            "/sys/fs/cgroup/kubepods/burstable/x0b6ad8e2-4b1c-4d8e-9e0f-2f6f1c1c2a3b",
            "/sys/fs/cgroup/0b6ad8e2-4b1c-4d8e-9e0f-2f6f1c1c2a3b",
        ] {
            assert!(!named_after(Path::new(name), uid), "{name}");
        }
    }

    #[test]
    fn own_cgroup_is_located_below_the_mount_that_shows_it() {
        let host = Cgroup2Mount {
            root: "/".into(),
            dir: "/".into(),
        };
        // Any existing directory stands for a cgroup here: only the path logic is under test.
        assert_eq!(
            locate(&host, "/tmp"),
            Some((PathBuf::from("/tmp"), "tmp".into()))
        );
        let ns = Cgroup2Mount {
            root: "/../..".into(),
            dir: "/".into(),
        };
        assert_eq!(locate(&ns, "/"), None);
        let bound = Cgroup2Mount {
            root: "/kubepods/pod1/c1".into(),
            dir: "/tmp".into(),
        };
        assert_eq!(
            locate(&bound, "/kubepods/pod1/c1"),
            Some((PathBuf::from("/tmp"), String::new()))
        );
        assert_eq!(locate(&bound, "/kubepods/pod1/c10"), None);
    }
}
