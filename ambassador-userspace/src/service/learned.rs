//! Names learned from the app's own DNS: which addresses the names that
//! services are named by resolved to, as the forwarder saw the answers,
//! until their TTL ends (at least `MIN_KEEP`: apps keep answers a while,
//! Java for 30 s, whatever the TTL says). Only names some service's
//! `match.host` names are kept, so the store stays small; it is bounded
//! anyway and outlives reloads (the table hands it on).

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use tokio::time::Instant;

/// The shortest time an answer is kept.
pub const MIN_KEEP: Duration = Duration::from_secs(60);
/// The longest: a day, whatever the TTL says.
const MAX_KEEP: Duration = Duration::from_secs(86_400);
/// (address, name) pairs kept at most.
pub const MAX_LEARNED: usize = 65_536;

#[derive(Debug, Clone)]
struct Entry {
    name: Arc<str>,
    until: Instant,
}

#[derive(Debug, Default)]
pub struct Learned {
    store: std::sync::RwLock<Store>,
}

#[derive(Debug, Default)]
struct Store {
    by_ip: HashMap<IpAddr, Vec<Entry>>,
    /// (address, name) pairs in `by_ip`.
    pairs: usize,
}

impl Learned {
    /// `name` (lowercase, no trailing dot) resolved to `ips` with `ttl`.
    pub fn record(&self, name: &str, ips: &[IpAddr], ttl: Duration) {
        if ips.is_empty() {
            return;
        }
        let now = Instant::now();
        let until = now + ttl.clamp(MIN_KEEP, MAX_KEEP);
        let name: Arc<str> = Arc::from(name);
        let mut store = crate::sync::write(&self.store);
        if store.pairs + ips.len() > MAX_LEARNED {
            store.prune(now);
        }
        for ip in ips {
            let entries = store.by_ip.entry(*ip).or_default();
            if let Some(e) = entries.iter_mut().find(|e| e.name == name) {
                e.until = e.until.max(until);
            } else if entries.len() < MAX_NAMES_PER_ADDRESS {
                entries.push(Entry {
                    name: name.clone(),
                    until,
                });
                store.pairs += 1;
            }
        }
    }

    /// The unexpired names `ip` was an answer for.
    pub fn names(&self, ip: IpAddr) -> Vec<Arc<str>> {
        let now = Instant::now();
        let store = crate::sync::read(&self.store);
        store
            .by_ip
            .get(&ip)
            .map(|v| {
                v.iter()
                    .filter(|e| e.until > now)
                    .map(|e| e.name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// (address, name) pairs held now (expired ones included until pruned).
    pub fn len(&self) -> usize {
        crate::sync::read(&self.store).pairs
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One address answers for a bounded number of names (a shared ingress
/// address may serve many; the first ones stay).
const MAX_NAMES_PER_ADDRESS: usize = 64;

impl Store {
    /// Drops what expired; if that is not enough, the soonest to expire
    /// half (rare: only names services name are learned).
    fn prune(&mut self, now: Instant) {
        self.keep_after(now);
        if self.pairs < MAX_LEARNED * 9 / 10 {
            return;
        }
        let mut untils: Vec<Instant> = self.by_ip.values().flatten().map(|e| e.until).collect();
        untils.sort_unstable();
        let cut = untils[untils.len() / 2];
        self.keep_after(cut);
    }

    fn keep_after(&mut self, t: Instant) {
        self.by_ip.retain(|_, v| {
            v.retain(|e| e.until > t);
            !v.is_empty()
        });
        self.pairs = self.by_ip.values().map(Vec::len).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn kept_for_the_ttl_but_at_least_a_minute() {
        let l = Learned::default();
        l.record(
            "db.test",
            &[ip("10.0.0.1"), ip("10.0.0.2")],
            Duration::from_secs(5),
        );
        l.record("api.test", &[ip("10.0.0.2")], Duration::from_secs(600));
        assert_eq!(&*l.names(ip("10.0.0.1"))[0], "db.test");
        assert_eq!(l.names(ip("10.0.0.2")).len(), 2);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(l.names(ip("10.0.0.1")).is_empty());
        let left = l.names(ip("10.0.0.2"));
        assert_eq!(left.len(), 1);
        assert_eq!(&*left[0], "api.test");
        // A new answer extends, never shortens.
        l.record("api.test", &[ip("10.0.0.2")], Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(l.names(ip("10.0.0.2")).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bounded() {
        let l = Learned::default();
        for i in 0..(MAX_LEARNED as u32 + 1000) {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.record(
                "wide.test",
                &[a],
                Duration::from_secs(60 + u64::from(i % 100)),
            );
        }
        assert!(l.len() <= MAX_LEARNED, "{}", l.len());
        assert!(l.len() > MAX_LEARNED / 3, "{}", l.len());
        // One address, many names: the first ones stay.
        for i in 0..100 {
            l.record(
                &format!("n{i}.test"),
                &[ip("10.9.9.9")],
                Duration::from_secs(60),
            );
        }
        assert_eq!(l.names(ip("10.9.9.9")).len(), 64);
    }
}
