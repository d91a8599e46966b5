//! DNS capture: the app's UDP queries to a captured resolver (port 53 of an
//! address in `AMB_DNS`) go to the proxy's forwarder on loopback instead
//! (resolver `i` to `dns_port + i`, so the forwarder knows which resolver
//! the app asked), on `connect` and on `sendto`/`sendmsg`. Replies read
//! with an address (`recvfrom`, the `recvmsg4/6` hooks) and the peer of a
//! connected socket (`getpeername`) name the resolver again, so resolvers
//! that check where answers come from (glibc does) take them. The proxy's
//! own sockets, and every query while the forwarder is not listening under
//! `fail: open`, pass untouched. TCP queries need nothing here: they are
//! redirected like any connection and the proxy recognises port 53.

use ambassador_common::{AF_INET, AF_INET6, Config, DnsResolver, counter, maps as m};
use aya_ebpf::{bindings::bpf_sock_addr, macros::map, maps::Array, programs::SockAddrContext};

use crate::{ALLOW, DENY, count, is_proxy_socket, is_v4_mapped, listening};

const IPPROTO_UDP: u32 = 17;
const DNS_PORT: u16 = 53;

#[map(name = "AMB_DNS")]
static DNS: Array<DnsResolver> = Array::with_max_entries(m::MAX_DNS_RESOLVERS, 0);

const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
const MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The index of the resolver at `addr` (IPv4 in word 0), if captured.
#[inline(always)]
fn resolver_index(family: u16, addr: &[u32; 4]) -> Option<u32> {
    let mut i = 0;
    while i < m::MAX_DNS_RESOLVERS {
        if let Some(r) = DNS.get(i) {
            let same = if family == AF_INET {
                r.addr[0] == addr[0]
            } else {
                r.addr == *addr
            };
            if r.family == family && same {
                return Some(i);
            }
        }
        i += 1;
    }
    None
}

/// Whether this is the app's UDP to port 53 while capture is on.
#[inline(always)]
fn candidate(ctx: &SockAddrContext, cfg: &Config, sa: &bpf_sock_addr) -> bool {
    cfg.dns_port != 0
        && sa.protocol == IPPROTO_UDP
        && u16::from_be(sa.user_port as u16) == DNS_PORT
        && !is_proxy_socket(ctx, cfg)
}

/// The forwarder's port for resolver `i`, when it listens; `Err` with the
/// verdict otherwise (pass under fail-open, refuse under fail-closed).
#[inline(always)]
fn forwarder(ctx: &SockAddrContext, cfg: &Config, i: u32, v4: bool) -> Result<u16, Option<i32>> {
    let port = cfg.dns_port + i as u16;
    if listening(ctx, v4, port, true) {
        return Ok(port);
    }
    if cfg.fail_open != 0 {
        Err(None)
    } else {
        count(counter::REFUSED);
        Err(Some(DENY))
    }
}

/// IPv4 `connect`/`sendmsg`: `Some(verdict)` when the datagram is DNS the
/// forwarder takes (rewritten to it), `None` to judge it as any UDP.
#[inline(always)]
pub fn capture_v4(ctx: &SockAddrContext, cfg: &Config, sa: &mut bpf_sock_addr) -> Option<i32> {
    if !candidate(ctx, cfg, sa) {
        return None;
    }
    let i = resolver_index(AF_INET, &[sa.user_ip4, 0, 0, 0])?;
    match forwarder(ctx, cfg, i, true) {
        Ok(port) => {
            sa.user_ip4 = LOOPBACK_V4;
            sa.user_port = port.to_be() as u32;
            count(counter::DNS_REDIRECTED);
            Some(ALLOW)
        }
        Err(verdict) => verdict,
    }
}

/// IPv6, as IPv4; a v4-mapped resolver goes to the v4 forwarder, mapped.
#[inline(always)]
pub fn capture_v6(ctx: &SockAddrContext, cfg: &Config, sa: &mut bpf_sock_addr) -> Option<i32> {
    if !candidate(ctx, cfg, sa) {
        return None;
    }
    let ip6 = sa.user_ip6;
    let mapped = is_v4_mapped(&ip6);
    let i = if mapped {
        resolver_index(AF_INET, &[ip6[3], 0, 0, 0])?
    } else {
        resolver_index(AF_INET6, &ip6)?
    };
    match forwarder(ctx, cfg, i, mapped) {
        Ok(port) => {
            sa.user_ip6 = if mapped {
                [0, 0, MAPPED, LOOPBACK_V4]
            } else {
                LOOPBACK_V6
            };
            sa.user_port = port.to_be() as u32;
            count(counter::DNS_REDIRECTED);
            Some(ALLOW)
        }
        Err(verdict) => verdict,
    }
}

/// The resolver answered for by the forwarder port `port` (network order).
#[inline(always)]
fn answered_for(cfg: &Config, port: u32) -> Option<DnsResolver> {
    let p = u16::from_be(port as u16);
    if cfg.dns_port == 0 || p < cfg.dns_port || p >= cfg.dns_port + m::MAX_DNS_RESOLVERS as u16 {
        return None;
    }
    DNS.get((p - cfg.dns_port) as u32).copied()
}

/// IPv4 `recvmsg`/`getpeername` of a UDP socket: the forwarder's address
/// becomes its resolver's.
#[inline(always)]
pub fn unmask_v4(cfg: &Config, sa: &mut bpf_sock_addr) {
    if sa.protocol != IPPROTO_UDP || sa.user_ip4 != LOOPBACK_V4 {
        return;
    }
    if let Some(r) = answered_for(cfg, sa.user_port)
        && r.family == AF_INET
    {
        sa.user_ip4 = r.addr[0];
        sa.user_port = DNS_PORT.to_be() as u32;
    }
}

/// IPv6, as IPv4 (the mapped loopback for a v4 resolver).
#[inline(always)]
pub fn unmask_v6(cfg: &Config, sa: &mut bpf_sock_addr) {
    if sa.protocol != IPPROTO_UDP {
        return;
    }
    let ip6 = sa.user_ip6;
    let mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == MAPPED && ip6[3] == LOOPBACK_V4;
    if !mapped && ip6 != LOOPBACK_V6 {
        return;
    }
    let Some(r) = answered_for(cfg, sa.user_port) else {
        return;
    };
    if mapped && r.family == AF_INET {
        sa.user_ip6 = [0, 0, MAPPED, r.addr[0]];
    } else if !mapped && r.family == AF_INET6 {
        // Word by word: the context takes 4-byte stores only (a copy of the
        // array would be compiled into byte moves the verifier refuses).
        let w = |i: usize| {
            // SAFETY: reads a word of a local copy.
            unsafe { core::ptr::read_volatile(&r.addr[i]) }
        };
        sa.user_ip6 = [w(0), w(1), w(2), w(3)];
    } else {
        return;
    }
    sa.user_port = DNS_PORT.to_be() as u32;
}
