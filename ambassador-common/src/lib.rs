//! What the ambassador's eBPF programs and its userspace agree on: map names and
//! layouts, program names, counter indices and defaults.
//!
//! Addresses are kept as the kernel hands them to the programs: IPv4 as one
//! network-order `u32`, IPv6 as four network-order `u32` words. Ports are in host
//! order. Every struct is `#[repr(C)]` with explicit padding so both sides see the
//! same bytes.
#![no_std]

/// Default redirect target port on 127.0.0.1 and ::1.
pub const DEFAULT_PROXY_PORT: u16 = 15001;
/// Default uid of the proxy (Istio's convention); its sockets are never redirected.
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// `Config::proxy_uid` value meaning "exclude no uid" (used by `ambassador run`,
/// where the proxy lives outside the intercepted cgroup).
pub const NO_UID: u32 = u32::MAX;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` and `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`.
pub const SO_ORIGINAL_DST: i32 = 80;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;

/// `getsockopt(SOL_IP, SO_AMB_SHORTCUT)` on the proxy's accepted socket: the
/// kernel's answer to "did the app's bytes take the sk_msg shortcut, and how
/// many" ([`ShortcutAnswer`]), so the proxy knows when the socket's receive
/// queue alone holds what is left (and `splice(2)` may read it). A private
/// option number that no kernel uses on SOL_IP; only the getsockopt program
/// answers it (a kernel without it says ENOPROTOOPT).
pub const SO_AMB_SHORTCUT: i32 = 0x414d;

/// The app's socket has not sent yet, or is not on the shortcut at all.
pub const SHORTCUT_NONE: u32 = 0;
/// Its sends go straight to the proxy socket's message queue.
pub const SHORTCUT_TAKE: u32 = 1;
/// Its sends go by TCP, for good (the move is one way).
pub const SHORTCUT_KEEP_TCP: u32 = 2;

/// The answer to [`SO_AMB_SHORTCUT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ShortcutAnswer {
    /// `SHORTCUT_*`.
    pub state: u32,
    pub _pad: u32,
    /// Bytes the app's socket has sent by the shortcut, in total.
    pub redirected: u64,
}

/// Default size of the per-connection tables (original destinations).
pub const DEFAULT_TABLE_SIZE: u32 = 65_536;

/// Names of the maps, as in the object file (and as pinned in bpffs).
pub mod maps {
    pub const CONFIG: &str = "AMB_CONFIG";
    pub const EXCLUDE_PORTS: &str = "AMB_EXCL_PORTS";
    pub const EXCLUDE_V4: &str = "AMB_EXCL_V4";
    pub const EXCLUDE_V6: &str = "AMB_EXCL_V6";
    pub const COOKIES: &str = "AMB_COOKIES";
    pub const CONNS: &str = "AMB_CONNS";
    pub const COUNTERS: &str = "AMB_COUNTERS";
    /// The two local ends of redirected connections (the app's socket and the
    /// proxy's accepted one), for the sk_msg shortcut between them.
    pub const SOCKS: &str = "AMB_SOCKS";
    /// Per sending socket: whether its bytes take the shortcut (decided once,
    /// at its first send, so a connection's bytes never mix both paths).
    pub const ACCEL: &str = "AMB_ACCEL";
    /// The single entry of the inbound config (`InboundConfig`).
    pub const IN_CONFIG: &str = "AMB_IN_CONFIG";
    /// Inbound ports, by host-order port: `IN_PORT_INTERCEPT` or `IN_PORT_EXCLUDE`.
    pub const IN_PORTS: &str = "AMB_IN_PORTS";
    /// The proxy's inbound listeners: index `IN_LISTEN_V4` and `IN_LISTEN_V6`.
    pub const IN_LISTEN: &str = "AMB_IN_LISTEN";
    /// UDP destinations allowed under `default: deny`: LPM tries keyed by
    /// the port (2 bytes, network order) then the address, so a prefix
    /// of 16 bits is "this port, any address".
    pub const UDP_V4: &str = "AMB_UDP_V4";
    pub const UDP_V6: &str = "AMB_UDP_V6";
    pub const MAX_UDP_ALLOWED: u32 = 256;
    /// The resolvers whose DNS the proxy's forwarder takes (`DnsResolver`
    /// by index: resolver `i` is answered on `Config::dns_port + i`).
    pub const DNS: &str = "AMB_DNS";
    /// As glibc's MAXNS (3), and one more.
    pub const MAX_DNS_RESOLVERS: u32 = 4;
    pub const IN_PORT_INTERCEPT: u8 = 1;
    pub const IN_PORT_EXCLUDE: u8 = 2;
    pub const IN_LISTEN_V4: u32 = 0;
    pub const IN_LISTEN_V6: u32 = 1;
    pub const MAX_INBOUND_PORTS: u32 = 256;
    /// Every map the programs pin, in the order `status` lists them.
    pub const PINNED: [&str; 15] = [
        CONFIG,
        EXCLUDE_PORTS,
        EXCLUDE_V4,
        EXCLUDE_V6,
        COOKIES,
        CONNS,
        COUNTERS,
        SOCKS,
        ACCEL,
        IN_CONFIG,
        IN_PORTS,
        IN_LISTEN,
        UDP_V4,
        UDP_V6,
        DNS,
    ];
    pub const MAX_EXCLUDED_PORTS: u32 = 64;
    pub const MAX_EXCLUDED_CIDRS: u32 = 256;
}

