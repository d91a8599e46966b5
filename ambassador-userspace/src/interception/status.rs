//! What `status` shows of each install on the host: its pins, links,
//! kernel config, counters, the outbound exemptions and the inbound half,
//! read from the pinned maps.

use std::{fs, path::PathBuf};

use ambassador_common::{
    Config as KernelConfig, ConnKey, InboundConfig as KernelInbound, OrigDst, maps as m,
    programs as p,
};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};

use super::{
    cgroup, link,
    load::read_counters,
    pins::{link_path, root},
};

/// One install as `status` shows it.
#[derive(Debug)]
pub struct InstallStatus {
    pub dir: PathBuf,
    pub cgroup_id: u64,
    pub cgroup: Option<PathBuf>,
    /// (program, pinned link present and openable)
    pub links: Vec<(&'static str, bool)>,
    pub config: Option<KernelConfig>,
    pub counters: Vec<(&'static str, u64)>,
    /// Connections currently in the original-destination table.
    pub tracked: usize,
    /// The sk_lookup link is pinned (inbound interception on).
    pub inbound_link: bool,
    pub inbound: Option<KernelInbound>,
    /// Ports the inbound program steers or leaves, as in its map.
    pub inbound_ports: Vec<(u16, u8)>,
    /// Outbound TCP the programs leave alone, as in their maps: ports, and
    /// address blocks (`10.0.0.0/8`).
    pub exempt_ports: Vec<u16>,
    pub exempt_cidrs: Vec<String>,
    /// Where UDP may go (`*:53`, `10.0.0.0/8:5000`), as in its tries.
    pub udp_allowed: Vec<String>,
    /// The resolvers whose DNS goes to the forwarder, in index order.
    pub dns_resolvers: Vec<std::net::IpAddr>,
}

/// Every install on this host.
pub fn list() -> Vec<InstallStatus> {
    let mount = cgroup::cgroup2_mount().ok();
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(root()) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name
            .strip_prefix("cgroup-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let dir = e.path();
        let links = p::ALL
            .iter()
            .map(|prog| {
                let present = link::open_pinned(&link_path(&dir, prog)).ok().flatten();
                (*prog, present.is_some())
            })
            .collect();
        let open = |name: &str| MapData::from_pin(dir.join(name)).ok();
        let config = open(m::CONFIG)
            .and_then(|d| Array::<_, KernelConfig>::try_from(Map::Array(d)).ok())
            .and_then(|a| a.get(&0, 0).ok());
        let counters = open(m::COUNTERS)
            .and_then(|d| PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(d)).ok())
            .map(|a| read_counters(&a))
            .unwrap_or_default();
        let tracked = open(m::CONNS)
            .and_then(|d| HashMap::<_, ConnKey, OrigDst>::try_from(Map::LruHashMap(d)).ok())
            .map(|h| h.keys().count())
            .unwrap_or(0);
        let inbound = open(m::IN_CONFIG)
            .and_then(|d| Array::<_, KernelInbound>::try_from(Map::Array(d)).ok())
            .and_then(|a| a.get(&0, 0).ok());
        let mut inbound_ports: Vec<(u16, u8)> = open(m::IN_PORTS)
            .and_then(|d| HashMap::<_, u16, u8>::try_from(Map::HashMap(d)).ok())
            .map(|h| h.iter().filter_map(Result::ok).collect())
            .unwrap_or_default();
        inbound_ports.sort_unstable();
        let inbound_link = link::open_pinned(&link_path(&dir, p::INBOUND))
            .ok()
            .flatten()
            .is_some();
        let (exempt_ports, exempt_cidrs) = exemptions(&open);
        out.push(InstallStatus {
            exempt_ports,
            exempt_cidrs,
            udp_allowed: udp_allowed(&open),
            dns_resolvers: dns_resolvers(&open),
            inbound_link,
            inbound,
            inbound_ports,
            cgroup: mount.as_deref().and_then(|m| cgroup::find_by_id(m, id)),
            dir,
            cgroup_id: id,
            links,
            config,
            counters,
            tracked,
        });
    }
    out.sort_by_key(|s| s.cgroup_id);
    out
}

/// The captured resolvers, as `init` wrote them.
fn dns_resolvers(open: &dyn Fn(&str) -> Option<MapData>) -> Vec<std::net::IpAddr> {
    let Some(a) = open(m::DNS)
        .and_then(|d| Array::<_, ambassador_common::DnsResolver>::try_from(Map::Array(d)).ok())
    else {
        return Vec::new();
    };
    (0..m::MAX_DNS_RESOLVERS)
        .filter_map(|i| a.get(&i, 0).ok())
        .filter_map(|r| ambassador_common::words_to_ip(r.family, r.addr))
        .collect()
}

/// The UDP allow tries' entries, as `intercept.udp.allow` writes them.
fn udp_allowed(open: &dyn Fn(&str) -> Option<MapData>) -> Vec<String> {
    use crate::config::udp::UdpAllow;
    use ipnet::{IpNet, Ipv4Net, Ipv6Net};
    let mut out: Vec<String> = Vec::new();
    let entry = |port: [u8; 2], net: Option<IpNet>| {
        UdpAllow {
            net,
            port: u16::from_be_bytes(port),
        }
        .to_string()
    };
    if let Some(t) =
        open(m::UDP_V4).and_then(|d| LpmTrie::<_, [u8; 6], u8>::try_from(Map::LpmTrie(d)).ok())
    {
        for k in t.keys().filter_map(Result::ok) {
            let d = k.data();
            let bits = k.prefix_len().saturating_sub(16) as u8;
            let ip = std::net::Ipv4Addr::new(d[2], d[3], d[4], d[5]);
            let net = (bits > 0).then(|| IpNet::V4(Ipv4Net::new(ip, bits).unwrap_or_default()));
            out.push(entry([d[0], d[1]], net));
        }
    }
    if let Some(t) =
        open(m::UDP_V6).and_then(|d| LpmTrie::<_, [u8; 18], u8>::try_from(Map::LpmTrie(d)).ok())
    {
        for k in t.keys().filter_map(Result::ok) {
            let d = k.data();
            let bits = k.prefix_len().saturating_sub(16) as u8;
            let mut a = [0u8; 16];
            a.copy_from_slice(&d[2..]);
            let ip = std::net::Ipv6Addr::from(a);
            // `*:PORT` is written to both tries: said once.
            if bits == 0 {
                continue;
            }
            let net = Some(IpNet::V6(Ipv6Net::new(ip, bits).unwrap_or_default()));
            out.push(entry([d[0], d[1]], net));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The exclusion maps' ports and blocks, sorted.
fn exemptions(open: &dyn Fn(&str) -> Option<MapData>) -> (Vec<u16>, Vec<String>) {
    let mut ports: Vec<u16> = open(m::EXCLUDE_PORTS)
        .and_then(|d| HashMap::<_, u16, u8>::try_from(Map::HashMap(d)).ok())
        .map(|h| h.keys().filter_map(Result::ok).collect())
        .unwrap_or_default();
    ports.sort_unstable();
    let mut cidrs: Vec<String> = Vec::new();
    if let Some(t) =
        open(m::EXCLUDE_V4).and_then(|d| LpmTrie::<_, [u8; 4], u8>::try_from(Map::LpmTrie(d)).ok())
    {
        cidrs.extend(
            t.keys()
                .filter_map(Result::ok)
                .map(|k| format!("{}/{}", std::net::Ipv4Addr::from(k.data()), k.prefix_len())),
        );
    }
    if let Some(t) =
        open(m::EXCLUDE_V6).and_then(|d| LpmTrie::<_, [u8; 16], u8>::try_from(Map::LpmTrie(d)).ok())
    {
        cidrs.extend(
            t.keys()
                .filter_map(Result::ok)
                .map(|k| format!("{}/{}", std::net::Ipv6Addr::from(k.data()), k.prefix_len())),
        );
    }
    cidrs.sort();
    (ports, cidrs)
}
