//! A service's endpoints: priorities, passive health (outlier ejection) and
//! load balancing. Traffic goes to the lowest priority number that has a
//! healthy endpoint, spread by round robin or power-of-two-choices on least
//! outstanding requests; an endpoint that fails `consecutive_failures` times in
//! a row is ejected for `base_ejection`, doubled for each ejection in a row
//! (capped), and comes back on its own.
//!
//! An endpoint named by host stands for every address its name resolves
//! to: `refresh.rs` makes each one an endpoint of its own and keeps the list
//! current. So the list changes at run time: it is one immutable snapshot,
//! swapped whole; an endpoint still in the next snapshot is the same
//! `Arc<Endpoint>` (its health goes on), and one taken out lives on while a
//! connection holds it.
//!
//! Time is tokio's, so the logic is tested on paused time.

pub mod health;
pub mod lookup;
pub mod refresh;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use arc_swap::ArcSwap;
use tokio::{
    net::TcpStream,
    time::{Duration, Instant},
};
use tracing::warn;

use crate::{
    config::service::{Balance, EndpointConfig, EndpointDns, HostPort, Outlier},
    net::{ConnectError as NetError, Settings},
};

/// No endpoint could be connected to.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error(transparent)]
    Connect(#[from] NetError),
    #[error("no endpoint left to try")]
    Exhausted,
}

impl EndpointError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, EndpointError::Connect(NetError::Timeout(_)))
    }
}

/// The first address of `host` (an IP literal needs no lookup).
pub async fn resolve(host: &str, port: u16) -> Result<std::net::SocketAddr, EndpointError> {
    if let Ok(ip) = host.parse() {
        return Ok(std::net::SocketAddr::new(ip, port));
    }
    let err = |reason: String| EndpointError::Resolve {
        host: host.to_string(),
        reason,
    };
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no addresses".into()))
}

impl EndpointSet {
    /// Connects to the best endpoint, moving on to the next on a connect
    /// failure (nothing was sent, so this is always safe) and counting the
    /// failure against the endpoint. `check` may reject a connected endpoint
    /// (a failed TLS handshake, say), which counts as a failure too.
    ///
    /// `first`, when given, is tried before anything else (the endpoint a
    /// request was already sent toward).
    pub async fn connect<T, E, F, Fut>(
        &self,
        first: Option<&Arc<Endpoint>>,
        settings: &Settings,
        mut check: F,
    ) -> Result<(T, Picked), E>
    where
        F: FnMut(TcpStream, std::net::SocketAddr) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: From<EndpointError>,
    {
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        let mut last: Option<E> = None;
        let mut first = first.map(|e| self.hold(e));
        while let Some(picked) = first.take().or_else(|| self.pick(&tried)) {
            tried.push(picked.endpoint.clone());
            let ep = &picked.endpoint;
            let attempt = async {
                let addr = ep.socket_addr().await?;
                let tcp = crate::net::connect(addr, settings).await?;
                Ok::<_, EndpointError>((tcp, addr))
            };
            let result = match attempt.await {
                Ok((tcp, addr)) => check(tcp, addr).await,
                Err(e) => Err(E::from(e)),
            };
            match result {
                Ok(t) => return Ok((t, picked)),
                Err(e) => {
                    if let Some(t) = self.failure(ep) {
                        warn!(endpoint = %ep.label(), ejected_for = ?t, "endpoint ejected after consecutive failures");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| E::from(EndpointError::Exhausted)))
    }
}

#[derive(Debug)]
pub struct Endpoint {
    /// As configured: a name (or IP literal) and port.
    pub address: HostPort,
    /// For an endpoint named by host once its name resolved: the one
    /// address of the name this endpoint is. None: an IP literal, or a name
    /// not resolved yet (then each connect resolves it).
    pub ip: Option<IpAddr>,
    /// Its entry's place in `upstream.endpoints`.
    pub source: usize,
    pub priority: u32,
    /// How status, metrics and logs name it.
    label: String,
    outstanding: AtomicUsize,
    health: Mutex<Health>,
    /// Marked down by active health checks.
    down: AtomicBool,
    pub metrics: crate::metrics::EndpointMetrics,
}

#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    /// Ejections in a row; sets the next ejection's length.
    ejections: u32,
    last_ejected: Option<Instant>,
}

impl Endpoint {
    fn new(service: &str, source: usize, cfg: &EndpointConfig, ip: Option<IpAddr>) -> Endpoint {
        let label = label(&cfg.address, ip);
        Endpoint {
            metrics: crate::metrics::get().endpoint(service, &label),
            address: cfg.address.clone(),
            ip,
            source,
            priority: cfg.priority,
            label,
            outstanding: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
            down: AtomicBool::new(false),
        }
    }

