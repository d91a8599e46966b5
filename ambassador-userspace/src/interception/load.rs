//! Loading the eBPF object, writing its maps (config, exclusions),
//! attaching its programs, and reading its counters and connection table.

use std::{
    fs::File,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use ambassador_common::{
    Config as KernelConfig, ConnKey, INBOUND_PASS_V4, InboundConfig as KernelInbound, NO_UID,
    OrigDst, counter, maps as m, programs as p,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::Program,
};
use ipnet::IpNet;

use super::{cgroup, error::InterceptError, link};
use crate::config::{Config, FailMode};

/// The compiled programs, built by `cargo xtask build` and embedded.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("AMBASSADOR_BPF_OBJECT"));

/// Minimum kernel: cgroup getpeername hooks and CAP_BPF arrived in 5.8.
const MIN_KERNEL: (u32, u32) = (5, 8);

/// Checks what every loading command needs, with a message naming what is missing.
pub fn check_environment() -> Result<(), InterceptError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(InterceptError::NotRoot);
    }
    let (release, version) = kernel_version();
    if version < MIN_KERNEL {
        return Err(InterceptError::KernelTooOld { found: release });
    }
    cgroup::cgroup2_mount()?;
    Ok(())
}

/// The running kernel's release string and (major, minor).
fn kernel_version() -> (String, (u32, u32)) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim().to_string();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (release, version)
}

/// Kernels before 5.11 charge BPF maps and programs to RLIMIT_MEMLOCK, which
/// container runtimes often leave at 64 KiB; later ones charge the memory
/// cgroup and ignore it. Raising the hard limit needs CAP_SYS_RESOURCE; without
/// it the soft limit still goes up to the hard one.
pub fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscalls on a valid rlimit struct.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) == 0 {
            return;
        }
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim);
            if kernel_version().1 < (5, 11) && lim.rlim_max != libc::RLIM_INFINITY {
                tracing::warn!(
                    "RLIMIT_MEMLOCK is {} KiB and this kernel charges eBPF maps to it: if loading \
                     fails, give the init container CAP_SYS_RESOURCE",
                    lim.rlim_max / 1024
                );
            }
        }
    }
}

/// How the programs are loaded.
pub struct LoadOptions<'a> {
    /// Pin (or reuse pinned) maps here; `None` keeps them private to this process.
    pub pin_dir: Option<&'a Path>,
    pub table_size: u32,
    /// aya-log level for the programs (0 off .. 5 trace); fixed at load.
    pub log_level: u8,
}

/// Loads the object: maps created (or reopened from pins), programs verified,
/// nothing attached yet.
pub fn load(opts: &LoadOptions<'_>) -> Result<Ebpf, InterceptError> {
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(m::COOKIES, opts.table_size)
        .map_max_entries(m::CONNS, opts.table_size)
        .override_global(aya_log::LEVEL, &opts.log_level, false);
    let pin_paths: Vec<(&'static str, PathBuf)> = match opts.pin_dir {
        Some(dir) => m::PINNED.iter().map(|n| (*n, dir.join(n))).collect(),
        None => Vec::new(),
    };
    super::layout::drop_changed(&pin_paths, OBJECT);
    for (name, path) in &pin_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut bpf = loader
        .load(OBJECT)
        .map_err(|e| InterceptError::Load(Box::new(e)))?;
    for name in p::ALL.into_iter().chain([p::ACCEL, p::INBOUND]) {
        let prog = bpf
            .program_mut(name)
            .ok_or_else(|| InterceptError::Program {
                name,
                source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
            })?;
        match prog {
            Program::CgroupSockAddr(p) => p.load(),
            Program::SockOps(p) => p.load(),
            Program::CgroupSockopt(p) => p.load(),
            Program::SkMsg(p) => p.load(),
            Program::SkLookup(p) => p.load(),
            _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
        }
        .map_err(InterceptError::program(name))?;
    }
    Ok(bpf)
}

