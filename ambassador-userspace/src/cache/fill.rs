//! A response being stored while it streams to the app: its body's frames
//! are kept (shared, not copied) up to `max_entry_bytes` and stored when it
//! ends whole; too large, trailers, an error or the app leaving, and
//! nothing is. Requests waiting for this fetch wake either way.

use std::{sync::Arc, time::SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_cache_semantics::CachePolicy;

use super::{Cache, Lead, entry::Entry, key::Key};

pub struct Fill {
    cache: Arc<Cache>,
    key: Key,
    policy: CachePolicy,
    status: StatusCode,
    headers: HeaderMap,
    variant: Vec<Option<HeaderValue>>,
    now: SystemTime,
    chunks: Vec<Bytes>,
    len: u64,
    /// Held to the end, so those waiting find the entry when they wake.
    _lead: Option<Lead>,
}

/// What a response is stored as, but for its body.
pub struct Stored {
    pub policy: CachePolicy,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub variant: Vec<Option<HeaderValue>>,
    pub now: SystemTime,
}

impl Fill {
    pub fn new(cache: Arc<Cache>, key: Key, s: Stored, lead: Option<Lead>) -> Fill {
        Fill {
            cache,
            key,
            policy: s.policy,
            status: s.status,
            headers: s.headers,
            variant: s.variant,
            now: s.now,
            chunks: Vec::new(),
            len: 0,
            _lead: lead,
        }
    }

    /// Keeps a data frame; false once the body is too large to store.
    pub fn data(&mut self, d: &Bytes) -> bool {
        self.len += d.len() as u64;
        if self.len > self.cache.config.max_entry_bytes {
            return false;
        }
        if !d.is_empty() {
            self.chunks.push(d.clone());
        }
        true
    }

    /// The body ended whole: it is stored (before those waiting wake).
    pub fn end(self) {
        let Fill {
            cache,
            key,
            policy,
            status,
            headers,
            variant,
            now,
            mut chunks,
            len,
            _lead,
        } = self;
        let body = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.pop().unwrap_or_default(),
            _ => {
                // One copy, once per stored response: hits share it.
                let mut b = BytesMut::with_capacity(len as usize);
                for c in &chunks {
                    b.extend_from_slice(c);
                }
                b.freeze()
            }
        };
        cache.insert(key, Entry::new(policy, status, headers, body, variant, now));
    }
}
