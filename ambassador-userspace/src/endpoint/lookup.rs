//! Looking a name up for its endpoints: every address, with the TTL the
//! answer may be kept for (getaddrinfo gives the addresses but no TTL).
//! `/etc/hosts` first, then DNS through hickory's resolver over the
//! system's `/etc/resolv.conf` (name servers, search domains, ndots,
//! timeouts), as getaddrinfo's `files dns` order does: a name the hosts file
//! knows is answered from it alone. Both files are read again when they
//! change (checked at most once a second).

use std::{
    net::IpAddr,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use hickory_resolver::{
    Hosts, TokioResolver,
    config::{LookupIpStrategy, ResolveHosts},
    proto::{
        op::Query,
        rr::{Name, RecordType},
    },
};

use crate::files::FromFiles;

/// What a name resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// In the answer's order, each once.
    pub ips: Vec<IpAddr>,
    /// How long the answer may be used: the shortest TTL of its records;
    /// none for the hosts file, whose entries have no TTL.
    pub ttl: Option<Duration>,
}

/// Why a name gave no addresses. Never seen by the app: a name that fails
/// keeps its last addresses, and the reason goes to the log.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot read the resolver configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Dns(String),
    #[error("no addresses")]
    Empty,
}

/// The system's resolver and hosts file, as the files say now.
struct System {
    dns: Result<TokioResolver, String>,
    hosts: Hosts,
}

const RESOLV_CONF: &str = "/etc/resolv.conf";
const HOSTS: &str = "/etc/hosts";

fn system() -> System {
    let dns = TokioResolver::builder_tokio()
        .map(|mut b| {
            let o = b.options_mut();
            // Every record of both families: each address is an endpoint.
            o.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
            // No cache: each lookup is asked when the last answer's TTL ran
            // out (or `max_ttl` did), and must reach the server.
            o.cache_size = 0;
            // The hosts file is looked at here, first and alone.
            o.use_hosts_file = ResolveHosts::Never;
            b
        })
        .and_then(|b| b.build())
        .map_err(|e| e.to_string());
    System {
        dns,
        hosts: Hosts::from_system().unwrap_or_default(),
    }
}

/// The addresses of `host` and how long they may be used.
pub async fn lookup(host: &str) -> Result<Answer, LookupError> {
    static SYSTEM: OnceLock<FromFiles<System>> = OnceLock::new();
    let files = SYSTEM.get_or_init(|| {
        FromFiles::new([PathBuf::from(RESOLV_CONF), PathBuf::from(HOSTS)], system())
    });
    let sys: Arc<System> = files.get("resolver configuration", || {
        Ok::<_, std::convert::Infallible>(system())
    });
    if let Some(ips) = from_hosts(&sys.hosts, host) {
        return Ok(Answer { ips, ttl: None });
    }
    let dns = sys
        .dns
        .as_ref()
        .map_err(|e| LookupError::Config(e.clone()))?;
    let found = dns
        .lookup_ip(host)
        .await
        .map_err(|e| LookupError::Dns(e.to_string()))?;
    let records = found.as_lookup().answers();
    let ips = unique(found.iter());
    if ips.is_empty() {
        return Err(LookupError::Empty);
    }
    // CNAMEs on the way count too: the chain is only as fresh as its
    // shortest link.
    let ttl = records.iter().map(|r| r.ttl).min().unwrap_or(0);
    Ok(Answer {
        ips,
        ttl: Some(Duration::from_secs(ttl.into())),
    })
}

/// The hosts file's addresses for `host`, both families; none when the
/// file does not name it.
fn from_hosts(hosts: &Hosts, host: &str) -> Option<Vec<IpAddr>> {
    let name = Name::from_str(host).ok()?;
    let records = [RecordType::A, RecordType::AAAA].into_iter().flat_map(|t| {
        hosts
            .lookup_static_host(&Query::query(name.clone(), t))
            .map(|l| l.answers().to_vec())
            .unwrap_or_default()
    });
    let ips = unique(records.filter_map(|r| r.data.ip_addr()));
    (!ips.is_empty()).then_some(ips)
}

fn unique(ips: impl Iterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in ips {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_file_answers_both_families_and_only_names_it_has() {
        let mut hosts = Hosts::default();
        hosts
            .read_hosts_conf(
                "10.0.0.1 db.example db\n10.0.0.2 db.example\nfd00::3 db.example\n# 10.9.9.9 db.example\n"
                    .as_bytes(),
            )
            .unwrap();
        let ips = |s: &[&str]| {
            s.iter()
                .map(|a| a.parse().unwrap())
                .collect::<Vec<IpAddr>>()
        };
        assert_eq!(
            from_hosts(&hosts, "db.example"),
            Some(ips(&["10.0.0.1", "10.0.0.2", "fd00::3"]))
        );
        assert_eq!(
            from_hosts(&hosts, "DB.Example"),
            from_hosts(&hosts, "db.example")
        );
        assert_eq!(from_hosts(&hosts, "db"), Some(ips(&["10.0.0.1"])));
        assert_eq!(from_hosts(&hosts, "other.example"), None);
    }
}
