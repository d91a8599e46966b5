//! `intercept.udp`: where the app's datagrams may go under `default: deny`
//! (with `passthrough` UDP is left alone). The kernel refuses the rest
//! (EPERM), so QUIC falls back to TCP, whose connections are policed.

use std::{net::IpAddr, path::PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct UdpPolicy {
    /// Destinations datagrams may go to: `ADDRESS:PORT`, `CIDR:PORT`
    /// (`10.0.0.0/8:5000`, `[fd00::/64]:53`), or `*:PORT` (any address).
    pub allow: Vec<UdpAllow>,
    /// The resolvers (`nameserver` lines) of this file are allowed on port
    /// 53, read when the programs are configured: the app's own DNS, as
    /// Kubernetes gives every container of a Pod the same file. `null`:
    /// none.
    pub resolvers_from: Option<PathBuf>,
}

impl Default for UdpPolicy {
    fn default() -> Self {
        UdpPolicy {
            allow: Vec::new(),
            resolvers_from: Some(PathBuf::from("/etc/resolv.conf")),
        }
    }
}

/// One allowed destination: a block of addresses (none: any) and a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpAllow {
    pub net: Option<IpNet>,
    pub port: u16,
}

impl UdpAllow {
    pub fn parse(s: &str) -> Result<UdpAllow, String> {
        let bad = || {
            format!(
                "`{}` is not ADDRESS:PORT, CIDR:PORT or *:PORT (IPv6 in brackets: [fd00::/64]:53)",
                super::values::clip(s)
            )
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.contains(':') && !s.starts_with('[') {
            return Err(bad());
        }
        let net = match host {
            "*" => None,
            h => Some(match h.parse::<IpNet>() {
                Ok(n) => n.trunc(),
                Err(_) => IpNet::from(h.parse::<IpAddr>().map_err(|_| bad())?),
            }),
        };
        Ok(UdpAllow { net, port })
    }
}

impl std::fmt::Display for UdpAllow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.net {
            None => write!(f, "*:{}", self.port),
            Some(IpNet::V6(n)) if n.prefix_len() == 128 => {
                write!(f, "[{}]:{}", n.addr(), self.port)
            }
            Some(IpNet::V6(n)) => write!(f, "[{n}]:{}", self.port),
            Some(IpNet::V4(n)) if n.prefix_len() == 32 => write!(f, "{}:{}", n.addr(), self.port),
            Some(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl Serialize for UdpAllow {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for UdpAllow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        UdpAllow::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for UdpAllow {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "UdpAllow".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "ADDRESS:PORT, CIDR:PORT or *:PORT (IPv6 in brackets)"
        })
    }
}

/// The `nameserver` addresses of a resolv.conf text.
pub fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            // A link-local IPv6 server may carry a zone (`fe80::1%eth0`).
            let a = rest.trim().split('%').next().unwrap_or("");
            a.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_errors() {
        for (text, shown) in [
            ("10.96.0.10:53", "10.96.0.10:53"),
            ("10.0.0.0/8:5000", "10.0.0.0/8:5000"),
            ("10.1.2.3/8:5000", "10.0.0.0/8:5000"),
            ("*:53", "*:53"),
            ("[fd00::1]:53", "[fd00::1]:53"),
            ("[fd00::/64]:443", "[fd00::/64]:443"),
        ] {
            assert_eq!(UdpAllow::parse(text).unwrap().to_string(), shown, "{text}");
        }
        for bad in [
            "10.0.0.1",
            "10.0.0.1:0",
            "fd00::1:53",
            "host:53",
            "*:x",
            ":53",
        ] {
            assert!(
                UdpAllow::parse(bad)
                    .unwrap_err()
                    .contains("is not ADDRESS:PORT"),
                "{bad}"
            );
        }
    }

    #[test]
    fn resolvers_of_a_resolv_conf() {
        let text = "search default.svc.cluster.local\nnameserver 10.96.0.10\n# nameserver 1.1.1.1\nnameserver fe80::1%eth0\noptions ndots:5\n";
        let want: Vec<IpAddr> = vec!["10.96.0.10".parse().unwrap(), "fe80::1".parse().unwrap()];
        assert_eq!(nameservers(text), want);
    }
}
