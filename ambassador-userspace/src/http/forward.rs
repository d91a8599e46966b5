//! One request, to a service (or, with none, under `passthrough` to the
//! original destination), in named steps: its share of the limits
//! ([`admit`]), the request as the upstream must see it ([`rewrite`]), its
//! body kept for another attempt where one may follow ([`replay`]), then
//! the attempts ([`attempt`], each judged by [`classify`]).

use bytes::Bytes;
use http::{HeaderValue, Request, Response, uri::Authority};
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};

use super::{
    admit,
    attempt::{self, Exchanged},
    dest::Dest,
    finish::Exchange,
    replay::{self, Outgoing},
    response::Body,
    rewrite,
};

pub(super) async fn forward(
    req: Request<Incoming>,
    to: Dest<'_>,
    upstream: Option<&(Authority, HeaderValue)>,
    exchange: &mut Exchange,
) -> Response<Body> {
    let (permits, p) = match admitted(req, to, upstream).await {
        Ok(ok) => ok,
        Err(refused) => return refused.into_response(),
    };
    exchange.bytes_in = p.body.size_hint().exact();
    // An upgrade is never replayed: its bytes are the relay's.
    let policy = to
        .http()
        .map(|h| &h.retry)
        .filter(|r| r.enabled() && p.upgrade.is_none());
    let body = match replay::keep(p.body, policy.is_some(), to, exchange).await {
        Ok(b) => b,
        Err(refused) => return refused.into_response(),
    };
    let x = Exchanged {
        to,
        head: p.head,
        body,
        h2c: p.h2c,
        own_h2c: p.own_h2c,
        upgrade: p.upgrade,
        permits,
        policy,
    };
    attempt::run(x, exchange).await
}

/// A request the proxy made itself (a gRPC call transcoded from the app's
/// REST call): its body is whole, so any attempt may send it again. HTTP/2
/// toward the upstream (h2c in the clear, ALPN over TLS).
pub(super) async fn send_made(
    req: Request<Bytes>,
    to: Dest<'_>,
    upstream: Option<&(Authority, HeaderValue)>,
    exchange: &mut Exchange,
) -> Response<Body> {
    let (mut head, bytes) = req.into_parts();
    // Read by `prepare` as "HTTP/2 from the app": h2c where plain.
    head.version = http::Version::HTTP_2;
    let req = Request::from_parts(head, Full::new(bytes.clone()));
    let (permits, p) = match admitted(req, to, upstream).await {
        Ok(ok) => ok,
        Err(refused) => return refused.into_response(),
    };
    let x = Exchanged {
        to,
        head: p.head,
        body: Outgoing::Replay(bytes),
        h2c: p.h2c,
        own_h2c: p.own_h2c,
        upgrade: None,
        permits,
        policy: to.http().map(|h| &h.retry).filter(|r| r.enabled()),
    };
    attempt::run(x, exchange).await
}

/// The request's share of the limits, and the request as the upstream must
/// see it.
async fn admitted<B: hyper::body::Body>(
    req: Request<B>,
    to: Dest<'_>,
    upstream: Option<&(Authority, HeaderValue)>,
) -> Result<(admit::Permits, rewrite::Prepared<B>), super::response::Refused> {
    let permits = admit::breakers(&to)?;
    Ok((permits, rewrite::prepare(req, to, upstream).await?))
}
