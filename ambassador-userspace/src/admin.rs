//! The admin API: `/live`, `/ready`, `/metrics`, `/config` (secrets
//! redacted), `/status`, `/log-level`. Loopback by default: it shows the
//! config and can change the log level, so it is not for the network.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Weak},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{metrics, reload::Live, service::ServiceTable};

/// Reads (`None`) or sets the process log filter; returns the filter in force.
pub type LogLevel = Arc<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen for the admin API on {addr}: {source} (is another ambassador there? set proxy.admin, or `off`)"
)]
pub struct AdminError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

struct Admin {
    live: Arc<Live>,
    log_level: Option<LogLevel>,
}

static LOG_CONTROL: std::sync::OnceLock<LogLevel> = std::sync::OnceLock::new();

/// Called once by the binary that owns the log subscriber.
pub fn set_log_control(l: LogLevel) {
    let _ = LOG_CONTROL.set(l);
}

/// Binds now (so a taken port fails the start) and serves in the background.
pub async fn start(addr: SocketAddr, live: Arc<Live>) -> Result<SocketAddr, AdminError> {
    let log_level = LOG_CONTROL.get().cloned();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    register_state(Arc::downgrade(&live));
    let admin = Arc::new(Admin { live, log_level });
    info!(%bound, "admin API listening");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
    });
    Ok(bound)
}

/// Endpoint health, read at each scrape from the table in force.
fn register_state(live: Weak<Live>) {
    metrics::get().state().set(
        "services",
        Box::new(move |rows| {
            let Some(live) = live.upgrade() else { return };
            let table = live.table();
            for svc in table.services() {
                if let Some(pg) = &svc.postgres {
                    postgres_rows(rows, &svc.name, pg);
                }
                for ep in svc.endpoints.endpoints() {
                    rows.endpoint_up.push((
                        svc.name.clone(),
                        ep.address.to_string(),
                        !svc.endpoints.is_ejected(ep),
                    ));
                }
            }
        }),
    );
}

/// A database service's pools, summed over its (user, database) pools.
fn postgres_rows(rows: &mut metrics::StateRows, service: &str, pg: &crate::postgres::PgService) {
    let mut sum = crate::postgres::PoolSnapshot::default();
    for p in pg.pools() {
        sum += p.stats;
    }
    let name = || service.to_string();
    let g = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
    rows.gauges.extend([
        ("pg_clients", "App sessions open", name(), g(pg.clients())),
        (
            "pg_pool_server_connections",
            "Server connections in the pools",
            name(),
            g(sum.servers),
        ),
        (
            "pg_pool_idle_connections",
            "Server connections idle in the pools",
            name(),
            g(sum.idle),
        ),
        (
            "pg_pool_in_use_connections",
            "Server connections lent to a session or transaction",
            name(),
            g(sum.in_use),
        ),
        (
            "pg_pool_waiting_clients",
            "Sessions waiting for a server connection",
            name(),
            g(sum.waiting),
        ),
    ]);
    rows.counters.extend([
        (
            "pg_server_connections_opened",
            "Server connections opened (TLS and login done)",
            name(),
            sum.opened,
        ),
        (
            "pg_server_connection_errors",
            "Server connections that failed to open or broke",
            name(),
            sum.errors,
        ),
        (
            "pg_pool_exhausted",
            "Waits for a server connection that ran past queue_timeout",
            name(),
            sum.exhausted,
        ),
    ]);
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut v) => {
            v.push(b'\n');
            let mut r = Response::new(Full::new(Bytes::from(v)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => {
                if self.live.is_ready() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: starting, or draining\n",
                    )
                }
            }
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(Full::new(Bytes::from(metrics::get().encode())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            (&Method::GET, "/config") => json(&*self.live.config()),
            (&Method::GET, "/status") => json(&status(&self.live)),
            (&Method::POST, "/reload") => match self.live.reload().await {
                Ok(()) => text(StatusCode::OK, "reloaded\n"),
                Err(e) => text(StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")),
            },
            (&Method::GET, "/log-level") => match &self.log_level {
                Some(l) => match l(None) {
                    Ok(f) => text(StatusCode::OK, format!("{f}\n")),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                },
                None => text(StatusCode::NOT_FOUND, "no log level control\n"),
            },
            (&Method::PUT | &Method::POST, "/log-level") => {
                let Some(l) = &self.log_level else {
                    return text(StatusCode::NOT_FOUND, "no log level control\n");
                };
                let body = match Limited::new(req.into_body(), 4096).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                };
                let Ok(filter) = std::str::from_utf8(&body) else {
                    return text(StatusCode::BAD_REQUEST, "the filter is not UTF-8\n");
                };
                match l(Some(filter.trim())) {
                    Ok(f) => {
                        info!(filter = %f, "log level changed");
                        text(StatusCode::OK, format!("{f}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                }
            }
            (_, "/live" | "/ready" | "/metrics" | "/config" | "/status" | "/log-level") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: /live /ready /metrics /config /status /log-level\n",
            ),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct Status {
    pub ready: bool,
    pub config_file: Option<String>,
    /// Seconds since the epoch of the last reload attempt.
    pub last_reload: Option<u64>,
    pub last_reload_error: Option<String>,
    pub default: crate::config::service::DefaultPolicy,
    pub services: Vec<ServiceStatus>,
    /// Database pools, one per service, user and database.
    #[serde(default)]
    pub pools: Vec<PoolStatus>,
}

#[derive(Serialize, Deserialize)]
pub struct PoolStatus {
    pub service: String,
    /// `user@database`.
    pub pool: String,
    #[serde(flatten)]
    pub stats: crate::postgres::PoolSnapshot,
}

#[derive(Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub protocol: crate::config::service::Protocol,
    pub requests_in_flight: usize,
    pub connections_open: i64,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Serialize, Deserialize)]
pub struct EndpointStatus {
    pub address: String,
    pub priority: u32,
    /// `up`, `ejected` (passive) or `down` (failing its health check).
    pub state: String,
    pub outstanding: usize,
}

fn status(live: &Live) -> Status {
    let table: Arc<ServiceTable> = live.table();
    Status {
        ready: live.is_ready(),
        config_file: live.path().map(|p| p.display().to_string()),
        last_reload: live.last_reload().and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        }),
        last_reload_error: live.last_error(),
        default: table.default,
        pools: table
            .postgres_pools()
            .into_iter()
            .map(|p| PoolStatus {
                service: p.service,
                pool: p.pool,
                stats: p.stats,
            })
            .collect(),
        services: table
            .services()
            .iter()
            .map(|s| ServiceStatus {
                name: s.name.clone(),
                protocol: s.protocol,
                requests_in_flight: s.limits.config.max_requests
                    - s.limits.requests.available_permits(),
                connections_open: s.metrics.active.get(),
                endpoints: s
                    .endpoints
                    .endpoints()
                    .iter()
                    .map(|e| EndpointStatus {
                        address: e.address.to_string(),
                        priority: e.priority,
                        state: if e.is_down() {
                            "down"
                        } else if s.endpoints.is_ejected(e) {
                            "ejected"
                        } else {
                            "up"
                        }
                        .into(),
                        outstanding: e.outstanding(),
                    })
                    .collect(),
            })
            .collect(),
    }
}
