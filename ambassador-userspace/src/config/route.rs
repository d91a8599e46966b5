//! `routes:` of an HTTP service: an ordered list, first match wins. A route
//! matches on path, method, headers and query parameters (every condition
//! given must hold) and then denies, answers by itself (a direct response,
//! a redirect), or forwards with its own rewrites, header changes, timeout
//! and rate limit. Checked while read: a bad regex, status or header is an
//! error with its line and field path.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    cache::RouteCache,
    gateway::{RateKey, RateLimit},
    request::HeaderKey,
    transcode::TranscodeConfig,
    values::{DurationText, clip, opt_duration, ser_opt_duration},
};

/// Longest direct-response body: answers of the proxy's own, not content.
pub const MAX_DIRECT_BODY: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawRoute")]
pub struct RouteConfig {
    /// Names the route in refusals, logs and `check` (default `route-N`,
    /// counting from 1).
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    pub action: RouteAction,
    pub rewrite: Rewrite,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// The request timeout for this route (else the service's).
    #[serde(serialize_with = "ser_opt_duration")]
    #[schemars(with = "Option<DurationText>")]
    pub timeout: Option<Duration>,
    /// One token bucket for the route.
    pub rate_limit: Option<RateLimit>,
    /// Another HTTP service (with endpoints) the route sends to: its
    /// endpoints, TLS, credentials, retries and timeouts.
    pub upstream: Option<String>,
    /// The route's own response cache, none, or (left out) the service's.
    #[serde(skip_serializing_if = "RouteCache::is_service")]
    pub cache: RouteCache,
    /// REST/JSON from the app made into gRPC calls to the upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcode: Option<TranscodeConfig>,
}

impl Eq for RouteConfig {}

/// When a route applies: every condition given must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawMatch")]
pub struct RouteMatch {
    pub path: PathCond,
    /// Upper-case method names; empty: any.
    pub methods: Vec<String>,
    pub headers: BTreeMap<HeaderKey, ValueMatch>,
    pub query: BTreeMap<String, ValueMatch>,
}

/// How a route names paths. A regex must match the whole path (it is
/// anchored at both ends), never the query.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, schemars::JsonSchema)]
pub enum PathCond {
    #[default]
    Any,
    Exact(String),
    /// This path and every path below it, by whole segments.
    Prefix(String),
    Regex(String),
}

/// A header's or query parameter's condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ValueMatch {
    Present,
    Exact(String),
    /// Anchored at both ends.
    Regex(String),
}

/// What a matched route does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub enum RouteAction {
    /// To the service's upstream, with the route's changes.
    Forward,
    /// 403, the route named in `x-ambassador-error`.
    Deny,
    /// The proxy answers by itself.
    Respond {
        status: u16,
        body: String,
        content_type: String,
    },
    Redirect {
        status: u16,
        location: String,
    },
}

/// Changes to the request line before it goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, schemars::JsonSchema)]
pub struct Rewrite {
    /// Replaces the part of the path the route's `path_prefix` matched.
    pub path_prefix: Option<String>,
    /// `[pattern, replacement]`: the first match in the path replaced
    /// (`$1`, `${name}` name groups).
    pub path_regex: Option<(String, String)>,
    /// The Host the upstream gets.
    pub host: Option<String>,
    pub add_query: BTreeMap<String, String>,
    pub remove_query: Vec<String>,
}

