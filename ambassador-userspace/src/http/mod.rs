//! The HTTP ambassador: hyper on the app side (HTTP/1.x and HTTP/2 prior
//! knowledge), per-request service choice by Host, the service's request
//! policy, and a pooled upstream client. Bodies stream both ways.

mod activity;
mod app_io;
pub mod pool;
pub mod target;
pub mod upstream;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{self, HeaderName},
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::{
    body::{Body as _, Incoming},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::{
    access_log,
    config::service::DefaultPolicy,
    endpoint::Picked,
    proxy::Settings,
    retry,
    service::{Route, Service, ServiceTable},
};

use upstream::ConnectError;

pub type Body = Either<ResponseBody, Full<Bytes>>;

/// An upstream response body on its way to the app: streamed frame by frame,
/// cut when the service's request timeout passes, and holding the request's
/// circuit-breaker permit until it ends.
pub struct ResponseBody {
    inner: Incoming,
    deadline: Option<(std::pin::Pin<Box<tokio::time::Sleep>>, std::time::Duration)>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The endpoint stays "outstanding" until the response ends.
    _endpoint: Option<Picked>,
    /// Metrics and the access-log line, done when the body ends or is dropped.
    finish: Option<Finish>,
    sent: u64,
    /// The HTTP/1.1 pool's connection: back to the pool once the body has
    /// ended, closed if the body is dropped before.
    lease: Option<upstream::Lease>,
    ended: bool,
}

impl ResponseBody {
    fn new(
        inner: Incoming,
        deadline: Option<(std::pin::Pin<Box<tokio::time::Sleep>>, std::time::Duration)>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
        endpoint: Option<Picked>,
    ) -> ResponseBody {
        ResponseBody {
            // An empty body may never be polled: it has ended already.
            ended: inner.is_end_stream(),
            inner,
            deadline,
            _permit: permit,
            _endpoint: endpoint,
            finish: None,
            sent: 0,
            lease: None,
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            f.done(self.sent);
        }
        if let Some(l) = self.lease.take()
            && self.ended
        {
            l.release();
        }
    }
}

/// The request timeout fired while the response body was streaming.
#[derive(Debug, thiserror::Error)]
#[error("request timeout ({0:?}) fired during the response body")]
pub struct BodyTimeout(std::time::Duration);

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some((sleep, t)) = &mut this.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            warn!("request timeout ({t:?}) fired during the response body: cutting it");
            if let Some(f) = &this.finish {
                f.who.metrics().timeouts.inc();
            }
            return std::task::Poll::Ready(Some(Err(Box::new(BodyTimeout(*t)))));
        }
        let r = std::pin::Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as Self::Error);
        match &r {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.sent += d.len() as u64;
                }
                this.ended = this.inner.is_end_stream();
            }
            std::task::Poll::Ready(None) => this.ended = true,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The header that tells the app why the ambassador answered itself.
pub const ERROR_HEADER: &str = "x-ambassador-error";

/// HTTP/2 connections from the app are pinged when they have been quiet this
/// long, and closed when the ping goes unanswered for `H2_PING_TIMEOUT`: a
/// peer that vanished does not hold its connection until the idle timeout.
const H2_PING_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
const H2_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// The largest request head the app may send (as Envoy's default, 60 KiB
/// and a little): a bigger one is refused (431) before any policy runs, and
/// no head ties up more memory than this.
const MAX_HEAD: usize = 64 * 1024;
/// How long a connection asked to close gracefully (idle, or draining) may
/// take to finish before it is dropped.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves one app connection until it closes. `accepted` is when the proxy
/// took it: the first request must begin within the header-read timeout of
/// that (protocol detection and an HTTP/2 preface included); after, the
/// connection closes once no request has been in flight for the idle
/// timeout.
pub async fn serve(
    app: TcpStream,
    accepted: tokio::time::Instant,
    dst: SocketAddr,
    route: Route,
    table: Arc<ServiceTable>,
    settings: &Settings,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    // A connection that belongs to one service reads heads under its timeouts.
    let (header_read, idle) = match &route {
        Route::Service(s) => (s.settings.header_read_timeout, s.settings.idle_timeout),
        _ => (settings.header_read_timeout, settings.idle_timeout),
    };
    let conn = Arc::new(AppConn::new(dst, route, table));
    let watched = conn.clone();
    let svc = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(req, conn).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read)
        .max_buf_size(MAX_HEAD);
    builder
        .http2()
        .max_header_list_size(MAX_HEAD as u32)
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_EVERY)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let (io, abort) = app_io::AppIo::new(app);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle_close = watched.activity.until_idle(accepted + header_read, idle);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { draining.wait_for(|d| *d).await.map(|_| ()) } => {
            // Finish what is in flight, take nothing new: HTTP/1.1 closes
            // after the current response, HTTP/2 sends GOAWAY.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = idle_close => {
            if !watched.activity.any() {
                debug!(%dst, "closing an app connection: no request began within the header-read timeout");
                return;
            }
            // Idle: a GOAWAY first over HTTP/2 (whose graceful end waits for
            // the client to answer a PING), bounded.
            debug!(%dst, "closing an idle app connection");
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        // A response cut short after its head went out (the upstream reset
        // mid-body, or the request timeout): the app gets a reset, not a
        // clean end that could pass a truncated body for a whole one.
        let body_broke = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user);
        if body_broke {
            abort.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        debug!(%dst, error = %e, reset = body_broke, "app connection ended with an error");
    }
}

