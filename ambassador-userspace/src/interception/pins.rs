//! What `init` leaves in bpffs so the programs outlive it, and how `status` and
//! `uninstall` find it again.
//!
//! Layout: `/sys/fs/bpf/ambassador/cgroup-<id>/` holds the maps (by their names)
//! and one `link_<program>` per attachment. One directory per Pod cgroup, so
//! Pods on a node never share state.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
};

use ambassador_common::{maps as m, programs as p};
use aya::maps::{Map, MapData, PerCpuArray};

use super::{
    cgroup,
    error::InterceptError,
    link,
    load::{LoadOptions, attach, attach_accel, attach_inbound, configure, load, set_accelerate},
};
use crate::config::Config;

pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn root() -> PathBuf {
    Path::new(BPFFS).join("ambassador")
}

pub fn dir_for(cgroup_id: u64) -> PathBuf {
    root().join(format!("cgroup-{cgroup_id}"))
}

/// The maps a Pod's own proxy may open (counters to read, exclusions, the
/// UDP allow list, and the inbound ports and fail mode to update on reload), pinned a second
/// time under the Pod's UID so the sidecar can be given this one directory
/// and nothing else of the node. The inbound listener map is among them:
/// the proxy puts its listeners in.
pub const SHARED_MAPS: [&str; 9] = [
    m::COUNTERS,
    m::EXCLUDE_PORTS,
    m::EXCLUDE_V4,
    m::EXCLUDE_V6,
    m::IN_LISTEN,
    m::IN_PORTS,
    m::IN_CONFIG,
    m::UDP_V4,
    m::UDP_V6,
];

pub fn shared_dir_for(pod_uid: &str) -> PathBuf {
    root().join(format!("pod-{pod_uid}"))
}

/// Pins the Pod's [`SHARED_MAPS`] again under `pod-<uid>/`, mode 0666: a
/// pinned map is opened by file permission (no capability), and what limits
/// who may is the path. bpffs' root is root-only, so on the node only root
/// reaches these; the Pod's sidecar gets exactly this directory mounted (by
/// the Pod's UID), so it reaches its own Pod's maps and no other's. (No
/// chown to the proxy's uid: that would cost the init container CAP_CHOWN.)
pub fn share_with_proxy(install: &Path, pod_uid: &str) -> Result<PathBuf, InterceptError> {
    use std::os::unix::fs::PermissionsExt as _;
    let valid = !pod_uid.is_empty()
        && pod_uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(InterceptError::Pin {
            path: shared_dir_for(pod_uid),
            source: std::io::Error::other("a Pod UID is letters, digits, - and _"),
        });
    }
    let dir = shared_dir_for(pod_uid);
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InterceptError::Pin { path, source }
    };
    // A re-run of init replaces what an earlier one shared.
    remove_dir(&dir)?;
    fs::create_dir_all(&dir).map_err(err(&dir))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(err(&dir))?;
    for name in SHARED_MAPS {
        let from = install.join(name);
        let to = dir.join(name);
        let map = MapData::from_pin(&from)
            .map_err(|e| err(&from)(std::io::Error::other(e.to_string())))?;
        map.pin(&to)
            .map_err(|e| err(&to)(std::io::Error::other(e.to_string())))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o666)).map_err(err(&to))?;
    }
    Ok(dir)
}

/// The id of the counters map pinned in `dir`: what ties a `pod-<uid>`
/// directory to its `cgroup-<id>` install.
fn counters_id(dir: &Path) -> Option<u32> {
    aya::maps::MapInfo::from_pin(dir.join(m::COUNTERS))
        .ok()
        .map(|i| i.id())
}

