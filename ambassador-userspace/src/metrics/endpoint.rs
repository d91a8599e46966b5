//! An endpoint's series. Endpoints come and go at run time (the addresses
//! of a name, a reload), so a series lives exactly as long as some endpoint
//! holds it: made by the first endpoint of its (service, endpoint) labels,
//! removed from `/metrics` when the last one is dropped. A reload's new
//! endpoint of the same labels takes the series over, counts and all.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    service: String,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    service: String,
    endpoint: String,
    outcome: &'static str,
}

/// The endpoint families, registered once.
pub(super) struct EndpointFamilies {
    requests: Family<OutcomeLabels, Counter>,
    ejections: Family<EndpointLabels, Counter>,
    /// How many endpoints hold each series.
    holds: Mutex<HashMap<EndpointLabels, usize>>,
}

/// The handles one endpoint counts with.
#[derive(Clone, Debug)]
pub struct EndpointMetrics {
    pub success: Counter,
    pub failure: Counter,
    pub ejections: Counter,
    _hold: Arc<Hold>,
}

/// One endpoint's claim on its series.
struct Hold {
    families: &'static EndpointFamilies,
    labels: EndpointLabels,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.labels.fmt(f)
    }
}

const OUTCOMES: [&str; 2] = ["success", "failure"];

fn outcome(l: &EndpointLabels, outcome: &'static str) -> OutcomeLabels {
    OutcomeLabels {
        service: l.service.clone(),
        endpoint: l.endpoint.clone(),
        outcome,
    }
}

impl EndpointFamilies {
    pub(super) fn register(r: &mut Registry) -> EndpointFamilies {
        let requests = Family::default();
        r.register(
            "endpoint_requests",
            "Exchanges with an endpoint, by outcome (failure: connect error, reset or 5xx)",
            requests.clone(),
        );
        let ejections = Family::default();
        r.register(
            "endpoint_ejections",
            "Endpoints taken out after consecutive failures",
            ejections.clone(),
        );
        EndpointFamilies {
            requests,
            ejections,
            holds: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn handles(&'static self, service: &str, endpoint: &str) -> EndpointMetrics {
        let labels = EndpointLabels {
            service: service.to_string(),
            endpoint: endpoint.to_string(),
        };
        // Counted and made under one lock, so a series being removed by
        // its last holder is never handed out in between.
        let mut holds = crate::sync::lock(&self.holds);
        *holds.entry(labels.clone()).or_default() += 1;
        let [success, failure] =
            OUTCOMES.map(|o| self.requests.get_or_create_owned(&outcome(&labels, o)));
        EndpointMetrics {
            success,
            failure,
            ejections: self.ejections.get_or_create_owned(&labels),
            _hold: Arc::new(Hold {
                families: self,
                labels,
            }),
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let f = self.families;
        let mut holds = crate::sync::lock(&f.holds);
        let Some(n) = holds.get_mut(&self.labels) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        holds.remove(&self.labels);
        for o in OUTCOMES {
            f.requests.remove(&outcome(&self.labels, o));
        }
        f.ejections.remove(&self.labels);
    }
}

#[cfg(test)]
mod tests {
    use super::super::get;

    #[test]
    fn a_series_lives_while_an_endpoint_holds_it() {
        let m = get();
        let series = r#"ambassador_endpoint_requests_total{service="hold-test",endpoint="a.example:80@10.0.0.1",outcome="success"}"#;
        let first = m.endpoint("hold-test", "a.example:80@10.0.0.1");
        first.success.inc();
        // A reload's endpoint of the same labels continues the count.
        let second = m.endpoint("hold-test", "a.example:80@10.0.0.1");
        second.success.inc();
        assert!(m.encode().contains(&format!("{series} 2")));
        drop(first);
        assert!(m.encode().contains(&format!("{series} 2")));
        drop(second);
        let text = m.encode();
        assert!(!text.contains("hold-test"), "{text}");
        // Back again: a new series from 0.
        let third = m.endpoint("hold-test", "a.example:80@10.0.0.1");
        assert!(m.encode().contains(&format!("{series} 0")));
        drop(third);
    }
}
