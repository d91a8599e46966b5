//! The HTTP ambassador: hyper on the app side (HTTP/1.x and HTTP/2 prior
//! knowledge), per-request service choice by Host, the service's request
//! policy, and a pooled upstream client. Bodies stream both ways.

pub mod upstream;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{self, HeaderName},
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body_util::{Either, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::{
    config::service::DefaultPolicy,
    endpoint::Picked,
    proxy::Settings,
    service::{Route, Service, ServiceTable},
};

use upstream::{ConnectError, HttpClient};

pub type Body = Either<ResponseBody, Full<Bytes>>;

/// An upstream response body on its way to the app: streamed frame by frame,
/// cut when the service's request timeout passes, and holding the request's
/// circuit-breaker permit until it ends.
pub struct ResponseBody {
    inner: Incoming,
    deadline: Option<(std::pin::Pin<Box<tokio::time::Sleep>>, std::time::Duration)>,
    _permits: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// The endpoint stays "outstanding" until the response ends.
    _endpoint: Option<Picked>,
}

impl ResponseBody {
    fn new(
        inner: Incoming,
        deadline: Option<(tokio::time::Instant, std::time::Duration)>,
        permits: Vec<tokio::sync::OwnedSemaphorePermit>,
        endpoint: Option<Picked>,
    ) -> ResponseBody {
        ResponseBody {
            inner,
            deadline: deadline.map(|(d, t)| (Box::pin(tokio::time::sleep_until(d)), t)),
            _permits: permits,
            _endpoint: endpoint,
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
            return std::task::Poll::Ready(Some(Err(Box::new(BodyTimeout(*t)))));
        }
        std::pin::Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as Self::Error)
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

/// Serves one app connection until it closes.
pub async fn serve(
    app: TcpStream,
    dst: SocketAddr,
    route: Route,
    table: Arc<ServiceTable>,
    settings: &Settings,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    // A connection that belongs to one service reads heads under its timeout.
    let header_read = match &route {
        Route::Service(s) => s.settings.header_read_timeout,
        _ => settings.header_read_timeout,
    };
    let svc = service_fn(move |req| {
        let (route, table) = (route.clone(), table.clone());
        async move { Ok::<_, Infallible>(handle(req, dst, &route, &table).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(app), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { draining.wait_for(|d| *d).await.map(|_| ()) } => {
            // Finish what is in flight, take nothing new: HTTP/1.1 closes
            // after the current response, HTTP/2 sends GOAWAY.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%dst, error = %e, "app connection ended with an error");
    }
}

/// The Host the request names, lowercased, without port.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req.uri().host().map(str::to_string).or_else(|| {
        let h = req.headers().get(header::HOST)?.to_str().ok()?;
        let h = h.parse::<Authority>().ok()?;
        Some(h.host().to_string())
    })?;
    Some(raw.to_ascii_lowercase())
}

async fn handle(
    req: Request<Incoming>,
    dst: SocketAddr,
    route: &Route,
    table: &ServiceTable,
) -> Response<Body> {
    let host = request_host(&req);
    let svc = match route {
        Route::Service(s) => match &s.host {
            Some(h) if host.as_deref() != Some(h.as_str()) => None,
            _ => Some(s.clone()),
        },
        Route::ByHost => host.as_deref().and_then(|h| table.by_host(h, dst.port())),
        Route::Default => None,
    };
    // HTTP/2 from the app to a plain upstream stays HTTP/2 (h2c): gRPC needs
    // it end to end. Over TLS, ALPN decides.
    let h2 = req.version() == Version::HTTP_2;
    match svc {
        Some(svc) => {
            let (picked, client, h2c) = svc.clients_for_request();
            let client = if h2 && svc.tls.is_none() { h2c } else { client };
            forward(req, dst, client, Some(&svc), picked).await
        }
        None => match table.default {
            DefaultPolicy::Passthrough => {
                let client = if h2 {
                    &table.passthrough_h2c
                } else {
                    &table.passthrough
                };
                forward(req, dst, client, None, None).await
            }
            DefaultPolicy::Deny => {
                let what = host.unwrap_or_else(|| dst.to_string());
                info!(%dst, host = %what, "denied: no service matches and the default is deny");
                error_response(
                    StatusCode::FORBIDDEN,
                    &format!("no service matches {what} and the default policy is deny"),
                )
            }
        },
    }
}

async fn forward(
    mut req: Request<Incoming>,
    dst: SocketAddr,
    client: &HttpClient,
    svc: Option<&Arc<Service>>,
    picked: Option<Picked>,
) -> Response<Body> {
    let name = svc.map_or("(default)", |s| s.name.as_str());
    // Circuit breaking: refuse at once rather than queue without bound.
    let mut permits = Vec::with_capacity(2);
    if let Some(s) = svc {
        for (sem, what, max) in [
            (
                &s.limits.requests,
                "max_requests",
                s.limits.config.max_requests,
            ),
            (
                &s.limits.pending,
                "max_pending",
                s.limits.config.max_pending,
            ),
        ] {
            match sem.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => {
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
    let (host, port) = svc.map_or((dst.ip().to_string(), dst.port()), |s| s.authority(dst));
    let tls = svc.is_some_and(|s| s.tls.is_some());
    let rewrites_host = svc.is_some_and(|s| !s.endpoints.is_empty());
    let Some(authority) = authority(&host, port) else {
        return error_response(StatusCode::BAD_GATEWAY, "bad upstream address");
    };
    if (rewrites_host || !req.headers().contains_key(header::HOST))
        && let Ok(v) = HeaderValue::from_str(&display_authority(&host, port, tls))
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(authority);
    parts.path_and_query = Some(path);
    *req.uri_mut() = match Uri::from_parts(parts) {
        Ok(u) => u,
        Err(_) => return error_response(StatusCode::BAD_GATEWAY, "bad upstream URI"),
    };
    // The upstream connection decides the wire version (ALPN, or h2c chosen
    // above); hyper sends an HTTP/1.1 request on an h2 connection as HTTP/2.
    *req.version_mut() = Version::HTTP_11;
    let timeout = svc.map(|s| s.request_timeout);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let sent = match deadline {
        Some(d) => match tokio::time::timeout_at(d, client.request(req)).await {
            Ok(r) => r,
            Err(_) => {
                let t = timeout.unwrap_or_default();
                warn!(service = name, %dst, "request timeout ({t:?}) fired before the response started");
                return error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("request timeout ({t:?}) fired"),
                );
            }
        },
        None => client.request(req).await,
    };
    // The response has started: no longer pending, still a request in flight.
    permits.truncate(1);
    match sent {
        Ok(mut resp) => {
            if let Some(svc) = svc
                && let Some(tag) = resp.extensions().get::<upstream::EndpointTag>()
            {
                // Passive health: 5xx counts against the endpoint that sent it.
                if resp.status().is_server_error() {
                    if let Some(t) = svc.endpoints.failure(&tag.0) {
                        warn!(service = name, endpoint = %tag.0.address, ejected_for = ?t, "endpoint ejected after consecutive failures");
                    }
                } else {
                    svc.endpoints.success(&tag.0);
                }
            }
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some(app_side) = app_upgraded
            {
                let upstream_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(splice_upgraded(app_side, upstream_side, name.to_string()));
                return resp.map(|b| Either::Left(ResponseBody::new(b, None, Vec::new(), None)));
            }
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let body = ResponseBody::new(body, deadline.zip(timeout), permits, picked);
            Response::from_parts(parts, Either::Left(body))
        }
        Err(e) => {
            if let Some(svc) = svc
                && let Some(info) = e.connect_info()
            {
                let mut ext = http::Extensions::new();
                info.get_extras(&mut ext);
                if let Some(tag) = ext.get::<upstream::EndpointTag>() {
                    svc.endpoints.failure(&tag.0);
                }
            }
            let connect =
                std::error::Error::source(&e).and_then(|s| s.downcast_ref::<ConnectError>());
            let (status, reason) = match connect {
                Some(c @ ConnectError::Limit(_)) => {
                    (StatusCode::SERVICE_UNAVAILABLE, c.to_string())
                }
                Some(c) if c.is_timeout() => (StatusCode::GATEWAY_TIMEOUT, c.to_string()),
                Some(c) => (StatusCode::BAD_GATEWAY, c.to_string()),
                None => {
                    // An alert after the handshake explains a "canceled" best.
                    let tls = e.connect_info().and_then(|c| {
                        let mut ext = http::Extensions::new();
                        c.get_extras(&mut ext);
                        ext.get::<upstream::LastTlsError>()?.get()
                    });
                    let missing_cert = svc
                        .and_then(|s| s.tls.as_ref())
                        .is_some_and(|t| t.client_cert_missing());
                    let why = if missing_cert {
                        "the upstream requires a client certificate and none is configured \
                         (upstream.tls.client_cert)"
                            .to_string()
                    } else {
                        tls.unwrap_or_else(|| describe(&e))
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
    }
}

/// The most telling cause of a failed exchange: a TLS alert the upstream sent
/// after the handshake (TLS 1.3 rejects a client certificate then), an I/O
/// error, or else hyper's own words.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut io = None;
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
        cause = c.source();
    }
    io.unwrap_or_else(|| e.to_string())
}

/// The protocol an HTTP/1.1 request asks to switch to, if it does.
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
    asks.then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
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
fn authority(host: &str, port: u16) -> Option<Authority> {
    let s = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    s.parse().ok()
}

/// The Host header value: the port only when it is not the scheme's default.
fn display_authority(host: &str, port: u16, tls: bool) -> String {
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
