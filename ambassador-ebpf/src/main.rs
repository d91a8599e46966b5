//! The ambassador's kernel side: cgroup programs that send a Pod's outbound TCP
//! connects to the userspace proxy and let the proxy learn where they were going.
//!
//! - `connect4`/`connect6`: decide per connect (bypass, refuse, pass, redirect),
//!   remember the original destination by socket cookie, rewrite to the proxy.
//! - `sockops` (active established): re-key the original destination by the
//!   connection's 4-tuple, which is what the proxy's accepted socket can name;
//!   forget both entries when the app's socket closes.
//! - `getsockopt`: answer `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on the
//!   proxy's accepted socket from that table, exactly as netfilter would.
//! - `getpeername4/6`: the app sees the original destination as its peer.
//! - UDP (`connect4/6` on UDP sockets, `sendmsg4/6`): under `default: deny`,
//!   only to allowed destinations (`udp.rs`); DNS to the Pod's resolvers
//!   goes to the proxy's forwarder, and `recvmsg4/6` name the resolver as
//!   the sender of its answers (`dns.rs`).
//! - the shortcut: `sockops` also puts both local ends of a redirected
//!   connection (the app's socket, the proxy's accepted one) into a sockhash,
//!   and `accel` (sk_msg) hands each one's sends straight to the other's
//!   receive queue, skipping the loopback TCP stack both ways.
#![no_std]
#![no_main]

mod dns;
mod inbound;
mod udp;

use ambassador_common::{
    AF_INET, AF_INET6, Config, ConnKey, DEFAULT_TABLE_SIZE, NO_UID, OrigDst, SHORTCUT_KEEP_TCP,
    SHORTCUT_NONE, SHORTCUT_TAKE, SO_AMB_SHORTCUT, SO_ORIGINAL_DST, SOL_IP, SOL_IPV6,
    ShortcutAnswer, counter, maps as m,
};
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, bpf_sock, bpf_sock_tuple,
        sk_action,
    },
    helpers::{
        bpf_get_current_uid_gid, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_lookup_udp,
        bpf_sk_release,
    },
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_msg, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::debug;

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const SOCK_STREAM: u32 = 1;
const TCP_CLOSE: u32 = 7;

#[map(name = "AMB_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map(name = "AMB_EXCL_PORTS")]
static EXCLUDE_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(m::MAX_EXCLUDED_PORTS, 0);
#[map(name = "AMB_EXCL_V4")]
static EXCLUDE_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(m::MAX_EXCLUDED_CIDRS, 0);
#[map(name = "AMB_EXCL_V6")]
static EXCLUDE_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(m::MAX_EXCLUDED_CIDRS, 0);
/// socket cookie -> original destination, from connect until the app's socket closes.
#[map(name = "AMB_COOKIES")]
static COOKIES: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(DEFAULT_TABLE_SIZE, 0);
/// (app addr, app port, proxy port) -> original destination, from established until close.
#[map(name = "AMB_CONNS")]
static CONNS: LruHashMap<ConnKey, OrigDst> = LruHashMap::with_max_entries(DEFAULT_TABLE_SIZE, 0);
#[map(name = "AMB_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);
/// Both local ends of redirected connections, each under its own view of the
/// connection (local end first).
#[map(name = "AMB_SOCKS")]
static SOCKS: SockHash<SockKey> = SockHash::with_max_entries(DEFAULT_TABLE_SIZE, 0);
/// Sending socket (its own view) -> whether its bytes take the shortcut.
#[map(name = "AMB_ACCEL")]
static ACCEL: LruHashMap<SockKey, Accel> = LruHashMap::with_max_entries(DEFAULT_TABLE_SIZE, 0);

const TAKE: u32 = SHORTCUT_TAKE;
const KEEP_TCP: u32 = SHORTCUT_KEEP_TCP;

/// One direction's state. A redirect into the peer's receive queue is not
/// held back by the peer's receive buffer (the kernel charges it against
/// global TCP memory only), so a direction that keeps sending while the other
/// side stays silent (a large body towards a reader that has stopped) goes
/// back to TCP, and its flow control, after `ONE_WAY_LIMIT` bytes. Request and
/// response traffic resets the count at every turn and stays on the shortcut.
#[repr(C)]
#[derive(Clone, Copy)]
struct Accel {
    state: u32,
    /// Bytes sent on the shortcut since the peer last sent anything.
    one_way: u32,
    /// Bytes sent on the shortcut in all (the proxy asks, see `SO_AMB_SHORTCUT`).
    redirected: u64,
}

