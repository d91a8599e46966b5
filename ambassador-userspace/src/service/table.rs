//! The table every connection and request is matched against: services by
//! address block, by name (and the addresses names resolve to, kept fresh),
//! the default for the rest; and whether a name match holds for an address.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use super::{
    error::ServiceError,
    kind::{Kind, Service},
    learned::Learned,
    names,
};
use crate::{
    config::{Cidr, Config, dns::DnsConfig, service::DefaultPolicy},
    net::Settings,
    upstream::{HttpClient, UpstreamConnector},
};

/// How a connection is handled, from its original destination alone.
#[derive(Debug, Clone)]
pub enum Route {
    Service(Arc<Service>),
    /// HTTP services are named by Host on this port: decide per request.
    ByHost,
    /// DNS over TCP to a resolver whose queries the forwarder takes.
    Dns,
    Default,
}

/// The shortest wait between two on-demand lookups of one name.
const RELOOKUP_EVERY: Duration = Duration::from_secs(1);

/// The addresses `host` resolves to now (bounded in time); `None` when it
/// does not resolve.
async fn lookup(host: &str) -> Option<Vec<IpAddr>> {
    let found =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host((host, 0))).await;
    match found {
        Ok(Ok(addrs)) => Some(addrs.map(|a| a.ip()).collect()),
        _ => None,
    }
}

/// On-demand lookups of names under wildcards at once.
const WILD_LOOKUPS: usize = 8;

/// Lookups at once when many names are resolved.
const PARALLEL_LOOKUPS: usize = 32;

/// The addresses a resolved map holds for `host`.
fn addresses_of(resolved: &HashMap<IpAddr, PortServices>, host: &str) -> Vec<IpAddr> {
    resolved
        .iter()
        .filter(|(_, v)| v.iter().any(|(_, s)| s.host.as_deref() == Some(host)))
        .map(|(ip, _)| *ip)
        .collect()
}

/// Adds `services` to one address's list, each once.
fn add(entry: &mut PortServices, services: &PortServices) {
    for (port, svc) in services {
        if !entry.iter().any(|(p, s)| p == port && Arc::ptr_eq(s, svc)) {
            entry.push((*port, svc.clone()));
        }
    }
}

/// Services with the port each one is limited to.
type PortServices = Vec<(Option<u16>, Arc<Service>)>;
/// Services named by host.
type HostServices = HashMap<String, PortServices>;

pub struct ServiceTable {
    /// Every service, in config order.
    all: Vec<Arc<Service>>,
    /// Their places in `all`, by name (routes name their upstream service).
    by_name: HashMap<String, usize>,
    by_addr: Vec<(Cidr, Option<u16>, Arc<Service>)>,
    by_host: HostServices,
    /// The addresses the host names resolve to, refreshed in the background,
    /// so raw connections to a named service's IPs are recognised too.
    resolved: std::sync::RwLock<HashMap<IpAddr, PortServices>>,
    pub default: DefaultPolicy,
    /// Plain clients for HTTP requests no service claims, under `passthrough`.
    pub passthrough: HttpClient,
    /// Makes the per-app-connection HTTP/2 clients under `passthrough`.
    pub passthrough_connector: UpstreamConnector,
    /// The `proxy` section's settings, for connections no service claims.
    pub settings: Settings,
    /// Series for traffic no service claims (`service="passthrough"`).
    pub passthrough_metrics: crate::metrics::ServiceMetrics,
    /// When each name was last looked up on demand (an address it did not
    /// cover), so a stream of such connections costs one lookup a second.
    relookups: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// The Pod's search domains: short names are completed by them.
    search: Vec<String>,
    /// On-demand lookups of names under a wildcard in flight.
    wild_lookups: Arc<tokio::sync::Semaphore>,
    /// Some name is a wildcard, or short names may be completed: a request
    /// name not found as it is is looked for as others too.
    patterned: bool,
    /// What the app's own DNS answered for the names services are named
    /// by (kept across reloads).
    learned: Arc<Learned>,
    /// The forwarder's policy: `hosts`, `deny_unknown`.
    pub dns: DnsConfig,
    /// The resolvers whose DNS the forwarder takes.
    pub resolvers: Vec<IpAddr>,
}

