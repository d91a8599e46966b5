//! What the forwarder does with one query, decided as a plain value from
//! its name and type and the table's DNS policy; the caller acts on it
//! with one `match`. Tested here without a socket.

use std::net::IpAddr;

use hickory_proto::rr::RecordType;

use crate::service::ServiceTable;

#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// A `dns.hosts` name: answered here with its addresses of the
    /// question's type (none: an empty NOERROR, "no such record").
    Hosts(Vec<IpAddr>),
    /// `deny_unknown`, and no service names it: NXDOMAIN, never asked upstream.
    Deny,
    /// Asked of the resolver the app asked; the answer is learned from.
    Forward,
}

pub fn plan(name: &str, qtype: RecordType, table: &ServiceTable) -> Plan {
    if let Some(ips) = table.dns.host(name) {
        let of_type = |ip: &&IpAddr| match qtype {
            RecordType::A => ip.is_ipv4(),
            RecordType::AAAA => ip.is_ipv6(),
            _ => false,
        };
        return Plan::Hosts(ips.iter().filter(of_type).copied().collect());
    }
    if table.dns.deny_unknown && !table.knows_name(name) {
        return Plan::Deny;
    }
    Plan::Forward
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, net::Settings};

    fn table(yaml: &str) -> ServiceTable {
        let cfg = Config::parse(yaml).unwrap();
        ServiceTable::new(&cfg, &Settings::from_config(&cfg.proxy)).unwrap()
    }

    #[test]
    fn each_name_gets_one_plan() {
        let services = "proxy: { search_domains: [default.svc.cluster.local] }\n\
            services:\n\
            - { name: db, match: { host: db.test, port: 5432 } }\n\
            - { name: wild, match: { host: \"*.api.test\", port: 443 } }\n\
            - { name: short, match: { host: payments, port: 80 }, protocol: http }\n\
            dns:\n  hosts: { vault.internal: [10.0.0.7, \"fd00::7\"] }\n";
        let open = table(services);
        let strict = table(&format!("{services}  deny_unknown: true\n"));
        let v4: IpAddr = "10.0.0.7".parse().unwrap();
        let v6: IpAddr = "fd00::7".parse().unwrap();
        for (t, name, qtype, want) in [
            (
                &open,
                "vault.internal",
                RecordType::A,
                Plan::Hosts(vec![v4]),
            ),
            (
                &open,
                "vault.internal",
                RecordType::AAAA,
                Plan::Hosts(vec![v6]),
            ),
            (&open, "vault.internal", RecordType::MX, Plan::Hosts(vec![])),
            (&open, "unknown.test", RecordType::A, Plan::Forward),
            (&strict, "unknown.test", RecordType::A, Plan::Deny),
            (&strict, "db.test", RecordType::A, Plan::Forward),
            (&strict, "db.test", RecordType::AAAA, Plan::Forward),
            (&strict, "x.api.test", RecordType::A, Plan::Forward),
            (&strict, "a.b.api.test", RecordType::A, Plan::Forward),
            (&strict, "api.test", RecordType::A, Plan::Deny),
            (&strict, "payments", RecordType::A, Plan::Forward),
            (
                &strict,
                "payments.default.svc.cluster.local",
                RecordType::A,
                Plan::Forward,
            ),
            // A short name's completion is that name (the resolver's
            // search list tries it); another domain's is not.
            (
                &strict,
                "db.test.default.svc.cluster.local",
                RecordType::A,
                Plan::Forward,
            ),
            (&strict, "db.test.example.org", RecordType::A, Plan::Deny),
            (
                &strict,
                "vault.internal",
                RecordType::A,
                Plan::Hosts(vec![v4]),
            ),
        ] {
            assert_eq!(plan(name, qtype, t), want, "{name} {qtype}");
        }
    }
}