    /// `host:port` as configured; one address of a name is
    /// `host:port@address`, so it says where it came from.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Where to connect: its own address, else what its name (or literal)
    /// resolves to now.
    pub async fn socket_addr(&self) -> Result<SocketAddr, EndpointError> {
        match self.ip {
            Some(ip) => Ok(SocketAddr::new(ip, self.address.port)),
            None => resolve(&self.address.host, self.address.port).await,
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    fn ejected(&self, now: Instant) -> bool {
        if self.down.load(Ordering::Relaxed) {
            return true;
        }
        let h = crate::sync::lock(&self.health);
        h.ejected_until.is_some_and(|t| now < t)
    }

    /// Active health checks mark an endpoint down or up again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }
}

/// One use of an endpoint; counts as outstanding until dropped.
#[derive(Debug)]
pub struct Picked {
    pub endpoint: Arc<Endpoint>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

fn label(address: &HostPort, ip: Option<IpAddr>) -> String {
    match ip {
        Some(ip) => format!("{address}@{ip}"),
        None => address.to_string(),
    }
}

#[derive(Debug)]
pub struct EndpointSet {
    service: String,
    /// `upstream.endpoints`, what the list is made from.
    config: Vec<EndpointConfig>,
    dns: EndpointDns,
    /// Sorted by priority; swapped whole when a name's addresses change.
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// Counts the swaps (what is kept per endpoint elsewhere follows it).
    generation: AtomicU64,
    /// One swap at a time (readers never wait).
    swap: Mutex<()>,
    balance: Balance,
    outlier: Outlier,
    next: AtomicUsize,
}

impl EndpointSet {
    /// One endpoint per entry to begin with: names resolve at connect time
    /// until `refresh` has their addresses.
    pub fn new(
        service: &str,
        cfg: &[EndpointConfig],
        balance: Balance,
        outlier: Outlier,
        dns: EndpointDns,
    ) -> EndpointSet {
        let mut endpoints: Vec<Arc<Endpoint>> = cfg
            .iter()
            .enumerate()
            .map(|(i, e)| Arc::new(Endpoint::new(service, i, e, None)))
            .collect();
        endpoints.sort_by_key(|e| e.priority);
        EndpointSet {
            service: service.to_string(),
            config: cfg.to_vec(),
            dns,
            endpoints: ArcSwap::from_pointee(endpoints),
            generation: AtomicU64::new(0),
            swap: Mutex::new(()),
            balance,
            outlier,
            next: AtomicUsize::new(0),
        }
    }

    /// No endpoints configured: the original destination.
    pub fn is_empty(&self) -> bool {
        self.config.is_empty()
    }

    /// The endpoints now (a snapshot: a swap does not change it).
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Changes with every new list of endpoints.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether `ep` is in the list now.
    pub fn contains(&self, ep: &Arc<Endpoint>) -> bool {
        self.endpoints.load().iter().any(|e| Arc::ptr_eq(e, ep))
    }

    /// The endpoint for the next connection or request, skipping `tried`.
    /// When every endpoint is ejected, the best priority is used anyway:
    /// sending somewhere beats refusing everything ("panic mode").
    pub fn pick(&self, tried: &[Arc<Endpoint>]) -> Option<Picked> {
        let now = Instant::now();
        let endpoints = self.endpoints.load();
        let fresh = |e: &&Arc<Endpoint>| !tried.iter().any(|t| Arc::ptr_eq(t, e));
        let mut best: Option<u32> = None;
        for e in endpoints.iter().filter(fresh) {
            if !e.ejected(now) {
                best = Some(e.priority);
                break;
            }
        }
        let candidates: Vec<&Arc<Endpoint>> = match best {
            Some(p) => endpoints
                .iter()
                .filter(fresh)
                .filter(|e| e.priority == p && !e.ejected(now))
                .collect(),
            None => {
                let first = endpoints.iter().find(fresh)?.priority;
                endpoints
                    .iter()
                    .filter(fresh)
                    .filter(|e| e.priority == first)
                    .collect()
            }
        };
        let chosen = match (self.balance, candidates.len()) {
            (_, 0) => return None,
            (_, 1) => candidates[0],
            (Balance::RoundRobin, n) => candidates[self.next.fetch_add(1, Ordering::Relaxed) % n],
            (Balance::P2c, n) => {
                // Two distinct candidates from a cheap counter-driven sequence;
                // the one with fewer outstanding requests wins.
                let k = self.next.fetch_add(1, Ordering::Relaxed);
                let i = k % n;
                let j = (i + 1 + (k / n) % (n - 1)) % n;
                let (a, b) = (candidates[i], candidates[j]);
                if b.outstanding() < a.outstanding() {
                    b
                } else {
                    a
                }
            }
        };
        chosen.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            endpoint: chosen.clone(),
        })
    }

    /// Counts a use of `ep` chosen elsewhere.
    pub fn hold(&self, ep: &Arc<Endpoint>) -> Picked {
        ep.outstanding.fetch_add(1, Ordering::Relaxed);
        Picked {
            endpoint: ep.clone(),
        }
    }

    /// Ends `ep`'s outlier ejection, if it is ejected (a passing active
    /// check); its ejection count stays, so a relapse is ejected for longer.
    /// Returns whether it was.
    pub fn readmit(&self, ep: &Endpoint) -> bool {
        let mut h = crate::sync::lock(&ep.health);
        let was = h.ejected_until.is_some_and(|t| Instant::now() < t);
        if was {
            h.ejected_until = None;
            h.consecutive_failures = 0;
        }
        was
    }

    /// A success: the failure streak ends; a long healthy stretch also
    /// forgets earlier ejections.
    pub fn success(&self, ep: &Endpoint) {
        ep.metrics.success.inc();
        let mut h = crate::sync::lock(&ep.health);
        h.consecutive_failures = 0;
        if let Some(last) = h.last_ejected
            && Instant::now().duration_since(last) > self.outlier.max_ejection
        {
            h.ejections = 0;
        }
    }

    /// A failure (connect failure, reset, 5xx). Returns how long the endpoint
    /// was ejected for, when this failure ejected it.
    pub fn failure(&self, ep: &Endpoint) -> Option<Duration> {
        ep.metrics.failure.inc();
        let now = Instant::now();
        let endpoints = self.endpoints.load();
        let ejected_now = endpoints.iter().filter(|e| e.ejected(now)).count();
        let mut h = crate::sync::lock(&ep.health);
        if h.ejected_until.is_some_and(|t| now < t) {
            return None;
        }
        h.consecutive_failures += 1;
        if h.consecutive_failures < self.outlier.consecutive_failures {
            return None;
        }
        let allowed = ((self.outlier.max_ejected * endpoints.len() as f64).floor() as usize).max(1);
        if ejected_now >= allowed {
            return None;
        }
        let factor = 1u32 << h.ejections.min(16);
        let time = self
            .outlier
            .base_ejection
            .saturating_mul(factor)
            .min(self.outlier.max_ejection);
        h.ejected_until = Some(now + time);
        h.last_ejected = Some(now);
        ep.metrics.ejections.inc();
        h.ejections += 1;
        h.consecutive_failures = 0;
        Some(time)
    }

    /// Whether `ep` is ejected right now (for status views and tests).
    pub fn is_ejected(&self, ep: &Endpoint) -> bool {
        ep.ejected(Instant::now())
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