impl ServiceTable {
    pub fn new(cfg: &Config, settings: &Settings) -> Result<ServiceTable, ServiceError> {
        let mut by_addr = Vec::new();
        let mut by_host: HashMap<String, Vec<_>> = HashMap::new();
        let mut all = Vec::with_capacity(cfg.services.len());
        let search = match &cfg.proxy.search_domains {
            Some(list) => list
                .iter()
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            None => names::search_domains(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            ),
        };
        for (index, sc) in cfg.services.iter().enumerate() {
            let svc = Arc::new(Service::new(sc, index, settings)?);
            all.push(svc.clone());
            match (&sc.matcher.cidr, &sc.matcher.host) {
                (Some(cidr), _) => by_addr.push((*cidr, sc.matcher.port, svc)),
                (None, Some(host)) => {
                    // A short name is also its completions: the app may use those.
                    for name in std::iter::once(host.clone()).chain(names::aliases(host, &search)) {
                        by_host
                            .entry(name)
                            .or_default()
                            .push((sc.matcher.port, svc.clone()));
                    }
                }
                (None, None) => unreachable!("validated: a match names host or cidr"),
            }
        }
        let patterned = !search.is_empty() || by_host.keys().any(|h| names::is_wildcard(h));
        let by_name = all
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        Ok(ServiceTable {
            all,
            by_name,
            by_addr,
            by_host,
            resolved: Default::default(),
            default: cfg.default,
            passthrough: UpstreamConnector::new(settings.clone(), None).client(),
            passthrough_connector: UpstreamConnector::new(settings.clone(), None),
            settings: settings.clone(),
            passthrough_metrics: crate::metrics::get().service("passthrough"),
            relookups: Default::default(),
            search,
            patterned,
            wild_lookups: Arc::new(tokio::sync::Semaphore::new(WILD_LOOKUPS)),
            learned: Default::default(),
            dns: cfg.dns.clone(),
            resolvers: cfg.dns_resolvers(),
        })
    }

    /// Takes on what the table this one replaces learned from the app's DNS.
    pub fn keep_learned(&mut self, previous: &ServiceTable) {
        self.learned = previous.learned.clone();
    }

    /// What the app's DNS answered, for the forwarder to add to.
    pub fn learned(&self) -> &Learned {
        &self.learned
    }

    /// Whether some service's `match.host` (or `dns.hosts`) names `name`,
    /// on any port: the names worth learning, and those `deny_unknown`
    /// lets through.
    pub fn knows_name(&self, name: &str) -> bool {
        if self.dns.host(name).is_some() || self.by_host.contains_key(name) {
            return true;
        }
        self.patterned
            && names::candidates(name, &self.search)
                .skip(1)
                .any(|c| self.by_host.contains_key(&c))
    }

    /// The addresses `host` resolves to: `dns.hosts` first, then the system
    /// resolver.
    async fn lookup(&self, host: &str) -> Option<Vec<IpAddr>> {
        match self.dns.host(host) {
            Some(ips) => Some(ips.to_vec()),
            None => lookup(host).await,
        }
    }

    /// The services the app's DNS taught `ip` belongs to, on `port`.
    fn learned_services(&self, ip: IpAddr, port: u16) -> Vec<Arc<Service>> {
        let mut found: Vec<Arc<Service>> = Vec::new();
        for name in self.learned.names(ip) {
            if let Some(s) = self.by_host(&name, port)
                && !found.iter().any(|f| Arc::ptr_eq(f, &s))
            {
                found.push(s);
            }
        }
        found
    }

    /// Whether the app's DNS answered `ip` for a name `svc` is named by.
    fn learned_owns(&self, svc: &Service, ip: IpAddr) -> bool {
        let Some(host) = svc.host.as_deref() else {
            return false;
        };
        self.learned
            .names(ip)
            .iter()
            .any(|n| self.names_match(host, n))
    }

    /// Whether a connection the app made to `dst` may go to `svc`: a name
    /// match must also hold for the address. A service with endpoints sends
    /// everything to them (its own); one matched by address block owns the
    /// block; one named only by host owns the addresses that name resolves
    /// to. Anything else (a Host or SNI naming the service toward another
    /// address) would carry the service's credentials, or the app's bytes,
    /// to a destination the config never named.
    /// `name` is the request's Host or SNI: for a wildcard service, the
    /// name looked up (the pattern itself resolves to nothing).
    pub async fn owns(&self, svc: &Arc<Service>, dst: IpAddr, name: Option<&str>) -> bool {
        if !svc.endpoints.is_empty() {
            return true;
        }
        if let Some(c) = &svc.cidr {
            return c.0.contains(&dst);
        }
        let Some(host) = svc.host.as_deref() else {
            return false;
        };
        if self.resolves_to(svc, dst) || self.learned_owns(svc, dst) {
            return true;
        }
        let lookup_name = match name {
            Some(n) if names::is_wildcard(host) => n,
            _ if names::is_wildcard(host) => return false,
            _ => host,
        };
        // The app may have resolved the name more recently than we did.
        self.relookup(lookup_name, host).await && self.resolves_to(svc, dst)
    }

