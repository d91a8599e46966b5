//! What went wrong on the kernel side.

use std::path::PathBuf;

/// What went wrong on the kernel side. Never retryable by the proxy; each
/// message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error(
        "must run as root (with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, or CAP_SYS_ADMIN) to load eBPF programs"
    )]
    NotRoot,
    #[error(
        "cgroup v2 is not mounted (no cgroup2 entry in /proc/mounts): is the node on cgroup v2?"
    )]
    NoCgroup2,
    #[error("cgroup {0} does not exist: pass the Pod's cgroup directory under the cgroup2 mount")]
    NoSuchCgroup(PathBuf),
    #[error("{0} is not in a cgroup v2 hierarchy: is the Pod's cgroup v2 mounted there?")]
    NotCgroup2(PathBuf),
    #[error("cannot find the Pod's cgroup: {0}")]
    PodCgroup(String),
    #[error(
        "no bpffs at /sys/fs/bpf: mount one on the node and give it to the init container as a \
         hostPath volume (a bpffs mounted inside the container would vanish with it, and the \
         interception along)"
    )]
    NoBpffs,
    #[error("nothing is installed at {0}: run `ambassador init --cgroup` first")]
    NotInstalled(PathBuf),
    #[error("kernel {found} is too old: ambassador needs Linux 5.8 or newer")]
    KernelTooOld { found: String },
    #[error("{what}: {source}")]
    Environment {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the eBPF object: {0} (does the kernel have CONFIG_CGROUP_BPF and BTF?)")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl InterceptError {
    pub(super) fn program(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> Self {
        move |e| InterceptError::Program {
            name,
            source: Box::new(e),
        }
    }
    pub(super) fn map(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |e| InterceptError::Map {
            name,
            source: Box::new(e),
        }
    }
}
