//! One stored response: its head as served, its body, the RFC 9111 policy
//! that says when it may be reused, and what a stored response needs to
//! answer: its `Age`, a 304 to an app that has it already, its head
//! refreshed by an upstream's 304.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_cache_semantics::CachePolicy;

pub struct Entry {
    pub policy: CachePolicy,
    pub status: StatusCode,
    /// The upstream's head as the app gets it (hop-by-hop headers gone).
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Fresh until then; after, it may answer only revalidated (or, within
    /// `stale_if_error`, when the upstream fails).
    pub fresh_until: SystemTime,
    /// `must-revalidate`, `proxy-revalidate` or `no-cache`: never served
    /// stale, whatever the config says.
    pub strict: bool,
    /// The values of the request headers its `Vary` names, in order: two
    /// entries with the same are one variant.
    pub variant: Vec<Option<HeaderValue>>,
}

impl Entry {
    pub fn new(
        policy: CachePolicy,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        variant: Vec<Option<HeaderValue>>,
        now: SystemTime,
    ) -> Entry {
        let strict = directives(&headers).any(|d| {
            ["must-revalidate", "proxy-revalidate", "no-cache"]
                .iter()
                .any(|s| d.eq_ignore_ascii_case(s))
        });
        Entry {
            fresh_until: now + policy.time_to_live(now),
            policy,
            status,
            headers,
            body,
            strict,
            variant,
        }
    }

    /// Another entry for the same request headers its `Vary` names.
    pub fn same_variant(&self, other: &Entry) -> bool {
        self.variant == other.variant
            && self
                .headers
                .get_all(header::VARY)
                .iter()
                .eq(other.headers.get_all(header::VARY))
    }

    /// Bytes it takes (what `max_bytes` counts): body, and head roughly.
    pub fn weight(&self) -> u64 {
        let head: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        (self.body.len() + head + 256) as u64
    }

    /// An upstream validator the entry can be revalidated with.
    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(header::ETAG) || self.headers.contains_key(header::LAST_MODIFIED)
    }

    /// May answer when the upstream fails, `window` past its freshness.
    pub fn usable_stale(&self, window: Option<Duration>, now: SystemTime) -> bool {
        window.is_some_and(|w| !self.strict && now <= self.fresh_until + w)
    }

    /// The head it answers with now: its own, with its `Age`.
    pub fn head(&self, now: SystemTime) -> HeaderMap {
        let mut h = self.headers.clone();
        h.insert(
            header::AGE,
            HeaderValue::from(self.policy.age(now).as_secs()),
        );
        h
    }

    /// The app's conditional request is satisfied by this entry (RFC 9110
    /// §13.2.2: `If-None-Match`, weak comparison, decides when present;
    /// else `If-Modified-Since` against `Last-Modified`).
    pub fn not_modified_for(&self, request: &HeaderMap) -> bool {
        if request.contains_key(header::IF_NONE_MATCH) {
            let Some(etag) = self.headers.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
                return false;
            };
            let ours = weak(etag);
            return request
                .get_all(header::IF_NONE_MATCH)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim() == "*" || weak(t.trim()) == ours);
        }
        let date = |h: &HeaderMap, n| {
            h.get(n)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok())
        };
        match (
            date(request, header::IF_MODIFIED_SINCE),
            date(&self.headers, header::LAST_MODIFIED),
        ) {
            (Some(since), Some(modified)) => modified <= since,
            _ => false,
        }
    }

    /// The head after an upstream's 304 (RFC 9111 §3.2): each field the 304
    /// carries replaces the stored one, but for those that describe the
    /// stored body.
    pub fn freshened(&self, from_304: &HeaderMap) -> HeaderMap {
        let mut h = self.headers.clone();
        for name in from_304.keys() {
            if KEEP.contains(name) {
                continue;
            }
            h.remove(name);
            for v in from_304.get_all(name) {
                h.append(name.clone(), v.clone());
            }
        }
        h
    }
}

/// Fields a 304 does not replace: they describe the stored body (and
/// hop-by-hop ones, which a 304 passed on must not bring in).
const KEEP: [header::HeaderName; 8] = [
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
    header::TRANSFER_ENCODING,
    header::CONNECTION,
    header::TRAILER,
    header::UPGRADE,
    header::TE,
];