/// Writes the config map and the exclusion maps; entries no longer configured
/// are removed, so this also updates pinned maps in place.
pub fn configure(
    bpf: &mut Ebpf,
    cfg: &Config,
    proxy_port: u16,
    dns_port: u16,
    proxy_uid: Option<u32>,
) -> Result<(), InterceptError> {
    let kcfg = KernelConfig {
        proxy_port,
        fail_open: u8::from(cfg.intercept.fail == FailMode::Open),
        loopback: u8::from(cfg.intercept.loopback),
        proxy_uid: proxy_uid.unwrap_or(NO_UID),
        proxy_mark: cfg.proxy.mark.unwrap_or(0),
        accelerate: u8::from(cfg.intercept.accelerate),
        udp_deny: u8::from(cfg.default == crate::config::service::DefaultPolicy::Deny),
        dns_port: 0,
    };
    let resolvers = cfg.dns_resolvers();
    let kcfg = KernelConfig {
        dns_port: if resolvers.is_empty() { 0 } else { dns_port },
        ..kcfg
    };
    dns_resolvers(&mut map_mut(bpf, m::DNS)?, &resolvers)?;
    let allowed = udp_allowed(cfg);
    udp_v4(&mut map_mut(bpf, m::UDP_V4)?, &allowed)?;
    udp_v6(&mut map_mut(bpf, m::UDP_V6)?, &allowed)?;
    excluded_ports(&mut map_mut(bpf, m::EXCLUDE_PORTS)?, cfg)?;
    excluded_v4(&mut map_mut(bpf, m::EXCLUDE_V4)?, cfg)?;
    excluded_v6(&mut map_mut(bpf, m::EXCLUDE_V6)?, cfg)?;
    configure_inbound(bpf, cfg)?;
    // The config entry goes last: until it is written the programs touch nothing.
    let mut conf: Array<_, KernelConfig> = map_mut(bpf, m::CONFIG)?;
    conf.set(0, kcfg, 0)
        .map_err(InterceptError::map(m::CONFIG))?;
    Ok(())
}

/// Fills the captured resolvers' slots in order (the rest emptied): the
/// forwarder answers resolver `i` on `dns.port + i`.
fn dns_resolvers<T: std::borrow::BorrowMut<MapData>>(
    map: &mut Array<T, ambassador_common::DnsResolver>,
    resolvers: &[std::net::IpAddr],
) -> Result<(), InterceptError> {
    for i in 0..m::MAX_DNS_RESOLVERS {
        let entry = match resolvers.get(i as usize) {
            Some(ip) => {
                let (family, addr) = ambassador_common::ip_to_words(*ip);
                ambassador_common::DnsResolver {
                    addr,
                    family,
                    _pad: 0,
                }
            }
            None => Default::default(),
        };
        map.set(i, entry, 0).map_err(InterceptError::map(m::DNS))?;
    }
    Ok(())
}

/// Writes the inbound ports and the inbound config entry (last, as for
/// outbound: until then the program touches nothing).
pub fn configure_inbound(bpf: &mut Ebpf, cfg: &Config) -> Result<(), InterceptError> {
    let mut ports: HashMap<_, u16, u8> = map_mut(bpf, m::IN_PORTS)?;
    write_inbound_ports(&mut ports, cfg)?;
    let mut conf: Array<_, KernelInbound> = map_mut(bpf, m::IN_CONFIG)?;
    conf.set(0, inbound_entry(cfg), 0)
        .map_err(InterceptError::map(m::IN_CONFIG))
}

/// The inbound config entry `cfg` asks for.
pub fn inbound_entry(cfg: &Config) -> KernelInbound {
    let i = &cfg.inbound;
    KernelInbound {
        enabled: u8::from(i.enabled()),
        fail_open: u8::from(i.fail == FailMode::Open),
        all_ports: u8::from(i.ports == crate::config::InboundPorts::All),
        _pad: 0,
        pass_v4: u32::from_ne_bytes(INBOUND_PASS_V4),
    }
}

/// Makes the inbound port map say what `cfg.inbound` says. The proxy's own
/// ports are never steered (with `ports: all` they would loop).
pub fn write_inbound_ports<T: std::borrow::BorrowMut<MapData>>(
    ports: &mut HashMap<T, u16, u8>,
    cfg: &Config,
) -> Result<(), InterceptError> {
    let i = &cfg.inbound;
    let mut want: std::collections::BTreeMap<u16, u8> = std::collections::BTreeMap::new();
    if let crate::config::InboundPorts::List(l) = &i.ports {
        want.extend(l.iter().map(|p| (*p, m::IN_PORT_INTERCEPT)));
    }
    let own = cfg.proxy.own_ports().chain([i.port]);
    want.extend(
        i.exclude_ports
            .iter()
            .copied()
            .chain(own)
            .map(|p| (p, m::IN_PORT_EXCLUDE)),
    );
    let stale: Vec<u16> = ports
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains_key(k))
        .collect();
    for k in stale {
        ports.remove(&k).map_err(InterceptError::map(m::IN_PORTS))?;
    }
    for (port, v) in want {
        ports
            .insert(port, v, 0)
            .map_err(InterceptError::map(m::IN_PORTS))?;
    }
    Ok(())
}

