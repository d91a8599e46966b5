//! Prometheus metrics (prometheus-client, OpenMetrics text at the admin
//! API's `/metrics`).
//!
//! Label values are bounded: service names and endpoint addresses come from
//! the config, status codes are folded into classes, TLS failure reasons into
//! a fixed set. Nothing the app chooses (paths, its own addresses) becomes a
//! label. Hot paths hold pre-made handles ([`ServiceMetrics`],
//! [`EndpointMetrics`]) and never look a family up per request.

use std::sync::{Arc, OnceLock};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// `direction`: `outbound` (the app's calls) or `inbound` (callers of the
/// Pod, whose series are named by port policy).
mod cache;
mod dns;
mod endpoint;
mod state;
pub use cache::CacheMetrics;
pub use dns::DnsMetrics;
pub use endpoint::EndpointMetrics;
pub use state::{StateCollector, StateRows, StateSource};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: String,
    direction: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    service: String,
    direction: &'static str,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    service: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    service: String,
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    service: String,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatementLabels {
    service: String,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeniedLabels {
    protocol: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Seconds: 0.5 ms to ~16 s, doubling. The proxy adds well under a
/// millisecond; upstreams take what they take.
fn latency_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

/// Seconds a pool checkout waited: 0.1 ms to ~6.5 s, doubling (the queue
/// timeout is 5 s by default).
fn wait_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 17,
    ))
}

/// Every family, registered once per process.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<ServiceLabel, Histogram, fn() -> Histogram>,
    connections: Family<ServiceLabel, Counter>,
    active: Family<ServiceLabel, Gauge>,
    bytes: Family<BytesLabels, Counter>,
    tls_failures: Family<ReasonLabels, Counter>,
    retries: Family<ServiceLabel, Counter>,
    breaker: Family<LimitLabels, Counter>,
    timeouts: Family<ServiceLabel, Counter>,
    endpoints: endpoint::EndpointFamilies,
    denied: Family<DeniedLabels, Counter>,
    auth_failures: Family<ReasonLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
    grpc: Family<GrpcLabels, Counter>,
    pool_wait: Family<PoolLabel, Histogram, fn() -> Histogram>,
    statements: Family<StatementLabels, Counter>,
    cache: cache::CacheFamilies,
    dns: dns::DnsFamilies,
    /// App connections refused because the process is near its fd limit.
    pub refused_fd_limit: Counter,
    /// Relay bytes moved by splice(2), both ways.
    pub spliced: Counter,
    reloads: Family<ResultLabel, Counter>,
    /// Scrape-time values: endpoint health, kernel counters, pools.
    state: Arc<StateCollector>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// A family made and registered under `name`.
fn registered<M>(r: &mut Registry, name: &str, help: &str) -> M
where
    M: prometheus_client::registry::Metric + Clone + Default,
{
    let m = M::default();
    r.register(name, help, m.clone());
    m
}

