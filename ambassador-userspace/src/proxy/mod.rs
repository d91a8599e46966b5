//! The userspace proxy: accepts redirected connections on 127.0.0.1 and ::1,
//! recovers each one's original destination, connects there and relays.

pub mod detect;
pub mod relay;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tracing::{debug, info, warn};

use detect::{Detected, detect};

use crate::{
    access_log,
    config::service::{DefaultPolicy, Protocol},
    http,
    original_dst::OriginalDst,
    reload::Live,
    service::{Route, Service, ServiceTable},
};
use relay::Totals;

/// A connection-level failure, classified by where it came from and whether
/// trying again could help.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("connection was not redirected by ambassador (no original destination): refusing it")]
    NotRedirected,
    #[error("original destination {0} is the proxy itself: refusing the loop")]
    Loop(SocketAddr),
    #[error(
        "cannot read the original destination: {0} (is the getsockopt program attached to an ancestor of the proxy's cgroup?)"
    )]
    OriginalDst(#[source] io::Error),
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error(
        "the proxy's own connection to {0} was intercepted: is proxy.uid the uid the proxy runs as (or proxy.mark set)?"
    )]
    Intercepted(SocketAddr),
}

/// Where a failure originated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    App,
    Upstream,
    Internal,
}

impl ProxyError {
    pub fn origin(&self) -> Origin {
        match self {
            ProxyError::NotRedirected | ProxyError::Loop(_) => Origin::App,
            ProxyError::OriginalDst(_) | ProxyError::Intercepted(_) => Origin::Internal,
            ProxyError::Connect { .. } | ProxyError::ConnectTimeout(_) => Origin::Upstream,
        }
    }

    /// Whether the same request could succeed on another attempt (no byte of it
    /// has reached anyone yet).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. } | ProxyError::ConnectTimeout(_)
        )
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "port {port} on {ip} is in use (is another ambassador or program listening there? set proxy.port)"
    )]
    InUse { ip: IpAddr, port: u16 },
    #[error(
        "cannot set proxy.mark {mark} on sockets: {source} (the proxy needs CAP_NET_ADMIN for a mark; or use proxy.uid)"
    )]
    Mark {
        mark: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// SO_MARK for upstream sockets, so the kernel programs skip them.
    pub mark: Option<u32>,
    /// An HTTP client that has not sent its request head by then is dropped.
    pub header_read_timeout: Duration,
}

impl Settings {
    pub fn from_config(cfg: &crate::config::ProxyConfig) -> Settings {
        Settings {
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            mark: cfg.mark,
            header_read_timeout: cfg.header_read_timeout,
        }
    }

    /// Fails at start-up, not on the first connection, when the mark cannot be set.
    pub fn check(&self) -> Result<(), ListenError> {
        if let Some(mark) = self.mark {
            let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .and_then(|s| s.set_mark(mark));
            if let Err(source) = probe {
                return Err(ListenError::Mark { mark, source });
            }
        }
        Ok(())
    }
}

/// The listeners of one proxy: 127.0.0.1:port always, [::1]:port when the host
/// has IPv6.
pub struct Listeners {
    pub v4: TcpListener,
    pub v6: Option<TcpListener>,
}

impl Listeners {
    /// Binds both loopback listeners on `port`; port 0 picks a free port (the
    /// same one on both families).
    pub fn bind(port: u16) -> Result<Listeners, ListenError> {
        for _ in 0..16 {
            let v4 = listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))?;
            let actual = v4.local_addr().map(|a| a.port()).unwrap_or(port);
            match listen(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), actual)) {
                Ok(v6) => return Ok(Listeners { v4, v6: Some(v6) }),
                // Picked a port that is taken on ::1 only: try another.
                Err(ListenError::InUse { .. }) if port == 0 => continue,
                Err(ListenError::Bind { source, .. })
                    if source.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                        || source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
                {
                    warn!("IPv6 loopback unavailable: listening on 127.0.0.1 only");
                    return Ok(Listeners { v4, v6: None });
                }
                Err(e) => return Err(e),
            }
        }
        Err(ListenError::InUse {
            ip: Ipv6Addr::LOCALHOST.into(),
            port,
        })
    }

    pub fn port(&self) -> u16 {
        self.v4.local_addr().map(|a| a.port()).unwrap_or(0)
    }
}