/// About one default TCP receive window.
const ONE_WAY_LIMIT: u32 = 256 * 1024;

/// One TCP connection as one of its local ends sees it; the other end's key
/// is the same with local and remote swapped. IPv4 (and v4-mapped IPv6) uses
/// word 0 of each address, so a dual-stack app socket and the proxy's IPv4
/// socket name the same connection.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockKey {
    local: [u32; 4],
    remote: [u32; 4],
    local_port: u32,
    remote_port: u32,
    family: u32,
}

impl SockKey {
    /// Ports in host order; addresses as the kernel gives them.
    #[inline(always)]
    fn new(family: u32, local: [u32; 4], remote: [u32; 4], lport: u32, rport: u32) -> SockKey {
        let (family, local, remote) = if family == AF_INET as u32 {
            (family, [local[0], 0, 0, 0], [remote[0], 0, 0, 0])
        } else if is_v4_mapped(&local) && is_v4_mapped(&remote) {
            (AF_INET as u32, [local[3], 0, 0, 0], [remote[3], 0, 0, 0])
        } else {
            (family, local, remote)
        };
        SockKey {
            local,
            remote,
            local_port: lport,
            remote_port: rport,
            family,
        }
    }

    /// From a context's fields (sock_ops and sk_msg name them alike).
    #[inline(always)]
    fn from_fields(
        family: u32,
        l4: u32,
        r4: u32,
        l6: [u32; 4],
        r6: [u32; 4],
        lport: u32,
        rport: u32,
    ) -> SockKey {
        let (local, remote) = if family == AF_INET as u32 {
            ([l4, 0, 0, 0], [r4, 0, 0, 0])
        } else {
            (l6, r6)
        };
        SockKey::new(family, local, remote, lport, remote_port_host(rport))
    }

    #[inline(always)]
    fn peer(&self) -> SockKey {
        SockKey {
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
        }
    }
}

/// A context's remote port, in network order in the context, to host order.
/// The kernel puts the be16 in the upper half of the u32 (since 5.x, for
/// both sock_ops and sk_msg); the lower half is taken too, for kernels that
/// did not shift it.
#[inline(always)]
fn remote_port_host(raw: u32) -> u32 {
    let v = u32::from_be(raw);
    if v > 0xffff { v >> 16 } else { v }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, programs do not migrate mid-run.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn config() -> Option<Config> {
    let cfg = *CONFIG.get(0)?;
    if cfg.proxy_port == 0 { None } else { Some(cfg) }
}

/// The proxy's own sockets: by the uid that creates them, or by the SO_MARK
/// the proxy sets on its upstream sockets before connecting.
#[inline(always)]
fn is_proxy_socket(ctx: &SockAddrContext, cfg: &Config) -> bool {
    let uid = bpf_get_current_uid_gid() as u32;
    if cfg.proxy_uid != NO_UID && uid == cfg.proxy_uid {
        return true;
    }
    if cfg.proxy_mark != 0 {
        // SAFETY: ctx is valid; sk is always set for connect hooks.
        let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
        // SAFETY: sk checked non-null; `mark` is a readable bpf_sock field.
        if !sk.is_null() && unsafe { (*sk).mark } == cfg.proxy_mark {
            return true;
        }
    }
    false
}

#[inline(always)]
fn cookie_of<C>(ctx: *mut C) -> u64 {
    // SAFETY: ctx is the program's context pointer, valid for this helper.
    unsafe { bpf_get_socket_cookie(ctx.cast()) }
}

/// The listener is looked up at every connect (no cached "proxy is up" state),
/// so a proxy that starts late or restarts is used from its first accept on.
#[inline(always)]
fn proxy_listening(ctx: &SockAddrContext, v4: bool, port: u16) -> bool {
    listening(ctx, v4, port, false)
}

/// Whether a socket of the proxy's is bound to `port` on 127.0.0.1 (or ::1),
/// TCP or UDP.
#[inline(always)]
fn listening(ctx: &SockAddrContext, v4: bool, port: u16, udp: bool) -> bool {
    // SAFETY: a zeroed tuple is a valid value of this plain-data union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if v4 {
        tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes([127, 0, 0, 1]);
        tuple.__bindgen_anon_1.ipv4.dport = port.to_be();
        core::mem::size_of::<u32>() * 2 + core::mem::size_of::<u16>() * 2
    } else {
        tuple.__bindgen_anon_1.ipv6.daddr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        tuple.__bindgen_anon_1.ipv6.dport = port.to_be();
        core::mem::size_of::<[u32; 4]>() * 2 + core::mem::size_of::<u16>() * 2
    };
    // SAFETY: ctx is valid; tuple lives on the stack for the call; a returned
    // socket is released right away as the verifier requires.
    unsafe {
        let lookup = if udp {
            bpf_sk_lookup_udp
        } else {
            bpf_sk_lookup_tcp
        };
        let sk = lookup(
            ctx.sock_addr.cast(),
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            false
        } else {
            bpf_sk_release(sk.cast());
            true
        }
    }
}

