//! What the cache sees of a request: whether it is one to look up at all,
//! its key, and the request the RFC 9111 rules judge (with credentials
//! replaced by their digests, so no secret is kept in the cache).

use std::borrow::Cow;

use http::{
    HeaderMap, HeaderValue, Method, Request, Uri,
    header::{self, HeaderName},
};
use http_cache_semantics::RequestLike;

/// Headers whose values are credentials: the cache keeps only their
/// SHA-256, never the value.
const SECRET: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
];

/// Stored responses are found by this: the route (a service's routes may
/// send one URL to different places), the app's host, path and query, and
/// the digest of the app's own `Authorization`, so one caller's
/// authenticated answer is never another's.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key(Box<[u8]>);

impl Key {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// How a request meets the cache.
#[derive(Debug, PartialEq, Eq)]
pub enum Ask {
    /// Not the cache's: it goes to the upstream as it is and nothing of it
    /// is stored (why, for the access log's `cache` field).
    Bypass(&'static str),
    Lookup(Lookup),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Lookup {
    pub key: Key,
    /// HEAD: answered from a stored GET, never stored itself.
    pub head: bool,
    /// The app asks conditionally (`If-None-Match`, `If-Modified-Since`).
    pub conditional: bool,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The digest part is binary; the rest is the app's own target.
        write!(f, "Key({} bytes)", self.0.len())
    }
}

/// Classifies a request; `route` tells the service's routes apart (0: none
/// matched).
pub fn ask<B>(req: &Request<B>, route: u32) -> Ask {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return Ask::Bypass("method"),
    };
    let h = req.headers();
    // Ranges and preconditions other than revalidation are the upstream's.
    if h.contains_key(header::RANGE)
        || h.contains_key(header::IF_MATCH)
        || h.contains_key(header::IF_UNMODIFIED_SINCE)
        || h.contains_key(header::IF_RANGE)
        || h.contains_key(header::UPGRADE)
    {
        return Ask::Bypass("precondition");
    }
    let conditional =
        h.contains_key(header::IF_NONE_MATCH) || h.contains_key(header::IF_MODIFIED_SINCE);
    let host = host(req).unwrap_or_default();
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut k = Vec::with_capacity(4 + host.len() + target.len() + 2 + 32);
    k.extend_from_slice(&route.to_be_bytes());
    k.extend_from_slice(host.as_bytes());
    k.push(0);
    k.extend_from_slice(target.as_bytes());
    k.push(0);
    for v in h.get_all(header::AUTHORIZATION) {
        k.extend_from_slice(digest(v.as_bytes()).as_ref());
    }
    Ask::Lookup(Lookup {
        key: Key(k.into_boxed_slice()),
        head,
        conditional,
    })
}

/// The app's host: the URI's authority (HTTP/2, absolute form), else Host.
fn host<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    })
}

fn digest(v: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, v)
}

/// The request as the RFC 9111 rules see it: a GET of the path and query,
/// Host set from either spelling, credentials as digests, and an
/// `Authorization` the ambassador adds on the way counted as one (RFC 9111
/// §3.5: then only responses marked public, s-maxage or must-revalidate are
/// stored). Borrowed as it is where nothing needs changing.
pub struct PolicyRequest<'a> {
    uri: Cow<'a, Uri>,
    headers: Cow<'a, HeaderMap>,
}

impl<'a> PolicyRequest<'a> {
    pub fn new<B>(req: &'a Request<B>, adds_authorization: bool) -> PolicyRequest<'a> {
        let origin_form = req.uri().authority().is_none();
        let uri = if origin_form {
            Cow::Borrowed(req.uri())
        } else {
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            Cow::Owned(target.parse().unwrap_or_default())
        };
        let h = req.headers();
        let secret = SECRET.iter().any(|n| h.contains_key(n));
        let needs_host = !h.contains_key(header::HOST);
        let needs_auth = adds_authorization && !h.contains_key(header::AUTHORIZATION);
        if !secret && !needs_host && !needs_auth {
            return PolicyRequest {
                uri,
                headers: Cow::Borrowed(h),
            };
        }
        let mut headers = h.clone();
        for name in &SECRET {
            let digests: Vec<HeaderValue> = headers
                .get_all(name)
                .iter()
                .map(|v| hex(digest(v.as_bytes()).as_ref()))
                .collect();
            headers.remove(name);
            for d in digests {
                headers.append(name.clone(), d);
            }
        }
        if needs_host && let Some(v) = host(req).and_then(|a| HeaderValue::from_str(a).ok()) {
            headers.insert(header::HOST, v);
        }
        if needs_auth {
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_static("(added by the ambassador)"),
            );
        }
        PolicyRequest {
            uri,
            headers: Cow::Owned(headers),
        }
    }
}