/// A request in flight on its app connection, until its response ends.
struct InFlight(Arc<AppConn>);

impl InFlight {
    fn new(conn: Arc<AppConn>) -> InFlight {
        conn.activity.start();
        InFlight(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.activity.end();
    }
}

/// An app connection's own HTTP/2 client for one service (`None`: passthrough).
type OwnClient = (Option<Arc<Service>>, Arc<upstream::HttpClient>);

/// What every request on one app connection shares.
struct AppConn {
    dst: SocketAddr,
    route: Route,
    table: Arc<ServiceTable>,
    /// The connection's own service, when it has no fixed endpoints: its
    /// upstream authority and Host value depend only on `dst`, so they are
    /// worked out once here rather than per request.
    upstream: Option<(Authority, HeaderValue)>,
    /// HTTP/2 from the app to the original destination goes on clients of
    /// this connection's own (per service; `None`: passthrough), which dial
    /// `dst` whatever the request names, so the app's `:authority` reaches
    /// the upstream as it sent it, as a direct connection would have carried
    /// it; their upstream connection ends with this one.
    h2c: std::sync::Mutex<Vec<OwnClient>>,
    activity: activity::Activity,
}

impl AppConn {
    fn new(dst: SocketAddr, route: Route, table: Arc<ServiceTable>) -> AppConn {
        let upstream = match &route {
            Route::Service(s) if s.fixed_authority.is_none() => {
                let (host, port) = s.authority(dst);
                let tls = s.tls.is_some();
                authority(&host, port)
                    .zip(HeaderValue::from_str(&display_authority(&host, port, tls)).ok())
            }
            _ => None,
        };
        AppConn {
            dst,
            route,
            table,
            upstream,
            h2c: Default::default(),
            activity: activity::Activity::new(),
        }
    }