enum Verdict {
    Redirect,
    Bypass,
    Refuse,
    Pass,
}

/// The decision shared by connect4 and connect6, once the destination is known
/// in IPv4 or IPv6 form.
#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    cfg: &Config,
    cookie: u64,
    orig: &OrigDst,
    loopback: bool,
) -> Verdict {
    if loopback && orig.port == cfg.proxy_port {
        // Already rewritten by us (a second copy of this program during an
        // in-place upgrade): leave it. Otherwise the app dialled the proxy port
        // itself, which would loop or bypass policy.
        // SAFETY: plain map lookup, value not held.
        return if unsafe { COOKIES.get(&cookie) }.is_some() {
            Verdict::Bypass
        } else {
            Verdict::Refuse
        };
    }
    if loopback && cfg.loopback == 0 {
        return Verdict::Bypass;
    }
    // SAFETY: plain map lookup, value not held.
    if unsafe { EXCLUDE_PORTS.get(&orig.port) }.is_some() {
        return Verdict::Bypass;
    }
    let excluded = if orig.family == AF_INET {
        EXCLUDE_V4
            .get(&Key::new(32, orig.addr[0].to_ne_bytes()))
            .is_some()
    } else {
        EXCLUDE_V6
            .get(&Key::new(128, words_to_bytes(&orig.addr)))
            .is_some()
    };
    if excluded {
        return Verdict::Bypass;
    }
    if !proxy_listening(ctx, orig.family == AF_INET, cfg.proxy_port) {
        return if cfg.fail_open != 0 {
            Verdict::Pass
        } else {
            Verdict::Refuse
        };
    }
    Verdict::Redirect
}