/// The families of the response caches and the DNS forwarder.
fn subsystems(r: &mut Registry) -> (cache::CacheFamilies, dns::DnsFamilies) {
    (
        cache::CacheFamilies::register(r),
        dns::DnsFamilies::register(r),
    )
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("ambassador");
        let requests = registered(
            &mut r,
            "http_requests",
            "HTTP requests answered, by service and status class (ambassador's own answers included)",
        );
        let duration = Family::new_with_constructor(latency_buckets as fn() -> Histogram);
        r.register_with_unit(
            "http_request_duration",
            "From the request head to the end of the response body",
            Unit::Seconds,
            duration.clone(),
        );
        let connections = registered(
            &mut r,
            "connections",
            "App connections taken, by the service they went to",
        );
        let active = registered(&mut r, "active_connections", "App connections open now");
        let bytes = Family::default();
        r.register_with_unit(
            "transferred",
            "Payload bytes: from_app (TCP bytes or HTTP request bodies) and to_app",
            Unit::Bytes,
            bytes.clone(),
        );
        let tls_failures = registered(
            &mut r,
            "tls_handshake_failures",
            "Failed TLS handshakes, with upstreams (outbound) or callers (inbound), by reason",
        );
        let retries = registered(&mut r, "retries", "HTTP requests sent again");
        let breaker = registered(
            &mut r,
            "breaker_rejections",
            "Requests or connections refused at once because a limit was reached",
        );
        let timeouts = registered(&mut r, "request_timeouts", "Request timeouts that fired");
        let endpoints = endpoint::EndpointFamilies::register(&mut r);
        let denied = registered(
            &mut r,
            "denied",
            "Connections or requests refused by policy: `default: deny` (no_service), or a service's name used toward an address it does not own (not_owned)",
        );
        let auth_failures = registered(
            &mut r,
            "auth_failures",
            "Requests refused for their credentials (inbound: callers of the Pod), by reason",
        );
        let refusals = registered(
            &mut r,
            "refusals",
            "Requests or connections refused by a port's gateway rules (inbound) or a service's routes (outbound), by reason (forbidden, rate_limited, body_too_large, max_connections, path_not_normal)",
        );
        let grpc = registered(
            &mut r,
            "grpc_responses",
            "gRPC responses, by their grpc-status (from the head, or the trailers)",
        );
        let pool_wait = Family::new_with_constructor(wait_buckets as fn() -> Histogram);
        r.register_with_unit(
            "pg_pool_wait",
            "How long a PostgreSQL session waited for a server connection of its pool (0 when one was free)",
            Unit::Seconds,
            pool_wait.clone(),
        );
        let statements = registered(
            &mut r,
            "pg_prepared_statements",
            "Named prepared statements in transaction pooling: prepared on a server connection, reused where one had it, evicted (closed) from a full one",
        );
        let (cache, dns) = subsystems(&mut r);
        let refused_fd_limit: Counter = registered(
            &mut r,
            "fd_limit_refusals",
            "App connections reset at once because the proxy was near its open-files limit (the rest is kept for the admin API, probes and connections in flight)",
        );
        let spliced = registered(
            &mut r,
            "relay_spliced_bytes",
            "Bytes of plain TCP relays moved by splice(2), kernel to kernel, both ways (bulk directions; the rest are copied)",
        );
        let reloads = registered(
            &mut r,
            "config_reloads",
            "Config reloads, by result (a rejected file leaves the old config serving)",
        );
        let state = Arc::new(StateCollector::default());
        r.register_collector(Box::new(state.clone()));
        Metrics {
            registry: r,
            requests,
            duration,
            connections,
            active,
            bytes,
            tls_failures,
            retries,
            breaker,
            timeouts,
            endpoints,
            denied,
            auth_failures,
            refusals,
            grpc,
            pool_wait,
            statements,
            cache,
            dns,
            refused_fd_limit,
            spliced,
            reloads,
            state,
        }
    }

    /// The handles one service uses on its data path. The same name gets the
    /// same series (a reloaded service continues its counters).
    pub fn service(&self, name: &str) -> ServiceMetrics {
        self.series(name, "outbound", ("from_app", "to_app"))
    }

    /// The handles of one inbound port's policy; bytes are counted as
    /// `from_caller` and `to_caller`.
    pub fn inbound(&self, name: &str) -> ServiceMetrics {
        self.series(name, "inbound", ("from_caller", "to_caller"))
    }

    fn series(
        &self,
        name: &str,
        direction: &'static str,
        bytes: (&'static str, &'static str),
    ) -> ServiceMetrics {
        let l = ServiceLabel {
            service: name.to_string(),
            direction,
        };
        let class = |c: &'static str| {
            self.requests.get_or_create_owned(&RequestLabels {
                service: name.to_string(),
                direction,
                status_class: c,
            })
        };
        let dir = |d: &'static str| {
            self.bytes.get_or_create_owned(&BytesLabels {
                service: name.to_string(),
                direction: d,
            })
        };
        let limit = |what: &'static str| {
            self.breaker.get_or_create_owned(&LimitLabels {
                service: name.to_string(),
                limit: what,
            })
        };
        ServiceMetrics {
            grpc: Arc::new(GrpcCounters {
                family: self.grpc.clone(),
                service: name.to_string(),
                direction,
                slots: Default::default(),
            }),
            name: name.to_string(),
            requests: STATUS_CLASSES.map(class),
            duration: self.duration.get_or_create_owned(&l),
            connections: self.connections.get_or_create_owned(&l),
            active: self.active.get_or_create_owned(&l),
            from_app: dir(bytes.0),
            to_app: dir(bytes.1),
            retries: self.retries.get_or_create_owned(&l),
            timeouts: self.timeouts.get_or_create_owned(&l),
            rejected_requests: limit("max_requests"),
            rejected_pending: limit("max_pending"),
            rejected_connections: limit("max_connections"),
        }
    }

    /// The handles of one endpoint (see `endpoint.rs`: its series goes
    /// with the last endpoint that holds it).
    pub fn endpoint(&'static self, service: &str, endpoint: &str) -> EndpointMetrics {
        self.endpoints.handles(service, endpoint)
    }

    /// A failed TLS handshake with an upstream (rare: the family lookup is
    /// fine here).
    pub fn tls_failure(&self, service: &str, reason: &'static str) {
        Self::reasoned(&self.tls_failures, service, "outbound", reason);
    }

    /// Something about a caller of the Pod, counted with its reason (from
    /// a fixed set; rare enough that the family lookup is fine).
    pub fn count_inbound(&self, what: Inbound, service: &str, reason: &'static str) {
        let family = match what {
            Inbound::TlsFailure => &self.tls_failures,
            Inbound::AuthFailure => &self.auth_failures,
            Inbound::Refusal => &self.refusals,
        };
        Self::reasoned(family, service, "inbound", reason);
    }

    /// The pool-wait histogram of a postgres service.
    pub fn pool_wait(&self, service: &str) -> Histogram {
        self.pool_wait.get_or_create_owned(&PoolLabel {
            service: service.to_string(),
        })
    }

    /// The prepared-statement counter of a postgres service for `event`
    /// (`prepared`, `reused`, `evicted`).
    pub fn pg_statements(&self, service: &str, event: &'static str) -> Counter {
        self.statements.get_or_create_owned(&StatementLabels {
            service: service.to_string(),
            event,
        })
    }

    /// A request of the app's a service's route refused (`forbidden`,
    /// `rate_limited`, `path_not_normal`).
    pub fn count_route_refusal(&self, service: &str, reason: &'static str) {
        Self::reasoned(&self.refusals, service, "outbound", reason);
    }

    fn reasoned(
        family: &Family<ReasonLabels, Counter>,
        service: &str,
        direction: &'static str,
        reason: &'static str,
    ) {
        family
            .get_or_create(&ReasonLabels {
                service: service.to_string(),
                direction,
                reason,
            })
            .inc();
    }

    /// A refused connection or request: `reason` is `no_service` (nothing
    /// matches under `default: deny`) or `not_owned` (a service's name
    /// toward an address that name does not resolve to).
    pub fn denied(&self, protocol: &'static str, reason: &'static str) {
        self.denied
            .get_or_create(&DeniedLabels { protocol, reason })
            .inc();
    }

    /// The handles of one service's response caches.
    pub fn cache(&self, service: &str) -> CacheMetrics {
        self.cache.handles(service)
    }

    /// The DNS forwarder's handles.
    pub fn dns(&self) -> DnsMetrics {
        self.dns.handles()
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// Sources read at every scrape.
    pub fn state(&self) -> &StateCollector {
        &self.state
    }

    /// The OpenMetrics text of everything.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What `Metrics::inbound` counts.
#[derive(Debug, Clone, Copy)]
pub enum Inbound {
    /// `tls_handshake_failures_total`.
    TlsFailure,
    /// `auth_failures_total`.
    AuthFailure,
    /// `refusals_total`.
    Refusal,
}

/// One service's data-path handles.
#[derive(Clone, Debug)]
pub struct ServiceMetrics {
    pub name: String,
    /// gRPC responses by status; a status's series made at its first.
    pub grpc: Arc<GrpcCounters>,
    requests: [Counter; 5],
    pub duration: Histogram,
    pub connections: Counter,
    pub active: Gauge,
    pub from_app: Counter,
    pub to_app: Counter,
    pub retries: Counter,
    pub timeouts: Counter,
    pub rejected_requests: Counter,
    pub rejected_pending: Counter,
    pub rejected_connections: Counter,
}

impl ServiceMetrics {
    pub fn response(&self, status: u16) {
        let i = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[i].inc();
    }

    /// Counts a connection as open until the guard drops.
    pub fn open(&self) -> ActiveGuard {
        self.connections.inc();
        self.active.inc();
        ActiveGuard(self.active.clone())
    }
}

/// One service's gRPC status counters.
pub struct GrpcCounters {
    family: Family<GrpcLabels, Counter>,
    service: String,
    direction: &'static str,
    slots: [OnceLock<Counter>; 17],
}

impl GrpcCounters {
    pub fn count(&self, code: u16) {
        let code = if code < 17 { code } else { 2 };
        self.slots[usize::from(code)]
            .get_or_init(|| {
                self.family.get_or_create_owned(&GrpcLabels {
                    service: self.service.clone(),
                    direction: self.direction,
                    grpc_code: crate::config::grpc::grpc_name(code),
                })
            })
            .inc();
    }
}

impl std::fmt::Debug for GrpcCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrpcCounters")
    }
}

pub struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
