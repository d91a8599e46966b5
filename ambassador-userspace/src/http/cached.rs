//! A request to a service (or route) with a response cache: the cache's
//! plan for it, then one `match`: a stored response answers (or a 304 to
//! the app's own conditional), or the request goes on, once for all who
//! ask for the same at the same time, with the stored response's
//! validators; what comes back refreshes the entry (304), is stored as it
//! streams to the app, or, when the upstream fails, a stale entry within
//! `stale_if_error` answers instead.

use std::{sync::Arc, time::SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header, response::Parts, uri::Authority};
use http_body_util::{Either, Full};
use http_cache_semantics::{AfterResponse, RequestLike};
use hyper::body::{Body as _, Incoming};

use super::{dest::Dest, finish::Exchange, forward, response::Body};
use crate::cache::{
    Cache, Turn,
    entry::{Entry, variant_of},
    fill::{Fill, Stored},
    key::{self, Ask, Lookup, PolicyRequest},
    plan::{Found, Plan, plan},
};

pub(super) async fn forward(
    req: Request<Incoming>,
    to: Dest<'_>,
    upstream: Option<&(Authority, HeaderValue)>,
    cache: Option<(&Arc<Cache>, u32)>,
    exchange: &mut Exchange,
) -> Response<Body> {
    let Some((cache, route)) = cache else {
        return forward::forward(req, to, upstream, exchange).await;
    };
    let lookup = match key::ask(&req, route) {
        Ask::Lookup(l) => l,
        Ask::Bypass(_) => {
            note(exchange, cache, "bypass");
            return forward::forward(req, to, upstream, exchange).await;
        }
    };
    // RFC 9111 §3.5 holds for credentials the ambassador adds, too.
    let adds_auth = to
        .http()
        .is_some_and(|h| h.rules.sets(&header::AUTHORIZATION));
    let now = SystemTime::now();
    let found = cache.find(&lookup.key, &PolicyRequest::new(&req, adds_auth), now);
    match plan(&lookup, found, req.headers()) {
        Plan::Hit(e) => {
            note(exchange, cache, "hit");
            answer(&e, lookup.head, now)
        }
        Plan::NotModified(e) => {
            note(exchange, cache, "not_modified");
            not_modified(&e, now)
        }
        Plan::Bypass(_) => {
            note(exchange, cache, "bypass");
            forward::forward(req, to, upstream, exchange).await
        }
        Plan::Fetch { stale } => {
            let f = Fetch {
                to,
                cache,
                lookup,
                adds_auth,
            };
            // Boxed: a fill's state would make every request's future
            // (hits and uncached services too) larger.
            Box::pin(f.run(req, upstream, stale, exchange)).await
        }
    }
}

/// A request the cache sends on.
struct Fetch<'a> {
    to: Dest<'a>,
    cache: &'a Arc<Cache>,
    lookup: Lookup,
    adds_auth: bool,
}

