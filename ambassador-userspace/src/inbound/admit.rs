//! May a caller's request go to the app: the checks every inbound request
//! passes, cheapest first — its shape (method, one Host, declared size,
//! a path in normal form), the rate limit when it keys on no identity, who
//! the caller is, the rate limit by claim, the access rules. Each refusal
//! is a status, a reason for the caller and a counted reason.

use std::{net::SocketAddr, time::Instant};

use http::{Request, StatusCode, header};

use super::{access::Decision, authn::Identity, jwt::TokenMemo, table::PortPolicy};
use crate::{
    config::gateway::RateKey,
    http::target::request_host,
    ratelimit::retry_after,
    route::{Decision as RouteDecision, Route},
};

/// The ambassador's own answer to a request it will not send.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
    /// `Retry-After` seconds (429).
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// A refusal by the port's rules, counted under `metric`.
    fn counted(p: &PortPolicy, metric: &'static str, status: StatusCode, reason: String) -> Self {
        crate::metrics::get().count_inbound(crate::metrics::Inbound::Refusal, &p.name, metric);
        Refusal::new(status, reason)
    }
}

/// Where an admitted request goes by the port's routes.
pub enum Routed<'a> {
    /// To the app, changed by this route if one matched.
    App(Option<&'a Route>),
    /// The route answers by itself.
    Answer(&'a Route),
}

/// The port's routes decide an admitted request (refusals counted as the
/// rules' are).
pub fn route<'a, B>(req: &Request<B>, p: &'a PortPolicy) -> Result<Routed<'a>, Refusal> {
    if p.routes.is_empty() {
        return Ok(Routed::App(None));
    }
    let d = p
        .routes
        .decide(req.method(), req.uri(), req.headers(), Instant::now());
    match d {
        RouteDecision::Service => Ok(Routed::App(None)),
        RouteDecision::Forward(r) => Ok(Routed::App(Some(r))),
        RouteDecision::Respond(r) => Ok(Routed::Answer(r)),
        RouteDecision::NotNormal => Err(Refusal::counted(
            p,
            "path_not_normal",
            StatusCode::BAD_REQUEST,
            "the path is not in normal form (dot segments, //, %-escapes of plain characters)"
                .into(),
        )),
        RouteDecision::Deny(r) => Err(Refusal::counted(
            p,
            "forbidden",
            StatusCode::FORBIDDEN,
            format!("denied by route {} of {}", r.name, p.name),
        )),
        RouteDecision::Limited(r, wait) => {
            let mut refusal = Refusal::counted(
                p,
                "rate_limited",
                StatusCode::TOO_MANY_REQUESTS,
                format!("rate limited by route {} of {}", r.name, p.name),
            );
            refusal.retry_after = Some(retry_after(wait));
            Err(refusal)
        }
    }
}

/// Who sent `req`, if it may go.
pub async fn admit<B>(
    req: &Request<B>,
    p: &PortPolicy,
    peer: SocketAddr,
    memo: &TokenMemo,
) -> Result<Identity, Refusal> {
    shape(req, p)?;
    let pre_auth = p
        .limiter
        .as_ref()
        .filter(|l| !matches!(l.key, RateKey::Claim(_)));
    if let Some(l) = pre_auth {
        let key = match &l.key {
            RateKey::Port | RateKey::Claim(_) => None,
            RateKey::ClientIp => Some(peer.ip().to_string()),
            RateKey::Header(h) => Some(
                req.headers()
                    .get(h.0.as_str())
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
            ),
        };
        limit(p, l, key.as_deref())?;
    }
    let identity = match &p.authn {
        Some(a) => a.check(req.headers(), memo).await.map_err(|f| {
            crate::metrics::get().count_inbound(crate::metrics::Inbound::AuthFailure, &p.name, f.reason());
            tracing::debug!(client = %peer, port = p.port, reason = f.reason(), "refused: {}", f.message());
            Refusal::new(f.status(), f.message())
        })?,
        None => Identity::Anonymous,
    };
    if let Some(l) = &p.limiter
        && let RateKey::Claim(c) = &l.key
    {
        let value = match &identity {
            Identity::Jwt(claims) => claims.get(c).map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
            _ => None,
        };
        limit(p, l, Some(value.as_deref().unwrap_or("")))?;
    }
    if let Some(a) = &p.access
        && let Decision::Deny(rule) = a.decide(req.method(), req.uri().path(), &identity)
    {
        let why = match rule {
            Some(i) => format!("denied by {}'s access rule {}", p.name, i + 1),
            None => format!("denied by {}'s default access rule", p.name),
        };
        return Err(Refusal::counted(p, "forbidden", StatusCode::FORBIDDEN, why));
    }
    Ok(identity)
}

/// What the request is, before who sent it.
fn shape<B>(req: &Request<B>, p: &PortPolicy) -> Result<(), Refusal> {
    if req.method() == http::Method::CONNECT {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served on the Pod's ports",
        ));
    }
    // One destination named (one valid Host, agreeing with an absolute
    // target or :authority): else the app and the proxy could each read
    // another one.
    request_host(req).map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    if let Some(max) = p.max_body {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(Refusal::counted(
                p,
                "body_too_large",
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {max} bytes"),
            ));
        }
    }
    if p.access.is_some() && !crate::route::is_normal(req.uri().path()) {
        return Err(Refusal::counted(
            p,
            "path_not_normal",
            StatusCode::BAD_REQUEST,
            "the path is not in normal form (dot segments, escaped dots, slashes or backslashes, empty segments)".into(),
        ));
    }
    Ok(())
}

fn limit(p: &PortPolicy, l: &crate::ratelimit::Limiter, key: Option<&str>) -> Result<(), Refusal> {
    l.check(key, Instant::now()).map_err(|wait| {
        let mut r = Refusal::counted(
            p,
            "rate_limited",
            StatusCode::TOO_MANY_REQUESTS,
            format!("{}'s rate limit is reached", p.name),
        );
        r.retry_after = Some(retry_after(wait));
        r
    })
}