    /// This connection's HTTP/2 client for `svc` (or passthrough).
    fn h2c_client(&self, svc: Option<&Arc<Service>>) -> Arc<upstream::HttpClient> {
        let mut own = crate::sync::lock(&self.h2c);
        let same = |k: &Option<Arc<Service>>| match (k, svc) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if let Some((_, c)) = own.iter().find(|(k, _)| same(k)) {
            return c.clone();
        }
        let connector = svc.map_or(&self.table.passthrough_connector, |s| &s.connector);
        let client = Arc::new(connector.clone().dialing(self.dst).h2c_client());
        own.push((svc.cloned(), client.clone()));
        client
    }
}

async fn handle(mut req: Request<Incoming>, conn: Arc<AppConn>) -> Response<Body> {
    let in_flight = InFlight::new(conn.clone());
    let conn = &*conn;
    let start = std::time::Instant::now();
    let (dst, table) = (conn.dst, &conn.table);
    if req.method() == http::Method::CONNECT {
        // A tunnel to wherever the app names would step around every
        // service's policy; the app's connections are intercepted anyway.
        info!(%dst, "refused: CONNECT");
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not proxied: the ambassador intercepts connections transparently, connect to the destination directly",
        );
    }
    let svc = match choose_service(&req, conn).await {
        Ok(svc) => svc,
        Err(refused) => return refused,
    };
    // Nothing is copied for tracing unless it is on.
    let span = crate::trace::enabled()
        .then(|| {
            let name = svc.as_ref().map_or("passthrough", |s| s.name.as_str());
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            crate::trace::start(req.headers_mut(), name, &method, &path)
        })
        .flatten();
    let info = access_log::enabled().then(|| Box::new(RequestInfo::new(&req, dst)));
    let mut exchange = Exchange::default();
    // The connection's worked-out authority holds for its own service only.
    let upstream = svc.as_ref().and(conn.upstream.as_ref());
    let resp = forward(req, conn, svc.as_ref(), upstream, &mut exchange).await;
    let who = match svc {
        Some(s) => Who::Service(s),
        None => Who::Passthrough(table.clone()),
    };
    let finish = Finish {
        who,
        _in_flight: in_flight,
        start,
        status: resp.status().as_u16(),
        exchange,
        span,
        info: info.map(|mut i| {
            i.error = resp
                .headers()
                .get(ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            i
        }),
    };
    match resp.into_parts() {
        (parts, Either::Left(mut body)) => {
            body.finish = Some(finish);
            Response::from_parts(parts, Either::Left(body))
        }
        (parts, Either::Right(full)) => {
            finish.done(full.size_hint().exact().unwrap_or(0));
            Response::from_parts(parts, Either::Right(full))
        }
    }
}

/// The service a request belongs to (`None`: no service, under
/// `passthrough`), or the answer that refuses it: 400 for a request that
/// names its destination twice, 403 under `deny`, and 403 for a service's
/// name used toward an address the service does not own.
async fn choose_service(
    req: &Request<Incoming>,
    conn: &AppConn,
) -> Result<Option<Arc<Service>>, Response<Body>> {
    let (dst, table) = (conn.dst, &conn.table);
    let host = target::request_host(req).map_err(|e| {
        info!(%dst, "refused: {e}");
        error_response(StatusCode::BAD_REQUEST, &e.to_string())
    })?;
    // The Host is looked at only where it decides something.
    let svc = match &conn.route {
        Route::Service(s) => match &s.host {
            Some(h) if host.as_deref() != Some(h.as_str()) => None,
            _ => Some(s.clone()),
        },
        Route::ByHost => host.as_deref().and_then(|h| table.by_host(h, dst.port())),
        Route::Default => None,
    };
    match svc {
        Some(s) if !table.owns(&s, dst.ip()).await => {
            let name = crate::config::clip(host.as_deref().unwrap_or(""));
            warn!(%dst, service = %s.name, host = %name, "denied: the request names a service's host toward an address that name does not resolve to");
            crate::metrics::get().denied("http", "not_owned");
            Err(error_response(
                StatusCode::FORBIDDEN,
                &format!(
                    "{name} (service {}) does not resolve to {}: the request was not sent",
                    s.name,
                    dst.ip()
                ),
            ))
        }
        None if table.default == DefaultPolicy::Deny => {
            let what =
                host.map_or_else(|| dst.to_string(), |h| crate::config::clip(&h).into_owned());
            info!(%dst, host = %what, "denied: no service matches and the default is deny");
            crate::metrics::get().denied("http", "no_service");
            Err(error_response(
                StatusCode::FORBIDDEN,
                &format!("no service matches {what} and the default policy is deny"),
            ))
        }
        svc => Ok(svc),
    }
}

/// Who a request's series and log line belong to.
enum Who {
    Service(Arc<Service>),
    Passthrough(Arc<ServiceTable>),
}

impl Who {
    fn metrics(&self) -> &crate::metrics::ServiceMetrics {
        match self {
            Who::Service(s) => &s.metrics,
            Who::Passthrough(t) => &t.passthrough_metrics,
        }
    }
}

/// What `forward` learned on the way, for metrics and the access log.
#[derive(Default)]
struct Exchange {
    endpoint: Option<Arc<crate::endpoint::Endpoint>>,
    retries: u32,
    tls: Option<&'static str>,
    bytes_in: Option<u64>,
}

/// The request's own facts, kept only while access logging is on.
struct RequestInfo {
    dst: SocketAddr,
    method: http::Method,
    authority: String,
    path: String,
    version: Version,
    trace_id: Option<String>,
    error: Option<String>,
}

impl RequestInfo {
    fn new<B>(req: &Request<B>, dst: SocketAddr) -> RequestInfo {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("")
            .to_string();
        RequestInfo {
            dst,
            method: req.method().clone(),
            authority,
            path: req.uri().path().to_string(),
            version: req.version(),
            trace_id: crate::trace::trace_id(req.headers()).map(str::to_string),
            error: None,
        }
    }
}

/// The end of one request: its series, and its access-log line.
struct Finish {
    who: Who,
    /// The connection counts the request in flight until this goes.
    _in_flight: InFlight,
    start: std::time::Instant,
    status: u16,
    exchange: Exchange,
    info: Option<Box<RequestInfo>>,
    span: Option<crate::trace::Span>,
}

impl Finish {
    fn done(self, bytes_out: u64) {
        let m = self.who.metrics();
        let elapsed = self.start.elapsed();
        m.response(self.status);
        m.duration.observe(elapsed.as_secs_f64());
        m.to_app.inc_by(bytes_out);
        if let Some(span) = self.span {
            let error = self.info.as_ref().and_then(|i| i.error.as_deref());
            let endpoint = self
                .exchange
                .endpoint
                .as_ref()
                .map(|e| e.address.to_string());
            crate::trace::finish(span, self.status, endpoint, error);
        }
        if let Some(i) = self.info {
            access_log::http(&access_log::HttpLine {
                service: &m.name,
                dst: i.dst,
                endpoint: self
                    .exchange
                    .endpoint
                    .as_ref()
                    .map(|e| e.address.to_string()),
                method: i.method.as_str(),
                authority: &i.authority,
                path: &i.path,
                version: version_name(i.version),
                status: self.status,
                bytes_in: self.exchange.bytes_in,
                bytes_out,
                duration_ms: elapsed.as_secs_f64() * 1000.0,
                retries: self.exchange.retries,
                upstream_tls: self.exchange.tls,
                trace_id: i.trace_id.as_deref(),
                error: i.error.as_deref(),
            });
        }
    }
}

fn version_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

/// One request, to a service (or, `svc` being `None`, under `passthrough` to
/// the original destination): policy, circuit breaking, the exchange with its
/// timeout, passive health, and retries where they are safe.
async fn forward(
    mut req: Request<Incoming>,
    conn: &AppConn,
    svc: Option<&Arc<Service>>,
    upstream: Option<&(Authority, HeaderValue)>,
    exchange: &mut Exchange,
) -> Response<Body> {
    let (dst, table) = (conn.dst, &*conn.table);
    let name = svc.map_or("(default)", |s| s.name.as_str());
    let metrics = svc.map_or(&table.passthrough_metrics, |s| &s.metrics);
    // HTTP/2 from the app to a plain upstream stays HTTP/2 (h2c): gRPC needs
    // it end to end. Over TLS, ALPN decides.
    let h2c = req.version() == Version::HTTP_2 && svc.is_none_or(|s| s.tls.is_none());
    // To the original destination, on the app connection's own client, with
    // the app's own :authority (the client dials `dst`).
    let own_h2c = (h2c && svc.is_none_or(|s| s.endpoints.is_empty())).then(|| conn.h2c_client(svc));
    let app_authority = own_h2c
        .as_ref()
        .and_then(|_| req.uri().authority().cloned());
    // Circuit breaking: refuse at once rather than queue without bound.
    // [max_requests, max_pending]; the second goes when the response starts.
    let mut permits = [None, None];
    if let Some(s) = svc {
        for (slot, (sem, what, max, rejected)) in [
            (
                &s.limits.requests,
                "max_requests",
                s.limits.config.max_requests,
                &metrics.rejected_requests,
            ),
            (
                &s.limits.pending,
                "max_pending",
                s.limits.config.max_pending,
                &metrics.rejected_pending,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            match sem.clone().try_acquire_owned() {
                Ok(p) => permits[slot] = Some(p),
                Err(_) => {
                    rejected.inc();
                    warn!(service = name, "circuit breaker: {what} ({max}) reached");
                    return error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("circuit breaker: {what} ({max}) reached"),
                    );
                }
            }
        }
    }
    // A protocol upgrade (WebSocket...) keeps its two hop-by-hop headers; the
    // connection turns into a byte relay once the upstream agrees (101).
    let upgrade = upgrade_protocol(&req);
    let app_upgraded = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut());
    if let Some(proto) = &upgrade {
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        req.headers_mut().insert(header::UPGRADE, proto.clone());
    }
    if let Some(svc) = svc
        && let Err(e) = svc.rules.apply(req.headers_mut()).await
    {
        // Never send the request without the credentials the service needs.
        warn!(service = name, "{e}");
        return error_response(StatusCode::BAD_GATEWAY, &e.to_string());
    }
    // The upstream sees its own name in Host and :authority, as if the app
    // had called it directly; the connector knows which endpoint to dial.
    let tls = svc.is_some_and(|s| s.tls.is_some());
    let rewrites_host = svc.is_some_and(|s| !s.endpoints.is_empty());
    let fixed = svc.and_then(|s| s.fixed_authority.as_ref()).or(upstream);
    let (authority, host_value) = match (app_authority, fixed) {
        (Some(app), _) => (app, None),
        // Services with endpoints: worked out once, at start; without, once
        // per app connection.
        (None, Some((a, v))) => (a.clone(), Some(v.clone())),
        (None, None) => {
            let (host, port) = svc.map_or((dst.ip().to_string(), dst.port()), |s| s.authority(dst));
            let Some(a) = authority(&host, port) else {
                return error_response(StatusCode::BAD_GATEWAY, "bad upstream address");
            };
            let v = (!req.headers().contains_key(header::HOST))
                .then(|| HeaderValue::from_str(&display_authority(&host, port, tls)).ok())
                .flatten();
            (a, v)
        }
    };
    if (rewrites_host || !req.headers().contains_key(header::HOST))
        && let Some(v) = host_value
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    uri.authority = Some(authority);
    uri.path_and_query = Some(path);
    *req.uri_mut() = match Uri::from_parts(uri) {
        Ok(u) => u,
        Err(_) => return error_response(StatusCode::BAD_GATEWAY, "bad upstream URI"),
    };
    // The upstream connection decides the wire version (ALPN, or h2c); hyper
    // sends an HTTP/1.1 request on an h2 connection as HTTP/2.
    *req.version_mut() = Version::HTTP_11;
    let (mut head, body) = req.into_parts();
    exchange.bytes_in = body.size_hint().exact();
    if !body.is_end_stream()
        && body.size_hint().exact().is_none()
        && matches!(head.method, http::Method::GET | http::Method::HEAD)
    {
        // hyper sends no body of unknown length with these methods unless
        // the framing is asked for: the app's chunked body would vanish.
        head.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let policy = svc
        .map(|s| &s.retry)
        .filter(|p| p.enabled() && upgrade.is_none());
    // A body kept for replay makes the request retryable; bigger or
    // unknown-length bodies stream through once.
    let mut stream_body = Some(body);
    // Small bodies of any method are kept while retries are on: an HTTP/2
    // stream refused unprocessed may be sent again whatever the method.
    let replay: Option<Bytes> = match policy {
        Some(_) => {
            let b = stream_body.take().expect("body present");
            if b.is_end_stream() {
                Some(Bytes::new())
            } else if b
                .size_hint()
                .upper()
                .is_some_and(|u| u as usize <= retry::MAX_REPLAY_BODY)
            {
                match Limited::new(b, retry::MAX_REPLAY_BODY).collect().await {
                    Ok(c) => {
                        let b = c.to_bytes();
                        metrics.from_app.inc_by(b.len() as u64);
                        exchange.bytes_in = Some(b.len() as u64);
                        Some(b)
                    }
                    Err(e) => {
                        return error_response(
                            StatusCode::BAD_REQUEST,
                            &format!("reading the request body: {e}"),
                        );
                    }
                }
            } else {
                stream_body = Some(b);
                None
            }
        }
        None => None,
    };
    let _in_flight = policy.map(|p| p.request());
    let timeout = svc.map(|s| s.request_timeout);
    // One timer for the whole exchange, retries and response body included.
    let mut deadline = timeout.map(|t| Box::pin(tokio::time::sleep(t)));
    let mut retry = 0u32;
    let mut _retry_permit = None;
    let mut app_upgraded = app_upgraded;
    loop {
        let (picked, client) = match svc.and_then(|s| s.endpoint_for_request()) {
            Some((p, c, h)) => (Some(p), if h2c { h } else { c }),
            None => match (&own_h2c, svc) {
                (Some(own), _) => (None, &**own),
                (None, Some(s)) => (None, &s.client),
                (None, None) => (None, &table.passthrough),
            },
        };
        let body = match (&replay, stream_body.take()) {
            (Some(b), _) => Either::Right(Full::new(b.clone())),
            (None, Some(b)) => Either::Left(upstream::AppBody::new(b, metrics.from_app.clone())),
            (None, None) => unreachable!("a streamed body is only sent once"),
        };
        let mut req = Request::new(body);
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = head.uri.clone();
        *req.version_mut() = head.version;
        // Kept for another attempt only where one may follow.
        *req.headers_mut() = if policy.is_some() {
            head.headers.clone()
        } else {
            std::mem::take(&mut head.headers)
        };
        let sent = match deadline.as_mut() {
            Some(sleep) => tokio::select! {
                r = client.request(req) => r,
                _ = sleep.as_mut() => {
                    let t = timeout.unwrap_or_default();
                    metrics.timeouts.inc();
                    warn!(service = name, %dst, "request timeout ({t:?}) fired before the response started");
                    return error_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!("request timeout ({t:?}) fired"),
                    );
                }
            },
            None => client.request(req).await,
        };
        retry += 1;
        let failure = match &sent {
            Ok(upstream::Answer {
                response: resp,
                info,
                ..
            }) => {
                if let Some(ep) = info.as_ref().and_then(|i| i.endpoint.as_ref()) {
                    if let Some(svc) = svc {
                        note_health(svc, ep, !resp.status().is_server_error());
                    }
                    exchange.endpoint = Some(ep.clone());
                }
                exchange.tls = info.as_ref().and_then(|i| i.tls);
                resp.status()
                    .is_server_error()
                    .then(|| retry::Failure::Status(resp.status().as_u16()))
            }
            Err(e) => {
                if let Some(app) = upstream::AppBodyError::in_chain(e) {
                    // The app's own request was broken: nothing the
                    // upstream or its health has to answer for.
                    info!(service = name, %dst, "{app}");
                    return error_response(StatusCode::BAD_REQUEST, &app.to_string());
                }
                let failure = if e.connect_error().is_some() {
                    // Already tried on every endpoint.
                    None
                } else {
                    Some(h2_unprocessed(e).unwrap_or(retry::Failure::Reset))
                };
                if let Some(ep) = e.conn_info().and_then(|i| i.endpoint) {
                    // A connection's graceful end is no fault of the endpoint.
                    if let Some(svc) = svc
                        && failure != Some(retry::Failure::GoneAway)
                    {
                        note_health(svc, &ep, false);
                    }
                    exchange.endpoint = Some(ep);
                }
                failure
            }
        };
        if let (Some(failure), Some(p)) = (failure, policy)
            && let Some(permit) = p.allow(&head.method, replay.is_some(), failure, retry)
        {
            let wait = p.backoff(retry, failure);
            if failure == retry::Failure::GoneAway {
                // Routine: nginx ends an HTTP/2 connection every
                // keepalive_requests (1000) requests.
                debug!(service = name, %dst, ?failure, retry, "retrying");
            } else {
                info!(service = name, %dst, ?failure, retry, ?wait, "retrying");
            }
            metrics.retries.inc();
            exchange.retries = retry;
            _retry_permit = Some(permit);
            tokio::time::sleep(wait).await;
            continue;
        }
        // The response has started: no longer pending, still in flight.
        let [request_permit, pending_permit] = permits;
        drop(pending_permit);
        return match sent {
            Ok(upstream::Answer {
                response: mut resp,
                lease,
                ..
            }) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(app_side) = app_upgraded.take()
                {
                    // The connection becomes the byte relay: never pooled again.
                    let upstream_side = hyper::upgrade::on(&mut resp);
                    tokio::spawn(splice_upgraded(app_side, upstream_side, name.to_string()));
                    return resp.map(|b| Either::Left(ResponseBody::new(b, None, None, None)));
                }
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let mut body =
                    ResponseBody::new(body, deadline.zip(timeout), request_permit, picked);
                body.lease = lease;
                Response::from_parts(parts, Either::Left(body))
            }
            Err(e) => exchange_failed(&e, svc, name, dst),
        };
    }
}