/// Attaches the sk_lookup program to a network namespace (the Pod's) as a
/// bpf_link; several coexist there, run in attach order.
pub fn attach_inbound(bpf: &Ebpf, netns: &File) -> Result<OwnedFd, InterceptError> {
    let prog = bpf.program(p::INBOUND).ok_or(InterceptError::Program {
        name: p::INBOUND,
        source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
    })?;
    let fd = prog.fd().map_err(InterceptError::program(p::INBOUND))?;
    link::create(fd.as_fd(), netns.as_fd(), link::AttachType::SkLookup).map_err(|source| {
        InterceptError::Environment {
            what: format!(
                "cannot attach {} to the network namespace (sk_lookup needs Linux 5.9+ and CAP_NET_ADMIN)",
                p::INBOUND
            ),
            source,
        }
    })
}

/// Turns the sk_msg shortcut on or off in the config map (off where it
/// cannot be attached, so no socket joins a sockhash for nothing).
pub fn set_accelerate(bpf: &mut Ebpf, on: bool) -> Result<(), InterceptError> {
    let mut conf: Array<_, KernelConfig> = map_mut(bpf, m::CONFIG)?;
    let mut k = conf.get(&0, 0).map_err(InterceptError::map(m::CONFIG))?;
    k.accelerate = u8::from(on);
    conf.set(0, k, 0).map_err(InterceptError::map(m::CONFIG))
}

/// Makes the exclusion maps say what `cfg.intercept` says (stale entries
/// removed): at `init` on the loaded object, and on reload by a proxy that
/// may open its Pod's maps.
pub fn write_exclusions<T: std::borrow::BorrowMut<MapData>>(
    ports: &mut HashMap<T, u16, u8>,
    v4: &mut LpmTrie<T, [u8; 4], u8>,
    v6: &mut LpmTrie<T, [u8; 16], u8>,
    cfg: &Config,
) -> Result<(), InterceptError> {
    excluded_ports(ports, cfg)?;
    excluded_v4(v4, cfg)?;
    excluded_v6(v6, cfg)
}

/// Makes the UDP allow tries say what `intercept.udp` says: its list and
/// the resolvers of `resolvers_from` on port 53 (stale entries removed).
pub fn write_udp<T: std::borrow::BorrowMut<MapData>>(
    v4: &mut LpmTrie<T, [u8; 6], u8>,
    v6: &mut LpmTrie<T, [u8; 18], u8>,
    cfg: &Config,
) -> Result<(), InterceptError> {
    let allowed = udp_allowed(cfg);
    udp_v4(v4, &allowed)?;
    udp_v6(v6, &allowed)
}

/// The IPv4 trie: (port, address) prefixes; `*:PORT` is the port alone.
fn udp_v4<T: std::borrow::BorrowMut<MapData>>(
    v4: &mut LpmTrie<T, [u8; 6], u8>,
    allowed: &[crate::config::udp::UdpAllow],
) -> Result<(), InterceptError> {
    let want: Vec<(u32, [u8; 6])> = allowed
        .iter()
        .filter_map(|a| {
            let n = match a.net {
                None => ipnet::Ipv4Net::default(),
                Some(IpNet::V4(n)) => n,
                Some(IpNet::V6(_)) => return None,
            };
            let mut data = [0u8; 6];
            data[..2].copy_from_slice(&a.port.to_be_bytes());
            data[2..].copy_from_slice(&n.addr().octets());
            Some((16 + u32::from(n.prefix_len()), data))
        })
        .collect();
    refill(v4, m::UDP_V4, &want)
}

/// The IPv6 trie, as the IPv4 one.
fn udp_v6<T: std::borrow::BorrowMut<MapData>>(
    v6: &mut LpmTrie<T, [u8; 18], u8>,
    allowed: &[crate::config::udp::UdpAllow],
) -> Result<(), InterceptError> {
    let want: Vec<(u32, [u8; 18])> = allowed
        .iter()
        .filter_map(|a| {
            let n = match a.net {
                None => ipnet::Ipv6Net::default(),
                Some(IpNet::V6(n)) => n,
                Some(IpNet::V4(_)) => return None,
            };
            let mut data = [0u8; 18];
            data[..2].copy_from_slice(&a.port.to_be_bytes());
            data[2..].copy_from_slice(&n.addr().octets());
            Some((16 + u32::from(n.prefix_len()), data))
        })
        .collect();
    refill(v6, m::UDP_V6, &want)
}

