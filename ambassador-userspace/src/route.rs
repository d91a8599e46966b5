//! An HTTP service's routes at run time: compiled once per config, then for
//! each request a [`Decision`] (a plain value, table-tested without sockets)
//! that the server acts on with one `match`; a forwarding route's changes to
//! the request and to the response. Also what a normal path is, for every
//! rule that matches paths (inbound access rules too).

use std::{
    borrow::Cow,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Uri,
    header::{CONTENT_TYPE, LOCATION},
    request::Parts,
    uri::{Authority, PathAndQuery},
};
use http_body_util::Full;
use regex::Regex;

use crate::{
    config::cache::RouteCache,
    config::route::{PathCond, RouteAction, RouteConfig, ValueMatch, anchored},
    ratelimit::Limiter,
};

/// A service's routes, in order.
#[derive(Default)]
pub struct Routes {
    list: Vec<Route>,
    /// Some route matches on paths: a path another server could read as a
    /// different one is refused before any route is tried.
    paths_matter: bool,
}

pub struct Route {
    pub name: String,
    matcher: Matcher,
    pub action: RouteAction,
    rewrite: Rewrite,
    request_headers: Ops,
    response_headers: Ops,
    pub timeout: Option<Duration>,
    limiter: Option<Limiter>,
    /// Another service to send to, by name.
    pub upstream: Option<String>,
    /// Where its forwarded requests are cached.
    pub caching: Caching,
    /// Its place in the list, from 1 (tells the service's routes apart in
    /// cache keys).
    pub number: u32,
    /// REST/JSON made into gRPC calls (`transcode:`).
    pub transcoder: Option<crate::transcode::Transcoder>,
}

/// A route's response cache: its service's, none, or its own.
pub enum Caching {
    Service,
    Off,
    Own(std::sync::Arc<crate::cache::Cache>),
}

struct Matcher {
    path: PathMatcher,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, Value)>,
    query: Vec<(String, Value)>,
}

