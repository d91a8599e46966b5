//! One configured service in runtime form, built once from the config:
//! what every service has (its name, match, endpoints, limits, series) and
//! what its kind adds. Only HTTP services build HTTP clients; only postgres
//! services pools of server connections.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderValue, uri::Authority};
use tokio::sync::Semaphore;

use super::{
    error::ServiceError,
    pools::{EndpointPools, Pools},
};
use crate::{
    auth::RequestRules,
    config::{
        Cidr,
        service::{
            DEFAULT_REQUEST_TIMEOUT, HealthCheck, Limits as LimitsConfig, Protocol, ServiceConfig,
        },
    },
    endpoint::{EndpointSet, Picked},
    metrics::ServiceMetrics,
    net::Settings,
    postgres::PgService,
    retry::RetryPolicy,
    route::Routes,
    tls::TlsOrigin,
    upstream::{
        HttpClient, UpstreamConnector,
        authority::{authority, display_authority},
    },
};

/// One configured service, ready for traffic.
pub struct Service {
    pub name: String,
    /// Its place in the config.
    pub index: usize,
    /// Requests must also carry this Host (when matched by address too).
    pub host: Option<String>,
    /// The address block it is matched by, when it is.
    pub cidr: Option<Cidr>,
    /// Where to go; empty means the original destination.
    pub endpoints: Arc<EndpointSet>,
    /// This service's timeouts and connect behaviour.
    pub settings: Settings,
    pub limits: Limits,
    pub health_check: Option<HealthCheck>,
    pub metrics: ServiceMetrics,
    pub kind: Kind,
}

/// What a service does with what it takes.
pub enum Kind {
    /// Bytes are relayed, in TLS toward the upstream when configured.
    Tcp { tls: Option<Arc<TlsOrigin>> },
    /// HTTP per request (`protocol: http`); or, `auto`, HTTP when the first
    /// bytes are, else relayed as `Tcp` would.
    Http(Box<HttpService>),
    /// The PostgreSQL wire protocol: logins of its own, pooled servers.
    Postgres(Arc<PgService>),
}

/// What an HTTP service adds: its request policy and upstream clients.
pub struct HttpService {
    /// `protocol: auto`: relayed as TCP when the first bytes are not HTTP.
    pub auto: bool,
    pub tls: Option<Arc<TlsOrigin>>,
    /// The name the upstream knows itself by (TLS server name), for Host.
    pub upstream_name: Option<String>,
    /// `:authority` and Host for services with endpoints (constant).
    pub fixed_authority: Option<(Authority, HeaderValue)>,
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
    pub rules: RequestRules,
    /// First match wins; none matching: the service's own policy.
    pub routes: Routes,
    /// Responses kept for reuse (`cache:`), for requests no route with its
    /// own (or none) matched.
    pub cache: Option<Arc<crate::cache::Cache>>,
    /// Pooled upstream connections to the original destination, when the
    /// service has no endpoints.
    pub client: HttpClient,
    /// Makes the clients for HTTP/2 from the app to the original destination
    /// (h2c, no endpoints): one per app connection, see `http::AppConn`.
    pub connector: UpstreamConnector,
    /// Pooled clients per endpoint.
    pub endpoint_pools: EndpointPools,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("protocol", &self.protocol())
            .finish_non_exhaustive()
    }
}

impl Service {
    pub fn protocol(&self) -> Protocol {
        match &self.kind {
            Kind::Tcp { .. } => Protocol::Tcp,
            Kind::Http(h) if h.auto => Protocol::Auto,
            Kind::Http(_) => Protocol::Http,
            Kind::Postgres(_) => Protocol::Postgres,
        }
    }

    pub fn http(&self) -> Option<&HttpService> {
        match &self.kind {
            Kind::Http(h) => Some(h),
            _ => None,
        }
    }

    /// TLS this service originates on a relayed connection.
    pub fn relay_tls(&self) -> Option<&Arc<TlsOrigin>> {
        match &self.kind {
            Kind::Tcp { tls } => tls.as_ref(),
            Kind::Http(h) => h.tls.as_ref(),
            Kind::Postgres(_) => None,
        }
    }

    /// The name the upstream knows itself by, when it is not an endpoint's.
    pub fn upstream_name(&self) -> Option<&str> {
        self.http().and_then(|h| h.upstream_name.as_deref())
    }

    pub(super) fn new(
        cfg: &ServiceConfig,
        index: usize,
        base: &Settings,
    ) -> Result<Service, ServiceError> {
        let t = &cfg.timeouts;
        let mut settings = base.clone();
        settings.connect_timeout = t.connect.unwrap_or(base.connect_timeout);
        settings.idle_timeout = t.idle.unwrap_or(base.idle_timeout);
        settings.header_read_timeout = t.header_read.unwrap_or(base.header_read_timeout);
        let endpoints = Arc::new(EndpointSet::new(
            &cfg.name,
            &cfg.upstream.endpoints,
            cfg.upstream.balance,
            cfg.outlier,
            cfg.upstream.dns,
        ));
        let limits = Limits::new(&cfg.limits);
        let kind = Kind::new(cfg, &settings, &endpoints, &limits)?;
        Ok(Service {
            name: cfg.name.clone(),
            index,
            host: cfg.matcher.host.clone(),
            cidr: cfg.matcher.cidr,
            endpoints,
            settings,
            limits,
            health_check: cfg.upstream.health_check.clone(),
            metrics: crate::metrics::get().service(&cfg.name),
            kind,
        })
    }
}