    fn resolves_to(&self, svc: &Arc<Service>, ip: IpAddr) -> bool {
        let resolved = crate::sync::read(&self.resolved);
        resolved
            .get(&ip)
            .is_some_and(|v| v.iter().any(|(_, s)| Arc::ptr_eq(s, svc)))
    }

    /// Looks `host` up again now (at most once a second per name) and adds
    /// what it resolves to for the services named `key` (the same name, or
    /// the wildcard it falls under); false when it was looked up too
    /// recently.
    async fn relookup(&self, host: &str, key: &str) -> bool {
        {
            let mut last = crate::sync::lock(&self.relookups);
            let now = std::time::Instant::now();
            if last
                .get(host)
                .is_some_and(|t| now.duration_since(*t) < RELOOKUP_EVERY)
            {
                return false;
            }
            if last.len() >= self.by_host.len().max(1) * 2 {
                last.clear();
            }
            last.insert(host.to_string(), now);
        }
        let Some(services) = self.by_host.get(key) else {
            return false;
        };
        // Names under a wildcard are the app's to choose: a bounded number
        // of their lookups at once, so a spray of new names cannot take
        // every lookup thread (those past it are refused as not owned).
        let _slot = match host == key {
            true => None,
            false => match self.wild_lookups.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return false,
            },
        };
        let Some(ips) = self.lookup(host).await else {
            return false;
        };
        let mut resolved = crate::sync::write(&self.resolved);
        for ip in ips {
            add(resolved.entry(ip).or_default(), services);
        }
        true
    }

    /// First service (in config order) whose address and port match; else
    /// per-request routing when some service is named by host on that port.
    pub fn route(&self, dst: SocketAddr) -> Route {
        if dst.port() == 53 && self.resolvers.contains(&dst.ip()) {
            return Route::Dns;
        }
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == dst.port());
        if let Some((_, _, svc)) = self
            .by_addr
            .iter()
            .find(|(c, p, _)| c.0.contains(&dst.ip()) && port_ok(p))
        {
            return Route::Service(svc.clone());
        }
        let resolved = crate::sync::read(&self.resolved);
        if let Some(named) = resolved.get(&dst.ip()) {
            let mut hits = named.iter().filter(|(p, _)| port_ok(p)).peekable();
            // A TCP service has no Host or SNI to tell it apart: it takes the
            // connection. HTTP and auto services share IPs (virtual hosts):
            // their Host or SNI decides below.
            if let Some((_, svc)) = named
                .iter()
                .find(|(p, s)| port_ok(p) && matches!(s.kind, Kind::Tcp { .. } | Kind::Postgres(_)))
            {
                return Route::Service(svc.clone());
            }
            if hits.peek().is_some() {
                return Route::ByHost;
            }
        } else {
            drop(resolved);
            // Not resolved by us, but perhaps answered to the app.
            let learned = self.learned_services(dst.ip(), dst.port());
            if let Some(svc) = learned
                .iter()
                .find(|s| matches!(s.kind, Kind::Tcp { .. } | Kind::Postgres(_)))
            {
                return Route::Service(svc.clone());
            }
            if !learned.is_empty() {
                return Route::ByHost;
            }
        }
        if self.by_host.values().flatten().any(|(p, _)| port_ok(p)) {
            return Route::ByHost;
        }
        Route::Default
    }

    /// Resolves every host name services are named by (each bounded in time)
    /// and replaces the address map. A name that does not resolve keeps its
    /// previous addresses until it does.
    pub async fn refresh_names(&self) {
        let previous = crate::sync::read(&self.resolved).clone();
        let mut next: HashMap<IpAddr, PortServices> = HashMap::new();
        // A wildcard names no one host to resolve.
        let mut names = self.by_host.keys().filter(|h| !names::is_wildcard(h));
        let mut lookups = tokio::task::JoinSet::new();
        loop {
            // Many names: a bounded number of lookups at once.
            while lookups.len() < PARALLEL_LOOKUPS
                && let Some(host) = names.next()
            {
                let host = host.clone();
                let fixed = self.dns.host(&host).map(<[IpAddr]>::to_vec);
                lookups.spawn(async move {
                    let ips = match fixed {
                        Some(ips) => Some(ips),
                        None => lookup(&host).await,
                    };
                    (host, ips)
                });
            }
            let Some(done) = lookups.join_next().await else {
                break;
            };
            let Ok((host, ips)) = done else { continue };
            let ips = ips.unwrap_or_else(|| {
                tracing::debug!(%host, "name did not resolve; keeping its last addresses");
                addresses_of(&previous, &host)
            });
            let services = &self.by_host[&host];
            for ip in ips {
                add(next.entry(ip).or_default(), services);
            }
        }
        *crate::sync::write(&self.resolved) = next;
    }

    /// Takes the addresses `previous` (the table this one replaces) knew
    /// for the names both have, so a reload serves at once and resolves
    /// again in the background.
    pub fn adopt_names(&self, previous: &ServiceTable) {
        let known = crate::sync::read(&previous.resolved);
        let mut resolved = crate::sync::write(&self.resolved);
        for (ip, list) in known.iter() {
            for host in list.iter().filter_map(|(_, s)| s.host.as_deref()) {
                if let Some(services) = self.by_host.get(host) {
                    add(resolved.entry(*ip).or_default(), services);
                }
            }
        }
    }

    /// The service of this name.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Service>> {
        self.by_name.get(name).map(|i| &self.all[*i])
    }

    /// Every service once, in config order.
    pub fn services(&self) -> &[Arc<Service>] {
        &self.all
    }

    /// Starts the active health checks of every service that has them.
    pub fn start_health_checks(&self) {
        for svc in self.services() {
            if let Some(check) = &svc.health_check {
                let target = crate::endpoint::health::Target {
                    service: svc.name.clone(),
                    endpoints: Arc::downgrade(&svc.endpoints),
                    settings: svc.settings.clone(),
                    tls: svc.relay_tls().cloned(),
                    upstream_name: svc.upstream_name().map(str::to_string),
                };
                crate::endpoint::health::spawn(target, check.clone());
            }
        }
    }

    /// Resolves now (or, `at_once` false, first in the background), then
    /// every `every`.
    pub async fn keep_names_resolved(self: &Arc<Self>, every: std::time::Duration, at_once: bool) {
        if self.by_host.is_empty() {
            return;
        }
        if at_once {
            self.refresh_names().await;
        }
        let table = Arc::downgrade(self);
        tokio::spawn(async move {
            if !at_once && let Some(t) = table.upgrade() {
                t.refresh_names().await;
            }
            loop {
                tokio::time::sleep(every).await;
                let Some(t) = table.upgrade() else { return };
                t.refresh_names().await;
            }
        });
    }

    /// The service named by `host` for a connection to `port`: by the name
    /// itself, else (only where the config has wildcards or short names)
    /// completed by a search domain or under a wildcard.
    pub fn by_host(&self, host: &str, port: u16) -> Option<Arc<Service>> {
        let under = |name: &str| {
            self.by_host
                .get(name)?
                .iter()
                .find(|(p, _)| p.is_none_or(|p| p == port))
                .map(|(_, s)| s.clone())
        };
        if let Some(s) = under(host) {
            return Some(s);
        }
        if !self.patterned {
            return None;
        }
        names::candidates(host, &self.search)
            .skip(1)
            .find_map(|c| under(&c))
    }

    /// Whether a service's host matches a request's name.
    pub fn names_match(&self, pattern: &str, name: &str) -> bool {
        pattern == name || (self.patterned && names::matches(pattern, name, &self.search))
    }

    /// The counters of every postgres pool (for `status` views and metrics).
    pub fn postgres_pools(&self) -> Vec<crate::postgres::PoolReport> {
        self.all
            .iter()
            .filter_map(|s| match &s.kind {
                Kind::Postgres(pg) => Some(pg),
                _ => None,
            })
            .flat_map(|pg| pg.pools())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> ServiceTable {
        let cfg = Config::parse(yaml).unwrap();
        ServiceTable::new(&cfg, &Settings::from_config(&cfg.proxy)).unwrap()
    }

    #[tokio::test]
    async fn names_under_a_wildcard_are_found_and_their_lookups_bounded() {
        let t = table(
            "proxy: { search_domains: [ns.svc] }\nservices:\n  - name: w\n    match: { host: \"*.0.0.1\", port: 80 }\n    protocol: http\n  - name: short\n    match: { host: api, port: 80 }\n    protocol: http\n",
        );
        // `127.0.0.1` is a name under `*.0.0.1` that resolves (to itself).
        let w = t.by_host("127.0.0.1", 80).unwrap();
        assert_eq!(w.name, "w");
        assert!(t.by_host("0.0.1", 80).is_none());
        assert!(t.by_host("127.0.0.1", 81).is_none());
        assert_eq!(t.by_host("api.ns.svc", 80).unwrap().name, "short");
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        // No lookup may start now: not owned, and not looked up.
        let held = t
            .wild_lookups
            .clone()
            .acquire_many_owned(WILD_LOOKUPS as u32)
            .await
            .unwrap();
        assert!(!t.owns(&w, ip, Some("127.0.0.1")).await);
        drop(held);
        // The pattern itself names nothing to look up.
        assert!(!t.owns(&w, ip, None).await);
        // A second later (one lookup a second per name), it is.
        tokio::time::sleep(RELOOKUP_EVERY).await;
        assert!(t.owns(&w, ip, Some("127.0.0.1")).await);
    }
}
