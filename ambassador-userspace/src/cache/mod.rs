//! The response cache of an HTTP service (or route): a shared cache by RFC
//! 9111, whose rules (storable, fresh, matching `Vary`, revalidation) are
//! http-cache-semantics's, in a store bounded by bytes (quick_cache, which
//! evicts the least valuable first). Concurrent misses for one key make one
//! upstream request: the first leads, the others wait for what it stores.
//!
//! [`key`] is what the cache sees of a request, [`plan`] what it does with
//! it, [`entry`] a stored response, [`fill`] a response being stored as it
//! streams to the app.

pub mod entry;
pub mod fill;
pub mod key;
pub mod plan;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use http::{HeaderMap, HeaderValue, StatusCode, header, response::Parts};
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy, ResponseLike};
use tokio::sync::watch;

use crate::{config::cache::CacheConfig, metrics::CacheMetrics};
use entry::Entry;
use key::{Key, PolicyRequest};
use plan::Found;

/// Variants of one key kept at most (by `Vary`); the newest stay.
const MAX_VARIANTS: usize = 8;

/// The entries of one key, one per variant, newest first.
#[derive(Clone)]
pub struct Variants {
    list: Vec<Arc<Entry>>,
    weight: u64,
}

#[derive(Clone)]
struct Weigh;

impl quick_cache::Weighter<Key, Arc<Variants>> for Weigh {
    fn weight(&self, key: &Key, v: &Arc<Variants>) -> u64 {
        v.weight + key.len() as u64
    }
}

/// Counts what the store evicts.
#[derive(Clone)]
struct Evictions(prometheus_client::metrics::counter::Counter);

impl quick_cache::Lifecycle<Key, Arc<Variants>> for Evictions {
    type RequestState = ();
    fn on_evict(&self, _: &mut (), _: Key, _: Arc<Variants>) {
        self.0.inc();
    }
}

type Store = quick_cache::sync::Cache<
    Key,
    Arc<Variants>,
    Weigh,
    std::collections::hash_map::RandomState,
    Evictions,
>;

pub struct Cache {
    /// The service it belongs to, as configured: a reload that leaves it
    /// unchanged keeps this cache ([`Cache::shared`]).
    owner: Box<crate::config::service::ServiceConfig>,
    route: u32,
    store: Store,
    /// Keys a request is fetching now, and how the others learn it is done.
    pending: Mutex<HashMap<Key, watch::Receiver<()>>>,
    pub config: CacheConfig,
    options: CacheOptions,
    pub metrics: CacheMetrics,
}

/// Whose turn it is to fetch a key.
pub enum Turn {
    Lead(Lead),
    /// Another request is fetching it: wait for it to end (`changed()`
    /// returns once it has stored its response or given up).
    Follow(watch::Receiver<()>),
}

/// The one request fetching a key; the others wake when it goes.
pub struct Lead {
    cache: Arc<Cache>,
    key: Key,
    _done: watch::Sender<()>,
}

impl Drop for Lead {
    fn drop(&mut self) {
        // Out of the map before the sender goes: a request arriving now
        // leads a fetch of its own rather than waiting for one that ended.
        crate::sync::lock(&self.cache.pending).remove(&self.key);
    }
}

/// The caches in use, so a reload finds the one it may keep.
static LIVE: Mutex<Vec<std::sync::Weak<Cache>>> = Mutex::new(Vec::new());