impl Kind {
    fn new(
        cfg: &ServiceConfig,
        settings: &Settings,
        endpoints: &Arc<EndpointSet>,
        limits: &Limits,
    ) -> Result<Kind, ServiceError> {
        let default_name = cfg
            .upstream
            .endpoints
            .first()
            .map(|e| e.address.host.as_str());
        if let (Protocol::Postgres, Some(pg)) = (cfg.protocol, &cfg.postgres) {
            // Its TLS starts after an SSLRequest: it has its own.
            let pg = PgService::new(
                &cfg.name,
                pg,
                cfg.upstream.tls.as_ref(),
                default_name,
                cfg.upstream.target,
                endpoints.clone(),
                settings.clone(),
            )
            .map_err(|source| ServiceError::Postgres {
                service: cfg.name.clone(),
                source,
            })?;
            return Ok(Kind::Postgres(Arc::new(pg)));
        }
        let tls = match &cfg.upstream.tls {
            Some(t) => Some(Arc::new(
                TlsOrigin::new(&cfg.name, t, default_name).map_err(|source| ServiceError::Tls {
                    service: cfg.name.clone(),
                    source,
                })?,
            )),
            None => None,
        };
        match cfg.protocol {
            Protocol::Http | Protocol::Auto => Ok(Kind::Http(Box::new(HttpService::new(
                cfg, settings, endpoints, limits, tls,
            )?))),
            Protocol::Tcp | Protocol::Postgres => Ok(Kind::Tcp { tls }),
        }
    }
}

impl HttpService {
    fn new(
        cfg: &ServiceConfig,
        settings: &Settings,
        endpoints: &Arc<EndpointSet>,
        limits: &Limits,
        tls: Option<Arc<TlsOrigin>>,
    ) -> Result<HttpService, ServiceError> {
        let rules =
            RequestRules::new(&cfg.request, settings).map_err(|source| ServiceError::Auth {
                service: cfg.name.clone(),
                source,
            })?;
        let connector = UpstreamConnector::new(settings.clone(), tls.clone())
            .with_endpoints(endpoints.clone())
            .with_connection_limit(limits.connections.clone(), limits.config.max_connections);
        let upstream_name = cfg
            .upstream
            .tls
            .as_ref()
            .and_then(|t| t.server_name.clone());
        let fixed_authority = cfg.upstream.endpoints.first().and_then(|first| {
            let host = upstream_name.as_deref().unwrap_or(&first.address.host);
            let port = first.address.port;
            let a = authority(host, port)?;
            let tls_on = cfg.upstream.tls.is_some();
            let v = HeaderValue::from_str(&display_authority(host, port, tls_on)).ok()?;
            Some((a, v))
        });
        Ok(HttpService {
            auto: cfg.protocol == Protocol::Auto,
            tls,
            upstream_name,
            fixed_authority,
            request_timeout: cfg.timeouts.request.unwrap_or(DEFAULT_REQUEST_TIMEOUT),
            retry: RetryPolicy::new(cfg.retries),
            rules,
            routes: Routes::new(&cfg.routes, Some(cfg))
                .map_err(|e| ServiceError::Build(format!("service {}: {e}", cfg.name)))?,
            cache: cfg.cache.map(|c| crate::cache::Cache::shared(c, cfg, 0)),
            client: connector.clone().client(),
            endpoint_pools: EndpointPools::new(connector.clone()),
            connector,
        })
    }

    /// The endpoint and its pooled clients for one request; none without
    /// endpoints (the original destination).
    pub fn endpoint_for_request(&self, endpoints: &EndpointSet) -> Option<(Picked, Arc<Pools>)> {
        let p = endpoints.pick(&[])?;
        let pools = self.endpoint_pools.get(endpoints, &p.endpoint);
        Some((p, pools))
    }

    /// How the upstream is named to itself (Host, `:authority`): its TLS
    /// server name, else its first endpoint's host, else the original
    /// destination; with the first endpoint's (or the original) port.
    pub fn authority(&self, endpoints: &EndpointSet, dst: SocketAddr) -> (String, u16) {
        let list = endpoints.endpoints();
        let first = list.first();
        let port = first.map_or(dst.port(), |e| e.address.port);
        let host = match (&self.upstream_name, first) {
            (Some(n), _) => n.clone(),
            (None, Some(e)) => e.address.host.clone(),
            (None, None) => dst.ip().to_string(),
        };
        (host, port)
    }
}

/// A service's circuit-breaking limits, as semaphores: a permit that cannot
/// be had at once is an immediate refusal.
#[derive(Debug, Clone)]
pub struct Limits {
    pub connections: Arc<Semaphore>,
    pub pending: Arc<Semaphore>,
    pub requests: Arc<Semaphore>,
    pub config: LimitsConfig,
}

impl Limits {
    fn new(cfg: &LimitsConfig) -> Limits {
        Limits {
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            pending: Arc::new(Semaphore::new(cfg.max_pending)),
            requests: Arc::new(Semaphore::new(cfg.max_requests)),
            config: *cfg,
        }
    }
}
