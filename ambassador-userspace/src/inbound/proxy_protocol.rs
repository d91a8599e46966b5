//! The PROXY protocol v2 header (haproxy.org's proxy-protocol.txt, section
//! 2.2): a relayed TCP connection tells the app who the caller was, since
//! the app's peer is the proxy's 127.0.0.6. Twelve fixed lines of format;
//! no crate needed for writing it.

use std::net::{IpAddr, SocketAddr};

const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
const TCP_V4: u8 = 0x11;
const TCP_V6: u8 = 0x21;

/// The header for a connection from `src` (the caller) to `dst` (the Pod
/// address it dialled). Mixed families are written as IPv6.
pub fn header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&SIGNATURE);
    out.push(V2_PROXY);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(TCP_V4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            out.push(TCP_V6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_is_28_bytes_as_the_spec_lays_them_out() {
        let h = header(
            "198.18.0.2:40000".parse().unwrap(),
            "198.18.0.1:8080".parse().unwrap(),
        );
        assert_eq!(h.len(), 16 + 12);
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[198, 18, 0, 2]);
        assert_eq!(&h[20..24], &[198, 18, 0, 1]);
        assert_eq!(&h[24..26], &40000u16.to_be_bytes());
        assert_eq!(&h[26..28], &8080u16.to_be_bytes());
    }

    #[test]
    fn ipv6_and_mixed_families_are_written_as_ipv6() {
        let h = header(
            "[fd00:a5::2]:40000".parse().unwrap(),
            "[fd00:a5::1]:8080".parse().unwrap(),
        );
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        let mixed = header(
            "198.18.0.2:1".parse().unwrap(),
            "[fd00:a5::1]:2".parse().unwrap(),
        );
        assert_eq!(
            &mixed[16..32],
            &"::ffff:198.18.0.2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }
}
