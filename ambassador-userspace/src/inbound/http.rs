//! HTTP from callers of the Pod: hyper serves the (maybe TLS-terminated)
//! connection under the same head limits and timers as the app's side, and each
//! request goes to the app over a pooled HTTP/1.1 connection from
//! 127.0.0.6, with the caller named in `X-Forwarded-For`, `Forwarded` and
//! `X-Forwarded-Proto` (copies the caller sent are replaced: they would let
//! it pose as anyone). A protocol upgrade (WebSocket) the caller was admitted
//! for becomes a byte relay once the app agrees; the connection's permit is
//! held until that relay ends.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header, uri::PathAndQuery};
use http_body_util::{Either, Full};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tracing::{debug, info};

use super::{
    admit::{Refusal, Routed, admit, route},
    forwarded::Caller,
    jwt::TokenMemo,
    table::{HttpPort, PortPolicy},
};
use crate::{
    access_log,
    http::{
        activity::{Activity, InFlight},
        headers::{grpc_status, strip_hop_by_hop, upgrade_protocol},
        response::{ERROR_HEADER, error_response, splice_upgraded},
    },
    route::Route,
    tls::PlainOrTls,
    upstream::{AppBody, AppBodyError, Lease},
};

/// How long a connection asked to close gracefully may take.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

type RespBody = Either<CallerBody, Full<Bytes>>;

/// What every request of one caller's connection shares.
struct CallerConn {
    activity: Arc<Activity>,
    policy: Arc<PortPolicy>,
    http: Arc<HttpPort>,
    peer: SocketAddr,
    dst: SocketAddr,
    tls: Option<&'static str>,
    /// The caller as the app is told of it, made once per connection.
    caller: Caller,
    /// The last token verified on this connection.
    memo: TokenMemo,
    /// The relay of an upgraded request, awaited before the connection's
    /// permit and series are given up.
    upgraded: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Serves one caller's connection until it closes or the proxy drains.
pub async fn serve(
    caller: PlainOrTls,
    peer: SocketAddr,
    dst: SocketAddr,
    policy: Arc<PortPolicy>,
    http: Arc<HttpPort>,
    accepted: tokio::time::Instant,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    let (header_read, idle) = (
        policy.settings.header_read_timeout,
        policy.settings.idle_timeout,
    );
    let tls = caller.tls_version();
    let conn = Arc::new(CallerConn {
        activity: Arc::new(Activity::new()),
        caller: Caller::new(peer, tls.is_some(), caller.peer_certificate()),
        policy,
        http,
        peer,
        dst,
        tls,
        memo: TokenMemo::default(),
        upgraded: std::sync::Mutex::new(None),
    });
    let _open = conn.policy.metrics.open();
    let watched = conn.clone();
    let svc = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(req, conn).await) }
    });
    let builder = crate::http::server::builder(header_read);
    let served = builder.serve_connection_with_upgrades(TokioIo::new(caller), svc);
    tokio::pin!(served);
    // No first request within the header-read timeout, or none in flight
    // for the idle timeout: the connection goes (HTTP/2 with a GOAWAY).
    let idle_close = watched.activity.until_idle(accepted + header_read, idle);
    let result = tokio::select! {
        r = served.as_mut() => r,
        _ = async { draining.wait_for(|d| *d).await.map(|_| ()) } => {
            served.as_mut().graceful_shutdown();
            served.await
        }
        () = idle_close => {
            if !watched.activity.any() {
                debug!(client = %peer, "closing an inbound connection: no request within the header-read timeout");
                return;
            }
            served.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, served.as_mut()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        debug!(client = %peer, error = %e, "inbound connection ended with an error");
    }
    let relay = crate::sync::lock(&watched.upgraded).take();
    if let Some(relay) = relay {
        let _ = relay.await;
    }
}