fn listen(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let bind_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            ListenError::InUse {
                ip: addr.ip(),
                port: addr.port(),
            }
        } else {
            ListenError::Bind { addr, source }
        }
    };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind_err)?;
    sock.set_reuseaddr(true).map_err(bind_err)?;
    if addr.is_ipv6() {
        socket2::SockRef::from(&sock)
            .set_only_v6(true)
            .map_err(bind_err)?;
    }
    sock.bind(addr).map_err(bind_err)?;
    sock.listen(1024).map_err(bind_err)
}

/// Raises the soft open-files limit to the hard one (each proxied connection
/// costs two fds; 1024 is a common default soft limit). Returns the old limit
/// so a spawned command can be given back what it would have had.
pub fn raise_fd_limit() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let old = lim;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: lim is a valid, initialised rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            warn!("could not raise the open-files limit");
        }
    }
    Some(old)
}

/// Keeps the last part of the open-files limit for what must go on working
/// when app connections pile up: the admin API and its probes, upstream
/// connects of connections already taken, files. An app connection whose
/// socket is numbered past the rest is reset at once: the lowest free number
/// is what accept returns, so a number that high means the ones below are
/// all in use.
#[derive(Debug, Clone, Copy)]
struct FdBudget {
    last_for_apps: u64,
}

impl FdBudget {
    fn now() -> FdBudget {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: lim is a valid out-pointer for getrlimit.
        let limit = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur
        } else {
            1024
        };
        FdBudget::of(limit)
    }

    fn of(limit: u64) -> FdBudget {
        let keep = (limit / 8).clamp(32, 1024);
        FdBudget {
            last_for_apps: limit.saturating_sub(keep),
        }
    }

    fn allows(&self, fd: i32) -> bool {
        (fd as u64) < self.last_for_apps
    }
}

/// Says at most once a second that app connections are being refused.
struct Throttled {
    last: Option<Instant>,
    since: u64,
}

impl Throttled {
    fn refused(&mut self, budget: FdBudget) {
        self.since += 1;
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            warn!(
                refused = self.since,
                fds_for_apps = budget.last_for_apps,
                "near the open-files limit: resetting new app connections (raise the limit, or find what holds them)"
            );
            self.last = Some(Instant::now());
            self.since = 0;
        }
    }
}

