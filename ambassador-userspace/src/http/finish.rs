//! The end of one request: who its series and access-log line belong to,
//! what was learned on the way (endpoint, retries, TLS), and the line.

use std::{net::SocketAddr, sync::Arc};

use http::{Request, Version, header};

use super::activity::InFlight;
use crate::{
    access_log,
    service::{Service, ServiceTable},
};

/// Who a request's series and log line belong to.
pub(super) enum Who {
    Service(Arc<Service>),
    Passthrough(Arc<ServiceTable>),
}

impl Who {
    pub(super) fn metrics(&self) -> &crate::metrics::ServiceMetrics {
        match self {
            Who::Service(s) => &s.metrics,
            Who::Passthrough(t) => &t.passthrough_metrics,
        }
    }
}

/// What `forward` learned on the way, for metrics and the access log.
#[derive(Default)]
pub(super) struct Exchange {
    pub(super) endpoint: Option<Arc<crate::endpoint::Endpoint>>,
    pub(super) retries: u32,
    pub(super) tls: Option<&'static str>,
    pub(super) bytes_in: Option<u64>,
    /// A gRPC response's status, from its head or its trailers.
    pub(super) grpc_status: Option<u16>,
    /// What the response cache did, for services with one.
    pub(super) cache: Option<&'static str>,
}

/// The request's own facts, kept only while access logging is on.
pub(super) struct RequestInfo {
    pub(super) dst: SocketAddr,
    pub(super) method: http::Method,
    pub(super) authority: String,
    pub(super) path: String,
    pub(super) version: Version,
    pub(super) trace_id: Option<String>,
    pub(super) error: Option<String>,
}

impl RequestInfo {
    pub(super) fn new<B>(req: &Request<B>, dst: SocketAddr) -> RequestInfo {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("")
            .to_string();
        RequestInfo {
            dst,
            method: req.method().clone(),
            authority,
            path: req.uri().path().to_string(),
            version: req.version(),
            trace_id: crate::trace::trace_id(req.headers()).map(str::to_string),
            error: None,
        }
    }
}

/// The end of one request: its series, and its access-log line.
pub(super) struct Finish {
    pub(super) who: Who,
    /// The connection counts the request in flight until this goes.
    pub(super) _in_flight: InFlight,
    pub(super) start: std::time::Instant,
    pub(super) status: u16,
    pub(super) exchange: Exchange,
    pub(super) info: Option<Box<RequestInfo>>,
    pub(super) span: Option<crate::trace::Span>,
}

impl Finish {
    pub(super) fn done(self, bytes_out: u64) {
        let m = self.who.metrics();
        let elapsed = self.start.elapsed();
        m.response(self.status);
        m.duration.observe(elapsed.as_secs_f64());
        m.to_app.inc_by(bytes_out);
        if let Some(code) = self.exchange.grpc_status {
            m.grpc.count(code);
        }
        if let Some(span) = self.span {
            let error = self.info.as_ref().and_then(|i| i.error.as_deref());
            let endpoint = self
                .exchange
                .endpoint
                .as_ref()
                .map(|e| e.label().to_string());
            crate::trace::finish(span, self.status, endpoint, error);
        }
        if let Some(i) = self.info {
            access_log::http(&access_log::HttpLine {
                service: &m.name,
                dst: i.dst,
                endpoint: self
                    .exchange
                    .endpoint
                    .as_ref()
                    .map(|e| e.label().to_string()),
                method: i.method.as_str(),
                authority: &i.authority,
                path: &i.path,
                version: access_log::version_name(i.version),
                status: self.status,
                bytes_in: self.exchange.bytes_in,
                bytes_out,
                duration_ms: elapsed.as_secs_f64() * 1000.0,
                retries: self.exchange.retries,
                grpc_status: self.exchange.grpc_status,
                cache: self.exchange.cache,
                upstream_tls: self.exchange.tls,
                trace_id: i.trace_id.as_deref(),
                error: i.error.as_deref(),
            });
        }
    }
}
