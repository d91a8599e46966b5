//! The app's side of an HTTP connection: hyper serving it (HTTP/1.x and
//! HTTP/2 prior knowledge) under the first-request, idle and ping timers,
//! and the life of one request on it: refused, or forwarded, then finished
//! (series, access log, trace) when its response body ends.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::{
    body::{Body as _, Incoming},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::{
    activity::InFlight,
    admit, app_io,
    conn::AppConn,
    dest::Dest,
    finish::{Exchange, Finish, RequestInfo, Who},
    response::{Body, ERROR_HEADER, error_response},
    routed,
};
use crate::{
    access_log,
    net::Settings,
    service::{Route, ServiceTable},
};

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
    let builder = builder(header_read);
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

/// hyper's server as both directions use it: HTTP/1.x heads up to
/// `MAX_HEAD` within `header_read`, HTTP/2 with the same head limit and
/// pings for peers that went quiet.
pub fn builder(header_read: std::time::Duration) -> auto::Builder<TokioExecutor> {
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
    builder
}

async fn handle(mut req: Request<Incoming>, conn: Arc<AppConn>) -> Response<Body> {
    let in_flight = InFlight::new(&conn.activity);
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
    let svc = match admit::choose_service(&req, conn).await {
        Ok(svc) => svc,
        Err(refused) => return refused.into_response(),
    };
    // Nothing is copied for tracing unless it is on.
    let span = crate::trace::enabled()
        .then(|| {
            let name = svc.as_ref().map_or("passthrough", |s| s.name.as_str());
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            crate::trace::start(
                req.headers_mut(),
                crate::trace::Role::Outbound,
                name,
                &method,
                &path,
            )
        })
        .flatten();
    let info = access_log::enabled().then(|| Box::new(RequestInfo::new(&req, dst)));
    let mut exchange = Exchange::default();
    // The connection's worked-out authority holds for its own service only.
    let upstream = svc.as_ref().and(conn.upstream.as_ref());
    let resp = routed::serve(
        req,
        Dest::new(conn, svc.as_ref(), None),
        upstream,
        &mut exchange,
    )
    .await;
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
