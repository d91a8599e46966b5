//! A request's destination as the forwarding steps see it: a service and
//! its HTTP part, or none (passthrough to the original destination).

use std::sync::Arc;

use super::conn::AppConn;
use crate::{
    metrics::ServiceMetrics,
    service::{HttpService, Service},
    tls::TlsOrigin,
};

#[derive(Clone, Copy)]
pub(super) struct Dest<'a> {
    pub conn: &'a AppConn,
    pub svc: Option<(&'a Arc<Service>, &'a HttpService)>,
}

impl<'a> Dest<'a> {
    pub fn new(conn: &'a AppConn, svc: Option<&'a Arc<Service>>) -> Dest<'a> {
        Dest {
            conn,
            svc: svc.and_then(|s| s.http().map(|h| (s, h))),
        }
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
