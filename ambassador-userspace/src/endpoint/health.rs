//! Active health checks: every `interval`, each endpoint of a service is
//! connected to (TCP, and TLS when the service originates it) or asked
//! `GET path`; `unhealthy_threshold` failures in a row mark it down (traffic
//! goes elsewhere), `healthy_threshold` passes bring it back, and also end
//! an outlier ejection (`readmit_ejected`, on by default). Endpoints start
//! up, so a fresh proxy serves at once. Each check takes the endpoints as
//! they are then: an address a name gained is checked from its next round,
//! and the streaks of endpoints still there go on.

use std::sync::{Arc, Weak};

use http::{Request, StatusCode, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tracing::{info, warn};

use super::{Endpoint, EndpointSet};
use crate::{
    config::service::{CheckKind, HealthCheck},
    net::Settings,
    tls::TlsOrigin,
};

/// What checking a service's endpoints needs of the service.
pub struct Target {
    pub service: String,
    /// The checks stop when the service's endpoint set goes (a reload).
    pub endpoints: Weak<EndpointSet>,
    pub settings: Settings,
    pub tls: Option<Arc<TlsOrigin>>,
    /// The name the upstream knows itself by (`Host`), when not the endpoint's.
    pub upstream_name: Option<String>,
}

/// Runs the checks of one service's endpoints while they live.
pub fn spawn(target: Target, check: HealthCheck) {
    let target = Arc::new(target);
    tokio::spawn(async move {
        // Failures and passes in a row, per endpoint.
        let mut streaks: Vec<(Arc<Endpoint>, u32, u32)> = Vec::new();
        let mut tick = tokio::time::interval(check.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(set) = target.endpoints.upgrade() else {
                return;
            };
            let eps: Vec<Arc<Endpoint>> = set.endpoints().to_vec();
            // Not held while probing: a reload may take the set away.
            drop(set);
            streaks = eps
                .iter()
                .map(|ep| {
                    let same = |(e, _, _): &&(Arc<Endpoint>, u32, u32)| Arc::ptr_eq(e, ep);
                    let (f, p) = streaks.iter().find(same).map_or((0, 0), |s| (s.1, s.2));
                    (ep.clone(), f, p)
                })
                .collect();
            // Side by side: a slow endpoint must not delay the others' checks.
            let mut probes = tokio::task::JoinSet::new();
            for (i, ep) in eps.iter().enumerate() {
                let (t, ep, check) = (target.clone(), ep.clone(), check.clone());
                probes.spawn(async move { (i, probe(&t, &ep, &check).await) });
            }
            let mut results = vec![false; eps.len()];
            while let Some(Ok((i, ok))) = probes.join_next().await {
                results[i] = ok;
            }
            let Some(set) = target.endpoints.upgrade() else {
                return;
            };
            for ((ep, fails, passes), ok) in streaks.iter_mut().zip(results) {
                if ok {
                    *passes += 1;
                    *fails = 0;
                    if ep.is_down() && *passes >= check.healthy_threshold {
                        ep.set_down(false);
                        info!(service = %target.service, endpoint = %ep.label(), "health check passing again: endpoint back in");
                    }
                    if check.readmit_ejected
                        && *passes >= check.healthy_threshold
                        && set.readmit(ep)
                    {
                        info!(service = %target.service, endpoint = %ep.label(), "health check passing: ejected endpoint re-admitted");
                    }
                } else {
                    *fails += 1;
                    *passes = 0;
                    if !ep.is_down() && *fails >= check.unhealthy_threshold {
                        ep.set_down(true);
                        warn!(service = %target.service, endpoint = %ep.label(), "health check failing: endpoint marked down");
                    }
                }
            }
        }
    });
}

/// One check of one endpoint, bounded by the check's timeout.
async fn probe(svc: &Target, ep: &Endpoint, check: &HealthCheck) -> bool {
    let run = async {
        let addr = ep.socket_addr().await.ok()?;
        let mut settings: Settings = svc.settings.clone();
        settings.connect_timeout = check.timeout;
        let tcp = crate::net::connect(addr, &settings).await.ok()?;
        match (&svc.tls, &check.kind) {
            (None, CheckKind::Tcp) => Some(true),
            (Some(tls), CheckKind::Tcp) => Some(tls.connect(tcp).await.is_ok()),
            (None, CheckKind::Http { path, expect }) => {
                http_get(TokioIo::new(tcp), svc, ep, path, *expect).await
            }
            (Some(tls), CheckKind::Http { path, expect }) => {
                let s = tls.connect(tcp).await.ok()?;
                http_get(TokioIo::new(s), svc, ep, path, *expect).await
            }
        }
    };
    matches!(
        tokio::time::timeout(check.timeout, run).await,
        Ok(Some(true))
    )
}

async fn http_get<T>(
    io: TokioIo<T>,
    svc: &Target,
    ep: &Endpoint,
    path: &str,
    expect: u16,
) -> Option<bool>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let host = svc
        .upstream_name
        .clone()
        .unwrap_or_else(|| ep.address.host.clone());
    let req = Request::get(path)
        .header(header::HOST, host)
        .header(header::USER_AGENT, "ambassador-health-check")
        .body(Empty::<bytes::Bytes>::new())
        .ok()?;
    let resp = send.send_request(req).await.ok()?;
    Some(resp.status() == StatusCode::from_u16(expect).ok()?)
}