/// The entity tag without its weakness mark.
fn weak(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// The Cache-Control directive names of a head, lowercase-insensitive.
pub fn directives(h: &HeaderMap) -> impl Iterator<Item = &str> {
    h.get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.split('=').next().unwrap_or("").trim())
}

/// The values of the request headers a response's `Vary` names.
pub fn variant_of(response: &HeaderMap, request: &HeaderMap) -> Vec<Option<HeaderValue>> {
    vary_names(response)
        .map(|n| request.get(n).cloned())
        .collect()
}

/// The request headers a response's `Vary` names.
pub fn vary_names(h: &HeaderMap) -> impl Iterator<Item = &str> {
    h.get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};

    fn entry(resp: &[(&str, &str)], req: &[(&str, &str)]) -> Entry {
        let mut r = Response::builder().status(200);
        for (n, v) in resp {
            r = r.header(*n, *v);
        }
        let resp = r.body(()).unwrap();
        let mut q = Request::builder().uri("/a").header("host", "api");
        for (n, v) in req {
            q = q.header(*n, *v);
        }
        let req = q.body(()).unwrap();
        let now = SystemTime::now();
        let policy = CachePolicy::new_options(&req, &resp, now, Default::default());
        let headers = resp.headers().clone();
        let variant = variant_of(&headers, req.headers());
        Entry::new(
            policy,
            StatusCode::OK,
            headers,
            Bytes::from_static(b"x"),
            variant,
            now,
        )
    }

    fn asks(h: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in h {
            m.append(
                header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn conditionals_of_the_app() {
        let e = entry(
            &[
                ("etag", "W/\"v1\""),
                ("last-modified", "Mon, 07 Dec 2026 10:00:00 GMT"),
            ],
            &[],
        );
        for (h, yes) in [
            (vec![("if-none-match", "\"v1\"")], true),
            (vec![("if-none-match", "\"v0\", W/\"v1\"")], true),
            (vec![("if-none-match", "*")], true),
            (vec![("if-none-match", "\"v2\"")], false),
            // If-None-Match decides when both are given.
            (
                vec![
                    ("if-none-match", "\"v2\""),
                    ("if-modified-since", "Mon, 07 Dec 2026 11:00:00 GMT"),
                ],
                false,
            ),
            (
                vec![("if-modified-since", "Mon, 07 Dec 2026 11:00:00 GMT")],
                true,
            ),
            (
                vec![("if-modified-since", "Mon, 07 Dec 2026 09:00:00 GMT")],
                false,
            ),
            (vec![("if-modified-since", "yesterday")], false),
        ] {
            assert_eq!(e.not_modified_for(&asks(&h)), yes, "{h:?}");
        }
    }

    #[test]
    fn heads_strictness_variants_and_304_merges() {
        let e = entry(
            &[
                ("cache-control", "max-age=60, must-revalidate"),
                ("vary", "accept-encoding, X-Tenant"),
                ("content-length", "1"),
                ("link", "</a>"),
                ("link", "</b>"),
            ],
            &[("x-tenant", "t1")],
        );
        assert!(e.strict);
        assert_eq!(e.variant, vec![None, Some(HeaderValue::from_static("t1"))]);
        let now = SystemTime::now();
        assert!(!e.usable_stale(Some(Duration::from_secs(60)), now));
        assert_eq!(e.head(now + Duration::from_secs(5))[header::AGE], "5");
        assert_eq!(e.head(now).get_all("link").iter().count(), 2);
        let merged = e.freshened(&asks(&[
            ("cache-control", "max-age=120"),
            ("content-length", "0"),
            ("link", "</c>"),
        ]));
        assert_eq!(merged[header::CACHE_CONTROL], "max-age=120");
        assert_eq!(merged[header::CONTENT_LENGTH], "1");
        assert_eq!(merged.get_all("link").iter().count(), 1);
        let lax = entry(&[("cache-control", "max-age=0")], &[]);
        assert!(lax.usable_stale(Some(Duration::from_secs(60)), now));
        assert!(!lax.usable_stale(None, now));
        assert!(!lax.has_validator());
    }
}