impl Cache {
    /// The cache of `owner` (and its route `route`, 0 for the service's):
    /// the one already in use when the service's config is unchanged (a
    /// reload keeps what is stored), else a new, empty one.
    pub fn shared(
        cfg: CacheConfig,
        owner: &crate::config::service::ServiceConfig,
        route: u32,
    ) -> Arc<Cache> {
        let mut live = crate::sync::lock(&LIVE);
        live.retain(|w| w.strong_count() > 0);
        let same = live
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|c| c.route == route && c.config == cfg && *c.owner == *owner);
        if let Some(c) = same {
            return c;
        }
        let c = Arc::new(Cache::new(cfg, owner, route));
        live.push(Arc::downgrade(&c));
        c
    }

    fn new(cfg: CacheConfig, owner: &crate::config::service::ServiceConfig, route: u32) -> Cache {
        let service = owner.name.as_str();
        let metrics = crate::metrics::get().cache(service);
        // quick_cache splits its bound among shards: each must hold several
        // of the largest entries.
        let shards = (cfg.max_bytes / cfg.max_entry_bytes / 8).clamp(1, 16) as usize;
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity((cfg.max_bytes / 4096).clamp(16, 1 << 20) as usize)
            .weight_capacity(cfg.max_bytes)
            .shards(shards)
            .build()
            .expect("capacities are set");
        Cache {
            owner: Box::new(owner.clone()),
            route,
            store: Store::with_options(
                options,
                Weigh,
                Default::default(),
                Evictions(metrics.evicted.clone()),
            ),
            pending: Mutex::default(),
            options: CacheOptions {
                shared: true,
                // No heuristic freshness: `default_ttl` is the only one.
                cache_heuristic: 0.0,
                immutable_min_time_to_live: std::time::Duration::ZERO,
                ignore_cargo_cult: false,
            },
            config: cfg,
            metrics,
        }
    }

    /// The entry for a request, if one matches (its `Vary` included).
    pub fn find(&self, key: &Key, req: &PolicyRequest<'_>, now: SystemTime) -> Found {
        let Some(variants) = self.store.get(key) else {
            return Found::None;
        };
        let mut stale = None;
        for e in &variants.list {
            match e.policy.before_request(req, now) {
                BeforeRequest::Fresh(_) => return Found::Fresh(e.clone()),
                BeforeRequest::Stale { matches: true, .. } if stale.is_none() => {
                    stale = Some(e.clone());
                }
                BeforeRequest::Stale { .. } => {}
            }
        }
        match stale {
            Some(e) if e.has_validator() || self.config.stale_if_error.is_some() => Found::Stale(e),
            _ => Found::None,
        }
    }

    /// Leads the fetch of `key`, or follows the one under way.
    pub fn turn(self: &Arc<Self>, key: &Key) -> Turn {
        let mut pending = crate::sync::lock(&self.pending);
        if let Some(rx) = pending.get(key) {
            return Turn::Follow(rx.clone());
        }
        let (tx, rx) = watch::channel(());
        pending.insert(key.clone(), rx);
        Turn::Lead(Lead {
            cache: self.clone(),
            key: key.clone(),
            _done: tx,
        })
    }

    /// The policy to store a response under, if it may be stored at all:
    /// RFC 9111's rules, and ours (no partial content, no `Set-Cookie`, no
    /// `Vary: *`, not over `max_entry_bytes`, and either fresh for a while
    /// or revalidatable).
    pub fn admit(
        &self,
        req: &PolicyRequest<'_>,
        head: &Parts,
        now: SystemTime,
    ) -> Option<CachePolicy> {
        let h = &head.headers;
        if head.status == StatusCode::PARTIAL_CONTENT
            || h.contains_key(header::SET_COOKIE)
            || entry::vary_names(h).any(|n| n == "*")
            || length(h).is_some_and(|n| n > self.config.max_entry_bytes)
        {
            return None;
        }
        let seen = Seen {
            status: head.status,
            headers: self.with_default_ttl(h),
        };
        let policy = CachePolicy::new_options(req, &seen, now, self.options);
        let revalidatable = h.contains_key(header::ETAG) || h.contains_key(header::LAST_MODIFIED);
        let useful = !policy.time_to_live(now).is_zero() || revalidatable;
        (policy.is_storable() && useful).then_some(policy)
    }

    /// The head the rules judge: the upstream's, with `default_ttl` as its
    /// `max-age` when it gives no freshness of its own.
    fn with_default_ttl(&self, h: &HeaderMap) -> HeaderMap {
        let mut h = h.clone();
        let Some(ttl) = self.config.default_ttl else {
            return h;
        };
        let explicit = h.contains_key(header::EXPIRES)
            || entry::directives(&h)
                .any(|d| d.eq_ignore_ascii_case("max-age") || d.eq_ignore_ascii_case("s-maxage"));
        if !explicit {
            h.append(
                header::CACHE_CONTROL,
                HeaderValue::from_str(&format!("max-age={}", ttl.as_secs().max(1)))
                    .expect("digits"),
            );
        }
        h
    }

    /// Stores `entry` as its key's variant (replacing the same variant).
    pub fn insert(&self, key: Key, entry: Entry) {
        let entry = Arc::new(entry);
        let mut list = self
            .store
            .get(&key)
            .map(|v| v.list.clone())
            .unwrap_or_default();
        list.retain(|e| !e.same_variant(&entry));
        list.insert(0, entry);
        list.truncate(MAX_VARIANTS);
        let weight = list.iter().map(|e| e.weight()).sum();
        self.store.insert(key, Arc::new(Variants { list, weight }));
        self.metrics.stored.inc();
    }

    /// Forgets a key (its entry can no longer answer).
    pub fn remove(&self, key: &Key) {
        self.store.remove(key);
    }

    /// Bytes and entries held now.
    pub fn held(&self) -> (u64, usize) {
        (self.store.weight(), self.store.len())
    }
}

/// A Content-Length, when the head gives one.
fn length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A response head as the rules see it.
struct Seen {
    status: StatusCode,
    headers: HeaderMap,
}

impl ResponseLike for Seen {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