/// Passive health: the endpoint that answered (or failed) gets the credit.
fn note_health(svc: &Service, ep: &Arc<crate::endpoint::Endpoint>, ok: bool) {
    if ok {
        svc.endpoints.success(ep);
    } else if let Some(t) = svc.endpoints.failure(ep) {
        warn!(service = %svc.name, endpoint = %ep.address, ejected_for = ?t, "endpoint ejected after consecutive failures");
    }
}

/// An HTTP/2 stream the upstream did not process: refused
/// (RST_STREAM(REFUSED_STREAM)), or above the last stream id of the GOAWAY
/// it ended the connection with (h2 fails only those with the GOAWAY's
/// error; RFC 9113 §6.8: they may be sent again). A graceful GOAWAY
/// (NO_ERROR) is the connection's normal end, any other code trouble.
fn h2_unprocessed(e: &(dyn std::error::Error + 'static)) -> Option<retry::Failure> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            if h2.is_go_away() && h2.is_remote() {
                return Some(match h2.reason() {
                    Some(h2::Reason::NO_ERROR) => retry::Failure::GoneAway,
                    _ => retry::Failure::Refused,
                });
            }
            return (h2.reason() == Some(h2::Reason::REFUSED_STREAM))
                .then_some(retry::Failure::Refused);
        }
        cause = c.source();
    }
    None
}

