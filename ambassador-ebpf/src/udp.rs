//! UDP under `default: deny`: a datagram the app sends with an address
//! (`sendto`/`sendmsg`: the `sendmsg4/6` hooks) or a UDP socket it
//! connects (`connect4/6`) is allowed only toward a destination the allow
//! tries hold (`intercept.udp.allow`, the resolvers); else the call fails
//! with EPERM at once, counted. Loopback, the proxy's own sockets, and
//! every datagram when `udp_deny` is off pass untouched. Nothing is
//! rewritten: UDP is not proxied.

use ambassador_common::{Config, counter, maps as m};
use aya_ebpf::{
    macros::map,
    maps::{LpmTrie, lpm_trie::Key},
    programs::SockAddrContext,
};

use crate::{ALLOW, DENY, count, is_proxy_socket, is_v4_mapped};

const IPPROTO_UDP: u32 = 17;

/// (port in network order, IPv4 address) -> 1.
#[map(name = "AMB_UDP_V4")]
static UDP_V4: LpmTrie<[u8; 6], u8> = LpmTrie::with_max_entries(m::MAX_UDP_ALLOWED, 0);
/// (port in network order, IPv6 address) -> 1.
#[map(name = "AMB_UDP_V6")]
static UDP_V6: LpmTrie<[u8; 18], u8> = LpmTrie::with_max_entries(m::MAX_UDP_ALLOWED, 0);

/// The verdict on an IPv4 destination (`addr` as the kernel gives it,
/// `port` in network order as in `user_port`).
#[inline(always)]
pub fn verdict_v4(ctx: &SockAddrContext, cfg: &Config, addr: u32, port: u32) -> i32 {
    if !policed(ctx, cfg) || addr.to_ne_bytes()[0] == 127 {
        return ALLOW;
    }
    let p = (port as u16).to_ne_bytes();
    let a = addr.to_ne_bytes();
    let key = Key::new(48, [p[0], p[1], a[0], a[1], a[2], a[3]]);
    judged(UDP_V4.get(&key).is_some())
}

/// The verdict on an IPv6 destination (v4-mapped ones as IPv4).
#[inline(always)]
pub fn verdict_v6(ctx: &SockAddrContext, cfg: &Config, addr: [u32; 4], port: u32) -> i32 {
    if is_v4_mapped(&addr) {
        return verdict_v4(ctx, cfg, addr[3], port);
    }
    let loopback =
        addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == u32::from_ne_bytes([0, 0, 0, 1]);
    if !policed(ctx, cfg) || loopback {
        return ALLOW;
    }
    let p = (port as u16).to_ne_bytes();
    let mut k = [0u8; 18];
    k[0] = p[0];
    k[1] = p[1];
    let mut i = 0;
    while i < 4 {
        let w = addr[i].to_ne_bytes();
        k[2 + i * 4] = w[0];
        k[3 + i * 4] = w[1];
        k[4 + i * 4] = w[2];
        k[5 + i * 4] = w[3];
        i += 1;
    }
    judged(UDP_V6.get(&Key::new(144, k)).is_some())
}

/// A UDP socket of the app's under `udp_deny`.
#[inline(always)]
fn policed(ctx: &SockAddrContext, cfg: &Config) -> bool {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    cfg.udp_deny != 0 && sa.protocol == IPPROTO_UDP && !is_proxy_socket(ctx, cfg)
}

#[inline(always)]
fn judged(allowed: bool) -> i32 {
    if allowed {
        count(counter::UDP_ALLOWED);
        ALLOW
    } else {
        count(counter::UDP_REFUSED);
        DENY
    }
}
