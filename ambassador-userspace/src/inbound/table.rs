//! The inbound policy of every intercepted port, built once per config (at
//! start and at each reload, off the data path), and the plan for one
//! caller's connection: a plain value, decided without sockets.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use ambassador_common::INBOUND_PASS_V4;
use http::uri::Authority;

use super::{access::Access, authn::Authn};
use crate::{
    config::{AppProtocol, Config, InboundProtocol},
    metrics::ServiceMetrics,
    net::Settings,
    tls::TlsTermination,
    upstream::{HttpClient, UpstreamConnector},
};
use crate::{ratelimit::Limiter, route::Routes};

/// What one port does with its callers.
pub struct PortPolicy {
    pub name: String,
    pub port: u16,
    pub kind: PortKind,
    pub tls: Option<TlsTermination>,
    pub metrics: ServiceMetrics,
    /// Where the app listens for this port.
    pub app: SocketAddr,
    /// Timeouts, and the source address toward the app.
    pub settings: Settings,
    /// Who callers are (HTTP ports with `auth`).
    pub authn: Option<Authn>,
    /// Who may call what.
    pub access: Option<Access>,
    pub limiter: Option<Limiter>,
    pub max_body: Option<u64>,
    /// TCP ports: the PROXY protocol v2 header goes to the app first.
    pub proxy_protocol: bool,
    /// Callers' connections at once, when limited.
    pub connections: Option<(Arc<tokio::sync::Semaphore>, usize)>,
    /// After the rules: first match wins.
    pub routes: Routes,
}

/// What a port's callers speak.
pub enum PortKind {
    Tcp,
    Http(Arc<HttpPort>),
}

/// What an HTTP port forwards with.
pub struct HttpPort {
    /// Pooled HTTP/1.1 connections to the app, or its HTTP/2 connection.
    pub client: HttpClient,
    /// The app's address as request URIs name it (the pool's key).
    pub authority: Authority,
    /// The app speaks HTTP/2 (h2c).
    pub http2: bool,
}

/// Every port's policy, and what connections to the app use.
pub struct InboundTable {
    ports: HashMap<u16, Arc<PortPolicy>>,
    /// Ports intercepted under `ports: all` that have no policy share one
    /// series (a label per port a caller may try would be unbounded), made
    /// at its first connection: a proxy without inbound shows none.
    others: std::sync::OnceLock<ServiceMetrics>,
    app: IpAddr,
    /// From 127.0.0.6, which the inbound program lets through.
    pub settings: Settings,
}

/// Why an inbound table could not be built.
#[derive(Debug, thiserror::Error)]
#[error("inbound port {port}: {why}")]
pub struct InboundError {
    port: u16,
    why: String,
}

/// What to do with one caller's connection.
#[derive(Clone)]
pub enum InboundPlan {
    /// Relay the bytes to the app, after TLS termination when configured.
    Tcp(Arc<PortPolicy>),
    /// Read requests (after TLS termination when configured) and forward
    /// them one by one.
    Http(Arc<PortPolicy>, Arc<HttpPort>),
    /// A port with no policy (under `ports: all`): relayed as it is.
    Relay { app: SocketAddr },
}