/// The app's answer when no response came: 503 for our limits, 504 for
/// timeouts, 502 otherwise, with the most telling reason.
fn exchange_failed(
    e: &upstream::RequestError,
    svc: Option<&Arc<Service>>,
    name: &str,
    dst: SocketAddr,
) -> Response<Body> {
    let (status, reason) = match e.connect_error() {
        Some(c @ ConnectError::Limit(_)) => (StatusCode::SERVICE_UNAVAILABLE, c.to_string()),
        Some(c) if c.is_timeout() => (StatusCode::GATEWAY_TIMEOUT, c.to_string()),
        Some(c) => (StatusCode::BAD_GATEWAY, c.to_string()),
        None => {
            let missing_cert = svc
                .and_then(|s| s.tls.as_ref())
                .is_some_and(|t| t.client_cert_missing());
            let why = if missing_cert {
                "the upstream requires a client certificate and none is configured \
                 (upstream.tls.client_cert)"
                    .to_string()
            } else {
                // An alert after the handshake explains a "canceled" best.
                e.conn_info()
                    .and_then(|i| i.last_tls_error.get())
                    .unwrap_or_else(|| describe(e))
            };
            (
                StatusCode::BAD_GATEWAY,
                format!("upstream request failed: {why}"),
            )
        }
    };
    warn!(service = name, %dst, "{reason}");
    error_response(status, &reason)
}