/// Header changes: `remove` first, then `set` (replacing), then `add`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, try_from = "RawHeaderOps")]
pub struct HeaderOps {
    pub set: BTreeMap<HeaderKey, String>,
    pub add: BTreeMap<HeaderKey, String>,
    pub remove: Vec<HeaderKey>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    #[serde(rename = "match", default)]
    matcher: RouteMatch,
    #[serde(default)]
    deny: bool,
    direct_response: Option<RawDirect>,
    redirect: Option<RawRedirect>,
    #[serde(default)]
    rewrite: RawRewrite,
    #[serde(default)]
    request_headers: HeaderOps,
    #[serde(default)]
    response_headers: HeaderOps,
    #[serde(default, deserialize_with = "opt_duration")]
    #[schemars(with = "Option<DurationText>")]
    timeout: Option<Duration>,
    rate_limit: Option<RateLimit>,
    upstream: Option<String>,
    #[serde(default)]
    cache: RouteCache,
    transcode: Option<TranscodeConfig>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawDirect {
    status: u16,
    #[serde(default)]
    body: String,
    #[serde(default = "text_plain")]
    content_type: String,
}

fn text_plain() -> String {
    "text/plain".into()
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawRedirect {
    location: String,
    #[serde(default = "found")]
    status: u16,
}

fn found() -> u16 {
    302
}

#[derive(Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawRewrite {
    path_prefix: Option<String>,
    path_regex: Option<(String, String)>,
    host: Option<String>,
    #[serde(default)]
    add_query: BTreeMap<String, String>,
    #[serde(default)]
    remove_query: Vec<String>,
}

impl TryFrom<RawRoute> for RouteConfig {
    type Error = String;
    fn try_from(r: RawRoute) -> Result<Self, String> {
        let action = match (r.deny, r.direct_response, r.redirect) {
            (false, None, None) => RouteAction::Forward,
            (true, None, None) => RouteAction::Deny,
            (false, Some(d), None) => {
                if !(200..=599).contains(&d.status) {
                    return Err("direct_response.status: 200 to 599".into());
                }
                if d.body.len() > MAX_DIRECT_BODY {
                    return Err(format!(
                        "direct_response.body: at most {MAX_DIRECT_BODY} bytes"
                    ));
                }
                header_value("direct_response.content_type", &d.content_type)?;
                RouteAction::Respond {
                    status: d.status,
                    body: d.body,
                    content_type: d.content_type,
                }
            }
            (false, None, Some(d)) => {
                if ![301, 302, 303, 307, 308].contains(&d.status) {
                    return Err("redirect.status: one of 301, 302, 303, 307, 308".into());
                }
                header_value("redirect.location", &d.location)?;
                RouteAction::Redirect {
                    status: d.status,
                    location: d.location,
                }
            }
            _ => return Err("give at most one of deny, direct_response, redirect".into()),
        };
        let forwards = action == RouteAction::Forward;
        let rewrite = rewrite(r.rewrite, &r.matcher)?;
        if !forwards
            && (rewrite != Rewrite::default()
                || !r.request_headers.is_empty()
                || r.timeout.is_some()
                || r.upstream.is_some()
                || r.cache != RouteCache::Service
                || r.transcode.is_some())
        {
            return Err(
                "rewrite, request_headers, timeout, upstream, cache and transcode are for routes that forward (no deny, direct_response, redirect)".into(),
            );
        }
        if let Some(t) = &r.transcode {
            t.validate()?;
            if rewrite.path_prefix.is_some() || rewrite.path_regex.is_some() {
                return Err("transcode: the route's paths are the REST API's; a path rewrite would change them (leave rewrite.path_* out)".into());
            }
            if r.cache != RouteCache::Service {
                return Err("transcode: gRPC answers are not cached (leave cache out)".into());
            }
        }
        if r.timeout.is_some_and(|t| t.is_zero()) {
            return Err("timeout: must be more than 0".into());
        }
        if let Some(l) = &r.rate_limit {
            l.validate()?;
            if l.key != RateKey::Port {
                return Err("rate_limit.key: a route has one bucket (leave key out)".into());
            }
        }
        if let Some(n) = &r.name
            && (n.is_empty() || header_value("name", n).is_err())
        {
            return Err("name: a short printable name".into());
        }
        Ok(RouteConfig {
            name: r.name,
            matcher: r.matcher,
            action,
            rewrite,
            request_headers: r.request_headers,
            response_headers: r.response_headers,
            timeout: r.timeout,
            rate_limit: r.rate_limit,
            upstream: r.upstream,
            cache: r.cache,
            transcode: r.transcode,
        })
    }
}

fn rewrite(r: RawRewrite, m: &RouteMatch) -> Result<Rewrite, String> {
    if let Some(p) = &r.path_prefix {
        if !matches!(m.path, PathCond::Prefix(_)) {
            return Err(
                "rewrite.path_prefix: needs match.path_prefix (the part it replaces)".into(),
            );
        }
        plain_path("rewrite.path_prefix", p)?;
    }
    if r.path_prefix.is_some() && r.path_regex.is_some() {
        return Err("rewrite: give path_prefix or path_regex, not both".into());
    }
    if let Some((pattern, to)) = &r.path_regex {
        regex::Regex::new(pattern)
            .map_err(|e| format!("rewrite.path_regex: `{}`: {e}", clip(pattern)))?;
        // Its literal part must be path characters: the groups come from a
        // valid path, so the result is one too.
        let literal: String = group_refs().replace_all(to, "").into_owned();
        if literal.contains(['?', '#'])
            || http::uri::PathAndQuery::try_from(format!("/{literal}").as_str()).is_err()
        {
            return Err(format!(
                "rewrite.path_regex: the replacement `{}` holds characters a path cannot (escape them with %)",
                clip(to)
            ));
        }
    }
    if let Some(h) = &r.host {
        h.parse::<http::uri::Authority>()
            .map_err(|_| format!("rewrite.host: `{}` is not a host", clip(h)))?;
    }
    for (k, v) in &r.add_query {
        if k.is_empty() || !query_safe(k) || !query_safe(v) {
            return Err(format!(
                "rewrite.add_query: `{}` needs %-escaping (write it escaped)",
                clip(k)
            ));
        }
    }
    Ok(Rewrite {
        path_prefix: r.path_prefix,
        path_regex: r.path_regex,
        host: r.host,
        add_query: r.add_query,
        remove_query: r.remove_query,
    })
}

/// `$1`, `$name`, `${name}` in a replacement.
fn group_refs() -> regex::Regex {
    regex::Regex::new(r"\$(\{[^}]*\}|[A-Za-z0-9_]+)").expect("a fixed pattern")
}

/// Characters a query name or value may hold as written.
fn query_safe(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$'()*+,;:@/?".contains(&b))
}

fn plain_path(field: &str, p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.contains(['?', '#', '\\']) {
        return Err(format!(
            "{field}: `{}` is not a path (starts with /, no query)",
            clip(p)
        ));
    }
    Ok(())
}

fn header_value(field: &str, v: &str) -> Result<(), String> {
    http::HeaderValue::from_str(v)
        .map(|_| ())
        .map_err(|_| format!("{field}: `{}` is not a valid header value", clip(v)))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    path: Option<String>,
    path_prefix: Option<String>,
    path_regex: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    headers: BTreeMap<HeaderKey, RawValueMatch>,
    #[serde(default)]
    query: BTreeMap<String, RawValueMatch>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawValueMatch {
    exact: Option<String>,
    regex: Option<String>,
    #[serde(default)]
    present: bool,
}

impl TryFrom<RawMatch> for RouteMatch {
    type Error = String;
    fn try_from(r: RawMatch) -> Result<Self, String> {
        let path = match (r.path, r.path_prefix, r.path_regex) {
            (None, None, None) => PathCond::Any,
            (Some(p), None, None) => {
                plain_path("match.path", &p)?;
                PathCond::Exact(p)
            }
            (None, Some(p), None) => {
                plain_path("match.path_prefix", &p)?;
                PathCond::Prefix(p.trim_end_matches('/').to_string())
            }
            (None, None, Some(re)) => {
                anchored(&re).map_err(|e| format!("match.path_regex: {e}"))?;
                PathCond::Regex(re)
            }
            _ => return Err("match: give one of path, path_prefix, path_regex".into()),
        };
        let methods =
            super::values::methods(r.methods).map_err(|e| format!("match.methods: {e}"))?;
        let value = |what: &str, v: RawValueMatch| -> Result<ValueMatch, String> {
            match (v.exact, v.regex, v.present) {
                (Some(e), None, false) => Ok(ValueMatch::Exact(e)),
                (None, Some(re), false) => {
                    anchored(&re).map_err(|e| format!("match.{what}: {e}"))?;
                    Ok(ValueMatch::Regex(re))
                }
                (None, None, true) => Ok(ValueMatch::Present),
                _ => Err(format!(
                    "match.{what}: give one of exact, regex, present: true"
                )),
            }
        };
        let mut headers = BTreeMap::new();
        for (k, v) in r.headers {
            let m = value(&format!("headers.{}", k.0), v)?;
            headers.insert(k, m);
        }
        let mut query = BTreeMap::new();
        for (k, v) in r.query {
            let m = value(&format!("query.{}", clip(&k)), v)?;
            query.insert(k, m);
        }
        Ok(RouteMatch {
            path,
            methods,
            headers,
            query,
        })
    }
}

/// `re` compiled to match whole values only.
pub fn anchored(re: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("`{}`: {e}", clip(re)))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawHeaderOps {
    #[serde(default)]
    set: BTreeMap<HeaderKey, String>,
    #[serde(default)]
    add: BTreeMap<HeaderKey, String>,
    #[serde(default)]
    remove: Vec<HeaderKey>,
}

impl TryFrom<RawHeaderOps> for HeaderOps {
    type Error = String;
    fn try_from(r: RawHeaderOps) -> Result<Self, String> {
        for (k, v) in r.set.iter().chain(&r.add) {
            header_value(&k.0, v)?;
        }
        Ok(HeaderOps {
            set: r.set,
            add: r.add,
            remove: r.remove,
        })
    }
}
