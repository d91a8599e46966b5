//! Sending a request, and sending it again where that is safe: each attempt
//! goes on the client of the endpoint the balancer picks, under one timer
//! for the whole exchange (retries and the response body included), until
//! an answer, a failure no retry may fix, or the retry policy says no.

use std::sync::Arc;

use http::{Request, Response, StatusCode, request::Parts};
use http_body_util::Either;
use tracing::{debug, info, warn};

use super::{
    admit::Permits,
    classify,
    dest::Dest,
    finish::Exchange,
    headers::strip_hop_by_hop,
    replay::Outgoing,
    response::{Body, ResponseBody, error_response, exchange_failed, splice_upgraded},
};
use crate::{
    endpoint::Picked,
    retry::{Failure, RetryPolicy},
    service::pools::Pools,
    upstream::{Answer, HttpClient, ReqBody, RequestError},
};

/// One request, ready to go as many times as it may.
pub(super) struct Exchanged<'a> {
    pub to: Dest<'a>,
    pub head: Parts,
    pub body: Outgoing,
    pub h2c: bool,
    pub own_h2c: Option<Arc<HttpClient>>,
    /// The app's side of an upgrade, spliced once the upstream agrees.
    pub upgrade: Option<hyper::upgrade::OnUpgrade>,
    pub permits: Permits,
    pub policy: Option<&'a RetryPolicy>,
}

type Deadline = Option<std::pin::Pin<Box<tokio::time::Sleep>>>;

pub(super) async fn run(mut x: Exchanged<'_>, exchange: &mut Exchange) -> Response<Body> {
    let to = x.to;
    let _in_flight = x.policy.map(|p| p.request());
    let timeout = to.request_timeout();
    let mut deadline: Deadline = timeout.map(|t| Box::pin(tokio::time::sleep(t)));
    let mut attempt = 0u32;
    let mut _retry_permit = None;
    loop {
        let (picked, client) = pick(to, x.h2c, x.own_h2c.as_deref());
        let req = request(&mut x.head, x.body.next(to), x.policy.is_some());
        let sent = match deadline.as_mut() {
            Some(sleep) => tokio::select! {
                r = client.request(req) => r,
                _ = sleep.as_mut() => return timed_out(to, timeout.unwrap_or_default()),
            },
            None => client.request(req).await,
        };
        attempt += 1;
        let failure = match classify::judge(&sent, to, exchange) {
            Ok(f) => f,
            Err(app_fault) => return app_fault.into_response(),
        };
        if let (Some(failure), Some(p)) = (failure, x.policy)
            && let Some(permit) = p.allow(&x.head.method, x.body.replayable(), failure, attempt)
        {
            let wait = p.backoff(attempt, failure);
            if failure == Failure::GoneAway {
                // Routine: nginx ends an HTTP/2 connection every
                // keepalive_requests (1000) requests.
                debug!(service = to.name(), dst = %to.conn.dst, ?failure, attempt, "retrying");
            } else {
                info!(service = to.name(), dst = %to.conn.dst, ?failure, attempt, ?wait, "retrying");
            }
            to.metrics().retries.inc();
            exchange.retries = attempt;
            _retry_permit = Some(permit);
            tokio::time::sleep(wait).await;
            continue;
        }
        // The response has started: no longer pending, still in flight.
        let [request_permit, pending_permit] = x.permits;
        drop(pending_permit);
        let body_timer = deadline.zip(timeout);
        return respond(sent, to, x.upgrade, body_timer, request_permit, picked);
    }
}

/// The client an attempt goes on.
enum Client<'a> {
    /// The service's (or the app connection's) own.
    Shared(&'a HttpClient),
    /// An endpoint's; h2c or not.
    Endpoint(Arc<Pools>, bool),
}

impl std::ops::Deref for Client<'_> {
    type Target = HttpClient;
    fn deref(&self) -> &HttpClient {
        match self {
            Client::Shared(c) => c,
            Client::Endpoint(p, true) => &p.h2c,
            Client::Endpoint(p, false) => &p.http,
        }
    }
}

/// The endpoint and client for the next attempt: the balancer's pick among
/// the service's endpoints, else the original destination.
fn pick<'a>(
    to: Dest<'a>,
    h2c: bool,
    own_h2c: Option<&'a HttpClient>,
) -> (Option<Picked>, Client<'a>) {
    if let Some((s, h)) = to.svc
        && let Some((p, pools)) = h.endpoint_for_request(&s.endpoints)
    {
        return (Some(p), Client::Endpoint(pools, h2c));
    }
    match (own_h2c, to.http()) {
        (Some(own), _) => (None, Client::Shared(own)),
        (None, Some(h)) => (None, Client::Shared(&h.client)),
        (None, None) => (None, Client::Shared(&to.conn.table.passthrough)),
    }
}

/// One attempt's request; the head is kept for another only where one may
/// follow.
fn request(head: &mut Parts, body: ReqBody, again: bool) -> Request<ReqBody> {
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = if again {
        head.headers.clone()
    } else {
        std::mem::take(&mut head.headers)
    };
    req
}

fn timed_out(to: Dest<'_>, t: std::time::Duration) -> Response<Body> {
    to.metrics().timeouts.inc();
    warn!(service = to.name(), dst = %to.conn.dst, "request timeout ({t:?}) fired before the response started");
    error_response(
        StatusCode::GATEWAY_TIMEOUT,
        &format!("request timeout ({t:?}) fired"),
    )
}

/// The app's response: the upstream's, streamed under what is left of the
/// timer (or the upgraded connection's relay), or why there is none.
fn respond(
    sent: Result<Answer, RequestError>,
    to: Dest<'_>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    timer: Option<(std::pin::Pin<Box<tokio::time::Sleep>>, std::time::Duration)>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    picked: Option<Picked>,
) -> Response<Body> {
    let Answer {
        response: mut resp,
        lease,
        ..
    } = match sent {
        Ok(a) => a,
        Err(e) => return exchange_failed(&e, to.tls().map(|t| &**t), to.name(), to.conn.dst),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(app_side) = upgrade
    {
        // The connection becomes the byte relay: never pooled again.
        let upstream_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(splice_upgraded(
            app_side,
            upstream_side,
            to.name().to_string(),
        ));
        return resp.map(|b| Either::Left(ResponseBody::new(b, None, None, None)));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let mut body = ResponseBody::new(body, timer, permit, picked);
    body.lease = lease;
    Response::from_parts(parts, Either::Left(body))
}