async fn handle(mut req: Request<Incoming>, conn: Arc<CallerConn>) -> Response<RespBody> {
    let in_flight = InFlight::new(&conn.activity);
    let start = Instant::now();
    // The caller's trace continues through the proxy's span to the app.
    let span = crate::trace::enabled()
        .then(|| {
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            let role = crate::trace::Role::Inbound;
            crate::trace::start(req.headers_mut(), role, &conn.policy.name, &method, &path)
        })
        .flatten();
    // The request's own facts, copied only while access logging is on.
    let mut log = access_log::enabled().then(|| {
        Box::new(RequestLog {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            version: req.version(),
            error: None,
        })
    });
    let resp = match forward(req, &conn).await {
        Ok(r) => r,
        Err(refused) => refusal(refused),
    };
    if let Some(l) = log.as_mut() {
        l.error = resp
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }
    let done = Done {
        _in_flight: in_flight,
        span,
        grpc_status: grpc_status(resp.headers()),
        status: resp.status().as_u16(),
        conn,
        start,
        log,
    };
    match resp.into_parts() {
        (parts, Either::Left(mut body)) => {
            body.done = Some(done);
            Response::from_parts(parts, Either::Left(body))
        }
        (parts, Either::Right(full)) => {
            done.finish(full.size_hint().exact().unwrap_or(0));
            Response::from_parts(parts, Either::Right(full))
        }
    }
}

/// Sends the request to the app; an answer of the ambassador's own (status
/// and reason) when it cannot.
async fn forward(
    mut req: Request<Incoming>,
    conn: &CallerConn,
) -> Result<Response<RespBody>, Refusal> {
    let p = &conn.policy;
    let identity = admit(&req, p, conn.peer, &conn.memo).await?;
    let route = match route(&req, p)? {
        Routed::App(r) => r,
        Routed::Answer(r) => {
            return Ok(r.answer().map_or_else(
                || {
                    refusal(Refusal::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "route without an answer",
                    ))
                },
                |a| a.map(Either::Right),
            ));
        }
    };
    let HttpPort { client, http2, .. } = &*conn.http;
    // Admitted like any request; its two hop-by-hop headers go on to the app.
    let upgrade = match upgrade_protocol(&req) {
        Some(_) if *http2 => {
            return Err(Refusal::new(
                StatusCode::NOT_IMPLEMENTED,
                "the app on this port speaks HTTP/2: a protocol upgrade cannot be carried to it",
            ));
        }
        Some(proto) => Some((proto, hyper::upgrade::on(&mut req))),
        None => None,
    };
    let (mut parts, body) = req.into_parts();
    head_for_app(
        &mut parts,
        conn,
        &identity,
        route,
        upgrade.as_ref().map(|u| &u.0),
    )?;
    let mut body = AppBody::new(body, p.metrics.from_app.clone());
    if let Some(max) = p.max_body {
        body = body.limited(max);
    }
    let answer = send(client, Request::from_parts(parts, body), conn, route).await?;
    let mut response = answer.response;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some((_, caller_side)) = upgrade
    {
        // The app's connection becomes the relay's: never pooled again.
        let app_side = hyper::upgrade::on(&mut response);
        let relay = tokio::spawn(splice_upgraded(caller_side, app_side, p.name.clone()));
        *crate::sync::lock(&conn.upgraded) = Some(relay);
        let (head, _) = response.into_parts();
        return Ok(Response::from_parts(head, Either::Right(Full::default())));
    }
    let (mut head, incoming) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    if let Some(r) = route {
        r.apply_response(&mut head.headers);
    }
    Ok(Response::from_parts(
        head,
        Either::Left(CallerBody {
            inner: incoming,
            lease: answer.lease,
            counter: p.metrics.to_app.clone(),
            sent: 0,
            ended: false,
            done: None,
        }),
    ))
}

/// The request head as the app gets it: a Host, hop-by-hop headers gone
/// (an upgrade's two kept), the caller named, the route's changes, the
/// verified identity, and the app's address in the URI.
fn head_for_app(
    parts: &mut http::request::Parts,
    conn: &CallerConn,
    identity: &super::authn::Identity,
    route: Option<&Route>,
    upgrade: Option<&HeaderValue>,
) -> Result<(), Refusal> {
    let HttpPort {
        authority, http2, ..
    } = &*conn.http;
    // HTTP/2 callers name the host in :authority only; the app gets a Host.
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(h) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(header::HOST, h);
    }
    strip_hop_by_hop(&mut parts.headers);
    if let Some(proto) = upgrade {
        parts.headers.insert(header::UPGRADE, proto.clone());
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    conn.caller.apply(&mut parts.headers);
    if let Some(r) = route {
        r.apply_request(parts)
            .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        if let Some((host, _)) = r.host() {
            parts.headers.insert(header::HOST, host.clone());
        }
    }
    // To an HTTP/2 app, :authority is the app's address (the connection's
    // key: a Host per caller would be a connection per name a caller
    // makes up) and the caller's Host goes as X-Forwarded-Host.
    if *http2 && let Some(host) = parts.headers.remove(header::HOST) {
        parts.headers.insert("x-forwarded-host", host);
    }
    if let Some(a) = &conn.policy.authn {
        a.apply(identity, &mut parts.headers);
    }
    // The pool is picked by the app's address; the request line gets the
    // path and query (both shared, not copied).
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(authority.clone());
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    parts.uri = Uri::from_parts(uri)
        .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "the request target is not a path"))?;
    parts.version = match http2 {
        true => http::Version::HTTP_2,
        false => http::Version::HTTP_11,
    };
    Ok(())
}