impl Fetch<'_> {
    async fn run(
        self,
        mut req: Request<Incoming>,
        upstream: Option<&(Authority, HeaderValue)>,
        stale: Option<Arc<Entry>>,
        exchange: &mut Exchange,
    ) -> Response<Body> {
        let cache = self.cache;
        let lead = match cache.turn(&self.lookup.key) {
            Turn::Lead(l) => Some(l),
            Turn::Follow(mut done) => {
                // Another request is fetching this: wait for what it stores
                // (at most the request timeout), else go too.
                let wait = self.to.request_timeout().unwrap_or(FOLLOW_WAIT);
                let _ = tokio::time::timeout(wait, done.changed()).await;
                let now = SystemTime::now();
                let p = PolicyRequest::new(&req, self.adds_auth);
                if let Found::Fresh(e) = cache.find(&self.lookup.key, &p, now) {
                    note(exchange, cache, "coalesced");
                    return answer(&e, false, now);
                }
                None
            }
        };
        // The request as the rules judge it, kept past sending it.
        let judged = snapshot(&req);
        if let Some(e) = &stale {
            validators(&mut req, e);
        }
        let resp = forward::forward(req, self.to, upstream, exchange).await;
        let now = SystemTime::now();
        let p = PolicyRequest::new(&judged, self.adds_auth);
        if let Some(e) = stale {
            if failed(&resp) && e.usable_stale(cache.config.stale_if_error, now) {
                note(exchange, cache, "stale");
                return answer(&e, false, now);
            }
            if resp.status() == StatusCode::NOT_MODIFIED {
                return self.refresh(&e, resp, &p, now, exchange);
            }
        }
        note(exchange, cache, "miss");
        let (parts, body) = resp.into_parts();
        let body = match body {
            Either::Left(mut body) => {
                if let Some(policy) = cache.admit(&p, &parts, now) {
                    let stored = Stored {
                        policy,
                        status: parts.status,
                        headers: parts.headers.clone(),
                        variant: variant_of(&parts.headers, p.headers()),
                        now,
                    };
                    let fill = Fill::new(cache.clone(), self.lookup.key, stored, lead);
                    // An empty body is never polled: it has ended already.
                    if body.is_end_stream() {
                        fill.end();
                    } else {
                        body.fill = Some(fill);
                    }
                }
                Either::Left(body)
            }
            own => own,
        };
        Response::from_parts(parts, body)
    }

    /// The upstream's 304 to our validators: the entry, refreshed, answers.
    fn refresh(
        self,
        e: &Entry,
        resp: Response<Body>,
        p: &PolicyRequest<'_>,
        now: SystemTime,
        exchange: &mut Exchange,
    ) -> Response<Body> {
        let cache = self.cache;
        match e.policy.after_response(p, &resp, now) {
            AfterResponse::NotModified(policy, _) => {
                let headers = e.freshened(resp.headers());
                let fresh = Entry::new(
                    policy,
                    e.status,
                    headers,
                    e.body.clone(),
                    e.variant.clone(),
                    now,
                );
                let out = answer(&fresh, self.lookup.head, now);
                cache.insert(self.lookup.key, fresh);
                note(exchange, cache, "revalidated");
                out
            }
            // A 304 for a version we do not hold: ours is no good.
            AfterResponse::Modified(..) => {
                cache.remove(&self.lookup.key);
                note(exchange, cache, "miss");
                resp
            }
        }
    }
}

/// How long a request waits for another's fetch of the same, when its
/// service sets no request timeout.
const FOLLOW_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

fn note(exchange: &mut Exchange, cache: &Cache, result: &'static str) {
    exchange.cache = Some(result);
    if let Some(c) = cache.metrics.result(result) {
        c.inc();
    }
}

/// The request's method, target and headers, without its body.
fn snapshot<B>(req: &Request<B>) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.headers_mut() = req.headers().clone();
    r
}

/// Asks the upstream whether the stored version still holds.
fn validators<B>(req: &mut Request<B>, e: &Entry) {
    let h = req.headers_mut();
    if let Some(tag) = e.headers.get(header::ETAG) {
        h.insert(header::IF_NONE_MATCH, tag.clone());
    }
    if let Some(date) = e.headers.get(header::LAST_MODIFIED) {
        h.insert(header::IF_MODIFIED_SINCE, date.clone());
    }
}

/// No usable answer: the proxy's own error (no connection, timeout), or
/// the upstream's 500/502/503/504.
fn failed(resp: &Response<Body>) -> bool {
    let s = resp.status().as_u16();
    match resp.body() {
        Either::Right(_) => s >= 500,
        Either::Left(_) => matches!(s, 500 | 502 | 503 | 504),
    }
}

/// The stored response, as the app gets it now.
fn answer(e: &Entry, head_only: bool, now: SystemTime) -> Response<Body> {
    let body = if head_only {
        Bytes::new()
    } else {
        e.body.clone()
    };
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = e.status;
    parts.headers = e.head(now);
    Response::from_parts(parts, Either::Right(Full::new(body)))
}

/// The app has this version already (RFC 9110 §15.4.5: the 304 carries
/// what a 200 would of these fields).
fn not_modified(e: &Entry, now: SystemTime) -> Response<Body> {
    let full = e.head(now);
    let mut parts: Parts = Response::new(()).into_parts().0;
    parts.status = StatusCode::NOT_MODIFIED;
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::VARY,
        header::LAST_MODIFIED,
        header::AGE,
    ] {
        for v in full.get_all(&name) {
            parts.headers.append(name.clone(), v.clone());
        }
    }
    Response::from_parts(parts, Either::Right(Full::new(Bytes::new())))
}
