//! The DNS forwarder's series: queries by what became of them, answers by
//! response code, and how long the resolvers took.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RcodeLabel {
    rcode: &'static str,
}

/// What became of a query.
pub const OUTCOMES: [&str; 6] = [
    "forwarded",
    "hosts",
    "denied",
    "upstream_error",
    "malformed",
    "dropped",
];

/// Response codes as the forwarder names them (`dns::wire::rcode_name`).
pub const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "OTHER",
];

/// The DNS families, registered once.
pub(super) struct DnsFamilies {
    queries: Family<OutcomeLabel, Counter>,
    answers: Family<RcodeLabel, Counter>,
    /// Seconds from forwarding a query to the resolver's answer.
    pub upstream: Histogram,
}

impl DnsFamilies {
    pub(super) fn register(r: &mut Registry) -> DnsFamilies {
        let queries = Family::default();
        r.register(
            "dns_queries",
            "The app's DNS queries taken by the forwarder, by outcome: forwarded (to the resolver the app asked), hosts (answered from dns.hosts), denied (NXDOMAIN under dns.deny_unknown), upstream_error (the resolver did not answer in time or answered garbage: SERVFAIL), malformed (not a query), dropped (too many in flight)",
            queries.clone(),
        );
        let answers = Family::default();
        r.register(
            "dns_answers",
            "Answers given to the app, by response code (NOERROR, NXDOMAIN, SERVFAIL, ...)",
            answers.clone(),
        );
        let upstream = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.0001, 2.0, 17,
        ));
        r.register_with_unit(
            "dns_upstream_duration",
            "From forwarding a query to the resolver's answer",
            Unit::Seconds,
            upstream.clone(),
        );
        DnsFamilies {
            queries,
            answers,
            upstream,
        }
    }

    pub(super) fn handles(&self) -> DnsMetrics {
        DnsMetrics {
            outcomes: OUTCOMES
                .map(|outcome| self.queries.get_or_create_owned(&OutcomeLabel { outcome })),
            answers: RCODES.map(|rcode| self.answers.get_or_create_owned(&RcodeLabel { rcode })),
            upstream: self.upstream.clone(),
        }
    }
}

/// The forwarder's handles.
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    outcomes: [Counter; 6],
    answers: [Counter; 7],
    pub upstream: Histogram,
}

impl DnsMetrics {
    /// Counts a query's outcome (one of `OUTCOMES`) and the code answered.
    pub fn query(&self, outcome: &str, rcode: Option<&'static str>) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.outcomes[i].inc();
        }
        if let Some(i) = rcode.and_then(|r| RCODES.iter().position(|c| *c == r)) {
            self.answers[i].inc();
        }
    }
}