/// Names of the programs (function names in the object file).
pub mod programs {
    pub const CONNECT4: &str = "ambassador_connect4";
    pub const CONNECT6: &str = "ambassador_connect6";
    pub const SOCKOPS: &str = "ambassador_sockops";
    pub const GETSOCKOPT: &str = "ambassador_getsockopt";
    pub const GETPEERNAME4: &str = "ambassador_getpeername4";
    pub const GETPEERNAME6: &str = "ambassador_getpeername6";
    /// UDP datagrams sent with an address (`sendto`, `sendmsg`).
    pub const SENDMSG4: &str = "ambassador_sendmsg4";
    pub const SENDMSG6: &str = "ambassador_sendmsg6";
    /// Replies from the DNS forwarder read with an address (`recvfrom`):
    /// the app sees its resolver as the sender.
    pub const RECVMSG4: &str = "ambassador_recvmsg4";
    pub const RECVMSG6: &str = "ambassador_recvmsg6";
    /// The cgroup programs, one link each.
    pub const ALL: [&str; 10] = [
        CONNECT4,
        CONNECT6,
        SOCKOPS,
        GETSOCKOPT,
        GETPEERNAME4,
        GETPEERNAME6,
        SENDMSG4,
        SENDMSG6,
        RECVMSG4,
        RECVMSG6,
    ];
    /// The sk_msg program, attached to the `AMB_SOCKS` map rather than a cgroup.
    pub const ACCEL: &str = "ambassador_accel";
    /// The sk_lookup program, attached to the Pod's network namespace.
    pub const INBOUND: &str = "ambassador_inbound";
}

/// Indices into the per-CPU counter array.
pub mod counter {
    /// Redirected to the proxy.
    pub const REDIRECTED: u32 = 0;
    /// Left alone on purpose: excluded port or CIDR, loopback.
    pub const BYPASSED: u32 = 1;
    /// Refused: proxy absent under fail-closed, or a direct connect to the proxy port.
    pub const REFUSED: u32 = 2;
    /// Went direct because the proxy was absent under fail-open.
    pub const PASSED: u32 = 3;
    /// app<->proxy byte streams (one per direction of a redirected
    /// connection) that took the sk_msg shortcut.
    pub const ACCELERATED: u32 = 4;
    /// Inbound: handed to the proxy's inbound listener.
    pub const IN_REDIRECTED: u32 = 5;
    /// Inbound: delivered straight to the app (proxy absent under fail-open).
    pub const IN_PASSED: u32 = 6;
    /// Inbound: refused (proxy absent under fail-closed).
    pub const IN_REFUSED: u32 = 7;
    /// UDP under `default: deny`: datagrams (or UDP connects) to an
    /// allowed destination ...
    pub const UDP_ALLOWED: u32 = 8;
    /// ... and refused ones (EPERM).
    pub const UDP_REFUSED: u32 = 9;
    /// DNS queries to a captured resolver handed to the proxy's forwarder.
    pub const DNS_REDIRECTED: u32 = 10;
    pub const COUNT: u32 = 11;
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected",
        "bypassed",
        "refused",
        "passed",
        "accelerated",
        "inbound_redirected",
        "inbound_passed",
        "inbound_refused",
        "udp_allowed",
        "udp_refused",
        "dns_redirected",
    ];
}

/// The single entry of the config map, written by `init` / `run`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Proxy listener port in host order; 0 means "not configured, touch nothing".
    pub proxy_port: u16,
    /// 1: connect directly when the proxy is absent; 0: refuse.
    pub fail_open: u8,
    /// 1: also intercept 127.0.0.0/8 and ::1.
    pub loopback: u8,
    /// Sockets created by this uid are never redirected; `NO_UID` for none.
    pub proxy_uid: u32,
    /// Sockets carrying this SO_MARK are never redirected; 0 for none.
    pub proxy_mark: u32,
    /// 1: bytes between the app and the proxy skip the loopback TCP stack
    /// (sk_msg redirect between the two sockets).
    pub accelerate: u8,
    /// 1: UDP to destinations outside `AMB_UDP_V4`/`AMB_UDP_V6` is refused
    /// (`default: deny`); 0: UDP is left alone.
    pub udp_deny: u8,
    /// Host order: the first port of the proxy's DNS forwarder (resolver
    /// `i` of `AMB_DNS` on `dns_port + i`); 0: DNS is not captured.
    pub dns_port: u16,
}