enum PathMatcher {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

enum Value {
    Present,
    Exact(String),
    Regex(Regex),
}

#[derive(Default)]
struct Rewrite {
    /// (the matched prefix, what replaces it)
    path_prefix: Option<(String, String)>,
    path_regex: Option<(Regex, String)>,
    host: Option<(HeaderValue, Authority)>,
    add_query: Vec<(String, String)>,
    remove_query: Vec<String>,
}

#[derive(Default)]
struct Ops {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

/// What a request gets from its service's routes.
#[derive(Debug)]
pub enum Decision<'a> {
    /// No route matched: the service's own policy.
    Service,
    /// Routes match on paths and this one is not in normal form: 400.
    NotNormal,
    Forward(&'a Route),
    /// 403 naming the route.
    Deny(&'a Route),
    /// The route's own answer (direct response or redirect).
    Respond(&'a Route),
    /// 429: the route's bucket is empty for this long.
    Limited(&'a Route, Duration),
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Routes {
    /// Compiles a service's routes (the config already checked them).
    /// Compiles a service's routes (the config already checked them); the
    /// service (`owner`: none for an inbound port's) owns their caches.
    /// Fails only on what the config names outside itself (a transcoding
    /// route's descriptor set).
    pub fn new(
        cfg: &[RouteConfig],
        owner: Option<&crate::config::service::ServiceConfig>,
    ) -> Result<Routes, String> {
        let list: Vec<Route> = cfg
            .iter()
            .enumerate()
            .map(|(i, r)| Route::new(i, r, owner))
            .collect::<Result<_, _>>()?;
        let paths_matter = list
            .iter()
            .any(|r| !matches!(r.matcher.path, PathMatcher::Any));
        Ok(Routes { list, paths_matter })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The routes' own response caches.
    pub fn caches(&self) -> impl Iterator<Item = &std::sync::Arc<crate::cache::Cache>> {
        self.list.iter().filter_map(|r| match &r.caching {
            Caching::Own(c) => Some(c),
            _ => None,
        })
    }

    /// The first route that matches decides; its rate limit is taken from
    /// here (at `now`), so a refused request costs no upstream work.
    pub fn decide(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        now: Instant,
    ) -> Decision<'_> {
        if self.list.is_empty() {
            return Decision::Service;
        }
        let path = uri.path();
        if self.paths_matter && !is_normal(path) {
            return Decision::NotNormal;
        }
        let Some(route) = self
            .list
            .iter()
            .find(|r| r.matcher.matches(method, path, uri.query(), headers))
        else {
            return Decision::Service;
        };
        if let Some(l) = &route.limiter
            && let Err(wait) = l.check(None, now)
        {
            return Decision::Limited(route, wait);
        }
        match route.action {
            RouteAction::Forward => Decision::Forward(route),
            RouteAction::Deny => Decision::Deny(route),
            RouteAction::Respond { .. } | RouteAction::Redirect { .. } => Decision::Respond(route),
        }
    }

    /// Routes no request can reach: an earlier one matches all it would
    /// (`(shadowed, by)` indices), for `check`.
    pub fn shadowed(cfg: &[RouteConfig]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (j, later) in cfg.iter().enumerate() {
            if let Some(i) = cfg[..j].iter().position(|earlier| covers(earlier, later)) {
                out.push((j, i));
            }
        }
        out
    }
}

/// Whether every request `b` matches, `a` matches too (as far as can be
/// told without running regexes: a regex path is covered only by no path).
fn covers(a: &RouteConfig, b: &RouteConfig) -> bool {
    let (a, b) = (&a.matcher, &b.matcher);
    let methods = a.methods.is_empty()
        || (!b.methods.is_empty() && b.methods.iter().all(|m| a.methods.contains(m)));
    let path = match (&a.path, &b.path) {
        (PathCond::Any, _) => true,
        (PathCond::Exact(x), PathCond::Exact(y)) => x == y,
        (PathCond::Prefix(p), PathCond::Exact(y) | PathCond::Prefix(y)) => under(y, p),
        (PathCond::Regex(x), PathCond::Regex(y)) => x == y,
        _ => false,
    };
    // a's header and query conditions must each be b's too.
    let headers = a.headers.iter().all(|(k, v)| b.headers.get(k) == Some(v));
    let query = a.query.iter().all(|(k, v)| b.query.get(k) == Some(v));
    methods && path && headers && query
}

impl Route {
    fn new(
        i: usize,
        r: &RouteConfig,
        owner: Option<&crate::config::service::ServiceConfig>,
    ) -> Result<Route, String> {
        let number = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let m = &r.matcher;
        let regex = |re: &str| anchored(re).expect("checked at load");
        let value = |v: &ValueMatch| match v {
            ValueMatch::Present => Value::Present,
            ValueMatch::Exact(e) => Value::Exact(e.clone()),
            ValueMatch::Regex(re) => Value::Regex(regex(re)),
        };
        let matcher = Matcher {
            path: match &m.path {
                PathCond::Any => PathMatcher::Any,
                PathCond::Exact(p) => PathMatcher::Exact(p.clone()),
                PathCond::Prefix(p) => PathMatcher::Prefix(p.clone()),
                PathCond::Regex(re) => PathMatcher::Regex(regex(re)),
            },
            methods: m
                .methods
                .iter()
                .map(|x| Method::from_bytes(x.as_bytes()).expect("checked at load"))
                .collect(),
            headers: m
                .headers
                .iter()
                .map(|(k, v)| (name(&k.0), value(v)))
                .collect(),
            query: m.query.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
        };
        let w = &r.rewrite;
        let rewrite = Rewrite {
            path_prefix: match (&m.path, &w.path_prefix) {
                (PathCond::Prefix(p), Some(to)) => Some((p.clone(), to.clone())),
                _ => None,
            },
            path_regex: w
                .path_regex
                .as_ref()
                .map(|(re, to)| (Regex::new(re).expect("checked at load"), to.clone())),
            host: w.host.as_ref().map(|h| {
                (
                    HeaderValue::from_str(h).expect("checked at load"),
                    h.parse().expect("checked at load"),
                )
            }),
            add_query: w.add_query.clone().into_iter().collect(),
            remove_query: w.remove_query.clone(),
        };
        let name = r.name.clone().unwrap_or_else(|| format!("route-{}", i + 1));
        let transcoder = match &r.transcode {
            Some(t) => Some(
                crate::transcode::Transcoder::load(t).map_err(|e| format!("route {name}: {e}"))?,
            ),
            None => None,
        };
        Ok(Route {
            name,
            matcher,
            action: r.action.clone(),
            rewrite,
            request_headers: Ops::new(&r.request_headers),
            response_headers: Ops::new(&r.response_headers),
            timeout: r.timeout,
            limiter: r.rate_limit.as_ref().map(Limiter::new),
            upstream: r.upstream.clone(),
            caching: match r.cache {
                // A transcoded answer is made per call: never cached.
                _ if transcoder.is_some() => Caching::Off,
                RouteCache::Service => Caching::Service,
                RouteCache::Off => Caching::Off,
                RouteCache::Own(c) => match owner {
                    Some(o) => Caching::Own(crate::cache::Cache::shared(c, o, number)),
                    None => Caching::Off,
                },
            },
            number,
            transcoder,
        })
    }

    /// The Host the route sends (as a header value, and as the authority
    /// for upstreams named by the URI).
    pub fn host(&self) -> Option<&(HeaderValue, Authority)> {
        self.rewrite.host.as_ref()
    }

    /// The route's changes to the path, query and headers (after the
    /// service's own header policy).
    /// A rewrite that makes no valid request target (a regex replacement
    /// putting a space in it, say) is an error: the request must not go
    /// with the path the route was meant to change.
    pub fn apply_request(&self, head: &mut Parts) -> Result<(), String> {
        let w = &self.rewrite;
        if w.path_prefix.is_some()
            || w.path_regex.is_some()
            || !w.add_query.is_empty()
            || !w.remove_query.is_empty()
        {
            let pq = self.rewritten(head.uri.path(), head.uri.query());
            let bad = || format!("route {}'s rewrite made no valid request target", self.name);
            let mut parts = head.uri.clone().into_parts();
            parts.path_and_query = Some(PathAndQuery::try_from(pq).map_err(|_| bad())?);
            head.uri = Uri::from_parts(parts).map_err(|_| bad())?;
        }
        self.request_headers.apply(&mut head.headers);
        Ok(())
    }

    pub fn apply_response(&self, headers: &mut HeaderMap) {
        self.response_headers.apply(headers);
    }

    /// The route's own answer (direct response or redirect), its response
    /// header changes made; none for a route that forwards or denies.
    pub fn answer(&self) -> Option<Response<Full<Bytes>>> {
        let (status, body, header) = match &self.action {
            RouteAction::Respond {
                status,
                body,
                content_type,
            } => (
                *status,
                Bytes::from(body.clone()),
                (CONTENT_TYPE, content_type),
            ),
            RouteAction::Redirect { status, location } => {
                (*status, Bytes::new(), (LOCATION, location))
            }
            RouteAction::Forward | RouteAction::Deny => return None,
        };
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        if let Ok(v) = HeaderValue::from_str(header.1) {
            r.headers_mut().insert(header.0, v);
        }
        self.apply_response(r.headers_mut());
        Some(r)
    }

    /// The path and query as the route sends them.
    fn rewritten(&self, path: &str, query: Option<&str>) -> String {
        let w = &self.rewrite;
        let path: Cow<'_, str> = match (&w.path_prefix, &w.path_regex) {
            (Some((from, to)), _) => {
                let rest = &path[from.len().min(path.len())..];
                let to = to.trim_end_matches('/');
                match (to.is_empty(), rest.is_empty()) {
                    (true, true) => "/".into(),
                    (true, false) => rest.into(),
                    _ => format!("{to}{rest}").into(),
                }
            }
            (None, Some((re, to))) => re.replace(path, to.as_str()),
            (None, None) => path.into(),
        };
        let mut q: Vec<&str> = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .filter(|p| {
                let name = p.split_once('=').map_or(*p, |(n, _)| n);
                !w.remove_query
                    .iter()
                    .chain(w.add_query.iter().map(|(k, _)| k))
                    .any(|r| *r == decode(name))
            })
            .collect();
        let added: Vec<String> = w
            .add_query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        q.extend(added.iter().map(String::as_str));
        match q.is_empty() {
            true => path.into_owned(),
            false => format!("{path}?{}", q.join("&")),
        }
    }
}

impl Matcher {
    fn matches(&self, method: &Method, path: &str, query: Option<&str>, h: &HeaderMap) -> bool {
        let path_ok = match &self.path {
            PathMatcher::Any => true,
            PathMatcher::Exact(p) => path == p,
            PathMatcher::Prefix(p) => under(path, p),
            PathMatcher::Regex(re) => re.is_match(path),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.contains(method))
            && self.headers.iter().all(|(k, v)| {
                let mut all = h.get_all(k).iter().peekable();
                match v {
                    Value::Present => all.peek().is_some(),
                    _ => all.any(|x| x.to_str().is_ok_and(|x| v.matches(x))),
                }
            })
            && self.query.iter().all(|(k, v)| {
                let mut values = query
                    .unwrap_or("")
                    .split('&')
                    .filter_map(|p| {
                        let (n, val) = p.split_once('=').unwrap_or((p, ""));
                        (decode(n) == *k).then(|| decode(val))
                    })
                    .peekable();
                match v {
                    Value::Present => values.peek().is_some(),
                    _ => values.any(|x| v.matches(&x)),
                }
            })
    }
}

impl Value {
    fn matches(&self, x: &str) -> bool {
        match self {
            Value::Present => true,
            Value::Exact(e) => x == e,
            Value::Regex(re) => re.is_match(x),
        }
    }
}

impl Ops {
    fn new(c: &crate::config::route::HeaderOps) -> Ops {
        let pairs = |m: &std::collections::BTreeMap<_, String>| {
            m.iter()
                .map(|(k, v): (&crate::config::service::HeaderKey, &String)| {
                    (
                        name(&k.0),
                        HeaderValue::from_str(v).expect("checked at load"),
                    )
                })
                .collect()
        };
        Ops {
            set: pairs(&c.set),
            add: pairs(&c.add),
            remove: c.remove.iter().map(|k| name(&k.0)).collect(),
        }
    }

    fn apply(&self, h: &mut HeaderMap) {
        for k in &self.remove {
            h.remove(k);
        }
        for (k, v) in &self.set {
            h.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            h.append(k.clone(), v.clone());
        }
    }
}

fn name(k: &str) -> HeaderName {
    HeaderName::from_bytes(k.as_bytes()).expect("checked at load")
}

/// `path` is `prefix` or below it by whole segments (`/` covers all).
fn under(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A query name or value with its %-escapes decoded (`+` stays: it is a
/// space only in forms).
fn decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return s.into();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1..i + 3)) {
            (b'%', Some(hex)) if hex.iter().all(u8::is_ascii_hexdigit) => {
                let hex = std::str::from_utf8(hex).expect("ascii");
                out.push(u8::from_str_radix(hex, 16).expect("hex"));
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned().into()
}

/// Whether `path` reads the same to every server: no `.`/`..` segments, no
/// backslash, no empty segment, and no %-escape of a character that needs
/// none (`%2e`, `%61`: RFC 3986 says a server may decode those, and then
/// `/%61dmin` is `/admin`), nor of `/` or `\`.
pub fn is_normal(path: &str) -> bool {
    if !path.starts_with('/') || path.contains('\\') || path.contains("//") {
        return false;
    }
    let b = path.as_bytes();
    for (i, c) in b.iter().enumerate() {
        if *c != b'%' {
            continue;
        }
        let Some(hex) = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
        else {
            return false;
        };
        let Ok(byte) = u8::from_str_radix(hex, 16) else {
            return false;
        };
        let unreserved = byte.is_ascii_alphanumeric() || b"-._~".contains(&byte);
        if unreserved || byte == b'/' || byte == b'\\' {
            return false;
        }
    }
    !path.split('/').any(|seg| seg == "." || seg == "..")
}

#[cfg(test)]
#[path = "route_tests.rs"]
mod tests;
