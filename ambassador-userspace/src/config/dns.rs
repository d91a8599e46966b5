//! `dns`: the app's DNS through the proxy's forwarder. The kernel hands the
//! app's queries to the Pod's resolvers (the nameservers of
//! `intercept.udp.resolvers_from`) to the forwarder, which answers
//! `hosts` itself, refuses unknown names under `deny_unknown`, forwards the
//! rest to the resolver the app asked, and learns which addresses the
//! names services are named by resolve to (so a connection to such an
//! address matches its service, Host or SNI or not).

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::values::{DurationText, clip, duration, ser_duration, valid_host};

/// The forwarder's first port (resolver `i` on `port + i`).
pub const DEFAULT_DNS_PORT: u16 = 15053;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Take the app's DNS (UDP and TCP port 53 to the Pod's resolvers)
    /// into the forwarder.
    pub capture: bool,
    /// The forwarder's first port on 127.0.0.1 and ::1; one port per
    /// resolver (at most 4).
    pub port: u16,
    /// Names answered with fixed addresses, never asked upstream.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Answer NXDOMAIN for names no service's `match.host` (nor `hosts`)
    /// names, without asking upstream: under `default: deny` the app fails
    /// at once instead of timing out on a connection that would be refused.
    pub deny_unknown: bool,
    /// The TTL of the answers from `hosts`.
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    #[schemars(with = "DurationText")]
    pub hosts_ttl: Duration,
    /// How long the forwarder waits for the resolver before answering
    /// SERVFAIL (the app's resolver then tries its next one).
    #[serde(deserialize_with = "duration", serialize_with = "ser_duration")]
    #[schemars(with = "DurationText")]
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            capture: true,
            port: DEFAULT_DNS_PORT,
            hosts: BTreeMap::new(),
            deny_unknown: false,
            hosts_ttl: Duration::from_secs(30),
            timeout: Duration::from_secs(4),
        }
    }
}

impl DnsConfig {
    /// The forwarder's ports.
    pub fn ports(&self) -> std::ops::Range<u32> {
        let first = u32::from(self.port);
        first..first + ambassador_common::maps::MAX_DNS_RESOLVERS
    }

    /// Checks the values; `taken` are the proxy's other ports.
    pub fn validate(&self, taken: &[u16]) -> Result<(), String> {
        if self.port == 0 || self.ports().end > 65536 {
            return Err(format!(
                "dns.port: must be 1-{} (the forwarder takes {} ports from it)",
                65536 - ambassador_common::maps::MAX_DNS_RESOLVERS,
                ambassador_common::maps::MAX_DNS_RESOLVERS
            ));
        }
        if let Some(p) = taken
            .iter()
            .find(|p| self.ports().contains(&u32::from(**p)))
        {
            return Err(format!(
                "dns.port: the forwarder's ports {}-{} include {p}, which the proxy already uses",
                self.port,
                self.ports().end - 1
            ));
        }
        if self.timeout.is_zero() || self.hosts_ttl.as_secs() > u64::from(u32::MAX) {
            return Err("dns.timeout: must be more than 0 (and hosts_ttl a u32 of seconds)".into());
        }
        for (name, addrs) in &self.hosts {
            if name.starts_with("*.")
                || valid_host(name).is_err()
                || name.to_ascii_lowercase() != *name
            {
                return Err(format!(
                    "dns.hosts: `{}` is not a lowercase host name (like db.internal)",
                    clip(name)
                ));
            }
            if addrs.is_empty() {
                return Err(format!("dns.hosts: `{}` has no addresses", clip(name)));
            }
        }
        Ok(())
    }

    /// The addresses `hosts` gives `name` (lowercase, no trailing dot).
    pub fn host(&self, name: &str) -> Option<&[IpAddr]> {
        self.hosts.get(name).map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        let ok = DnsConfig::default();
        assert_eq!(ok.validate(&[15001, 15020]), Ok(()));
        let e = ok.validate(&[15054]).unwrap_err();
        assert!(e.contains("15053-15056 include 15054"), "{e}");
        let mut bad = DnsConfig::default();
        bad.hosts
            .insert("Db.Internal".into(), vec!["10.0.0.1".parse().unwrap()]);
        assert!(
            bad.validate(&[])
                .unwrap_err()
                .contains("lowercase host name")
        );
        let mut empty = DnsConfig::default();
        empty.hosts.insert("db.internal".into(), vec![]);
        assert!(
            empty
                .validate(&[])
                .unwrap_err()
                .contains("has no addresses")
        );
        let high = DnsConfig {
            port: 65534,
            ..DnsConfig::default()
        };
        assert!(high.validate(&[]).unwrap_err().contains("dns.port"));
    }
}
