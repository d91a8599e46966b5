//! A service's endpoints: priorities, passive health (outlier ejection) and
//! load balancing. Traffic goes to the lowest priority number that has a
//! healthy endpoint, spread by round robin or power-of-two-choices on least
//! outstanding requests; an endpoint that fails `consecutive_failures` times in
//! a row is ejected for `base_ejection`, doubled for each ejection in a row
//! (capped), and comes back on its own.
//!
//! Time is tokio's, so the logic is tested on paused time.

pub mod health;

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use tokio::{
    net::TcpStream,
    time::{Duration, Instant},
};
use tracing::warn;

use crate::{
    config::service::{Balance, EndpointConfig, HostPort, Outlier},
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
                let addr = resolve(&ep.address.host, ep.address.port).await?;
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
                        warn!(endpoint = %ep.address, ejected_for = ?t, "endpoint ejected after consecutive failures");
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
    pub address: HostPort,
    pub priority: u32,
    outstanding: AtomicUsize,
    health: Mutex<Health>,
    /// Marked down by active health checks.
    down: std::sync::atomic::AtomicBool,
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

#[derive(Debug)]
pub struct EndpointSet {
    /// Sorted by priority.
    endpoints: Vec<Arc<Endpoint>>,
    balance: Balance,
    outlier: Outlier,
    next: AtomicUsize,
}

impl EndpointSet {
    pub fn new(
        service: &str,
        cfg: &[EndpointConfig],
        balance: Balance,
        outlier: Outlier,
    ) -> EndpointSet {
        let mut endpoints: Vec<Arc<Endpoint>> = cfg
            .iter()
            .map(|e| {
                Arc::new(Endpoint {
                    address: e.address.clone(),
                    priority: e.priority,
                    outstanding: AtomicUsize::new(0),
                    health: Mutex::new(Health::default()),
                    down: std::sync::atomic::AtomicBool::new(false),
                    metrics: crate::metrics::get().endpoint(service, &e.address.to_string()),
                })
            })
            .collect();
        endpoints.sort_by_key(|e| e.priority);
        EndpointSet {
            endpoints,
            balance,
            outlier,
            next: AtomicUsize::new(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The endpoint for the next connection or request, skipping `tried`.
    /// When every endpoint is ejected, the best priority is used anyway:
    /// sending somewhere beats refusing everything ("panic mode").
    pub fn pick(&self, tried: &[Arc<Endpoint>]) -> Option<Picked> {
        let now = Instant::now();
        let fresh = |e: &&Arc<Endpoint>| !tried.iter().any(|t| Arc::ptr_eq(t, e));
        let mut best: Option<u32> = None;
        for e in self.endpoints.iter().filter(fresh) {
            if !e.ejected(now) {
                best = Some(e.priority);
                break;
            }
        }
        let candidates: Vec<&Arc<Endpoint>> = match best {
            Some(p) => self
                .endpoints
                .iter()
                .filter(fresh)
                .filter(|e| e.priority == p && !e.ejected(now))
                .collect(),
            None => {
                let first = self.endpoints.iter().find(fresh)?.priority;
                self.endpoints
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

    /// The position of `ep` in `endpoints()`.
    pub fn index_of(&self, ep: &Arc<Endpoint>) -> Option<usize> {
        self.endpoints.iter().position(|e| Arc::ptr_eq(e, ep))
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
        let ejected_now = self.endpoints.iter().filter(|e| e.ejected(now)).count();
        let mut h = crate::sync::lock(&ep.health);
        if h.ejected_until.is_some_and(|t| now < t) {
            return None;
        }
        h.consecutive_failures += 1;
        if h.consecutive_failures < self.outlier.consecutive_failures {
            return None;
        }
        let allowed =
            ((self.outlier.max_ejected * self.endpoints.len() as f64).floor() as usize).max(1);
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
mod tests {
    use super::*;

    fn set(specs: &[(&str, u32)], balance: Balance) -> EndpointSet {
        let cfg: Vec<EndpointConfig> = specs
            .iter()
            .map(|(a, p)| EndpointConfig {
                address: HostPort::try_from(a.to_string()).unwrap(),
                priority: *p,
            })
            .collect();
        EndpointSet::new(
            "test",
            &cfg,
            balance,
            Outlier {
                consecutive_failures: 3,
                base_ejection: Duration::from_secs(30),
                max_ejection: Duration::from_secs(300),
                max_ejected: 0.5,
            },
        )
    }

    fn name(p: &Picked) -> String {
        p.endpoint.address.to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn priority_failover_and_readmission() {
        let s = set(
            &[("10.0.0.2:80", 1), ("10.0.0.1:80", 0)],
            Balance::RoundRobin,
        );
        let primary = s.endpoints()[0].clone();
        assert_eq!(primary.address.to_string(), "10.0.0.1:80");
        assert_eq!(name(&s.pick(&[]).unwrap()), "10.0.0.1:80");
        assert_eq!(s.failure(&primary), None);
        assert_eq!(s.failure(&primary), None);
        assert_eq!(s.failure(&primary), Some(Duration::from_secs(30)));
        // Ejected: the secondary takes the traffic.
        assert_eq!(name(&s.pick(&[]).unwrap()), "10.0.0.2:80");
        tokio::time::advance(Duration::from_secs(31)).await;
        // Back after its ejection time.
        assert_eq!(name(&s.pick(&[]).unwrap()), "10.0.0.1:80");
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_grow_and_are_capped_and_forgotten() {
        let s = set(
            &[("10.0.0.1:80", 0), ("10.0.0.2:80", 0)],
            Balance::RoundRobin,
        );
        let ep = s.endpoints()[0].clone();
        let mut times = Vec::new();
        for _ in 0..6 {
            let t = (0..3).find_map(|_| s.failure(&ep)).unwrap();
            times.push(t.as_secs());
            tokio::time::advance(t + Duration::from_secs(1)).await;
        }
        assert_eq!(times, [30, 60, 120, 240, 300, 300]);
        // A healthy stretch longer than the cap resets the growth.
        tokio::time::advance(Duration::from_secs(301)).await;
        s.success(&ep);
        let t = (0..3).find_map(|_| s.failure(&ep)).unwrap();
        assert_eq!(t, Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_share_but_always_one() {
        let s = set(
            &[("10.0.0.1:80", 0), ("10.0.0.2:80", 0), ("10.0.0.3:80", 0)],
            Balance::RoundRobin,
        );
        let eject = |i: usize| (0..3).find_map(|_| s.failure(&s.endpoints()[i]));
        // 0.5 of 3 is 1.
        assert!(eject(0).is_some());
        assert!(
            eject(1).is_none(),
            "a second ejection would exceed the share"
        );
        let single = set(&[("10.0.0.1:80", 0)], Balance::RoundRobin);
        assert!(
            (0..3)
                .find_map(|_| single.failure(&single.endpoints()[0]))
                .is_some()
        );
        // All ejected: still answers, with the best priority.
        assert_eq!(name(&single.pick(&[]).unwrap()), "10.0.0.1:80");
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_breaks_the_failure_streak() {
        let s = set(
            &[("10.0.0.1:80", 0), ("10.0.0.2:80", 0)],
            Balance::RoundRobin,
        );
        let ep = s.endpoints()[0].clone();
        s.failure(&ep);
        s.failure(&ep);
        s.success(&ep);
        assert_eq!(s.failure(&ep), None);
        assert_eq!(s.failure(&ep), None);
        assert!(!s.is_ejected(&ep));
    }

    #[test]
    fn p2c_always_compares_two_different_endpoints() {
        let s = set(
            &[("10.0.0.1:80", 0), ("10.0.0.2:80", 0), ("10.0.0.3:80", 0)],
            Balance::P2c,
        );
        // With one endpoint loaded, it must never win against an idle one.
        let busy = s.pick(&[]).unwrap();
        for _ in 0..30 {
            let p = s.pick(&[]).unwrap();
            assert!(!Arc::ptr_eq(&p.endpoint, &busy.endpoint) || busy.endpoint.outstanding() == 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_prefers_the_less_loaded_and_skips_what_was_tried() {
        let s = set(&[("10.0.0.1:80", 0), ("10.0.0.2:80", 0)], Balance::P2c);
        // Hold many picks of whatever comes: the load stays balanced.
        let held: Vec<Picked> = (0..100).map(|_| s.pick(&[]).unwrap()).collect();
        let a = s.endpoints()[0].outstanding();
        let b = s.endpoints()[1].outstanding();
        assert_eq!(a + b, 100);
        assert!(a.abs_diff(b) <= 2, "{a} vs {b}");
        drop(held);
        assert_eq!(s.endpoints()[0].outstanding(), 0);
        let first = s.pick(&[]).unwrap();
        let tried = [first.endpoint.clone()];
        let second = s.pick(&tried).unwrap();
        assert!(!Arc::ptr_eq(&first.endpoint, &second.endpoint));
        assert!(
            s.pick(&[first.endpoint.clone(), second.endpoint.clone()])
                .is_none()
        );
    }
}
