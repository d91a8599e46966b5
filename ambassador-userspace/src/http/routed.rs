//! A request a service's route decides: forwarded by the route (through
//! the response cache where there is one; the route's changes to the
//! response made here, on the way back), or answered by the
//! proxy itself: a refusal (path not in normal form, denied, rate limited),
//! a direct response or a redirect.

use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode, header, uri::Authority};
use http_body_util::Either;
use hyper::body::Incoming;

use super::{
    cached,
    dest::Dest,
    finish::Exchange,
    response::{Body, error_response},
    transcoded,
};
use crate::{
    ratelimit::retry_after,
    route::{Caching, Decision, Route},
};

/// Decides by the service's routes, then does it: one `match`.
pub(super) async fn serve(
    req: Request<Incoming>,
    to: Dest<'_>,
    upstream: Option<&(Authority, HeaderValue)>,
    exchange: &mut Exchange,
) -> Response<Body> {
    // Most services have no routes: no clock read for them.
    let decision = match to.http() {
        Some(h) if !h.routes.is_empty() => {
            h.routes
                .decide(req.method(), req.uri(), req.headers(), Instant::now())
        }
        _ => Decision::Service,
    };
    let service = to.name();
    let refused = match &decision {
        Decision::NotNormal => Some("path_not_normal"),
        Decision::Deny(_) => Some("forbidden"),
        Decision::Limited(..) => Some("rate_limited"),
        _ => None,
    };
    if let Some(reason) = refused {
        crate::metrics::get().count_route_refusal(service, reason);
    }
    match decision {
        Decision::Service => {
            let cache = to.http().and_then(|h| h.cache.as_ref()).map(|c| (c, 0));
            cached::forward(req, to, upstream, cache, exchange).await
        }
        Decision::Forward(route) => {
            // Cached by the service the app called, told apart by route.
            let cache = match &route.caching {
                Caching::Service => to.http().and_then(|h| h.cache.as_ref()),
                Caching::Off => None,
                Caching::Own(c) => Some(c),
            }
            .map(|c| (c, route.number));
            // Another service's upstream: its endpoints name themselves.
            let other = route.upstream.as_deref().map(|n| to.conn.table.by_name(n));
            let mut resp = match other {
                None => {
                    let to = Dest {
                        route: Some(route),
                        ..to
                    };
                    by_route(req, to, upstream, cache, exchange).await
                }
                Some(Some(svc)) => {
                    let to = Dest::new(to.conn, Some(svc), Some(route));
                    by_route(req, to, None, cache, exchange).await
                }
                // A reload took the service away between table and request.
                Some(None) => error_response(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "route {} of {service}: its upstream service is gone",
                        route.name
                    ),
                ),
            };
            route.apply_response(resp.headers_mut());
            resp
        }
        Decision::NotNormal => error_response(
            StatusCode::BAD_REQUEST,
            &format!(
                "the path is not in normal form (dot segments, //, %-escapes of plain characters): \
                 {service}'s routes match on paths"
            ),
        ),
        Decision::Deny(route) => error_response(
            StatusCode::FORBIDDEN,
            &format!("denied by route {} of {service}", route.name),
        ),
        Decision::Limited(route, wait) => {
            let mut resp = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("rate limited by route {} of {service}", route.name),
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after(wait)));
            resp
        }
        Decision::Respond(route) => answer(route),
    }
}

/// A forwarding route's request: transcoded into a gRPC call, or sent on
/// (through the cache where there is one).
async fn by_route(
    req: Request<Incoming>,
    to: Dest<'_>,
    upstream: Option<&(Authority, HeaderValue)>,
    cache: Option<(&std::sync::Arc<crate::cache::Cache>, u32)>,
    exchange: &mut Exchange,
) -> Response<Body> {
    match to.route.and_then(|r| r.transcoder.as_ref()) {
        // Boxed: transcoding's state is kilobytes, and every request's
        // future would carry (and move) it otherwise.
        Some(t) => Box::pin(transcoded::forward(req, to, upstream, t, exchange)).await,
        None => cached::forward(req, to, upstream, cache, exchange).await,
    }
}

/// A route's own answer: its direct response or its redirect.
fn answer(route: &Route) -> Response<Body> {
    match route.answer() {
        Some(r) => r.map(Either::Right),
        None => error_response(StatusCode::INTERNAL_SERVER_ERROR, "route without an answer"),
    }
}