#[inline(always)]
fn words_to_bytes(w: &[u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[inline(always)]
fn is_v4_mapped(w: &[u32; 4]) -> bool {
    w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[inline(always)]
fn finish(ctx: &SockAddrContext, verdict: Verdict, cookie: u64, orig: &OrigDst) -> i32 {
    match verdict {
        Verdict::Bypass => {
            count(counter::BYPASSED);
            ALLOW
        }
        Verdict::Pass => {
            count(counter::PASSED);
            ALLOW
        }
        Verdict::Refuse => {
            count(counter::REFUSED);
            log_dst(ctx, "refused", orig);
            DENY
        }
        Verdict::Redirect => {
            if COOKIES.insert(&cookie, orig, 0).is_err() {
                // Without a record the proxy could not route it: refuse rather
                // than send it somewhere unknown.
                count(counter::REFUSED);
                return DENY;
            }
            count(counter::REDIRECTED);
            log_dst(ctx, "redirected", orig);
            ALLOW
        }
    }
}

#[inline(always)]
fn log_dst(ctx: &SockAddrContext, what: &str, orig: &OrigDst) {
    if orig.family == AF_INET {
        debug!(
            ctx,
            "{} connect to {:i}:{}",
            what,
            u32::from_be(orig.addr[0]),
            orig.port
        );
    } else {
        debug!(
            ctx,
            "{} connect to [{:i}]:{}",
            what,
            words_to_bytes(&orig.addr),
            orig.port
        );
    }
}

#[cgroup_sock_addr(connect4)]
pub fn ambassador_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(cfg) = config() else { return ALLOW };
    if sa.type_ != SOCK_STREAM {
        if let Some(verdict) = dns::capture_v4(&ctx, &cfg, sa) {
            return verdict;
        }
        return udp::verdict_v4(&ctx, &cfg, sa.user_ip4, sa.user_port);
    }
    if is_proxy_socket(&ctx, &cfg) {
        return ALLOW;
    }
    let orig = OrigDst {
        addr: [sa.user_ip4, 0, 0, 0],
        port: u16::from_be(sa.user_port as u16),
        family: AF_INET,
    };
    let cookie = cookie_of(ctx.sock_addr);
    let loopback = sa.user_ip4.to_ne_bytes()[0] == 127;
    let verdict = decide(&ctx, &cfg, cookie, &orig, loopback);
    if let Verdict::Redirect = verdict {
        sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        sa.user_port = cfg.proxy_port.to_be() as u32;
    }
    finish(&ctx, verdict, cookie, &orig)
}

#[cgroup_sock_addr(connect6)]
pub fn ambassador_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(cfg) = config() else { return ALLOW };
    if sa.type_ != SOCK_STREAM {
        if let Some(verdict) = dns::capture_v6(&ctx, &cfg, sa) {
            return verdict;
        }
        return udp::verdict_v6(&ctx, &cfg, sa.user_ip6, sa.user_port);
    }
    if is_proxy_socket(&ctx, &cfg) {
        return ALLOW;
    }
    let ip6 = sa.user_ip6;
    let port = u16::from_be(sa.user_port as u16);
    let cookie = cookie_of(ctx.sock_addr);
    // A dual-stack socket dialling ::ffff:a.b.c.d is an IPv4 connection: treat
    // it as one (exclusions, loopback, the v4 listener, a v4 original dst).
    let mapped = is_v4_mapped(&ip6);
    let (orig, loopback) = if mapped {
        (
            OrigDst {
                addr: [ip6[3], 0, 0, 0],
                port,
                family: AF_INET,
            },
            ip6[3].to_ne_bytes()[0] == 127,
        )
    } else {
        let lo =
            ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == u32::from_ne_bytes([0, 0, 0, 1]);
        (
            OrigDst {
                addr: ip6,
                port,
                family: AF_INET6,
            },
            lo,
        )
    };
    let verdict = decide(&ctx, &cfg, cookie, &orig, loopback);
    if let Verdict::Redirect = verdict {
        sa.user_ip6 = if mapped {
            [
                0,
                0,
                u32::from_ne_bytes([0, 0, 0xff, 0xff]),
                u32::from_ne_bytes([127, 0, 0, 1]),
            ]
        } else {
            [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
        };
        sa.user_port = cfg.proxy_port.to_be() as u32;
    }
    finish(&ctx, verdict, cookie, &orig)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ambassador_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(cfg) = config() else { return ALLOW };
    if let Some(verdict) = dns::capture_v4(&ctx, &cfg, sa) {
        return verdict;
    }
    udp::verdict_v4(&ctx, &cfg, sa.user_ip4, sa.user_port)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ambassador_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(cfg) = config() else { return ALLOW };
    if let Some(verdict) = dns::capture_v6(&ctx, &cfg, sa) {
        return verdict;
    }
    udp::verdict_v6(&ctx, &cfg, sa.user_ip6, sa.user_port)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ambassador_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(cfg) = config() {
        dns::unmask_v4(&cfg, sa);
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ambassador_recvmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(cfg) = config() {
        dns::unmask_v6(&cfg, sa);
    }
    ALLOW
}

/// The key of the app's side of a redirected connection, as the proxy's
/// accepted socket will name it: (app address, app port, proxy port).
#[inline(always)]
fn key_from_ops(ctx: &SockOpsContext) -> ConnKey {
    let local6 = ctx.local_ip6();
    let (family, app_addr) = if ctx.family() == AF_INET as u32 {
        (AF_INET, [ctx.local_ip4(), 0, 0, 0])
    } else if is_v4_mapped(&local6) {
        (AF_INET, [local6[3], 0, 0, 0])
    } else {
        (AF_INET6, local6)
    };
    ConnKey {
        app_addr,
        app_port: ctx.local_port() as u16,
        // remote_port is a be16 in the upper half of the u32.
        proxy_port: u32::from_be(ctx.remote_port()) as u16,
        family,
        _pad: 0,
    }
}

/// The socket key from a context whose fields are named as in
/// `bpf_sock_ops` and `sk_msg_md` (two kernel structs, the same names). Each
/// field is read whole, by its own load (volatile: the verifier refuses a
/// load through a context pointer the compiler offset by a select). Expands
/// to unsafe reads: the caller's SAFETY says why the pointer is valid.
macro_rules! sock_key_of {
    ($ctx:expr) => {{
        let c = &*$ctx;
        SockKey::from_fields(
            core::ptr::read_volatile(&c.family),
            core::ptr::read_volatile(&c.local_ip4),
            core::ptr::read_volatile(&c.remote_ip4),
            core::ptr::read_volatile(&c.local_ip6),
            core::ptr::read_volatile(&c.remote_ip6),
            core::ptr::read_volatile(&c.local_port),
            core::ptr::read_volatile(&c.remote_port),
        )
    }};
}

/// This socket's view of its connection, for the shortcut maps.
#[inline(always)]
fn sock_key_from_ops(ctx: &SockOpsContext) -> SockKey {
    // SAFETY: ctx.ops is the kernel's bpf_sock_ops for this callback.
    unsafe { sock_key_of!(ctx.ops) }
}

/// This socket's sends keep to TCP for good.
#[inline(always)]
fn keep_tcp(me: &SockKey) {
    match ACCEL.get_ptr_mut(me) {
        // SAFETY: a pointer into the map's value, written in place.
        Some(a) => unsafe { (*a).state = KEEP_TCP },
        None => {
            let _ = ACCEL.insert(
                me,
                &Accel {
                    state: KEEP_TCP,
                    one_way: 0,
                    redirected: 0,
                },
                0,
            );
        }
    }
}

/// Offers this socket to the shortcut (the config allowing it) and asks for
/// its state changes, so its entries go when it closes.
#[inline(always)]
fn accelerate(ctx: &SockOpsContext, cfg: &Config) {
    if cfg.accelerate != 0 {
        let mut key = sock_key_from_ops(ctx);
        // SAFETY: ctx.ops is the kernel's bpf_sock_ops for this callback.
        let _ = SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64);
    }
}

#[sock_ops]
pub fn ambassador_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let cookie = cookie_of(ctx.ops);
            // SAFETY: copied out at once, not held across other map operations.
            let Some(orig) = (unsafe { COOKIES.get(&cookie) }).copied() else {
                return 1;
            };
            let key = key_from_ops(&ctx);
            if CONNS.insert(&key, &orig, 0).is_ok() {
                // Ask for state changes so both entries go when the socket
                // closes, and, while its sends may take the shortcut, to see
                // every segment it transmits (see `BPF_SOCK_OPS_HDR_OPT_LEN_CB`).
                let mut flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
                if let Some(cfg) = config()
                    && cfg.accelerate != 0
                {
                    // Data that left with the SYN (TCP Fast Open) went by TCP.
                    // SAFETY: a whole-field read of the kernel's bpf_sock_ops.
                    let sent = unsafe { core::ptr::read_volatile(&(*ctx.ops).data_segs_out) };
                    if sent > 0 {
                        keep_tcp(&sock_key_from_ops(&ctx));
                    } else {
                        flags |= BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
                    }
                    accelerate(&ctx, &cfg);
                }
                let _ = ctx.set_cb_flags(flags as i32);
            }
        }
        // A segment of the app's socket is about to leave by TCP. With data in
        // it, bytes went by TCP after the socket joined the sockhash without
        // passing `accel` (a send that began before the connect finished:
        // TCP Fast Open without a cookie yet, or another thread's send
        // blocked in the connect). Later shortcut bytes could overtake them:
        // the socket keeps to TCP from now on, and stops asking.
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => {
            // SAFETY: a whole-field read of the kernel's bpf_sock_ops.
            let len = unsafe { core::ptr::read_volatile(&(*ctx.ops).skb_len) };
            if len > 0 {
                keep_tcp(&sock_key_from_ops(&ctx));
                let _ =
                    ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
            }
        }
        // The proxy's end of a connection redirected here: the app's end is
        // already in CONNS (its ACK made this socket).
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let Some(cfg) = config() else { return 1 };
            if cfg.accelerate == 0 || ctx.local_port() != u32::from(cfg.proxy_port) {
                return 1;
            }
            let app = sock_key_from_ops(&ctx);
            let key = ConnKey {
                app_addr: app.remote,
                app_port: app.remote_port as u16,
                proxy_port: cfg.proxy_port,
                family: app.family as u16,
                _pad: 0,
            };
            // SAFETY: presence check only, value not held.
            if unsafe { CONNS.get(&key) }.is_some() {
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
                accelerate(&ctx, &cfg);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            // (The sockhash drops a closing socket by itself.)
            let _ = ACCEL.remove(&sock_key_from_ops(&ctx));
            let is_proxy_end =
                config().is_some_and(|c| ctx.local_port() == u32::from(c.proxy_port));
            if !is_proxy_end {
                let key = key_from_ops(&ctx);
                let _ = CONNS.remove(&key);
                let _ = COOKIES.remove(&cookie_of(ctx.ops));
            }
        }
        _ => {}
    }
    1
}