/// The most telling cause of a failed exchange: a TLS alert the upstream sent
/// after the handshake (TLS 1.3 rejects a client certificate then), an I/O
/// error, HTTP/2's own (a reset or GOAWAY and its code), or else hyper's
/// words with their causes.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut io = None;
    let mut chain = String::new();
    while let Some(c) = cause {
        if let Some(ioe) = c.downcast_ref::<std::io::Error>() {
            if ioe
                .get_ref()
                .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
            {
                return crate::tls::reason(ioe);
            }
            io.get_or_insert_with(|| ioe.to_string());
        }
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return format!("HTTP/2: {h2}");
        }
        if !chain.is_empty() {
            chain.push_str(": ");
        }
        chain.push_str(&c.to_string());
        cause = c.source();
    }
    io.unwrap_or(chain)
}

/// The protocol an HTTP/1.1 request asks to switch to, if it does.
/// An upgrade to h2c is never passed on (the headers go as hop-by-hop): once
/// the upstream switched, every request on that connection would go past
/// the proxy's per-request policy (h2c is served by prior knowledge).
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let proto = req.headers().get(header::UPGRADE).filter(|_| asks)?;
    let h2c = proto.to_str().map_or(true, |p| {
        p.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c"))
    });
    (!h2c).then(|| proto.clone())
}