fn hex(d: &[u8]) -> HeaderValue {
    use std::fmt::Write;
    let mut s = String::with_capacity(d.len() * 2);
    for b in d {
        let _ = write!(s, "{b:02x}");
    }
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("-"))
}

impl RequestLike for PolicyRequest<'_> {
    fn uri(&self) -> Uri {
        self.uri.as_ref().clone()
    }

    fn is_same_uri(&self, other: &Uri) -> bool {
        self.uri.as_ref() == other
    }

    fn method(&self) -> &Method {
        // A HEAD is answered from, and revalidates, the GET's response.
        &Method::GET
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    fn key(r: &Request<()>, route: u32) -> Key {
        match ask(r, route) {
            Ask::Lookup(l) => l.key,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn which_requests_the_cache_takes() {
        let host = [("host", "api")];
        assert_eq!(ask(&req("POST", "/a", &host), 0), Ask::Bypass("method"));
        for h in ["range", "if-match", "if-unmodified-since", "if-range"] {
            let r = req("GET", "/a", &[("host", "api"), (h, "x")]);
            assert_eq!(ask(&r, 0), Ask::Bypass("precondition"), "{h}");
        }
        let Ask::Lookup(l) = ask(&req("HEAD", "/a", &[("if-none-match", "\"1\"")]), 0) else {
            panic!()
        };
        assert!(l.head && l.conditional);
    }

    #[test]
    fn keys_part_routes_hosts_targets_and_callers() {
        let plain = key(&req("GET", "/a?x=1", &[("host", "api")]), 0);
        // HTTP/2's absolute form and HTTP/1.1's Host are one key.
        assert!(plain == key(&req("GET", "http://api/a?x=1", &[]), 0));
        assert!(plain == key(&req("HEAD", "/a?x=1", &[("host", "api")]), 0));
        for other in [
            key(&req("GET", "/a?x=1", &[("host", "api")]), 2),
            key(&req("GET", "/a?x=2", &[("host", "api")]), 0),
            key(&req("GET", "/a?x=1", &[("host", "web")]), 0),
            key(
                &req("GET", "/a?x=1", &[("host", "api"), ("authorization", "u1")]),
                0,
            ),
        ] {
            assert!(plain != other);
        }
        let u1 = key(
            &req("GET", "/a", &[("host", "api"), ("authorization", "u1")]),
            0,
        );
        let u2 = key(
            &req("GET", "/a", &[("host", "api"), ("authorization", "u2")]),
            0,
        );
        assert!(u1 != u2);
        // The credential itself is not in the key.
        assert!(!u1.0.windows(2).any(|w| w == b"u1"));
    }

    #[test]
    fn the_judged_request_holds_digests_and_added_credentials() {
        let r = req("GET", "/a", &[("host", "api")]);
        let p = PolicyRequest::new(&r, false);
        assert!(matches!(p.headers, Cow::Borrowed(_)));
        let p = PolicyRequest::new(&r, true);
        assert!(p.headers().contains_key(header::AUTHORIZATION));
        let r = req(
            "GET",
            "http://api/a",
            &[("authorization", "Bearer s3cret"), ("cookie", "sid=42")],
        );
        let p = PolicyRequest::new(&r, true);
        let text = format!("{:?}", p.headers());
        assert!(
            !text.contains("s3cret") && !text.contains("sid=42"),
            "{text}"
        );
        assert_eq!(p.headers()[header::HOST], "api");
        assert_eq!(p.uri(), "/a");
        assert_eq!(RequestLike::method(&p), Method::GET);
    }
}