/// A resolver whose DNS (UDP port 53) the forwarder takes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsResolver {
    /// Network-order words; IPv4 uses `addr[0]` only.
    pub addr: [u32; 4],
    /// `AF_INET`, `AF_INET6`, or 0 for an empty slot.
    pub family: u16,
    pub _pad: u16,
}

/// The single entry of the inbound config map, written by `init` / `run`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InboundConfig {
    /// 1: the program steers connections; 0: it touches nothing.
    pub enabled: u8,
    /// 1: deliver to the app when the proxy's listener is gone; 0: refuse.
    pub fail_open: u8,
    /// 1: every port not excluded; 0: only ports marked `IN_PORT_INTERCEPT`.
    pub all_ports: u8,
    pub _pad: u8,
    /// Connections from this address (network order) are the proxy's own to
    /// the app and always pass (127.0.0.6, as Istio uses).
    pub pass_v4: u32,
}

/// The source address the proxy uses toward the app, which the inbound
/// program lets through.
pub const INBOUND_PASS_V4: [u8; 4] = [127, 0, 0, 6];
/// Default port of the proxy's inbound listener (on 127.0.0.1 and ::1).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

/// Where the app meant to go.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// Network-order words; IPv4 uses `addr[0]` only.
    pub addr: [u32; 4],
    /// Host order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
}

/// One redirected connection, as both its ends can name it: the app's address
/// and ephemeral port, and the proxy listener port it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnKey {
    /// Network-order words; IPv4 uses `app_addr[0]` only.
    pub app_addr: [u32; 4],
    /// Host order.
    pub app_port: u16,
    /// Host order.
    pub proxy_port: u16,
    pub family: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of them are repr(C), contain only integers, and have no implicit
    // padding (explicit `_pad` fields), so any bit pattern is valid.
    unsafe impl aya::Pod for Config {}
    // SAFETY: see above.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: see above.
    unsafe impl aya::Pod for ConnKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for InboundConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for DnsResolver {}
}

#[cfg(feature = "user")]
pub use user_conv::*;

#[cfg(feature = "user")]
mod user_conv {
    extern crate std;
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    /// Network-order words as the kernel stores them, to an address.
    pub fn words_to_ip(family: u16, words: [u32; 4]) -> Option<IpAddr> {
        match family {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))),
            AF_INET6 => {
                let mut b = [0u8; 16];
                for (i, w) in words.iter().enumerate() {
                    b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
                }
                Some(IpAddr::V6(Ipv6Addr::from(b)))
            }
            _ => None,
        }
    }

    /// An address to the kernel's network-order words.
    pub fn ip_to_words(ip: IpAddr) -> (u16, [u32; 4]) {
        match ip {
            IpAddr::V4(v4) => (AF_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                (AF_INET6, [w(0), w(4), w(8), w(12)])
            }
        }
    }

    impl OrigDst {
        pub fn socket_addr(&self) -> Option<SocketAddr> {
            words_to_ip(self.family, self.addr).map(|ip| SocketAddr::new(ip, self.port))
        }
    }

    impl ConnKey {
        /// The key of a connection accepted by the proxy, from its peer (the app)
        /// and the listener port.
        pub fn from_accepted(peer: SocketAddr, proxy_port: u16) -> Self {
            // An app's IPv6 socket to ::ffff:127.0.0.1 reaches the v4 listener; the
            // kernel side keys those as IPv4 too.
            let ip = match peer.ip() {
                IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map(IpAddr::V4)
                    .unwrap_or(IpAddr::V6(v6)),
                v4 => v4,
            };
            let (family, app_addr) = ip_to_words(ip);
            ConnKey {
                app_addr,
                app_port: peer.port(),
                proxy_port,
                family,
                _pad: 0,
            }
        }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use super::*;
    use std::net::{IpAddr, SocketAddr};

    #[test]
    fn words_round_trip() {
        for s in ["10.1.2.3", "2001:db8::1", "::1", "127.0.0.1"] {
            let ip: IpAddr = s.parse().unwrap();
            let (f, w) = ip_to_words(ip);
            assert_eq!(words_to_ip(f, w), Some(ip));
        }
    }

    #[test]
    fn mapped_peer_keys_as_v4() {
        let peer: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        let k = ConnKey::from_accepted(peer, 15001);
        assert_eq!(k.family, AF_INET);
        assert_eq!(k.app_addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(k.app_port, 40000);
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<Config>(), 16);
        assert_eq!(core::mem::size_of::<OrigDst>(), 20);
        assert_eq!(core::mem::size_of::<ConnKey>(), 24);
        assert_eq!(core::mem::size_of::<DnsResolver>(), 20);
        assert_eq!(core::mem::size_of::<InboundConfig>(), 8);
    }
}