/// Every send on a socket in `AMB_SOCKS`: hand the bytes to the other local
/// end's receive queue. A receiver reads that queue before its TCP queue, so
/// a socket may take the shortcut only while none of its bytes can be on
/// their way by TCP: decided at its first send (the other end not in the map
/// yet, its handshake in flight: TCP for good), and ended for good when
/// `sockops` sees it transmit data by TCP anyway. The one move allowed is
/// from the shortcut to TCP, never back, for the same reason.
#[sk_msg]
pub fn ambassador_accel(ctx: SkMsgContext) -> u32 {
    // SAFETY: the kernel passes a valid sk_msg_md for the program's lifetime.
    let me = unsafe { sock_key_of!(ctx.msg) };
    let mut peer = me.peer();
    // The peer's silence ends: its one-way count starts again.
    if let Some(p) = ACCEL.get_ptr_mut(&peer) {
        // SAFETY: a pointer into the map's value, written in place; a racing
        // update from another CPU only makes the count less exact.
        unsafe { (*p).one_way = 0 };
    }
    // SAFETY: md is valid for the program's lifetime.
    let size = unsafe { core::ptr::read_volatile(&(*ctx.msg).size) };
    match ACCEL.get_ptr_mut(&me) {
        None => {
            let verdict = SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64);
            let taken = verdict == sk_action::SK_PASS as i64;
            let state = Accel {
                state: if taken { TAKE } else { KEEP_TCP },
                one_way: if taken { size } else { 0 },
                redirected: if taken { u64::from(size) } else { 0 },
            };
            let _ = ACCEL.insert(&me, &state, 0);
            if taken {
                count(counter::ACCELERATED);
            }
        }
        // SAFETY: as above.
        Some(a) => unsafe {
            if (*a).state != TAKE {
                return sk_action::SK_PASS;
            }
            let one_way = (*a).one_way.saturating_add(size);
            if one_way > ONE_WAY_LIMIT {
                (*a).state = KEEP_TCP;
                return sk_action::SK_PASS;
            }
            (*a).one_way = one_way;
            if SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64)
                == sk_action::SK_PASS as i64
            {
                // The socket's sends are serialized by its lock: a plain add.
                (*a).redirected += u64::from(size);
            }
        },
    }
    // A failed lookup (the peer closed) leaves the bytes to TCP.
    sk_action::SK_PASS
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

