//! Inbound: an sk_lookup program on the Pod's network namespace hands TCP
//! connections for the app's ports to the proxy's inbound listener. No
//! address is rewritten: the accepted socket's local address is the one the
//! caller dialled, so `getsockname` tells the proxy the app port.
//!
//! Passed untouched: UDP, connections to a loopback address (the app and
//! the proxy talking to themselves, the proxy's forward to the app), and
//! connections from the proxy's own source address (127.0.0.6).

use ambassador_common::{
    AF_INET, InboundConfig, counter,
    maps::{self as m, IN_LISTEN_V4, IN_LISTEN_V6, IN_PORT_EXCLUDE, IN_PORT_INTERCEPT},
};
use aya_ebpf::{
    bindings::sk_action,
    macros::{map, sk_lookup},
    maps::{Array, HashMap, SockMap},
    programs::SkLookupContext,
};

use crate::count;

const IPPROTO_TCP: u32 = 6;

#[map(name = "AMB_IN_CONFIG")]
static IN_CONFIG: Array<InboundConfig> = Array::with_max_entries(1, 0);
#[map(name = "AMB_IN_PORTS")]
static IN_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(m::MAX_INBOUND_PORTS, 0);
#[map(name = "AMB_IN_LISTEN")]
static IN_LISTEN: SockMap = SockMap::with_max_entries(2, 0);

/// What to do with one incoming connection.
enum Steer {
    /// Not ours: the normal socket lookup goes on.
    Pass,
    /// To the proxy's listener for this family.
    Proxy(u32),
}

#[inline(always)]
fn decide(cfg: &InboundConfig, l: &aya_ebpf::bindings::bpf_sk_lookup) -> Steer {
    if l.protocol != IPPROTO_TCP {
        return Steer::Pass;
    }
    let v4 = l.family == AF_INET as u32;
    if v4 {
        // Network order: the first byte is the lowest in memory.
        if l.local_ip4.to_ne_bytes()[0] == 127 || l.remote_ip4 == cfg.pass_v4 {
            return Steer::Pass;
        }
    } else if l.local_ip6 == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])] {
        return Steer::Pass;
    }
    // local_port is in host order (the remote one is not).
    let port = l.local_port as u16;
    // SAFETY: a plain lookup; the value is copied out at once.
    let marked = unsafe { IN_PORTS.get(&port) }.copied();
    let intercept = match marked {
        Some(IN_PORT_EXCLUDE) => false,
        Some(IN_PORT_INTERCEPT) => true,
        _ => cfg.all_ports == 1,
    };
    if !intercept {
        return Steer::Pass;
    }
    Steer::Proxy(if v4 { IN_LISTEN_V4 } else { IN_LISTEN_V6 })
}

#[sk_lookup]
pub fn ambassador_inbound(ctx: SkLookupContext) -> u32 {
    let Some(cfg) = IN_CONFIG.get(0).copied() else {
        return sk_action::SK_PASS;
    };
    if cfg.enabled == 0 {
        return sk_action::SK_PASS;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let l = unsafe { &*ctx.lookup };
    match decide(&cfg, l) {
        Steer::Pass => sk_action::SK_PASS,
        Steer::Proxy(index) => match IN_LISTEN.redirect_sk_lookup(&ctx, index, 0) {
            Ok(()) => {
                count(counter::IN_REDIRECTED);
                sk_action::SK_PASS
            }
            // No listener (the proxy is down): the fail mode decides.
            Err(_) if cfg.fail_open == 1 => {
                count(counter::IN_PASSED);
                sk_action::SK_PASS
            }
            Err(_) => {
                // The lookup then finds no socket: TCP answers the SYN with
                // a reset, so callers are refused at once, not left waiting.
                count(counter::IN_REFUSED);
                sk_action::SK_DROP
            }
        },
    }
}
