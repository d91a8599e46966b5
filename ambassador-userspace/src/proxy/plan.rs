//! What to do with one app connection, decided as a plain value from where
//! it was going (its route) and, where that cannot tell, what its first
//! bytes say. The caller does it with one `match`; the decision is tested
//! here without a socket.

use std::sync::Arc;

use super::detect::Detected;
use crate::{
    config::service::DefaultPolicy,
    postgres::PgService,
    service::{Kind, Route, Service, ServiceTable},
};

#[derive(Debug)]
pub enum Plan {
    /// Serve HTTP: each request finds its service (or none) by its Host.
    Http,
    /// Relay the bytes to a service, originating TLS when it says so and the
    /// app does not speak TLS itself.
    Relay { svc: Arc<Service>, originate: bool },
    /// The app's own TLS names a service: relay its bytes untouched, if the
    /// address it dialled is one that name resolves to.
    RelayNamed { svc: Arc<Service>, sni: String },
    /// A PostgreSQL session.
    Postgres {
        svc: Arc<Service>,
        pg: Arc<PgService>,
    },
    /// No service, `default: passthrough`: relay as it is.
    Passthrough,
    /// No service, `default: deny`: reset.
    Deny,
    /// DNS over TCP to a captured resolver: the forwarder answers.
    Dns,
}

/// Whether the first bytes are needed to decide (peeked, never consumed).
pub fn needs_first_bytes(route: &Route) -> bool {
    match route {
        Route::Service(s) => s.http().is_some_and(|h| h.auto),
        // Services here are named by Host or SNI: look at what the app says.
        Route::ByHost => true,
        Route::Dns | Route::Default => false,
    }
}

pub fn plan(route: &Route, first: Option<&Detected>, table: &ServiceTable, port: u16) -> Plan {
    let fallback = || match table.default {
        DefaultPolicy::Deny => Plan::Deny,
        DefaultPolicy::Passthrough => Plan::Passthrough,
    };
    match route {
        Route::Service(svc) => for_service(svc, first),
        Route::ByHost => match first {
            Some(Detected::Http) => Plan::Http,
            Some(Detected::Tls { sni: Some(name) }) => match table.by_host(name, port) {
                Some(svc) => Plan::RelayNamed {
                    svc,
                    sni: name.clone(),
                },
                None => fallback(),
            },
            _ => fallback(),
        },
        Route::Dns => Plan::Dns,
        Route::Default => fallback(),
    }
}

fn for_service(svc: &Arc<Service>, first: Option<&Detected>) -> Plan {
    let app_tls = matches!(first, Some(Detected::Tls { .. }));
    match &svc.kind {
        Kind::Http(h) if !h.auto || first == Some(&Detected::Http) => Plan::Http,
        Kind::Http(_) | Kind::Tcp { .. } => Plan::Relay {
            svc: svc.clone(),
            originate: !app_tls,
        },
        Kind::Postgres(pg) => Plan::Postgres {
            svc: svc.clone(),
            pg: pg.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{config::Config, net::Settings};

    fn table(yaml: &str) -> ServiceTable {
        let cfg = Config::parse(yaml).unwrap();
        ServiceTable::new(&cfg, &Settings::from_config(&cfg.proxy)).unwrap()
    }

    /// The plan's shape, by name, for a table.
    fn shape(p: &Plan) -> String {
        match p {
            Plan::Http => "http".into(),
            Plan::Relay { svc, originate } => format!("relay {} originate={originate}", svc.name),
            Plan::RelayNamed { svc, sni } => format!("named {} {sni}", svc.name),
            Plan::Postgres { svc, .. } => format!("postgres {}", svc.name),
            Plan::Passthrough => "passthrough".into(),
            Plan::Deny => "deny".into(),
            Plan::Dns => "dns".into(),
        }
    }

    #[tokio::test]
    async fn each_route_and_first_bytes_give_one_plan() {
        let services = "services:\n\
             - { name: web, match: { cidr: 10.0.0.1/32, port: 80 }, protocol: http }\n\
             - { name: any, match: { cidr: 10.0.0.2/32, port: 443 }, protocol: auto }\n\
             - { name: db, match: { cidr: 10.0.0.3/32, port: 7000 } }\n\
             - { name: api, match: { host: api.test, port: 443 }, upstream: { endpoints: [{ address: \"10.0.0.9:443\" }] } }\n";
        let deny = table(&format!("default: deny\n{services}"));
        let pass = table(services);
        let tls = |sni: &str| Detected::Tls {
            sni: Some(sni.into()),
        };
        let at = |ip: &str, port: u16| -> SocketAddr { format!("{ip}:{port}").parse().unwrap() };
        let cases: Vec<(&ServiceTable, SocketAddr, Option<Detected>, &str)> = vec![
            (&deny, at("10.0.0.1", 80), None, "http"),
            (&deny, at("10.0.0.2", 443), Some(Detected::Http), "http"),
            (
                &deny,
                at("10.0.0.2", 443),
                Some(tls("x")),
                "relay any originate=false",
            ),
            (
                &deny,
                at("10.0.0.2", 443),
                Some(Detected::Opaque),
                "relay any originate=true",
            ),
            (&deny, at("10.0.0.3", 7000), None, "relay db originate=true"),
            (
                &deny,
                at("10.9.9.9", 443),
                Some(tls("api.test")),
                "named api api.test",
            ),
            (&deny, at("10.9.9.9", 443), Some(tls("other.test")), "deny"),
            (
                &pass,
                at("10.9.9.9", 443),
                Some(tls("other.test")),
                "passthrough",
            ),
            (&deny, at("10.9.9.9", 443), Some(Detected::Http), "http"),
            (&deny, at("10.9.9.9", 443), Some(Detected::Opaque), "deny"),
            (&deny, at("10.9.9.9", 22), None, "deny"),
            (&pass, at("10.9.9.9", 22), None, "passthrough"),
        ];
        for (t, dst, first, want) in cases {
            let route = t.route(dst);
            let needs = needs_first_bytes(&route);
            assert_eq!(needs, first.is_some(), "{dst} {first:?}: detection");
            let got = shape(&plan(&route, first.as_ref(), t, dst.port()));
            assert_eq!(got, want, "{dst} {first:?}");
        }
    }
}
