//! The userspace proxy: accepts redirected connections on 127.0.0.1 and ::1,
//! recovers each one's original destination, connects there and relays.

pub mod accept;
pub mod detect;
pub mod plan;
pub mod relay;
pub mod splice;

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, sync::watch};
use tracing::{debug, info, warn};

use detect::detect;
use plan::Plan;

use crate::{
    access_log,
    error::{Classified, Origin, Retry},
    http,
    net::{self, Listeners},
    original_dst::OriginalDst,
    reload::Live,
    service::{Route, Service, ServiceTable},
};
use relay::Totals;

/// Why an app connection could not be taken on.
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
    #[error(transparent)]
    Connect(#[from] net::ConnectError),
}

impl Classified for ProxyError {
    fn origin(&self) -> Origin {
        match self {
            ProxyError::NotRedirected | ProxyError::Loop(_) => Origin::App,
            ProxyError::OriginalDst(_) => Origin::Internal,
            ProxyError::Connect(e) => e.origin(),
        }
    }

    fn retry(&self) -> Retry {
        match self {
            ProxyError::Connect(e) => e.retry(),
            _ => Retry::Never,
        }
    }
}

/// Runs the proxy until `shutdown` turns true, then stops accepting and lets
/// live connections finish (up to `drain`).
pub async fn serve(
    listeners: Listeners,
    original_dst: OriginalDst,
    live: Arc<Live>,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let port = listeners.port();
    let ctx = Arc::new(Ctx {
        original_dst,
        port,
        live: live.clone(),
        draining: shutdown.clone(),
    });
    info!(port, ipv6 = listeners.v6.is_some(), "proxy listening");
    let stopped = move || live.set_ready(false);
    accept::serve(listeners, shutdown, drain, stopped, move |stream, peer| {
        let ctx = ctx.clone();
        async move { ctx.handle(stream, peer).await }
    })
    .await;
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
    /// Each kind of connection's future is boxed: this one is what every
    /// accepted connection's task holds and moves when it is spawned, and
    /// inline it would be the largest branch's size (kilobytes).
    async fn handle(&self, app: TcpStream, peer: SocketAddr) {
        let accepted = tokio::time::Instant::now();
        let dst = match self.original_destination(&app, peer) {
            Ok(dst) => dst,
            Err(e) => return self.refuse(&app, peer, &e),
        };
        let table = self.live.table();
        let route = table.route(dst);
        let first = match plan::needs_first_bytes(&route) {
            true => Some(detect(&app).await),
            false => None,
        };
        match plan::plan(&route, first.as_ref(), &table, dst.port()) {
            Plan::Http => {
                // Host-routed connections may carry requests of several
                // services: those count requests only.
                let _open = match &route {
                    Route::Service(s) => Some(s.metrics.open()),
                    Route::Default => Some(table.passthrough_metrics.open()),
                    Route::ByHost | Route::Dns => None,
                };
                let settings = table.settings.clone();
                let draining = self.draining.clone();
                Box::pin(http::serve(
                    app, accepted, dst, route, table, &settings, draining,
                ))
                .await
            }
            Plan::Relay { svc, originate } => {
                Box::pin(self.relay_to_service(app, peer, dst, &svc, originate)).await
            }
            Plan::RelayNamed { svc, sni } => {
                if !table.owns(&svc, dst.ip(), Some(&sni)).await {
                    // An allowed name toward any address would be a tunnel
                    // to anywhere.
                    warn!(%peer, %dst, service = %svc.name, %sni, "denied: TLS names a service's host toward an address that name does not resolve to");
                    crate::metrics::get().denied("tcp", "not_owned");
                    return net::reset(&app);
                }
                // The app does TLS itself: relay its bytes, originate nothing.
                Box::pin(self.relay_to_service(app, peer, dst, &svc, false)).await
            }
            Plan::Postgres { svc, pg } => {
                let m = &svc.metrics;
                let _open = m.open();
                let start = Instant::now();
                let t = Box::pin(crate::postgres::serve(pg, app, peer, dst)).await;
                let totals = Totals {
                    sent: t.from_app,
                    received: t.to_app,
                    spliced: 0,
                };
                session_log(m, dst, None, start, totals, t.outcome, None);
            }
            Plan::Passthrough => Box::pin(self.passthrough(app, peer, dst, &table)).await,
            Plan::Dns => Box::pin(crate::dns::tcp::serve(app, dst, table)).await,
            Plan::Deny => {
                info!(%peer, %dst, "denied: no service matches and the default is deny");
                crate::metrics::get().denied("tcp", "no_service");
                net::reset(&app);
            }
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
        let upstream = match net::connect(dst, &table.settings).await {
            Ok(u) => u,
            Err(e) => {
                session_failed(m, dst, None, start, "connect_failed");
                return self.refuse(&app, peer, &ProxyError::Connect(e));
            }
        };
        let _ = upstream.set_nodelay(true);
        let idle = table.settings.idle_timeout;
        let gate = splice::outbound_gate(&table.settings);
        let (outcome, totals) = relay::relay(&app, &upstream, idle, gate).await;
        debug!(%peer, %dst, ?outcome, sent = totals.sent, received = totals.received, "connection closed");
        if outcome == relay::Outcome::Idle {
            info!(%peer, %dst, timeout = ?idle, "idle timeout fired: closing");
        }
        session_log(m, dst, None, start, totals, outcome.name(), None);
    }

    fn refuse(&self, app: &TcpStream, peer: SocketAddr, e: &ProxyError) {
        crate::log_failure!(e.origin(), %peer, "{e}");
        // The app learns at once, not after its own timeout.
        net::reset(app);
    }

    fn original_destination(
        &self,
        app: &TcpStream,
        peer: SocketAddr,
    ) -> Result<SocketAddr, ProxyError> {
        let dst = self
            .original_dst
            .lookup(app, peer, self.port)
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
            net::reset(&app);
            return;
        };
        let settings = &svc.settings;
        // Endpoints with failover on connect failure, or the original destination.
        let connected = if svc.endpoints.is_empty() {
            net::connect(dst, settings)
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
                net::reset(&app);
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        let idle = settings.idle_timeout;
        match svc.relay_tls().filter(|_| originate) {
            None => {
                let gate = splice::outbound_gate(settings);
                let (outcome, totals) = relay::relay(&app, &upstream, idle, gate).await;
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
                    net::reset(&app);
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
    crate::metrics::get().spliced.inc_by(totals.spliced);
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
