//! The DNS forwarder. The kernel hands the app's queries to the Pod's
//! resolvers to it (UDP to `dns.port + i` for resolver `i`; TCP port 53
//! arrives as any redirected connection); each query is decided as a plain
//! value (`plan`): answered from `dns.hosts`, refused with NXDOMAIN under
//! `dns.deny_unknown`, or forwarded as it is to the resolver the app asked.
//! What resolvers answer for the names services are named by is learned
//! (`ServiceTable::learned`), so a connection to such an address matches
//! its service even with no Host or SNI to tell.

pub mod plan;
pub mod tcp;
pub mod udp;
mod upstream;
pub mod wire;

use std::{sync::Arc, time::Duration};

use hickory_proto::op::ResponseCode;
use tokio::time::Instant;
use tracing::debug;

use crate::{access_log, metrics::DnsMetrics, service::ServiceTable};
use plan::Plan;
pub use upstream::Upstream;
use wire::{Answer, Query};

/// The table of the moment (a reload swaps it; each query takes one).
pub type Tables = Arc<dyn Fn() -> Arc<ServiceTable> + Send + Sync>;

/// How one query ended, for metrics and the access log.
struct Outcome {
    bytes: Vec<u8>,
    what: &'static str,
    rcode: &'static str,
    answers: usize,
}

/// One query, start to end: read, decide, act, learn, count, log. `None`:
/// not a query (nothing is answered).
pub async fn answer(
    bytes: &[u8],
    upstream: &mut Upstream,
    table: &ServiceTable,
    transport: &'static str,
    m: &DnsMetrics,
) -> Option<Vec<u8>> {
    let start = Instant::now();
    let q = match Query::parse(bytes) {
        Ok(q) => q,
        Err(e) => {
            debug!(resolver = %upstream.resolver(), "DNS: {e}");
            m.query("malformed", None);
            return None;
        }
    };
    let out = match plan::plan(&q.name, q.qtype, table) {
        Plan::Hosts(ips) => Outcome {
            bytes: q.answer(ResponseCode::NoError, &ips, table.dns.hosts_ttl),
            what: "hosts",
            rcode: "NOERROR",
            answers: ips.len(),
        },
        Plan::Deny => Outcome {
            bytes: q.answer(ResponseCode::NXDomain, &[], Duration::ZERO),
            what: "denied",
            rcode: "NXDOMAIN",
            answers: 0,
        },
        Plan::Forward => forward(&q, bytes, upstream, table, m).await,
    };
    m.query(out.what, Some(out.rcode));
    if access_log::enabled() {
        access_log::dns(&access_log::DnsLine {
            name: &q.name,
            qtype: &q.qtype.to_string(),
            transport,
            resolver: upstream.resolver().ip(),
            outcome: out.what,
            rcode: out.rcode,
            answers: out.answers,
            duration_ms: start.elapsed().as_secs_f64() * 1000.0,
        });
    }
    Some(out.bytes)
}

/// Asks the resolver (bounded by `dns.timeout`: SERVFAIL after it) and
/// learns from what it says.
async fn forward(
    q: &Query,
    bytes: &[u8],
    upstream: &mut Upstream,
    table: &ServiceTable,
    m: &DnsMetrics,
) -> Outcome {
    let sent = Instant::now();
    // Only answers for names services are named by are worth reading whole.
    let full = table.knows_name(&q.name);
    let asked = upstream.exchange(q, bytes, full);
    match tokio::time::timeout(table.dns.timeout, asked).await {
        Ok(Ok((reply, answer))) => {
            m.upstream.observe(sent.elapsed().as_secs_f64());
            learn(table, q, &answer);
            Outcome {
                bytes: reply,
                what: "forwarded",
                rcode: answer.rcode,
                answers: answer.count,
            }
        }
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {:?}", table.dns.timeout),
            };
            debug!(resolver = %upstream.resolver(), name = %q.name, "DNS upstream failed: {why}");
            Outcome {
                bytes: q.answer(ResponseCode::ServFail, &[], Duration::ZERO),
                what: "upstream_error",
                rcode: "SERVFAIL",
                answers: 0,
            }
        }
    }
}

/// Keeps the addresses of the names services are named by: the question's
/// (all the addresses, through any CNAMEs) and each owner's own.
fn learn(table: &ServiceTable, q: &Query, answer: &Answer) {
    if answer.count == 0 {
        return;
    }
    let learned = table.learned();
    if table.knows_name(&q.name) {
        learned.record(&q.name, &answer.addresses(), answer.ttl);
    }
    for (owner, ips) in &answer.names {
        if *owner != q.name && table.knows_name(owner) {
            learned.record(owner, ips, answer.ttl);
        }
    }
}
