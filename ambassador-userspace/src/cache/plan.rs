//! What the cache does with one request, decided from what it holds before
//! anything is sent: a plain value the HTTP step acts on with one `match`.

use std::sync::Arc;

use http::HeaderMap;

use super::{entry::Entry, key::Lookup};

/// What the store holds for a request.
pub enum Found {
    None,
    /// Reusable as it is (RFC 9111 §4: fresh, matching, not refused by the
    /// request's own directives).
    Fresh(Arc<Entry>),
    /// Matching, but it must be revalidated first.
    Stale(Arc<Entry>),
}

pub enum Plan {
    /// Answer from the entry; nothing is sent.
    Hit(Arc<Entry>),
    /// The app already has the entry's version (its own conditional): 304.
    NotModified(Arc<Entry>),
    /// To the upstream, and store what comes back if it may be stored;
    /// `stale` is revalidated (its validators sent) and answers if the
    /// upstream fails within `stale_if_error`.
    Fetch { stale: Option<Arc<Entry>> },
    /// To the upstream as it is; nothing stored (the reason is the access
    /// log's `cache`).
    Bypass(&'static str),
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plan::Hit(_) => f.write_str("Hit"),
            Plan::NotModified(_) => f.write_str("NotModified"),
            Plan::Fetch { stale } => write!(f, "Fetch(stale: {})", stale.is_some()),
            Plan::Bypass(why) => write!(f, "Bypass({why})"),
        }
    }
}

/// The plan for a request the cache may take (`lookup`), given what the
/// store holds and the request's headers.
pub fn plan(lookup: &Lookup, found: Found, request: &HeaderMap) -> Plan {
    match found {
        Found::Fresh(e) if lookup.conditional && e.not_modified_for(request) => {
            Plan::NotModified(e)
        }
        Found::Fresh(e) => Plan::Hit(e),
        // The app's own validators are for its copy, not ours; a HEAD
        // cannot bring a body to store: the upstream answers those.
        _ if lookup.conditional => Plan::Bypass("conditional"),
        _ if lookup.head => Plan::Bypass("head"),
        Found::Stale(e) => Plan::Fetch { stale: Some(e) },
        Found::None => Plan::Fetch { stale: None },
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use bytes::Bytes;
    use http::{HeaderValue, Request, Response, StatusCode, header};
    use http_cache_semantics::CachePolicy;

    use super::*;
    use crate::cache::key::{Ask, ask};

    fn entry() -> Arc<Entry> {
        let req = Request::get("/a").header("host", "api").body(()).unwrap();
        let resp = Response::builder()
            .header("etag", "\"v1\"")
            .header("cache-control", "max-age=60")
            .body(())
            .unwrap();
        let now = SystemTime::now();
        let policy = CachePolicy::new_options(&req, &resp, now, Default::default());
        let h = resp.headers().clone();
        Arc::new(Entry::new(
            policy,
            StatusCode::OK,
            h,
            Bytes::new(),
            vec![],
            now,
        ))
    }

    fn lookup(method: &str, conditional: Option<&str>) -> (Lookup, HeaderMap) {
        let mut b = Request::builder()
            .method(method)
            .uri("/a")
            .header("host", "api");
        if let Some(tag) = conditional {
            b = b.header(header::IF_NONE_MATCH, HeaderValue::from_str(tag).unwrap());
        }
        let r = b.body(()).unwrap();
        let Ask::Lookup(l) = ask(&r, 0) else { panic!() };
        (l, r.headers().clone())
    }

    #[test]
    fn plans() {
        let e = entry;
        let cases: Vec<(&str, Option<&str>, Found, &str)> = vec![
            ("GET", None, Found::None, "Fetch(stale: false)"),
            ("GET", None, Found::Fresh(e()), "Hit"),
            ("GET", None, Found::Stale(e()), "Fetch(stale: true)"),
            ("HEAD", None, Found::Fresh(e()), "Hit"),
            ("HEAD", None, Found::Stale(e()), "Bypass(head)"),
            ("HEAD", None, Found::None, "Bypass(head)"),
            ("GET", Some("\"v1\""), Found::Fresh(e()), "NotModified"),
            ("GET", Some("\"v0\""), Found::Fresh(e()), "Hit"),
            (
                "GET",
                Some("\"v1\""),
                Found::Stale(e()),
                "Bypass(conditional)",
            ),
            ("GET", Some("\"v1\""), Found::None, "Bypass(conditional)"),
            ("HEAD", Some("\"v1\""), Found::Fresh(e()), "NotModified"),
        ];
        for (method, cond, found, want) in cases {
            let (l, h) = lookup(method, cond);
            let got = format!("{:?}", plan(&l, found, &h));
            assert_eq!(got, want, "{method} {cond:?}");
        }
    }
}
