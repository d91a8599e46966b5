//! What every request on one app connection shares: where it was going, its
//! route and table, the upstream's name worked out once, its own HTTP/2
//! clients, and how busy it is.

use std::{net::SocketAddr, sync::Arc};

use http::{HeaderValue, uri::Authority};

use super::activity::Activity;
use crate::{
    service::{Route, Service, ServiceTable},
    upstream::{
        HttpClient,
        authority::{authority, display_authority},
    },
};

/// An app connection's own HTTP/2 client for one service (`None`: passthrough).
type OwnClient = (Option<Arc<Service>>, Arc<HttpClient>);

pub(super) struct AppConn {
    pub dst: SocketAddr,
    pub route: Route,
    pub table: Arc<ServiceTable>,
    /// The connection's own service, when it has no fixed endpoints: its
    /// upstream authority and Host value depend only on `dst`, so they are
    /// worked out once here rather than per request.
    pub upstream: Option<(Authority, HeaderValue)>,
    /// HTTP/2 from the app to the original destination goes on clients of
    /// this connection's own (per service; `None`: passthrough), which dial
    /// `dst` whatever the request names, so the app's `:authority` reaches
    /// the upstream as it sent it, as a direct connection would have carried
    /// it; their upstream connection ends with this one.
    h2c: std::sync::Mutex<Vec<OwnClient>>,
    pub activity: Arc<Activity>,
}

impl AppConn {
    pub fn new(dst: SocketAddr, route: Route, table: Arc<ServiceTable>) -> AppConn {
        let upstream = match &route {
            Route::Service(s) => s
                .http()
                .filter(|h| h.fixed_authority.is_none())
                .and_then(|h| {
                    let (host, port) = h.authority(&s.endpoints, dst);
                    let tls = h.tls.is_some();
                    authority(&host, port)
                        .zip(HeaderValue::from_str(&display_authority(&host, port, tls)).ok())
                }),
            _ => None,
        };
        AppConn {
            dst,
            route,
            table,
            upstream,
            h2c: Default::default(),
            activity: Arc::new(Activity::new()),
        }
    }

    /// This connection's HTTP/2 client for `svc` (or passthrough).
    pub fn h2c_client(&self, svc: Option<&Arc<Service>>) -> Arc<HttpClient> {
        let mut own = crate::sync::lock(&self.h2c);
        let same = |k: &Option<Arc<Service>>| match (k, svc) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if let Some((_, c)) = own.iter().find(|(k, _)| same(k)) {
            return c.clone();
        }
        let connector = svc
            .and_then(|s| s.http())
            .map_or(&self.table.passthrough_connector, |h| &h.connector);
        let client = Arc::new(connector.clone().dialing(self.dst).h2c_client());
        own.push((svc.cloned(), client.clone()));
        client
    }
}
