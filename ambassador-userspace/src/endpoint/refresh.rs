//! Endpoints named by host: each address the name resolves to is an
//! endpoint of its own (balanced, ejected, checked and counted on its own),
//! and the name is looked up again when its answer's TTL runs out, within
//! the service's `upstream.dns` bounds. Kubernetes headless services (one
//! name, an A record per ready Pod) are endpoint sets this way.
//!
//! Decide, then act: `plan` computes the next list as a plain value from
//! the current one and an answer; `EndpointSet::resolved` makes it so. An
//! address still answered keeps its `Arc<Endpoint>` (health, ejections,
//! counters); one no longer answered leaves the list, and lives on while a
//! connection holds it, so nothing live is cut. A name that fails to
//! resolve, or answers nothing, keeps its last addresses.

use std::{
    future::Future,
    net::IpAddr,
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use tracing::{debug, info, warn};

use super::{
    Endpoint, EndpointSet,
    lookup::{self, Answer, LookupError},
};
use crate::config::service::EndpointDns;

/// What an endpoint is to `plan`: its entry in `upstream.endpoints`, and
/// its own address (none: a literal, or a name not resolved yet).
pub type Key = (usize, Option<IpAddr>);

/// One endpoint of the next list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The current list's endpoint at this index, as it is.
    Keep(usize),
    /// A new endpoint for this address of the entry's name.
    New(IpAddr),
}

/// The next list after entry `source`'s name resolved to `ips`; none when
/// nothing changes (no addresses, or the same ones). Other entries'
/// endpoints are kept; the entry's own become one per address (its
/// unresolved stand-in goes), in address order, whatever order the answer
/// came in (servers rotate it).
pub fn plan(current: &[Key], source: usize, ips: &[IpAddr]) -> Option<Vec<Slot>> {
    if ips.is_empty() {
        return None;
    }
    let mut wanted: Vec<IpAddr> = ips.to_vec();
    wanted.sort();
    wanted.dedup();
    let mine = |(s, _): &Key| *s == source;
    let unchanged = current.iter().filter(|k| mine(k)).count() == wanted.len()
        && wanted
            .iter()
            .all(|ip| current.contains(&(source, Some(*ip))));
    if unchanged {
        return None;
    }
    let others = current
        .iter()
        .enumerate()
        .filter(|(_, k)| !mine(k))
        .map(|(i, _)| Slot::Keep(i));
    let own =
        wanted.iter().map(
            |ip| match current.iter().position(|k| *k == (source, Some(*ip))) {
                Some(i) => Slot::Keep(i),
                None => Slot::New(*ip),
            },
        );
    Some(others.chain(own).collect())
}

/// How long to wait before looking a name up again: its answer's TTL
/// within the bounds; a failed lookup, or an answer without a TTL (the
/// hosts file), waits the shortest.
pub fn next_lookup(ttl: Option<Duration>, dns: &EndpointDns) -> Duration {
    ttl.unwrap_or(dns.min_ttl).clamp(dns.min_ttl, dns.max_ttl)
}

/// What a new list changed, for the log.
#[derive(Debug)]
pub struct Change {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl EndpointSet {
    /// Entry `source`'s name now resolves to `ips`: the list becomes
    /// `plan`'s. Returns what changed, if anything did.
    pub fn resolved(&self, source: usize, ips: &[IpAddr]) -> Option<Change> {
        let cfg = self.config.get(source)?;
        let _one = crate::sync::lock(&self.swap);
        let current = self.endpoints.load_full();
        let keys: Vec<Key> = current.iter().map(|e| (e.source, e.ip)).collect();
        let slots = plan(&keys, source, ips)?;
        let mut next: Vec<Arc<Endpoint>> = slots
            .iter()
            .filter_map(|s| match s {
                Slot::Keep(i) => current.get(*i).cloned(),
                Slot::New(ip) => Some(Arc::new(Endpoint::new(
                    &self.service,
                    source,
                    cfg,
                    Some(*ip),
                ))),
            })
            .collect();
        // Stable: entries in config order within a priority, as at start.
        next.sort_by_key(|e| (e.priority, e.source));
        let absent =
            |list: &[Arc<Endpoint>], e: &Arc<Endpoint>| !list.iter().any(|x| Arc::ptr_eq(x, e));
        let change = Change {
            added: next
                .iter()
                .filter(|e| absent(&current, e))
                .map(|e| e.label().to_string())
                .collect(),
            removed: current
                .iter()
                .filter(|e| absent(&next, e))
                .map(|e| e.label().to_string())
                .collect(),
        };
        self.endpoints.store(Arc::new(next));
        self.generation.fetch_add(1, Ordering::Release);
        Some(change)
    }
}

impl EndpointSet {
    /// Starts from the addresses `previous` (the set this one replaces on a
    /// reload) had for the same names, so the new set balances over them at
    /// once; its own lookups follow in the background.
    pub fn adopt(&self, previous: &EndpointSet) {
        let old = previous.endpoints();
        for (source, cfg) in self.config.iter().enumerate() {
            let ips: Vec<IpAddr> = old
                .iter()
                .filter(|e| e.address == cfg.address)
                .filter_map(|e| e.ip)
                .collect();
            self.resolved(source, &ips);
        }
    }
}

/// Keeps every entry of `set` that is named by host resolved, while the set
/// lives (a reload's new set has tasks of its own).
pub fn spawn(set: &Arc<EndpointSet>) {
    for (source, e) in set.config.iter().enumerate() {
        if e.address.host.parse::<IpAddr>().is_ok() {
            continue;
        }
        let set = Arc::downgrade(set);
        tokio::spawn(keep_resolved(set, source, |host: String| async move {
            lookup::lookup(&host).await
        }));
    }
}

/// Looks entry `source`'s name up with `lookup` now and whenever its answer
/// runs out, until the set is gone.
async fn keep_resolved<F, Fut>(set: Weak<EndpointSet>, source: usize, lookup: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<Answer, LookupError>>,
{
    let mut failing = false;
    loop {
        // Not held while waiting: a reload may take the set away.
        let Some((host, dns)) = set
            .upgrade()
            .and_then(|s| Some((s.config.get(source)?.address.host.clone(), s.dns)))
        else {
            return;
        };
        let result = lookup(host.clone()).await;
        let Some(s) = set.upgrade() else { return };
        let ttl = match result {
            Ok(answer) => {
                failing = false;
                if let Some(c) = s.resolved(source, &answer.ips) {
                    info!(service = %s.service, name = %host, added = ?c.added, removed = ?c.removed, "endpoint addresses changed");
                }
                answer.ttl
            }
            Err(e) if !failing => {
                failing = true;
                warn!(service = %s.service, name = %host, "endpoint name did not resolve ({e}); keeping its last addresses");
                None
            }
            Err(e) => {
                debug!(service = %s.service, name = %host, "endpoint name still does not resolve ({e})");
                None
            }
        };
        drop(s);
        tokio::time::sleep(next_lookup(ttl, &dns)).await;
    }
}

#[cfg(test)]
#[path = "refresh_tests.rs"]
mod tests;