/// Relays an upgraded connection's bytes both ways until either side ends.
async fn splice_upgraded(
    app: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    service: String,
) {
    match tokio::try_join!(app, upstream) {
        Ok((a, u)) => {
            let (mut a, mut u) = (TokioIo::new(a), TokioIo::new(u));
            let r = tokio::io::copy_bidirectional(&mut a, &mut u).await;
            debug!(%service, result = ?r.map_err(|e| e.kind()), "upgraded connection closed");
        }
        Err(e) => warn!(%service, error = %e, "protocol upgrade failed"),
    }
}

/// `host:port` for the request URI (IPv6 bracketed).
pub fn authority(host: &str, port: u16) -> Option<Authority> {
    let s = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    s.parse().ok()
}

/// The Host header value: the port only when it is not the scheme's default.
pub fn display_authority(host: &str, port: u16, tls: bool) -> String {
    let h = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    if (tls && port == 443) || (!tls && port == 80) {
        h
    } else {
        format!("{h}:{port}")
    }
}

/// Removes the headers that describe one hop, as RFC 9110 §7.6.1 says: those
/// named in `Connection`, and the standard hop-by-hop set. `TE: trailers` is
/// end-to-end in practice (gRPC needs it) and is kept.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (standard ones
    // compare without hashing) spares the removals below.
    if !h.keys().any(|k| {
        k == header::CONNECTION
            || k == header::TE
            || k == header::TRAILER
            || k == header::TRANSFER_ENCODING
            || k == header::UPGRADE
            || k == header::PROXY_AUTHENTICATE
            || k == header::PROXY_AUTHORIZATION
            || k.as_str() == "keep-alive"
            || k.as_str() == "proxy-connection"
    }) {
        return;
    }
    // The names Connection lists go too (TE has its own rule below). One
    // Connection field (nginx's `keep-alive` on every response) is taken out
    // and its names removed by &str, which allocates nothing.
    let fields = h.get_all(header::CONNECTION).iter().count();
    if fields == 1 {
        if let Some(v) = h.remove(header::CONNECTION) {
            for n in v.to_str().unwrap_or("").split(',').map(str::trim) {
                if !n.is_empty() && !n.eq_ignore_ascii_case("te") {
                    h.remove(n);
                }
            }
        }
    } else if fields > 1 {
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in listed {
            if n != header::TE {
                h.remove(n);
            }
        }
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        h.remove(n);
    }
    let trailers_only = h
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("trailers"));
    if !trailers_only {
        h.remove(header::TE);
    }
}