/// Makes an LPM trie hold exactly `want` (prefix bits, data).
fn refill<T: std::borrow::BorrowMut<MapData>, const N: usize>(
    trie: &mut LpmTrie<T, [u8; N], u8>,
    name: &'static str,
    want: &[(u32, [u8; N])],
) -> Result<(), InterceptError> {
    let stale: Vec<Key<[u8; N]>> = trie.keys().filter_map(Result::ok).collect();
    for k in stale {
        trie.remove(&k).map_err(InterceptError::map(name))?;
    }
    for (bits, data) in want {
        trie.insert(&Key::new(*bits, *data), 1, 0)
            .map_err(InterceptError::map(name))?;
    }
    Ok(())
}

/// Every UDP destination `cfg` allows: its list, and port 53 of the
/// resolvers its file names (a file that cannot be read adds none).
pub fn udp_allowed(cfg: &Config) -> Vec<crate::config::udp::UdpAllow> {
    use crate::config::udp::{UdpAllow, nameservers};
    let u = &cfg.intercept.udp;
    let mut all = u.allow.clone();
    if let Some(path) = &u.resolvers_from {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        all.extend(nameservers(&text).into_iter().take(8).map(|ip| UdpAllow {
            net: Some(IpNet::from(ip)),
            port: 53,
        }));
    }
    all
}

fn excluded_ports<T: std::borrow::BorrowMut<MapData>>(
    ports: &mut HashMap<T, u16, u8>,
    cfg: &Config,
) -> Result<(), InterceptError> {
    let stale: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
    for k in stale {
        ports
            .remove(&k)
            .map_err(InterceptError::map(m::EXCLUDE_PORTS))?;
    }
    for port in &cfg.intercept.exclude_ports {
        ports
            .insert(port, 1, 0)
            .map_err(InterceptError::map(m::EXCLUDE_PORTS))?;
    }
    Ok(())
}

fn excluded_v4<T: std::borrow::BorrowMut<MapData>>(
    v4: &mut LpmTrie<T, [u8; 4], u8>,
    cfg: &Config,
) -> Result<(), InterceptError> {
    let want: Vec<(u32, [u8; 4])> = cfg
        .intercept
        .exclude_cidrs
        .iter()
        .filter_map(|c| match c.0 {
            IpNet::V4(n) => Some((u32::from(n.prefix_len()), n.addr().octets())),
            IpNet::V6(_) => None,
        })
        .collect();
    refill(v4, m::EXCLUDE_V4, &want)
}

fn excluded_v6<T: std::borrow::BorrowMut<MapData>>(
    v6: &mut LpmTrie<T, [u8; 16], u8>,
    cfg: &Config,
) -> Result<(), InterceptError> {
    let want: Vec<(u32, [u8; 16])> = cfg
        .intercept
        .exclude_cidrs
        .iter()
        .filter_map(|c| match c.0 {
            IpNet::V6(n) => Some((u32::from(n.prefix_len()), n.addr().octets())),
            IpNet::V4(_) => None,
        })
        .collect();
    refill(v6, m::EXCLUDE_V6, &want)
}

fn map_mut<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<T, InterceptError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = bpf.map_mut(name).ok_or_else(|| InterceptError::Map {
        name,
        source: Box::new(aya::maps::MapError::InvalidName { name: name.into() }),
    })?;
    T::try_from(map).map_err(InterceptError::map(name))
}

/// Attaches every program to `cgroup` and returns the links: dropping one
/// detaches it, pinning it keeps it. bpf_links coexist with other cgroup
/// programs (Cilium's, say) on the same hooks.
pub fn attach(
    bpf: &mut Ebpf,
    cgroup: &File,
) -> Result<Vec<(&'static str, OwnedFd)>, InterceptError> {
    use link::AttachType as A;
    let hooks = [
        (p::CONNECT4, A::Inet4Connect),
        (p::CONNECT6, A::Inet6Connect),
        (p::SOCKOPS, A::SockOps),
        (p::GETSOCKOPT, A::GetSockopt),
        (p::GETPEERNAME4, A::Inet4GetPeerName),
        (p::GETPEERNAME6, A::Inet6GetPeerName),
        (p::SENDMSG4, A::Udp4SendMsg),
        (p::SENDMSG6, A::Udp6SendMsg),
        (p::RECVMSG4, A::Udp4RecvMsg),
        (p::RECVMSG6, A::Udp6RecvMsg),
    ];
    let mut links = Vec::with_capacity(hooks.len());
    for (name, at) in hooks {
        let prog = bpf.program(name).ok_or(InterceptError::Program {
            name,
            source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
        })?;
        let fd = prog.fd().map_err(InterceptError::program(name))?;
        let l = link::create(fd.as_fd(), cgroup.as_fd(), at).map_err(|source| {
            InterceptError::Environment {
                what: format!(
                    "cannot attach {name} to the cgroup (is cgroup BPF enabled in this kernel?)"
                ),
                source,
            }
        })?;
        links.push((name, l));
    }
    Ok(links)
}