/// Runs the proxy until `shutdown` turns true, then stops accepting and lets
/// live connections finish (up to `drain`).
pub async fn serve(
    listeners: Listeners,
    original_dst: OriginalDst,
    live: Arc<Live>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let port = listeners.port();
    let ctx = Arc::new(Ctx {
        original_dst,
        port,
        live: live.clone(),
        draining: shutdown.clone(),
    });
    let mut conns = JoinSet::new();
    let v6 = listeners.v6;
    let v4 = listeners.v4;
    let budget = FdBudget::now();
    let mut refusals = Throttled {
        last: None,
        since: 0,
    };
    info!(port, ipv6 = v6.is_some(), "proxy listening");
    loop {
        let accepted = tokio::select! {
            r = v4.accept() => r,
            r = accept_opt(v6.as_ref()) => r,
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        match accepted {
            Ok((stream, _)) if !budget.allows(std::os::fd::AsRawFd::as_raw_fd(&stream)) => {
                crate::metrics::get().refused_fd_limit.inc();
                refusals.refused(budget);
                relay::reset(&stream);
            }
            Ok((stream, peer)) => {
                let ctx = ctx.clone();
                conns.spawn(async move { ctx.handle(stream, peer).await });
            }
            Err(e) => {
                // Out of fds or memory: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop((v4, v6));
    live.set_ready(false);
    if conns.is_empty() {
        info!("no connections in flight: stopping");
        return;
    }
    info!(connections = conns.len(), deadline = ?drain, "draining: no new connections, in-flight ones finish");
    let done =
        tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    match done {
        Ok(()) => info!("drained"),
        Err(_) => warn!(
            left = conns.len(),
            "drain deadline reached: closing what is left"
        ),
    }
}

async fn accept_opt(l: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

struct Ctx {
    original_dst: OriginalDst,
    port: u16,
    /// The current config; each connection takes the table of its time.
    live: Arc<Live>,
    /// Turns true when the proxy stops accepting (graceful drain).
    draining: watch::Receiver<bool>,
}

impl Ctx {
    async fn handle(&self, app: TcpStream, peer: SocketAddr) {
        let accepted = tokio::time::Instant::now();
        let dst = match self.original_destination(&app) {
            Ok(dst) => dst,
            Err(e) => return self.refuse(&app, peer, &e),
        };
        let _ = app.set_nodelay(true);
        let table = self.live.table();
        let route = table.route(dst);
        let detected = match &route {
            Route::Service(svc) if svc.protocol == Protocol::Http => Some(Detected::Http),
            Route::Service(svc) if svc.protocol == Protocol::Auto => Some(detect(&app).await),
            // Services here are named by Host or SNI: look at what the app says.
            Route::ByHost => Some(detect(&app).await),
            _ => None,
        };
        match (&route, &detected) {
            (_, Some(Detected::Http)) => {
                // Host-routed connections may carry requests of several
                // services: those count requests only.
                let _open = match &route {
                    Route::Service(s) => Some(s.metrics.open()),
                    Route::Default => Some(table.passthrough_metrics.open()),
                    Route::ByHost => None,
                };
                let settings = table.settings.clone();
                let draining = self.draining.clone();
                return http::serve(app, accepted, dst, route, table, &settings, draining).await;
            }
            (Route::ByHost, Some(Detected::Tls { sni: Some(name) })) => {
                if let Some(svc) = table.by_host(name, dst.port()) {
                    if !table.owns(&svc, dst.ip()).await {
                        // An allowed name toward any address would be a
                        // tunnel to anywhere.
                        warn!(%peer, %dst, service = %svc.name, sni = %name, "denied: TLS names a service's host toward an address that name does not resolve to");
                        crate::metrics::get().denied("tcp", "not_owned");
                        return relay::reset(&app);
                    }
                    // The app does TLS itself: relay its bytes, originate nothing.
                    return self.relay_to_service(app, peer, dst, &svc, false).await;
                }
            }
            _ => {}
        }
        match &route {
            Route::Service(svc) if svc.protocol == Protocol::Postgres => {
                if let Some(pg) = &svc.postgres {
                    let m = &svc.metrics;
                    let _open = m.open();
                    let start = Instant::now();
                    let t = crate::postgres::serve(pg.clone(), app, peer, dst).await;
                    let totals = Totals {
                        sent: t.from_app,
                        received: t.to_app,
                    };
                    session_log(m, dst, None, start, totals, t.outcome, None);
                }
            }
            Route::Service(svc) => {
                let app_speaks_tls = matches!(detected, Some(Detected::Tls { .. }));
                self.relay_to_service(app, peer, dst, svc, !app_speaks_tls)
                    .await
            }
            _ if table.default == DefaultPolicy::Deny => {
                info!(%peer, %dst, "denied: no service matches and the default is deny");
                crate::metrics::get().denied("tcp", "no_service");
                relay::reset(&app);
            }
            _ => self.passthrough(app, peer, dst, &table).await,
        }
    }

    /// No service: relay to where the app was going, as it is.
    async fn passthrough(
        &self,
        app: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        table: &ServiceTable,
    ) {
        let m = &table.passthrough_metrics;
        let _open = m.open();
        let start = Instant::now();
        let upstream = match connect_upstream(dst, &table.settings).await {
            Ok(u) => u,
            Err(e) => {
                session_failed(m, dst, None, start, "connect_failed");
                return self.refuse(&app, peer, &e);
            }
        };
        let _ = upstream.set_nodelay(true);
        let idle = table.settings.idle_timeout;
        let (outcome, totals) = relay::relay(&app, &upstream, idle).await;
        debug!(%peer, %dst, ?outcome, sent = totals.sent, received = totals.received, "connection closed");
        if outcome == relay::Outcome::Idle {
            info!(%peer, %dst, timeout = ?idle, "idle timeout fired: closing");
        }
        session_log(m, dst, None, start, totals, outcome.name(), None);
    }

    fn refuse(&self, app: &TcpStream, peer: SocketAddr, e: &ProxyError) {
        match e.origin() {
            Origin::App => warn!(%peer, "{e}"),
            Origin::Upstream => info!(%peer, "{e}"),
            Origin::Internal => warn!(%peer, "{e}"),
        }
        // The app learns at once, not after its own timeout.
        relay::reset(app);
    }

    fn original_destination(&self, app: &TcpStream) -> Result<SocketAddr, ProxyError> {
        let dst = self
            .original_dst
            .lookup(app)
            .map_err(ProxyError::OriginalDst)?
            .ok_or(ProxyError::NotRedirected)?;
        if dst.port() == self.port && dst.ip().is_loopback() {
            return Err(ProxyError::Loop(dst));
        }
        Ok(dst)
    }

    /// A TCP service with its own endpoints and/or TLS origination (only when
    /// `originate`: an app that speaks TLS itself gets its bytes relayed).
    async fn relay_to_service(
        &self,
        app: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        svc: &Service,
        originate: bool,
    ) {
        let m = &svc.metrics;
        let _open = m.open();
        let start = Instant::now();
        let Ok(_permit) = svc.limits.connections.clone().try_acquire_owned() else {
            warn!(service = %svc.name, "circuit breaker: max_connections ({}) reached: refusing", svc.limits.config.max_connections);
            m.rejected_connections.inc();
            session_failed(m, dst, None, start, "max_connections");
            relay::reset(&app);
            return;
        };
        let settings = &svc.settings;
        // Endpoints with failover on connect failure, or the original destination.
        let connected = if svc.endpoints.is_empty() {
            connect_upstream(dst, settings)
                .await
                .map(|t| (t, dst, None))
                .map_err(|e| e.to_string())
        } else {
            svc.endpoints
                .connect(None, settings, |tcp, addr| async move {
                    Ok::<_, crate::endpoint::EndpointError>((tcp, addr))
                })
                .await
                .map(|((t, a), p)| (t, a, Some(p)))
                .map_err(|e| e.to_string())
        };
        let (upstream, addr, picked) = match connected {
            Ok(c) => c,
            Err(e) => {
                info!(%peer, service = %svc.name, "{e}");
                session_failed(m, dst, None, start, "connect_failed");
                relay::reset(&app);
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        let idle = settings.idle_timeout;
        match svc.tls.as_ref().filter(|_| originate) {
            None => {
                let (outcome, totals) = relay::relay(&app, &upstream, idle).await;
                if outcome == relay::Outcome::Idle {
                    info!(%peer, service = %svc.name, timeout = ?idle, "idle timeout fired: closing");
                }
                debug!(%peer, %dst, service = %svc.name, upstream = %addr, ?outcome, sent = totals.sent, received = totals.received, "connection closed");
                session_log(m, dst, Some(addr), start, totals, outcome.name(), None);
            }
            Some(origin) => match origin.connect(upstream).await {
                Ok(tls) => {
                    let version = tls.get_ref().1.protocol_version().and_then(|v| v.as_str());
                    let (outcome, totals) = relay::relay_io(app, tls, idle).await;
                    if outcome == relay::Outcome::Idle {
                        info!(%peer, service = %svc.name, timeout = ?idle, "idle timeout fired: closing");
                    }
                    debug!(%peer, %dst, service = %svc.name, upstream = %addr, ?outcome, "tls connection closed");
                    session_log(m, dst, Some(addr), start, totals, outcome.name(), version);
                }
                Err(e) => {
                    if let Some(p) = &picked {
                        svc.endpoints.failure(&p.endpoint);
                    }
                    warn!(service = %svc.name, upstream = %addr, "TLS handshake failed: {}", crate::tls::reason(&e));
                    session_failed(m, dst, Some(addr), start, "tls_failed");
                    relay::reset(&app);
                }
            },
        }
    }
}

/// A session that ended before any byte was relayed.
fn session_failed(
    m: &crate::metrics::ServiceMetrics,
    dst: SocketAddr,
    endpoint: Option<SocketAddr>,
    start: Instant,
    outcome: &str,
) {
    session_log(m, dst, endpoint, start, Totals::default(), outcome, None);
}

/// Counts a finished TCP session and writes its access-log line.
fn session_log(
    m: &crate::metrics::ServiceMetrics,
    dst: SocketAddr,
    endpoint: Option<SocketAddr>,
    start: Instant,
    totals: Totals,
    outcome: &str,
    upstream_tls: Option<&str>,
) {
    m.from_app.inc_by(totals.sent);
    m.to_app.inc_by(totals.received);
    if access_log::enabled() {
        access_log::tcp(&access_log::TcpLine {
            service: &m.name,
            dst,
            endpoint: endpoint.map(|e| e.to_string()),
            bytes_in: totals.sent,
            bytes_out: totals.received,
            duration_ms: start.elapsed().as_secs_f64() * 1000.0,
            outcome,
            upstream_tls,
        });
    }
}

/// Connects to an upstream from the proxy: its own socket (marked when
/// configured), so the kernel programs let it through.
pub async fn connect_upstream(
    dst: SocketAddr,
    settings: &Settings,
) -> Result<TcpStream, ProxyError> {
    {
        let sock = if dst.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|source| ProxyError::Connect { addr: dst, source })?;
        if let Some(mark) = settings.mark {
            socket2::SockRef::from(&sock)
                .set_mark(mark)
                .map_err(|source| ProxyError::Connect { addr: dst, source })?;
        }
        match tokio::time::timeout(settings.connect_timeout, sock.connect(dst)).await {
            // A non-loopback destination reached from a loopback address means
            // the kernel sent our own connect back to us: stop the loop here.
            Ok(Ok(s))
                if !dst.ip().is_loopback()
                    && s.local_addr().is_ok_and(|a| a.ip().is_loopback()) =>
            {
                relay::reset(&s);
                Err(ProxyError::Intercepted(dst))
            }
            Ok(Ok(s)) => Ok(s),
            Ok(Err(source)) => Err(ProxyError::Connect { addr: dst, source }),
            Err(_) => Err(ProxyError::ConnectTimeout(dst)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FdBudget;

    #[test]
    fn the_last_part_of_the_fd_limit_is_kept_back_from_apps() {
        // 1024 (a common default): 128 kept; tiny limits keep 32, huge 1024.
        assert_eq!(FdBudget::of(1024).last_for_apps, 896);
        assert_eq!(FdBudget::of(128).last_for_apps, 96);
        assert_eq!(FdBudget::of(20).last_for_apps, 0);
        assert_eq!(FdBudget::of(1 << 20).last_for_apps, (1 << 20) - 1024);
        assert!(FdBudget::of(1024).allows(895) && !FdBudget::of(1024).allows(896));
    }
}