/// A response the ambassador makes itself, with the reason in a header and
/// the body.
pub fn error_response(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "ambassador: {reason}\n"
    )))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Header values must be visible ASCII: keep the reason readable anyway.
    let clean: String = reason
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&clean) {
        h.insert(HeaderName::from_static(ERROR_HEADER), v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_end_to_end_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("x-end") && h.contains_key(header::TE));

        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());

        // Only end-to-end headers: all kept (the one-pass shortcut).
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert("x-keep-alive-ish", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);

        // A custom header named in Connection goes even with no standard one.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");

        // Names in any case, TE listed yet kept for trailers, a token that
        // is no header name ignored; and the same over two Connection fields.
        for fields in [
            &["X-Hop, TE, bad name, "][..],
            &["X-Hop", "te,bad name"][..],
        ] {
            let mut h = HeaderMap::new();
            for f in fields {
                h.append(header::CONNECTION, HeaderValue::from_static(f));
            }
            h.insert("x-hop", HeaderValue::from_static("1"));
            h.insert(header::TE, HeaderValue::from_static("trailers"));
            h.insert("x-end", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            left.sort_unstable();
            assert_eq!(left, ["te", "x-end"], "{fields:?}");
        }
    }

    #[test]
    fn host_shows_port_only_when_not_default() {
        assert_eq!(
            display_authority("api.example.com", 443, true),
            "api.example.com"
        );
        assert_eq!(
            display_authority("api.example.com", 443, false),
            "api.example.com:443"
        );
        assert_eq!(display_authority("10.0.0.1", 80, false), "10.0.0.1");
        assert_eq!(display_authority("fd00::1", 8080, false), "[fd00::1]:8080");
    }
}
