//! The kernel side as the tests inspect it: the Pod's pinned maps (the
//! interception counters, the original-destination tables), the BPF objects
//! on the host, and the programs `bpftool` shows attached to a cgroup.

use std::{fs, os::unix::fs::MetadataExt, path::Path, path::PathBuf, process::Command};

use ambassador_common::{ConnKey, OrigDst, counter, maps};
use aya::maps::{Map, MapData, PerCpuArray};

use super::Pod;
use crate::{process::sh, stdout};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub redirected: u64,
    pub bypassed: u64,
    pub refused: u64,
    pub passed: u64,
    /// app<->proxy byte streams (one per direction) on the sk_msg shortcut.
    pub accelerated: u64,
    /// Callers' connections the sk_lookup program handed to the proxy.
    pub inbound_redirected: u64,
    /// UDP sends and connects under `default: deny`: allowed, refused.
    pub udp_allowed: u64,
    pub udp_refused: u64,
    /// DNS queries handed to the proxy's forwarder.
    pub dns_redirected: u64,
}

impl Pod {
    pub fn pin_dir(&self) -> PathBuf {
        let ino = fs::metadata(&self.cgroup).expect("cgroup").ino();
        PathBuf::from(format!("/sys/fs/bpf/ambassador/cgroup-{ino}"))
    }

    /// The kernel counters, by name.
    pub fn counters(&self) -> Counters {
        let data = MapData::from_pin(self.pin_dir().join(maps::COUNTERS)).expect("pinned counters");
        let arr = PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(data)).expect("counters map");
        let get = |i: u32| arr.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
        Counters {
            redirected: get(counter::REDIRECTED),
            bypassed: get(counter::BYPASSED),
            refused: get(counter::REFUSED),
            passed: get(counter::PASSED),
            accelerated: get(counter::ACCELERATED),
            inbound_redirected: get(counter::IN_REDIRECTED),
            udp_allowed: get(counter::UDP_ALLOWED),
            udp_refused: get(counter::UDP_REFUSED),
            dns_redirected: get(counter::DNS_REDIRECTED),
        }
    }

    /// Entries in the original-destination tables (AMB_CONNS, AMB_COOKIES).
    pub fn tracked(&self) -> (usize, usize) {
        let open = |name: &str| {
            Map::LruHashMap(MapData::from_pin(self.pin_dir().join(name)).expect("pinned table"))
        };
        let conns = aya::maps::HashMap::<_, ConnKey, OrigDst>::try_from(open(maps::CONNS))
            .expect("connection table");
        let cookies = aya::maps::HashMap::<_, u64, OrigDst>::try_from(open(maps::COOKIES))
            .expect("cookie table");
        (conns.keys().count(), cookies.keys().count())
    }
}

/// Counts of BPF objects on the host (programs, maps, links).
pub fn bpf_object_counts() -> (usize, usize, usize) {
    (
        aya::programs::loaded_programs().count(),
        aya::maps::loaded_maps().count(),
        aya::programs::loaded_links().count(),
    )
}

/// `bpftool cgroup show` for one cgroup: the attached programs, one per line.
pub fn attached_programs(cgroup: &Path) -> String {
    let out = sh(Command::new("bpftool")
        .arg("cgroup")
        .arg("show")
        .arg(cgroup));
    stdout(&out)
}