#[cgroup_sockopt(getsockopt)]
pub fn ambassador_getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sockopt for the program's lifetime.
    let so = unsafe { &mut *ctx.sockopt };
    if so.level != SOL_IP && so.level != SOL_IPV6 {
        return ALLOW;
    }
    if so.optname == SO_AMB_SHORTCUT {
        return answer_shortcut(so);
    }
    if so.optname != SO_ORIGINAL_DST {
        return ALLOW;
    }
    // SAFETY: union field read; sk is always set for sockopt programs.
    let sk: *mut bpf_sock = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return ALLOW;
    }
    // SAFETY: sk checked non-null; the verifier tracks it as a socket pointer.
    let (family, src_port, dst_port, dst4, dst6) = unsafe {
        (
            (*sk).family as u16,
            (*sk).src_port as u16,
            u16::from_be((*sk).dst_port),
            (*sk).dst_ip4,
            (*sk).dst_ip6,
        )
    };
    let (kfam, app_addr) = if family == AF_INET {
        (AF_INET, [dst4, 0, 0, 0])
    } else if is_v4_mapped(&dst6) {
        (AF_INET, [dst6[3], 0, 0, 0])
    } else {
        (AF_INET6, dst6)
    };
    let key = ConnKey {
        app_addr,
        app_port: dst_port,
        proxy_port: src_port,
        family: kfam,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { CONNS.get(&key) }).copied() else {
        return ALLOW;
    };
    // SAFETY: union field reads of the kernel buffer bounds.
    let (start, end) = unsafe {
        (
            so.__bindgen_anon_2.optval as usize,
            so.__bindgen_anon_3.optval_end as usize,
        )
    };
    if orig.family == AF_INET {
        let len = core::mem::size_of::<SockaddrIn>();
        if start + len > end {
            return ALLOW;
        }
        let v = SockaddrIn {
            family: AF_INET,
            port: orig.port.to_be(),
            addr: orig.addr[0],
            zero: [0; 8],
        };
        // SAFETY: bounds checked against optval_end just above.
        unsafe { (start as *mut SockaddrIn).write_unaligned(v) };
        so.optlen = len as i32;
    } else {
        let len = core::mem::size_of::<SockaddrIn6>();
        if start + len > end {
            return ALLOW;
        }
        let v = SockaddrIn6 {
            family: AF_INET6,
            port: orig.port.to_be(),
            flowinfo: 0,
            addr: orig.addr,
            scope_id: 0,
        };
        // SAFETY: bounds checked against optval_end just above.
        unsafe { (start as *mut SockaddrIn6).write_unaligned(v) };
        so.optlen = len as i32;
    }
    so.retval = 0;
    ALLOW
}

