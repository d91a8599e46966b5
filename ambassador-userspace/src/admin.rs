//! The admin API: `/live`, `/ready`, `/metrics`, `/config` (secrets
//! redacted), `/status`, `/log-level`, `/reload`.
//!
//! Three doors. On TCP (the Pod's loopback by default) it only answers
//! reads: the app shares that loopback, and must not change what the proxy
//! does to it. Changes (`PUT /log-level`, `POST /reload`) go through a Unix
//! socket that only the proxy's own user (and root) can open: a file in the
//! sidecar's own filesystem, mode 0600, each peer's uid checked again. And
//! `/metrics` alone on the Pod's addresses (`proxy.metrics`), for scrapers
//! outside the Pod, which have no business reading the config.

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
    "cannot listen for {what} on {addr}: {source} (is another ambassador there? set proxy.{key}, or `off`)"
)]
pub struct AdminError {
    what: &'static str,
    key: &'static str,
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// What a door serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Door {
    /// `GET /metrics` only (`proxy.metrics`).
    Metrics,
    /// Every read (`proxy.admin`).
    Reads,
    /// Reads and changes (the admin socket).
    Changes,
}

struct Admin {
    live: Arc<Live>,
    log_level: Option<LogLevel>,
    door: Door,
}

/// Why the admin socket could not be served (the start goes on without it).
#[derive(Debug, thiserror::Error)]
#[error("admin socket {path}: {source}")]
pub struct SocketError {
    path: String,
    #[source]
    source: std::io::Error,
}

static LOG_CONTROL: std::sync::OnceLock<LogLevel> = std::sync::OnceLock::new();

/// Called once by the binary that owns the log subscriber.
pub fn set_log_control(l: LogLevel) {
    let _ = LOG_CONTROL.set(l);
}

/// Binds now (so a taken port fails the start) and serves the read-only
/// endpoints in the background.
pub async fn start(addr: SocketAddr, live: Arc<Live>) -> Result<SocketAddr, AdminError> {
    listen(addr, live, Door::Reads).await
}

/// Binds now and serves `GET /metrics` alone in the background.
pub async fn start_metrics(addr: SocketAddr, live: Arc<Live>) -> Result<SocketAddr, AdminError> {
    listen(addr, live, Door::Metrics).await
}

async fn listen(addr: SocketAddr, live: Arc<Live>, door: Door) -> Result<SocketAddr, AdminError> {
    let (what, key) = match door {
        Door::Metrics => ("metrics", "metrics"),
        _ => ("the admin API", "admin"),
    };
    let listener = TcpListener::bind(addr).await.map_err(|source| AdminError {
        what,
        key,
        addr,
        source,
    })?;
    let bound = listener.local_addr().unwrap_or(addr);
    register_state(Arc::downgrade(&live));
    let admin = Arc::new(Admin {
        live,
        log_level: LOG_CONTROL.get().cloned(),
        door,
    });
    match door {
        Door::Metrics => info!(%bound, "metrics listening (GET /metrics only)"),
        _ => info!(%bound, "admin API listening (read-only on TCP)"),
    }
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => serve_one(admin.clone(), stream),
                Err(e) => accept_failed(&e).await,
            }
        }
    });
    Ok(bound)
}

/// Serves every endpoint, changes included, on a Unix socket at `path`:
/// its directory is made (0700) if missing, a stale socket file replaced,
/// the socket left at mode 0600, and each peer must be this process's own
/// user or root.
pub fn start_socket(path: &std::path::Path, live: Arc<Live>) -> Result<(), SocketError> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let err = |source| SocketError {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    let admin = Arc::new(Admin {
        live,
        log_level: LOG_CONTROL.get().cloned(),
        door: Door::Changes,
    });
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    info!(path = %path.display(), "admin socket listening (reads and changes)");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => match stream.peer_cred() {
                    Ok(c) if c.uid() == own || c.uid() == 0 => serve_one(admin.clone(), stream),
                    Ok(c) => warn!(
                        uid = c.uid(),
                        "admin socket: refused a peer of another user"
                    ),
                    Err(e) => warn!("admin socket: cannot tell the peer's user ({e}): refused"),
                },
                Err(e) => accept_failed(&e).await,
            }
        }
    });
    Ok(())
}

