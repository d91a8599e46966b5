//! An HTTP service's pooled clients per endpoint, so each request goes
//! where the balancer says and a recovered primary gets its traffic back at
//! once. The endpoint list changes at run time (the addresses of a name), so
//! pools are made when an endpoint first carries a request and let go when
//! it has left the list: their idle connections close, requests in flight
//! keep theirs.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::{
    endpoint::{Endpoint, EndpointSet},
    upstream::{HttpClient, UpstreamConnector},
};

/// One endpoint's clients.
pub struct Pools {
    pub endpoint: Arc<Endpoint>,
    /// HTTP/1.1, or what ALPN picks.
    pub http: HttpClient,
    /// HTTP/2 without TLS (h2c), for apps that speak it.
    pub h2c: HttpClient,
}

/// Every endpoint's clients, for the list of one generation.
pub struct EndpointPools {
    connector: UpstreamConnector,
    made: ArcSwap<(u64, Vec<Arc<Pools>>)>,
    /// One maker at a time (finding never waits).
    making: Mutex<()>,
}

impl EndpointPools {
    pub fn new(connector: UpstreamConnector) -> EndpointPools {
        EndpointPools {
            connector,
            made: ArcSwap::from_pointee((u64::MAX, Vec::new())),
            making: Mutex::new(()),
        }
    }

    /// The clients of `ep`, an endpoint of `set`.
    pub fn get(&self, set: &EndpointSet, ep: &Arc<Endpoint>) -> Arc<Pools> {
        let generation = set.generation();
        if let Some(p) = self.find(generation, ep) {
            return p;
        }
        let _one = crate::sync::lock(&self.making);
        if let Some(p) = self.find(generation, ep) {
            return p;
        }
        let list = set.endpoints();
        let listed = |e: &Arc<Endpoint>| list.iter().any(|x| Arc::ptr_eq(x, e));
        // The pools of endpoints that left the list go now.
        let mut pools: Vec<Arc<Pools>> = self
            .made
            .load()
            .1
            .iter()
            .filter(|p| listed(&p.endpoint))
            .cloned()
            .collect();
        let found = pools.iter().find(|p| Arc::ptr_eq(&p.endpoint, ep)).cloned();
        let p = found.unwrap_or_else(|| Arc::new(self.make(ep)));
        // One picked from the list just before it changed gets clients for
        // this request alone.
        if listed(ep) && !pools.iter().any(|x| Arc::ptr_eq(x, &p)) {
            pools.push(p.clone());
        }
        self.made.store(Arc::new((generation, pools)));
        p
    }

    fn find(&self, generation: u64, ep: &Arc<Endpoint>) -> Option<Arc<Pools>> {
        let made = self.made.load();
        if made.0 != generation {
            return None;
        }
        made.1
            .iter()
            .find(|p| Arc::ptr_eq(&p.endpoint, ep))
            .cloned()
    }

    fn make(&self, ep: &Arc<Endpoint>) -> Pools {
        let c = self.connector.clone().for_endpoint(ep.clone());
        Pools {
            endpoint: ep.clone(),
            http: c.clone().client(),
            h2c: c.h2c_client(),
        }
    }
}