/// `SO_AMB_SHORTCUT` on the proxy's accepted socket: the app's end of the
/// connection, as `accel` keeps it (its key is this socket's, swapped).
#[inline(always)]
fn answer_shortcut(so: &mut aya_ebpf::bindings::bpf_sockopt) -> i32 {
    // SAFETY: union field read; sk is always set for sockopt programs.
    let sk: *mut bpf_sock = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return ALLOW;
    }
    // SAFETY: sk checked non-null; whole-field reads of the kernel's bpf_sock.
    let app = unsafe {
        let family = (*sk).family;
        let (local, remote) = if family == AF_INET as u32 {
            ([(*sk).dst_ip4, 0, 0, 0], [(*sk).src_ip4, 0, 0, 0])
        } else {
            ((*sk).dst_ip6, (*sk).src_ip6)
        };
        SockKey::new(
            family,
            local,
            remote,
            u32::from(u16::from_be((*sk).dst_port)),
            (*sk).src_port,
        )
    };
    // SAFETY: copied out at once.
    let answer = match unsafe { ACCEL.get(&app) } {
        Some(a) => ShortcutAnswer {
            state: a.state,
            _pad: 0,
            redirected: a.redirected,
        },
        None => ShortcutAnswer {
            state: SHORTCUT_NONE,
            _pad: 0,
            redirected: 0,
        },
    };
    // SAFETY: union field reads of the kernel buffer bounds.
    let (start, end) = unsafe {
        (
            so.__bindgen_anon_2.optval as usize,
            so.__bindgen_anon_3.optval_end as usize,
        )
    };
    let len = core::mem::size_of::<ShortcutAnswer>();
    if start + len > end {
        return ALLOW;
    }
    // SAFETY: bounds checked against optval_end just above.
    // Two volatile 4-byte stores: merged into one 8-byte store, the
    // verifier refuses the context access.
    // SAFETY: bounds checked against optval_end just above; optlen and
    // retval are writable fields of the kernel's bpf_sockopt.
    unsafe {
        (start as *mut ShortcutAnswer).write_unaligned(answer);
        core::ptr::write_volatile(&mut so.optlen, len as i32);
        core::ptr::write_volatile(&mut so.retval, 0);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn ambassador_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: copied out at once.
    if let Some(orig) = (unsafe { COOKIES.get(&cookie_of(ctx.sock_addr)) }).copied() {
        if orig.family == AF_INET {
            sa.user_ip4 = orig.addr[0];
            sa.user_port = orig.port.to_be() as u32;
        }
    } else if let Some(cfg) = config() {
        dns::unmask_v4(&cfg, sa);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn ambassador_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: copied out at once.
    if let Some(orig) = (unsafe { COOKIES.get(&cookie_of(ctx.sock_addr)) }).copied() {
        sa.user_ip6 = if orig.family == AF_INET {
            [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), orig.addr[0]]
        } else {
            orig.addr
        };
        sa.user_port = orig.port.to_be() as u32;
    } else if let Some(cfg) = config() {
        dns::unmask_v6(&cfg, sa);
    }
    ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