/// Out of fds or memory: back off instead of spinning.
async fn accept_failed(e: &std::io::Error) {
    warn!(error = %e, "admin accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

fn serve_one<S>(admin: Arc<Admin>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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

/// One request to the admin socket at `path` (the `reload` and `log-level`
/// commands): (status, body).
pub fn ask_socket(
    path: &std::path::Path,
    method: &str,
    uri: &str,
    body: &str,
) -> Result<(u16, String), SocketError> {
    use std::io::{Read as _, Write as _};
    let err = |source| SocketError {
        path: path.display().to_string(),
        source,
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(err)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .map_err(err)?;
    write!(
        s,
        "{method} {uri} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(err)?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(err)?;
    let bad = || err(std::io::Error::other("not an HTTP response"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

/// Endpoint health, read at each scrape from the table in force.
fn register_state(live: Weak<Live>) {
    metrics::get().state().set(
        "services",
        Box::new(move |rows| {
            let Some(live) = live.upgrade() else { return };
            let table = live.table();
            for svc in table.services() {
                match &svc.kind {
                    crate::service::Kind::Postgres(pg) => postgres_rows(rows, &svc.name, pg),
                    crate::service::Kind::Http(_) => cache_rows(rows, svc),
                    crate::service::Kind::Tcp { .. } => {}
                }
                for ep in svc.endpoints.endpoints().iter() {
                    rows.endpoint_up.push((
                        svc.name.clone(),
                        ep.label().to_string(),
                        !svc.endpoints.is_ejected(ep),
                    ));
                }
            }
        }),
    );
}

/// What an HTTP service's response caches hold (its own and its routes').
fn cache_rows(rows: &mut metrics::StateRows, svc: &crate::service::Service) {
    let Some(c) = cache_status(svc) else { return };
    let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    rows.gauges.extend([
        (
            "cache_bytes",
            "Bytes the response caches hold (bodies and heads, as max_bytes counts them)",
            svc.name.clone(),
            g(c.bytes),
        ),
        (
            "cache_entries",
            "Keys the response caches hold",
            svc.name.clone(),
            g(c.entries as u64),
        ),
    ]);
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
        (
            "pg_prepared_statements_cached",
            "Named statements prepared on the pools' server connections (transaction pooling)",
            name(),
            g(sum.statements),
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
        if self.door == Door::Metrics && path != "/metrics" {
            return text(
                StatusCode::NOT_FOUND,
                "not found: this listener serves GET /metrics only (the rest of the admin API is on the Pod's loopback)\n",
            );
        }
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
            (&Method::PUT | &Method::POST, "/log-level") | (&Method::POST, "/reload")
                if self.door != Door::Changes =>
            {
                text(
                    StatusCode::FORBIDDEN,
                    "changes are taken on the admin socket (proxy.admin_socket), not on TCP, which the app shares: \
                     use `ambassador reload` or `ambassador log-level` in the proxy's container\n",
                )
            }
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
    /// What its response caches hold (its own and its routes'), if it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStatus>,
}

#[derive(Serialize, Deserialize)]
pub struct CacheStatus {
    pub entries: usize,
    pub bytes: u64,
    /// The sum of their `max_bytes`.
    pub max_bytes: u64,
}

/// A service's caches, summed (none: it has no cache).
fn cache_status(s: &crate::service::Service) -> Option<CacheStatus> {
    let h = s.http()?;
    let mut caches = h.cache.iter().chain(h.routes.caches()).peekable();
    caches.peek()?;
    Some(caches.fold(
        CacheStatus {
            entries: 0,
            bytes: 0,
            max_bytes: 0,
        },
        |mut sum, c| {
            let (bytes, entries) = c.held();
            sum.entries += entries;
            sum.bytes += bytes;
            sum.max_bytes += c.config.max_bytes;
            sum
        },
    ))
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
                protocol: s.protocol(),
                requests_in_flight: s.limits.config.max_requests
                    - s.limits.requests.available_permits(),
                connections_open: s.metrics.active.get(),
                cache: cache_status(s),
                endpoints: s
                    .endpoints
                    .endpoints()
                    .iter()
                    .map(|e| EndpointStatus {
                        address: e.label().to_string(),
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