/// Attaches the sk_msg program to the sockhash of the app's and the proxy's
/// sockets, as a bpf_link (kernel 6.10+), or, given the link pinned by an
/// earlier `init`, moves that link to the new program (a sockhash takes one
/// sk_msg program, and the sockets in it stay). `Ok(None)`: the kernel has
/// no sockmap links, so bytes keep to the TCP path; the caller says so.
pub fn attach_accel(
    bpf: &Ebpf,
    existing: Option<&OwnedFd>,
) -> Result<Option<OwnedFd>, InterceptError> {
    let prog = bpf.program(p::ACCEL).ok_or(InterceptError::Program {
        name: p::ACCEL,
        source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
    })?;
    let prog_fd = prog.fd().map_err(InterceptError::program(p::ACCEL))?;
    if let Some(link) = existing {
        link::update(link.as_fd(), prog_fd.as_fd()).map_err(|source| {
            InterceptError::Environment {
                what: format!(
                    "cannot move the pinned {} link to the new program",
                    p::ACCEL
                ),
                source,
            }
        })?;
        return Ok(None);
    }
    let socks = match bpf.map(m::SOCKS) {
        Some(aya::maps::Map::SockHash(d)) => d,
        _ => {
            return Err(InterceptError::Map {
                name: m::SOCKS,
                source: Box::new(aya::maps::MapError::InvalidName {
                    name: m::SOCKS.into(),
                }),
            });
        }
    };
    match link::create_for_map(
        prog_fd.as_fd(),
        socks.fd().as_fd(),
        link::AttachType::SkMsgVerdict,
    ) {
        Ok(l) => Ok(Some(l)),
        // Sockmap links came in 6.10; older kernels answer EINVAL.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(source) => Err(InterceptError::Environment {
            what: format!("cannot attach {} to the {} map", p::ACCEL, m::SOCKS),
            source,
        }),
    }
}

/// Serves these counters at every `/metrics` scrape.
pub fn counters_into_metrics(counters: std::sync::Arc<PerCpuArray<MapData, u64>>) {
    crate::metrics::get().state().set(
        "kernel",
        Box::new(move |rows| rows.kernel = read_counters(&counters)),
    );
}

/// Says once why `/metrics` has no kernel counters.
pub fn no_counters_in_metrics(why: &str) {
    tracing::info!("kernel counters are not in /metrics: {why}");
}

/// Sums the per-CPU counters: (name, value) in `counter::NAMES` order.
pub fn read_counters(map: &PerCpuArray<MapData, u64>) -> Vec<(&'static str, u64)> {
    (0..counter::COUNT)
        .map(|i| {
            let total = map.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
            (counter::NAMES[i as usize], total)
        })
        .collect()
}

/// The original-destination table as the proxy reads it when it owns the maps
/// (`ambassador run`), instead of asking the kernel through getsockopt.
pub type ConnTable = HashMap<MapData, ConnKey, OrigDst>;

/// Takes the counters and the connection table out of a loaded object.
pub fn take_tables(
    bpf: &mut Ebpf,
) -> Result<(PerCpuArray<MapData, u64>, ConnTable), InterceptError> {
    let counters = bpf.take_map(m::COUNTERS).ok_or(InterceptError::Map {
        name: m::COUNTERS,
        source: Box::new(aya::maps::MapError::InvalidName {
            name: m::COUNTERS.into(),
        }),
    })?;
    let conns = bpf.take_map(m::CONNS).ok_or(InterceptError::Map {
        name: m::CONNS,
        source: Box::new(aya::maps::MapError::InvalidName {
            name: m::CONNS.into(),
        }),
    })?;
    Ok((
        PerCpuArray::try_from(counters).map_err(InterceptError::map(m::COUNTERS))?,
        ConnTable::try_from(conns).map_err(InterceptError::map(m::CONNS))?,
    ))
}