impl InboundTable {
    pub fn new(cfg: &Config, proxy: &Settings) -> Result<InboundTable, InboundError> {
        let i = &cfg.inbound;
        let settings = Settings {
            bind: Some(IpAddr::V4(Ipv4Addr::from(INBOUND_PASS_V4))),
            // The app's own connections are in the same Pod: no mark needed.
            mark: None,
            ..proxy.clone()
        };
        let metrics = crate::metrics::get();
        let mut ports = HashMap::new();
        let listed: Vec<u16> = match &i.ports {
            crate::config::InboundPorts::All => Vec::new(),
            crate::config::InboundPorts::List(l) => l.clone(),
        };
        let policy_ports = i.policies.iter().map(|p| p.port);
        for port in listed.iter().copied().chain(policy_ports) {
            if ports.contains_key(&port) || !i.intercepts(port) {
                continue;
            }
            let app = SocketAddr::new(i.app, port);
            let policy = i.policy(port);
            let name = policy.map_or_else(|| format!("inbound-{port}"), |p| p.name());
            let protocol = policy.map_or(InboundProtocol::Tcp, |p| p.protocol);
            let tls = match policy.and_then(|p| p.tls.as_ref()) {
                Some(t) => Some(TlsTermination::new(t).map_err(|e| InboundError {
                    port,
                    why: e.to_string(),
                })?),
                None => None,
            };
            let kind = match protocol {
                InboundProtocol::Tcp => PortKind::Tcp,
                InboundProtocol::Http => {
                    let http2 = policy.is_some_and(|p| p.app_protocol == AppProtocol::Http2);
                    let connector = UpstreamConnector::new(settings.clone(), None).dialing(app);
                    PortKind::Http(Arc::new(HttpPort {
                        client: match http2 {
                            true => connector.h2c_client(),
                            false => connector.client(),
                        },
                        authority: Authority::try_from(app.to_string())
                            .expect("an address is an authority"),
                        http2,
                    }))
                }
            };
            let authn = match policy.and_then(|p| p.auth.as_ref()) {
                // Keys are fetched from the network as the proxy, not as
                // the app's caller (no 127.0.0.6 there).
                Some(a) => Some(Authn::new(a, proxy).map_err(|why| InboundError { port, why })?),
                None => None,
            };
            let routes = match policy {
                Some(p) => {
                    Routes::new(&p.routes, None).map_err(|why| InboundError { port, why })?
                }
                None => Routes::default(),
            };
            ports.insert(
                port,
                Arc::new(PortPolicy {
                    metrics: metrics.inbound(&name),
                    name,
                    port,
                    kind,
                    tls,
                    app,
                    settings: settings.clone(),
                    authn,
                    access: policy.and_then(|p| p.access.as_ref()).map(Access::new),
                    limiter: policy.and_then(|p| p.rate_limit.as_ref()).map(Limiter::new),
                    max_body: policy.and_then(|p| p.limits.max_body_bytes),
                    proxy_protocol: policy.is_some_and(|p| p.proxy_protocol),
                    connections: policy
                        .and_then(|p| p.limits.max_connections)
                        .map(|n| (Arc::new(tokio::sync::Semaphore::new(n)), n)),
                    routes,
                }),
            );
        }
        Ok(InboundTable {
            ports,
            others: std::sync::OnceLock::new(),
            app: i.app,
            settings,
        })
    }

    /// The plan for a connection a caller made to `port` of the Pod.
    pub fn plan(&self, port: u16) -> InboundPlan {
        match self.ports.get(&port) {
            Some(p) => match &p.kind {
                PortKind::Http(h) => InboundPlan::Http(p.clone(), h.clone()),
                PortKind::Tcp => InboundPlan::Tcp(p.clone()),
            },
            None => InboundPlan::Relay {
                app: SocketAddr::new(self.app, port),
            },
        }
    }

    /// The series of ports without a policy.
    pub fn others(&self) -> &ServiceMetrics {
        self.others
            .get_or_init(|| crate::metrics::get().inbound("inbound"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> InboundTable {
        let cfg = Config::parse(yaml).unwrap();
        InboundTable::new(&cfg, &Settings::from_config(&cfg.proxy)).unwrap()
    }

    fn kind(p: &InboundPlan) -> String {
        match p {
            InboundPlan::Tcp(p) => format!("tcp {} -> {}", p.name, p.app),
            InboundPlan::Http(p, h) if h.http2 => format!("http/2 {} -> {}", p.name, p.app),
            InboundPlan::Http(p, _) => format!("http {} -> {}", p.name, p.app),
            InboundPlan::Relay { app } => format!("relay -> {app}"),
        }
    }

    #[test]
    fn each_port_gets_its_policy_and_the_rest_are_relayed() {
        let t = table(
            r#"
inbound:
  ports: all
  exclude_ports: [9090]
  policies:
    - { port: 8080, protocol: http, name: api }
    - { port: 5432, protocol: tcp }
    - { port: 50051, app_protocol: http2 }
"#,
        );
        let cases = [
            (8080, "http api -> 127.0.0.1:8080"),
            (50051, "http/2 inbound-50051 -> 127.0.0.1:50051"),
            (5432, "tcp inbound-5432 -> 127.0.0.1:5432"),
            (7000, "relay -> 127.0.0.1:7000"),
        ];
        for (port, want) in cases {
            assert_eq!(kind(&t.plan(port)), want, "port {port}");
        }
    }

    #[test]
    fn listed_ports_without_a_policy_are_tcp_with_their_own_series() {
        let t = table("inbound: { ports: [8080, 9000], app: 10.1.2.3 }");
        assert_eq!(kind(&t.plan(9000)), "tcp inbound-9000 -> 10.1.2.3:9000");
        assert_eq!(t.settings.bind, Some("127.0.0.6".parse().unwrap()));
    }
}
