//! A response cache's series: its requests by result and its stores and
//! evictions (bytes and entries held are read at scrape time).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    service: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    service: String,
    event: &'static str,
}

/// The cache families, registered once.
pub(super) struct CacheFamilies {
    requests: Family<ResultLabels, Counter>,
    events: Family<EventLabels, Counter>,
}

impl CacheFamilies {
    pub(super) fn register(r: &mut Registry) -> CacheFamilies {
        let requests = Family::default();
        r.register(
            "cache_requests",
            "Requests of services with a response cache, by result: hit, miss, revalidated (the upstream's 304 refreshed the entry), stale (served when the upstream failed), coalesced (answered by another request's fetch), not_modified (the app's own conditional), bypass (not the cache's: method, preconditions)",
            requests.clone(),
        );
        let events = Family::default();
        r.register(
            "cache_events",
            "Response cache entries stored, and evicted to stay within max_bytes",
            events.clone(),
        );
        CacheFamilies { requests, events }
    }

    /// One service's handles (the same name gets the same series).
    pub(super) fn handles(&self, service: &str) -> CacheMetrics {
        let result = |result: &'static str| {
            self.requests.get_or_create_owned(&ResultLabels {
                service: service.to_string(),
                result,
            })
        };
        let event = |event: &'static str| {
            self.events.get_or_create_owned(&EventLabels {
                service: service.to_string(),
                event,
            })
        };
        CacheMetrics {
            hit: result("hit"),
            miss: result("miss"),
            revalidated: result("revalidated"),
            stale: result("stale"),
            coalesced: result("coalesced"),
            not_modified: result("not_modified"),
            bypass: result("bypass"),
            stored: event("stored"),
            evicted: event("evicted"),
        }
    }
}

/// One service's cache handles, made once per cache.
#[derive(Clone, Debug)]
pub struct CacheMetrics {
    pub hit: Counter,
    pub miss: Counter,
    pub revalidated: Counter,
    pub stale: Counter,
    pub coalesced: Counter,
    pub not_modified: Counter,
    pub bypass: Counter,
    pub stored: Counter,
    pub evicted: Counter,
}

impl CacheMetrics {
    /// The counter of a result as the access log names it.
    pub fn result(&self, result: &str) -> Option<&Counter> {
        Some(match result {
            "hit" => &self.hit,
            "miss" => &self.miss,
            "revalidated" => &self.revalidated,
            "stale" => &self.stale,
            "coalesced" => &self.coalesced,
            "not_modified" => &self.not_modified,
            "bypass" => &self.bypass,
            _ => return None,
        })
    }
}
