//! The inbound half: callers of the Pod. The sk_lookup program hands their
//! connections for the app's ports to the proxy's inbound listener without
//! rewriting any address, so each accepted socket's local address is what
//! the caller dialled; its port picks the policy (`table`), then one match
//! dispatches: a byte relay to the app (after TLS termination when
//! configured) or HTTP (`http`), every request forwarded to the app from
//! 127.0.0.6, which the program lets through.

pub mod access;
pub mod admit;
pub mod authn;
pub mod failure;
pub mod forwarded;
pub mod http;
pub mod jwks;
pub mod jwt;
pub mod proxy_protocol;
pub mod table;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, sync::watch};
use tracing::{debug, info};

use crate::{
    access_log,
    metrics::ServiceMetrics,
    net::{self, Listeners, Settings},
    proxy::{accept, relay, splice::Gate},
    reload::Live,
    tls::PlainOrTls,
};
use table::{InboundPlan, PortPolicy};

/// Serves callers until `shutdown` turns true, then lets live connections
/// finish (up to `drain`).
pub async fn serve(
    listeners: Listeners,
    live: Arc<Live>,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    info!(
        port = listeners.port(),
        ipv6 = listeners.v6.is_some(),
        "inbound listening"
    );
    let draining = shutdown.clone();
    accept::serve(
        listeners,
        shutdown,
        drain,
        || {},
        move |stream, peer| {
            let (live, draining) = (live.clone(), draining.clone());
            async move { handle(stream, peer, &live, draining).await }
        },
    )
    .await;
}

async fn handle(caller: TcpStream, peer: SocketAddr, live: &Live, draining: watch::Receiver<bool>) {
    let accepted = tokio::time::Instant::now();
    // The address the caller dialled: the program assigned the connection
    // to this listener without rewriting it.
    let Ok(dst) = caller.local_addr() else {
        return;
    };
    let table = live.inbound();
    let conn = Conn {
        peer,
        dst,
        start: accepted.into_std(),
    };
    match table.plan(dst.port()) {
        InboundPlan::Relay { app } => {
            let caller = PlainOrTls::Plain(caller);
            conn.relay(caller, app, table.others(), &table.settings, false)
                .await
        }
        InboundPlan::Tcp(p) => {
            let Some((caller, _permit)) = conn.admit(caller, &p).await else {
                return;
            };
            conn.relay(caller, p.app, &p.metrics, &table.settings, p.proxy_protocol)
                .await
        }
        InboundPlan::Http(p, port) => {
            let Some((caller, _permit)) = conn.admit(caller, &p).await else {
                return;
            };
            http::serve(caller, conn.peer, conn.dst, p, port, accepted, draining).await
        }
    }
}

/// One caller's connection.
struct Conn {
    peer: SocketAddr,
    dst: SocketAddr,
    start: Instant,
}

impl Conn {
    /// Takes the connection on: within the port's connection limit (past
    /// it, a reset at once), then TLS where the port ends it.
    async fn admit(
        &self,
        caller: TcpStream,
        p: &PortPolicy,
    ) -> Option<(PlainOrTls, Option<tokio::sync::OwnedSemaphorePermit>)> {
        let permit = match &p.connections {
            None => None,
            Some((limit, max)) => match limit.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    crate::metrics::get().count_inbound(
                        crate::metrics::Inbound::Refusal,
                        &p.name,
                        "max_connections",
                    );
                    debug!(client = %self.peer, port = p.port, max, "refused: the port's max_connections is reached");
                    self.log_tcp(
                        &p.metrics,
                        relay::Totals::default(),
                        "max_connections",
                        None,
                    );
                    net::reset(&caller);
                    return None;
                }
            },
        };
        Some((self.terminate(caller, p).await?, permit))
    }

    /// The TLS handshake with the caller where the port terminates TLS; a
    /// failure is counted by reason, logged and closes the connection.
    async fn terminate(&self, caller: TcpStream, p: &PortPolicy) -> Option<PlainOrTls> {
        let Some(tls) = &p.tls else {
            return Some(PlainOrTls::Plain(caller));
        };
        // A caller that never finishes its hello is held no longer than one
        // that never finishes its request head.
        let limit = p.settings.header_read_timeout;
        let (reason, class) = match tokio::time::timeout(limit, tls.accept(caller)).await {
            Ok(Ok(s)) => return Some(PlainOrTls::terminated(s)),
            Ok(Err(e)) => {
                let reason = crate::tls::reason(&e);
                let class = crate::tls::reason_class(&reason);
                (reason, class)
            }
            Err(_) => (format!("no handshake within {limit:?}"), "timeout"),
        };
        crate::metrics::get().count_inbound(crate::metrics::Inbound::TlsFailure, &p.name, class);
        info!(client = %self.peer, port = p.port, "inbound TLS handshake failed: {reason}");
        self.log_tcp(&p.metrics, relay::Totals::default(), "tls_failed", None);
        None
    }

    /// Relays `caller` to the app at `app`.
    /// Relays `caller` to the app at `app`, after the PROXY protocol
    /// header when the port sends one.
    async fn relay(
        &self,
        caller: PlainOrTls,
        app: SocketAddr,
        m: &ServiceMetrics,
        settings: &Settings,
        proxy_protocol: bool,
    ) {
        let _open = m.open();
        let tls = caller.tls_version();
        let connected = match net::connect(app, settings).await {
            Ok(u) if proxy_protocol => {
                let header = proxy_protocol::header(self.peer, self.dst);
                let mut u = u;
                tokio::io::AsyncWriteExt::write_all(&mut u, &header)
                    .await
                    .map(|()| u)
                    .map_err(|e| e.to_string())
            }
            Ok(u) => Ok(u),
            Err(e) => Err(e.to_string()),
        };
        let upstream = match connected {
            Ok(u) => u,
            Err(e) => {
                info!(client = %self.peer, %app, "the app is not reachable: {e}");
                self.log_tcp(m, relay::Totals::default(), "connect_failed", tls);
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        let idle = settings.idle_timeout;
        let (outcome, totals) = match caller {
            // Plain: readiness-driven, no buffer while idle, resets carried.
            // A caller's socket: plain TCP, never on the local shortcut.
            PlainOrTls::Plain(c) => {
                let gate = if settings.splice {
                    Gate::Plain
                } else {
                    Gate::Off
                };
                relay::relay(&c, &upstream, idle, gate).await
            }
            tls => relay::relay_io(tls, upstream, idle).await,
        };
        debug!(client = %self.peer, dst = %self.dst, ?outcome, "inbound connection closed");
        m.from_app.inc_by(totals.sent);
        m.to_app.inc_by(totals.received);
        crate::metrics::get().spliced.inc_by(totals.spliced);
        self.log_tcp(m, totals, outcome.name(), tls);
    }

    fn log_tcp(&self, m: &ServiceMetrics, t: relay::Totals, outcome: &str, tls: Option<&str>) {
        if access_log::enabled() {
            access_log::inbound_tcp(&access_log::InboundTcpLine {
                service: &m.name,
                client: self.peer,
                dst: self.dst,
                bytes_in: t.sent,
                bytes_out: t.received,
                duration_ms: self.start.elapsed().as_secs_f64() * 1000.0,
                outcome,
                tls,
            });
        }
    }
}