/// Sends to the app under the route's timeout; a refusal of the ambassador's
/// own when the app does not answer or the body is too large.
async fn send(
    client: &crate::upstream::HttpClient,
    req: Request<AppBody>,
    conn: &CallerConn,
    route: Option<&Route>,
) -> Result<crate::upstream::Answer, Refusal> {
    let p = &conn.policy;
    let sent = client.request(req.map(Either::Left));
    let sent = match route.and_then(|r| r.timeout.map(|t| (r, t))) {
        Some((r, t)) => tokio::time::timeout(t, sent).await.map_err(|_| {
            Refusal::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "route {}'s timeout ({t:?}) fired before the app answered",
                    r.name
                ),
            )
        })?,
        None => sent.await,
    };
    sent.map_err(|e| match AppBodyError::in_chain(&e) {
        Some(AppBodyError::TooLarge(max)) => {
            crate::metrics::get().count_inbound(
                crate::metrics::Inbound::Refusal,
                &p.name,
                "body_too_large",
            );
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {max} bytes"),
            )
        }
        _ => {
            info!(client = %conn.peer, app = %p.app, "the app did not answer: {e}");
            Refusal::new(
                StatusCode::BAD_GATEWAY,
                format!("the app at {} did not answer", p.app),
            )
        }
    })
}

/// The response to a request the ambassador will not send.
fn refusal(r: Refusal) -> Response<RespBody> {
    let mut resp = error_response(r.status, &r.reason);
    let h = resp.headers_mut();
    if r.status == StatusCode::UNAUTHORIZED {
        h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if let Some(secs) = r.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// Metrics and the access-log line of one request, done when its response
/// has gone out (or been dropped).
struct Done {
    /// The connection is busy until the response has gone out.
    _in_flight: InFlight,
    span: Option<crate::trace::Span>,
    conn: Arc<CallerConn>,
    status: u16,
    /// A gRPC app's status, from the head or the trailers.
    grpc_status: Option<u16>,
    start: Instant,
    log: Option<Box<RequestLog>>,
}

/// What the access-log line needs of the request.
struct RequestLog {
    method: http::Method,
    path: String,
    version: http::Version,
    error: Option<String>,
}

impl Done {
    fn finish(self, bytes_out: u64) {
        let took = self.start.elapsed();
        if let Some(span) = self.span {
            crate::trace::finish(span, self.status, None, None);
        }
        let (c, m) = (&self.conn, &self.conn.policy.metrics);
        m.response(self.status);
        m.duration.observe(took.as_secs_f64());
        if let Some(code) = self.grpc_status {
            m.grpc.count(code);
        }
        if let Some(l) = &self.log {
            access_log::inbound_http(&access_log::InboundHttpLine {
                service: &m.name,
                client: c.peer,
                dst: c.dst,
                method: l.method.as_str(),
                path: &l.path,
                version: access_log::version_name(l.version),
                status: self.status,
                bytes_out,
                duration_ms: took.as_secs_f64() * 1000.0,
                tls: c.tls,
                grpc_status: self.grpc_status,
                error: l.error.as_deref(),
            });
        }
    }
}

/// The app's response body on its way to the caller: streamed, counted,
/// its pool connection given back once it has ended.
struct CallerBody {
    inner: Incoming,
    lease: Option<Lease>,
    counter: prometheus_client::metrics::counter::Counter,
    sent: u64,
    ended: bool,
    done: Option<Done>,
}

impl Drop for CallerBody {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d.finish(self.sent);
        }
        if let Some(l) = self.lease.take()
            && (self.ended || self.inner.is_end_stream())
        {
            l.release();
        }
    }
}

impl Body for CallerBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    let n = d.len() as u64;
                    self.sent += n;
                    self.counter.inc_by(n);
                } else if let Some(t) = f.trailers_ref()
                    && let Some(code) = grpc_status(t)
                    && let Some(done) = self.done.as_mut()
                {
                    done.grpc_status = Some(code);
                }
            }
            Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