/// Removes the `pod-*` directories that share maps with `install`, or, with
/// `None`, those whose install is gone.
fn remove_shared(install: Option<&Path>) {
    let Ok(entries) = fs::read_dir(root()) else {
        return;
    };
    let live: Vec<u32> = match install {
        Some(_) => Vec::new(),
        None => fs::read_dir(root())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("cgroup-"))
            .filter_map(|e| counters_id(&e.path()))
            .collect(),
    };
    let target = install.and_then(counters_id);
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with("pod-") {
            continue;
        }
        let id = counters_id(&e.path());
        let remove = match install {
            Some(_) => target.is_some() && id == target,
            // A young one may be another `init` sharing its Pod's maps right
            // now (the directory made, its pins, or its install's, not yet):
            // left for a later sweep.
            None => id.is_none_or(|id| !live.contains(&id)) && is_old(&e.path()),
        };
        if remove {
            let _ = remove_files(&e.path());
        }
    }
}

/// Older than `ABANDONED_AFTER`: no `init` is still making it.
fn is_old(dir: &Path) -> bool {
    fs::metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > ABANDONED_AFTER)
}

pub(super) fn link_path(dir: &Path, prog: &str) -> PathBuf {
    dir.join(format!("link_{prog}"))
}

fn is_bpffs() -> bool {
    let target = std::ffi::CString::new(BPFFS).expect("static path");
    // SAFETY: valid path; st is plain data written by the kernel.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    unsafe { libc::statfs(target.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// In a container the bpffs must be the node's (a hostPath volume): one
/// mounted by `ensure_bpffs` there would go with the container, pins and all.
pub fn require_bpffs() -> Result<(), InterceptError> {
    if is_bpffs() {
        Ok(())
    } else {
        Err(InterceptError::NoBpffs)
    }
}

/// Mounts bpffs at /sys/fs/bpf unless something already is.
pub fn ensure_bpffs() -> Result<(), InterceptError> {
    if is_bpffs() {
        return Ok(());
    }
    let target = std::ffi::CString::new(BPFFS).expect("static path");
    let src = std::ffi::CString::new("bpf").expect("static");
    let mode = std::ffi::CString::new("mode=0700").expect("static");
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            mode.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(InterceptError::Environment {
            what: format!("cannot mount bpffs at {BPFFS} (is /sys writable in this container?)"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// What `init` did.
#[derive(Debug)]
pub struct Installed {
    pub dir: PathBuf,
    /// True when an earlier install was replaced in place.
    pub upgraded: bool,
}

/// Loads, configures and attaches at `cgroup_path`, then pins links and maps.
/// Re-running upgrades in place: new links are attached and pinned before the
/// old ones are removed, so interception never lapses and never doubles up.
pub fn install(
    cgroup_path: &Path,
    netns: &Path,
    cfg: &Config,
    log_level: u8,
) -> Result<Installed, InterceptError> {
    cgroup::check_cgroup2(cgroup_path)?;
    let id = cgroup::cgroup_id(cgroup_path)?;
    ensure_bpffs()?;
    let dir = dir_for(id);
    fs::create_dir_all(&dir).map_err(|source| InterceptError::Pin {
        path: dir.clone(),
        source,
    })?;
    let mut bpf = load(&LoadOptions {
        pin_dir: Some(&dir),
        table_size: cfg.intercept.table_size,
        log_level,
    })?;
    configure(
        &mut bpf,
        cfg,
        cfg.proxy.port,
        cfg.dns.port,
        Some(cfg.proxy.uid),
    )?;
    let cg =
        File::open(cgroup_path).map_err(|_| InterceptError::NoSuchCgroup(cgroup_path.into()))?;
    let mut links = attach(&mut bpf, &cg)?;
    let inbound_path = link_path(&dir, p::INBOUND);
    if cfg.inbound.enabled() {
        let ns = File::open(netns).map_err(|source| InterceptError::Environment {
            what: format!("cannot open the network namespace {}", netns.display()),
            source,
        })?;
        links.push((p::INBOUND, attach_inbound(&bpf, &ns)?));
    } else {
        // Inbound turned off: its old link goes (detaching it).
        let _ = fs::remove_file(&inbound_path);
    }
    let mut upgraded = false;
    for (name, link) in links {
        let final_path = link_path(&dir, name);
        // bpffs refuses names with dots.
        let new_path = dir.join(format!("next_{name}"));
        let pin_err = |source| InterceptError::Pin {
            path: new_path.clone(),
            source,
        };
        let _ = fs::remove_file(&new_path);
        link::pin(&link, &new_path).map_err(pin_err)?;
        // Removing the old pin drops the last reference to the old link, which
        // detaches it; the new one is already in place.
        match fs::remove_file(&final_path) {
            Ok(()) => upgraded = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(InterceptError::Pin {
                    path: final_path,
                    source,
                });
            }
        }
        fs::rename(&new_path, &final_path).map_err(pin_err)?;
    }
    // The sockhash is reused from its pin, so its sk_msg link is too: moved
    // to the new program, or made and pinned the first time.
    let accel_path = link_path(&dir, p::ACCEL);
    let existing = link::open_pinned(&accel_path).ok().flatten();
    match attach_accel(&bpf, existing.as_ref())? {
        Some(l) => link::pin(&l, &accel_path).map_err(|source| InterceptError::Pin {
            path: accel_path.clone(),
            source,
        })?,
        None if existing.is_none() => {
            tracing::warn!(
                "this kernel cannot attach sk_msg programs with a bpf_link (Linux 6.10+): \
                 app<->proxy bytes take the loopback TCP path"
            );
            set_accelerate(&mut bpf, false)?;
        }
        None => {}
    }
    Ok(Installed { dir, upgraded })
}

/// Pins the links `ambassador run` attached to its transient cgroup, so its
/// command tree stays intercepted (and its fail mode holds) whatever becomes
/// of the `run` process: `kill -9` included. Removed by `run` at its end, by
/// its reaper, or by the next `run` or `gc` once the cgroup is gone.
pub fn pin_links(
    cgroup_path: &Path,
    links: &[(&'static str, std::os::fd::OwnedFd)],
) -> Result<PathBuf, InterceptError> {
    let id = cgroup::cgroup_id(cgroup_path)?;
    ensure_bpffs()?;
    let dir = dir_for(id);
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InterceptError::Pin { path, source }
    };
    fs::create_dir_all(&dir).map_err(err(&dir))?;
    for (name, l) in links {
        let path = link_path(&dir, name);
        link::pin(l, &path).map_err(err(&path))?;
    }
    Ok(dir)
}

/// Removes what `ambassador run`s killed outright (their reapers too) left:
/// their command trees and cgroups, then their pins (a removed cgroup lets
/// go of its links only later, so the pins are named by the ids).
pub fn sweep_stale_runs(mount: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for (cg, id) in cgroup::sweep_stale_runs(mount) {
        if let Err(e) = remove_dir(&dir_for(id)) {
            tracing::warn!("cannot remove the pins of {}: {e}", cg.display());
        }
        removed.push(cg);
    }
    removed
}

/// Detaches and unpins everything for `cgroup_path`. Returns false when there
/// was nothing to remove.
pub fn uninstall(cgroup_path: &Path) -> Result<bool, InterceptError> {
    let id = cgroup::cgroup_id(cgroup_path)?;
    remove_dir(&dir_for(id))
}

/// Removes one install directory: links first (detaching), then maps.
pub fn remove_dir(dir: &Path) -> Result<bool, InterceptError> {
    if !dir.exists() {
        return Ok(false);
    }
    if dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("cgroup-"))
    {
        remove_shared(Some(dir));
    }
    remove_files(dir)?;
    let _ = fs::remove_dir(root()); // only succeeds once the last Pod is gone
    Ok(true)
}

/// Unpins everything in `dir` and removes it.
fn remove_files(dir: &Path) -> Result<(), InterceptError> {
    let entries = fs::read_dir(dir).map_err(|source| InterceptError::Pin {
        path: dir.into(),
        source,
    })?;
    let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    // Links before maps, so no program runs against a half-removed state.
    names.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
    });
    // NotFound is success: a concurrent `gc` or `init` may be removing the same.
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    for path in names {
        gone(fs::remove_file(&path)).map_err(|source| InterceptError::Pin {
            path: path.clone(),
            source,
        })?;
    }
    gone(fs::remove_dir(dir)).map_err(|source| InterceptError::Pin {
        path: dir.into(),
        source,
    })
}

/// What a sweep for installs of deleted Pods found.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Cgroup ids whose pins were removed.
    pub removed: Vec<u64>,
    /// Stale installs that could not be removed.
    pub failed: Vec<InterceptError>,
}

/// An install directory with no link pinned is only taken for abandoned (an
/// `init` that died half-way, its Pod since deleted) once it is this old, so a
/// concurrent `init` that has pinned its maps but not yet its links is safe.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the pins of every install whose Pod cgroup is gone.
///
/// When the kubelet removes a Pod's cgroup the kernel detaches our links from
/// it, but the pins keep links, programs and maps alive: nothing of the Pod
/// runs any more, yet it all stays on the node until someone unpins it. A
/// pinned cgroup link reports the cgroup it is attached to, and id 0 once that
/// cgroup is gone: that kernel fact, not a path lookup (a container may only
/// see part of the cgroup tree), decides. An install with no link at all is
/// removed only when its cgroup is nowhere under the visible cgroup2 mounts and
/// the directory is older than a minute.
pub fn sweep_stale() -> Sweep {
    let mut sweep = Sweep::default();
    let Ok(entries) = fs::read_dir(root()) else {
        return sweep;
    };
    for e in entries.flatten() {
        let Some(id) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("cgroup-"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let dir = e.path();
        if !is_stale(&dir, id) {
            continue;
        }
        match remove_dir(&dir) {
            Ok(_) => sweep.removed.push(id),
            Err(err) => sweep.failed.push(err),
        }
    }
    // Shared copies whose install went with a Pod (or was never finished).
    remove_shared(None);
    sweep.removed.sort_unstable();
    sweep
}

fn is_stale(dir: &Path, id: u64) -> bool {
    let mut links = 0;
    for prog in p::ALL {
        match link::open_pinned(&link_path(dir, prog)) {
            Ok(Some(fd)) => match link::cgroup_id(&fd) {
                Ok(None) => links += 1,
                // Attached (or not ours to judge): keep.
                Ok(Some(_)) | Err(_) => return false,
            },
            Ok(None) => {}
            Err(_) => return false,
        }
    }
    if links > 0 {
        return true;
    }
    is_old(dir)
        && cgroup::cgroup2_mounts()
            .unwrap_or_default()
            .iter()
            .all(|m| cgroup::find_by_id(&m.dir, id).is_none())
}

/// The counters of the install that covers this process (the proxy in its
/// Pod): the nearest ancestor cgroup with pins. Reading them needs CAP_BPF
/// (kernel.unprivileged_bpf_disabled), which a locked-down sidecar lacks:
/// the error says so, and `ambassador status` on the node shows them anyway.
pub fn own_counters() -> Result<PerCpuArray<MapData, u64>, String> {
    let pin = own_pin(m::COUNTERS)?;
    let data = MapData::from_pin(&pin).map_err(|e| {
        format!(
            "cannot open {}: {e} (reading pinned maps needs CAP_BPF)",
            pin.display()
        )
    })?;
    PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(|e| e.to_string())
}

/// Where the map `name` of the install covering this process is pinned:
/// the nearest ancestor cgroup with pins.
pub fn own_pin(name: &str) -> Result<PathBuf, String> {
    let mount = cgroup::cgroup2_mount().map_err(|e| e.to_string())?;
    let own = cgroup::cgroup_of(std::process::id()).map_err(|e| e.to_string())?;
    let mut dir = Some(mount.join(own));
    while let Some(d) = dir {
        if let Ok(id) = cgroup::cgroup_id(&d) {
            let pin = dir_for(id).join(name);
            if pin.exists() {
                return Ok(pin);
            }
        }
        if d == mount {
            break;
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    Err("no pins found for this process's cgroup or its ancestors (none installed, or not visible without root / CAP_BPF)".into())
}
