//! A request's destination as the forwarding steps see it: a service and
//! its HTTP part, or none (passthrough to the original destination).

use std::sync::Arc;

use super::conn::AppConn;
use crate::{
    metrics::ServiceMetrics,
    route::Route,
    service::{HttpService, Service},
    tls::TlsOrigin,
};

#[derive(Clone, Copy)]
pub(super) struct Dest<'a> {
    pub conn: &'a AppConn,
    pub svc: Option<(&'a Arc<Service>, &'a HttpService)>,
    /// The service's route this request forwards by, if one matched.
    pub route: Option<&'a Route>,
}

impl<'a> Dest<'a> {
    pub fn new(
        conn: &'a AppConn,
        svc: Option<&'a Arc<Service>>,
        route: Option<&'a Route>,
    ) -> Dest<'a> {
        Dest {
            conn,
            svc: svc.and_then(|s| s.http().map(|h| (s, h))),
            route,
        }
    }

    /// The route's request timeout, else the service's.
    pub fn request_timeout(&self) -> Option<std::time::Duration> {
        self.route
            .and_then(|r| r.timeout)
            .or(self.http().map(|h| h.request_timeout))
    }

    pub fn service(&self) -> Option<&'a Arc<Service>> {
        self.svc.map(|(s, _)| s)
    }

    pub fn http(&self) -> Option<&'a HttpService> {
        self.svc.map(|(_, h)| h)
    }

    pub fn name(&self) -> &'a str {
        self.svc.map_or("(default)", |(s, _)| s.name.as_str())
    }

    pub fn metrics(&self) -> &'a ServiceMetrics {
        self.svc
            .map_or(&self.conn.table.passthrough_metrics, |(s, _)| &s.metrics)
    }

    pub fn tls(&self) -> Option<&'a Arc<TlsOrigin>> {
        self.http().and_then(|h| h.tls.as_ref())
    }

    /// Requests go to the service's endpoints, not the original destination.
    pub fn has_endpoints(&self) -> bool {
        self.svc.is_some_and(|(s, _)| !s.endpoints.is_empty())
    }
}
