//! What one attempt came to, decided in one place: an answer (a 5xx one may
//! be tried again), a failure of a kind the retry policy weighs, or the
//! app's own fault (400, no retry, no endpoint blamed). The endpoint that
//! answered or failed gets the credit or the blame here too.

use std::sync::Arc;

use http::StatusCode;
use tracing::{info, warn};

use super::{dest::Dest, finish::Exchange, headers::grpc_status, response::Refused};
use crate::{
    endpoint::Endpoint,
    error::{Classified, Origin, Retry},
    retry::Failure,
    service::Service,
    upstream::{Answer, AppBodyError, RequestError, Unprocessed, unprocessed},
};

/// `Ok(None)`: done (an answer, or a failure nothing can fix); `Ok(Some)`:
/// a failure another attempt might fix; `Err`: the app's fault, answered.
pub(super) fn judge(
    sent: &Result<Answer, RequestError>,
    to: Dest<'_>,
    exchange: &mut Exchange,
) -> Result<Option<Failure>, Refused> {
    match sent {
        Ok(Answer { response, info, .. }) => {
            let status = response.status();
            if let Some(ep) = info.as_ref().and_then(|i| i.endpoint.as_ref()) {
                if let Some(svc) = to.service() {
                    note_health(svc, ep, !status.is_server_error());
                }
                exchange.endpoint = Some(ep.clone());
            }
            exchange.tls = info.as_ref().and_then(|i| i.tls);
            // A gRPC answer with its status in the head (trailers-only):
            // nothing of it has reached the app yet.
            exchange.grpc_status = grpc_status(response.headers());
            if status.is_server_error() {
                return Ok(Some(Failure::Status(status.as_u16())));
            }
            Ok(exchange.grpc_status.filter(|c| *c != 0).map(Failure::Grpc))
        }
        Err(e) if e.origin() == Origin::App => {
            // The app's own request was broken: nothing the upstream or its
            // health has to answer for.
            let why = AppBodyError::in_chain(e).map_or_else(|| e.to_string(), |a| a.to_string());
            info!(service = to.name(), dst = %to.conn.dst, "{why}");
            Err(Refused::new(StatusCode::BAD_REQUEST, why))
        }
        Err(e) => {
            let failure = failure_of(e);
            if let Some(ep) = e.conn_info().and_then(|i| i.endpoint) {
                // A connection's graceful end is no fault of the endpoint.
                if let Some(svc) = to.service()
                    && failure != Some(Failure::GoneAway)
                {
                    note_health(svc, &ep, false);
                }
                exchange.endpoint = Some(ep);
            }
            Ok(failure)
        }
    }
}

/// The retry policy's kind of failure, from the error's classification.
fn failure_of(e: &RequestError) -> Option<Failure> {
    match e.retry() {
        Retry::Never | Retry::Elsewhere => None,
        Retry::IfIdempotent => Some(Failure::Reset),
        Retry::Unprocessed => Some(match unprocessed(e) {
            Some(Unprocessed::GoneAway) => Failure::GoneAway,
            _ => Failure::Refused,
        }),
    }
}

/// Passive health: the endpoint that answered (or failed) gets the credit.
fn note_health(svc: &Service, ep: &Arc<Endpoint>, ok: bool) {
    if ok {
        svc.endpoints.success(ep);
    } else if let Some(t) = svc.endpoints.failure(ep) {
        warn!(service = %svc.name, endpoint = %ep.label(), ejected_for = ?t, "endpoint ejected after consecutive failures");
    }
}
