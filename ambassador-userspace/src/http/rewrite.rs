//! The request as the upstream must see it: hop-by-hop headers gone (but
//! for an upgrade the proxy carries), the service's header policy applied,
//! `Host` and the URI naming the upstream (or the app's own names where the
//! request goes where the app was going), its body's framing kept.

use std::sync::Arc;

use http::{
    HeaderValue, Request, StatusCode, Uri, Version, header,
    request::Parts,
    uri::{Authority, PathAndQuery, Scheme},
};
use hyper::body::{Body, Incoming};
use tracing::warn;

use super::{
    dest::Dest,
    headers::{strip_hop_by_hop, upgrade_protocol},
    response::Refused,
};
use crate::upstream::{
    HttpClient,
    authority::{authority, display_authority},
};

/// A request ready to go out, and how.
pub(super) struct Prepared<B = Incoming> {
    pub head: Parts,
    pub body: B,
    /// The app's side of an upgrade, once the upstream agrees (101).
    pub upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// HTTP/2 from the app to a plain upstream stays HTTP/2 (h2c): gRPC
    /// needs it end to end. Over TLS, ALPN decides.
    pub h2c: bool,
    /// To the original destination: the app connection's own h2c client,
    /// which dials it whatever the request names.
    pub own_h2c: Option<Arc<HttpClient>>,
}

pub(super) async fn prepare<B: Body>(
    mut req: Request<B>,
    to: Dest<'_>,
    upstream: Option<&(Authority, HeaderValue)>,
) -> Result<Prepared<B>, Refused> {
    let h2c = req.version() == Version::HTTP_2 && to.tls().is_none();
    let own_h2c = (h2c && !to.has_endpoints()).then(|| to.conn.h2c_client(to.service()));
    // The app's own :authority goes to where the app was going.
    let app_authority = own_h2c
        .as_ref()
        .and_then(|_| req.uri().authority().cloned());
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
    if let Some(h) = to.http()
        && let Err(e) = h.rules.apply(req.headers_mut()).await
    {
        // Never send the request without the credentials the service needs.
        warn!(service = to.name(), "{e}");
        return Err(Refused::new(StatusCode::BAD_GATEWAY, e.to_string()));
    }
    name_upstream(&mut req, to, upstream, app_authority)?;
    if let Some(route) = to.route {
        let (mut head, body) = req.into_parts();
        route
            .apply_request(&mut head)
            .map_err(|e| Refused::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        if let Some((host, authority)) = route.host() {
            head.headers.insert(header::HOST, host.clone());
            // With endpoints the URI's authority is only a name (the
            // endpoint is dialled); to the original destination it is the
            // pool's key, and stays.
            if to.has_endpoints() {
                let mut parts = std::mem::take(&mut head.uri).into_parts();
                parts.authority = Some(authority.clone());
                head.uri = Uri::from_parts(parts).unwrap_or_default();
            }
        }
        req = Request::from_parts(head, body);
    }
    // The upstream connection decides the wire version (ALPN, or h2c); hyper
    // sends an HTTP/1.1 request on an h2 connection as HTTP/2.
    *req.version_mut() = Version::HTTP_11;
    let (mut head, body) = req.into_parts();
    keep_framing(&mut head, &body);
    Ok(Prepared {
        head,
        body,
        upgrade: app_upgraded,
        h2c,
        own_h2c,
    })
}

/// The upstream sees its own name in Host and :authority, as if the app had
/// called it directly; the connector knows which endpoint to dial.
fn name_upstream<B>(
    req: &mut Request<B>,
    to: Dest<'_>,
    upstream: Option<&(Authority, HeaderValue)>,
    app_authority: Option<Authority>,
) -> Result<(), Refused> {
    let dst = to.conn.dst;
    let tls = to.tls().is_some();
    let fixed = to
        .http()
        .and_then(|h| h.fixed_authority.as_ref())
        .or(upstream);
    let (authority, host_value) = match (app_authority, fixed) {
        (Some(app), _) => (app, None),
        // Services with endpoints: worked out once, at start; without, once
        // per app connection.
        (None, Some((a, v))) => (a.clone(), Some(v.clone())),
        (None, None) => {
            let (host, port) = to.svc.map_or((dst.ip().to_string(), dst.port()), |(s, h)| {
                h.authority(&s.endpoints, dst)
            });
            let Some(a) = authority(&host, port) else {
                return Err(Refused::new(
                    StatusCode::BAD_GATEWAY,
                    "bad upstream address",
                ));
            };
            let v = (!req.headers().contains_key(header::HOST))
                .then(|| HeaderValue::from_str(&display_authority(&host, port, tls)).ok())
                .flatten();
            (a, v)
        }
    };
    if (to.has_endpoints() || !req.headers().contains_key(header::HOST))
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
    *req.uri_mut() = Uri::from_parts(uri)
        .map_err(|_| Refused::new(StatusCode::BAD_GATEWAY, "bad upstream URI"))?;
    Ok(())
}

/// hyper sends no body of unknown length with GET or HEAD unless the
/// framing is asked for: the app's chunked body would vanish.
fn keep_framing(head: &mut Parts, body: &impl Body) {
    if !body.is_end_stream()
        && body.size_hint().exact().is_none()
        && matches!(head.method, http::Method::GET | http::Method::HEAD)
    {
        head.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
}
