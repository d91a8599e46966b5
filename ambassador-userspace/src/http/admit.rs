//! Whether a request may go on at all: the service it belongs to (or
//! none), refused when it names its destination twice, names a service
//! toward an address the service does not own, or matches nothing under
//! `deny`; then its share of the service's circuit-breaking limits.

use std::sync::Arc;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{info, warn};

use super::{conn::AppConn, dest::Dest, response::Refused, target};
use crate::{
    config::service::DefaultPolicy,
    service::{Route, Service},
};

/// The service a request belongs to (`None`: no service, under
/// `passthrough`), or the answer that refuses it: 400 for a request that
/// names its destination twice, 403 under `deny`, and 403 for a service's
/// name used toward an address the service does not own.
pub(super) async fn choose_service(
    req: &Request<Incoming>,
    conn: &AppConn,
) -> Result<Option<Arc<Service>>, Refused> {
    let (dst, table) = (conn.dst, &conn.table);
    let host = target::request_host(req).map_err(|e| {
        info!(%dst, "refused: {e}");
        Refused::new(StatusCode::BAD_REQUEST, e.to_string())
    })?;
    // The Host is looked at only where it decides something.
    let svc = match &conn.route {
        Route::Service(s) => match (&s.host, host.as_deref()) {
            (Some(h), Some(name)) if table.names_match(h, name) => Some(s.clone()),
            (Some(_), _) => None,
            _ => Some(s.clone()),
        },
        Route::ByHost => host.as_deref().and_then(|h| table.by_host(h, dst.port())),
        Route::Dns | Route::Default => None,
    };
    // A name that belongs to a service of another kind is no HTTP service.
    let svc = svc.filter(|s| s.http().is_some());
    match svc {
        Some(s) if !table.owns(&s, dst.ip(), host.as_deref()).await => {
            let name = crate::config::clip(host.as_deref().unwrap_or(""));
            warn!(%dst, service = %s.name, host = %name, "denied: the request names a service's host toward an address that name does not resolve to");
            crate::metrics::get().denied("http", "not_owned");
            Err(Refused::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{name} (service {}) does not resolve to {}: the request was not sent",
                    s.name,
                    dst.ip()
                ),
            ))
        }
        None if table.default == DefaultPolicy::Deny => {
            let what =
                host.map_or_else(|| dst.to_string(), |h| crate::config::clip(&h).into_owned());
            info!(%dst, host = %what, "denied: no service matches and the default is deny");
            crate::metrics::get().denied("http", "no_service");
            Err(Refused::new(
                StatusCode::FORBIDDEN,
                format!("no service matches {what} and the default policy is deny"),
            ))
        }
        svc => Ok(svc),
    }
}

/// A request's places under its service's limits: [max_requests,
/// max_pending]; the second is given back when the response starts.
pub(super) type Permits = [Option<OwnedSemaphorePermit>; 2];

/// Circuit breaking: refuse at once rather than queue without bound.
pub(super) fn breakers(to: &Dest<'_>) -> Result<Permits, Refused> {
    let mut permits = [None, None];
    let Some(s) = to.service() else {
        return Ok(permits);
    };
    let m = &s.metrics;
    let limits = [
        (
            &s.limits.requests,
            "max_requests",
            s.limits.config.max_requests,
            &m.rejected_requests,
        ),
        (
            &s.limits.pending,
            "max_pending",
            s.limits.config.max_pending,
            &m.rejected_pending,
        ),
    ];
    for (slot, (sem, what, max, rejected)) in limits.into_iter().enumerate() {
        match sem.clone().try_acquire_owned() {
            Ok(p) => permits[slot] = Some(p),
            Err(_) => {
                rejected.inc();
                warn!(service = %s.name, "circuit breaker: {what} ({max}) reached");
                return Err(Refused::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("circuit breaker: {what} ({max}) reached"),
                ));
            }
        }
    }
    Ok(permits)
}
