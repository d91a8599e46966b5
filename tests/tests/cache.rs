//! The response cache against the app's unmodified curl in a simulated Pod
//! and a real origin (tests/src/origin.rs) that counts what reaches it:
//! hits, HEAD from a stored GET, no-store and private, Vary, revalidation
//! with the origin's 304, the app's own conditional answered by the cache,
//! RFC 9111 §3.5 for the app's and the ambassador's credentials, route
//! caches (own, with default_ttl; none), 50 concurrent misses coalesced into
//! one upstream request, the byte bound, and a stale entry answering while
//! the upstream is down.

use std::time::Duration;

use ambassador_tests::{upstream::HttpUpstream, *};

const CONFIG: &str = r#"
telemetry: { access_log: true }
services:
  - name: api
    match: { cidr: 198.18.0.2/32, port: 8080 }
    protocol: http
    cache: { max_bytes: 200000, max_entry_bytes: 20000, stale_if_error: 60s }
    routes:
      - name: own
        match: { path_prefix: /origin/own }
        cache: { max_bytes: 100000, max_entry_bytes: 1000, default_ttl: 30s }
      - name: off
        match: { path_prefix: /origin/off }
        cache: false
  - name: tokened
    match: { cidr: 198.18.0.3/32, port: 8080 }
    protocol: http
    cache: {}
    request: { set_headers: { authorization: { value: "Bearer s3cret" } } }
"#;

/// What the app gets: status line, headers (lowercase names) and body.
struct Got {
    status: u16,
    head: String,
    body: String,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

fn get(pod: &Pod, host: &str, target: &str, extra: &[&str]) -> Got {
    let mut args = vec!["-i"];
    args.extend_from_slice(extra);
    let out = stdout(&pod.curl(&format!("http://{host}:8080{target}"), &args));
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Got {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Requests for `path` the upstream answered.
fn reached(up: &HttpUpstream, path: &str) -> usize {
    up.seen()
        .iter()
        .filter(|s| s.uri.split('?').next() == Some(path))
        .count()
}

fn series(m: &str, name: &str) -> u64 {
    m.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn rfc_9111_semantics_against_a_real_origin() {
    let mut pod = Pod::new(CONFIG);
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    let api = SERVER_V4;

    // A fresh response answers again, with its Age; HEAD from the GET.
    let a = "/origin/a?cc=max-age%3D60";
    let first = get(&pod, api, a, &[]);
    assert_eq!((first.status, first.body.as_str()), (200, "/origin/a #1\n"));
    let again = get(&pod, api, a, &[]);
    assert_eq!(again.body, "/origin/a #1\n");
    assert!(again.header("age").is_some(), "{}", again.head);
    let head = get(&pod, api, a, &["-I"]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("13"), "{}", head.head);
    assert_eq!(reached(&up, "/origin/a"), 1);
    let line = pod
        .wait_access_log(r#""cache":"hit""#)
        .expect("a hit logged");
    assert!(line.contains(r#""path":"/origin/a""#), "{line}");

    // no-store and private are not kept; nor what comes without freshness.
    for (path, cc) in [
        ("/origin/ns", "no-store"),
        ("/origin/p", "private%2Cmax-age%3D60"),
        ("/origin/none", ""),
    ] {
        let target = format!("{path}?cc={cc}");
        assert_eq!(get(&pod, api, &target, &[]).body, format!("{path} #1\n"));
        assert_eq!(get(&pod, api, &target, &[]).body, format!("{path} #2\n"));
    }

    // One entry per value of what Vary names.
    let v = "/origin/v?cc=max-age%3D60&vary=x-tenant";
    let t = |name: &str| format!("x-tenant: {name}");
    assert_eq!(get(&pod, api, v, &["-H", &t("a")]).body, "/origin/v #1\n");
    assert_eq!(get(&pod, api, v, &["-H", &t("b")]).body, "/origin/v #2\n");
    assert_eq!(get(&pod, api, v, &["-H", &t("a")]).body, "/origin/v #1\n");
    assert_eq!(get(&pod, api, v, &["-H", &t("b")]).body, "/origin/v #2\n");
    assert_eq!(reached(&up, "/origin/v"), 2);

    // Stale: revalidated with the origin's validator; its 304 refreshes.
    let r = "/origin/r?cc=max-age%3D1&etag=v1";
    assert_eq!(get(&pod, api, r, &[]).body, "/origin/r #1\n");
    std::thread::sleep(Duration::from_millis(1100));
    let revalidated = get(&pod, api, r, &[]);
    assert_eq!(revalidated.body, "/origin/r #1\n");
    let seen = up.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.header("if-none-match"), Some("\"v1\""));
    assert!(pod.wait_access_log(r#""cache":"revalidated""#).is_some());
    // The app's own conditional: the cache answers 304, the origin is spared.
    let cond = get(&pod, api, r, &["-H", "if-none-match: \"v1\""]);
    assert_eq!(cond.status, 304, "{}", cond.head);
    assert_eq!(reached(&up, "/origin/r"), 2);

    // RFC 9111 §3.5: an authenticated request's answer is kept only when
    // the origin says so, and one caller's is never another's.
    let bearer = |u: &str| format!("authorization: Bearer {u}");
    let private = "/origin/auth?cc=max-age%3D60";
    get(&pod, api, private, &["-H", &bearer("u1")]);
    get(&pod, api, private, &["-H", &bearer("u1")]);
    assert_eq!(reached(&up, "/origin/auth"), 2);
    let public = "/origin/pub?cc=public%2Cmax-age%3D60";
    assert_eq!(
        get(&pod, api, public, &["-H", &bearer("u1")]).body,
        "/origin/pub #1\n"
    );
    assert_eq!(
        get(&pod, api, public, &["-H", &bearer("u1")]).body,
        "/origin/pub #1\n"
    );
    assert_eq!(
        get(&pod, api, public, &["-H", &bearer("u2")]).body,
        "/origin/pub #2\n"
    );
    assert_eq!(get(&pod, api, public, &[]).body, "/origin/pub #3\n");

    // Routes: their own cache (default_ttl: kept without freshness), none.
    get(&pod, api, "/origin/own/x", &[]);
    assert_eq!(
        get(&pod, api, "/origin/own/x", &[]).body,
        "/origin/own/x #1\n"
    );
    let off = "/origin/off?cc=max-age%3D60";
    get(&pod, api, off, &[]);
    assert_eq!(get(&pod, api, off, &[]).body, "/origin/off #2\n");

    let m = pod.metrics();
    for (result, n) in [("hit", 6), ("revalidated", 1), ("not_modified", 1)] {
        let s = format!(r#"ambassador_cache_requests_total{{service="api",result="{result}"}}"#);
        assert_eq!(series(&m, &s), n, "{s}\n{m}");
    }
    assert!(
        series(&m, r#"ambassador_cache_entries{service="api"}"#) >= 5,
        "{m}"
    );
    // /status says the same per service, with the bound.
    let (code, body) = pod.admin("GET", "/status", "");
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let api = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "api")
        .unwrap();
    assert!(api["cache"]["entries"].as_u64().unwrap() >= 5, "{api}");
    // The service's 200000 and its `own` route's 100000.
    assert_eq!(api["cache"]["max_bytes"], 300_000, "{api}");
}

#[test]
fn credentials_the_ambassador_adds_keep_responses_out_unless_public() {
    let mut pod = Pod::new(CONFIG);
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER2_V4, 8080));
    let host = SERVER2_V4;
    let private = "/origin/t?cc=max-age%3D60";
    get(&pod, host, private, &[]);
    assert_eq!(get(&pod, host, private, &[]).body, "/origin/t #2\n");
    assert_eq!(up.seen()[0].header("authorization"), Some("Bearer s3cret"));
    let public = "/origin/tp?cc=public%2Cmax-age%3D60";
    get(&pod, host, public, &[]);
    assert_eq!(get(&pod, host, public, &[]).body, "/origin/tp #1\n");
    assert_eq!(reached(&up, "/origin/tp"), 1);
    // Neither the token nor its digest is anywhere a user can read.
    let m = pod.metrics();
    assert!(!m.contains("s3cret"));
    assert!(!pod.access_log().join("\n").contains("s3cret"));
}

#[test]
fn concurrent_misses_make_one_request_bytes_stay_bounded_stale_answers_outages() {
    let mut pod = Pod::new(CONFIG);
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    let api = SERVER_V4;

    // 50 at once for what nobody has yet: one reaches the origin.
    let url = format!("http://{api}:8080/origin/c?cc=max-age%3D60&delay_ms=400");
    let mut args = vec!["--parallel", "--parallel-immediate", "--parallel-max", "50"];
    let urls = vec![url.as_str(); 50];
    args.extend(urls.iter().skip(1).copied());
    let out = stdout(&pod.curl(&url, &args));
    assert_eq!(out.lines().count(), 50, "{out}");
    assert!(out.lines().all(|l| l == "/origin/c #1"), "{out}");
    assert_eq!(reached(&up, "/origin/c"), 1);
    let m = pod.metrics();
    let n = |r: &str| {
        series(
            &m,
            &format!(r#"ambassador_cache_requests_total{{service="api",result="{r}"}}"#),
        )
    };
    assert_eq!(n("miss"), 1, "{m}");
    assert_eq!(n("coalesced") + n("hit"), 49, "{m}");

    // Past max_bytes the least valuable go; the bound holds.
    for i in 0..30 {
        get(
            &pod,
            api,
            &format!("/origin/big{i}?cc=max-age%3D60&size=15000"),
            &[],
        );
    }
    let m = pod.metrics();
    let bytes = series(&m, r#"ambassador_cache_bytes{service="api"}"#);
    assert!((15000..=200_000).contains(&bytes), "{bytes}\n{m}");
    assert!(
        series(
            &m,
            r#"ambassador_cache_events_total{service="api",event="evicted"}"#
        ) > 0
    );
    // Larger than max_entry_bytes: through, not kept.
    let huge = "/origin/huge?cc=max-age%3D60&size=30000";
    get(&pod, api, huge, &[]);
    assert_eq!(get(&pod, api, huge, &[]).body.len(), 30000);
    assert_eq!(reached(&up, "/origin/huge"), 2);

    // Stale within stale_if_error answers while the origin is down.
    let s = "/origin/s?cc=max-age%3D1";
    assert_eq!(get(&pod, api, s, &[]).body, "/origin/s #1\n");
    drop(up);
    std::thread::sleep(Duration::from_millis(1100));
    let stale = get(&pod, api, s, &[]);
    assert_eq!((stale.status, stale.body.as_str()), (200, "/origin/s #1\n"));
    assert!(pod.wait_access_log(r#""cache":"stale""#).is_some());
    // What was never stored fails as before.
    assert_eq!(get(&pod, api, "/origin/never", &[]).status, 502);
}

/// A reload keeps what an unchanged service stored; a service whose config
/// changed starts empty.
#[test]
fn reloads_keep_the_caches_of_unchanged_services() {
    let mut pod = Pod::new(CONFIG);
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));
    let a = "/origin/keep?cc=max-age%3D60";
    assert_eq!(get(&pod, SERVER_V4, a, &[]).body, "/origin/keep #1\n");
    // Another service added: `api` is unchanged, its entry stays.
    let more = format!(
        "{CONFIG}  - name: other\n    match: {{ cidr: 198.18.0.9/32, port: 80 }}\n    protocol: http\n"
    );
    pod.rewrite_config(&more);
    pod.hup_proxy();
    assert!(pod.wait_log("config reloaded"), "{}", pod.proxy_log());
    assert_eq!(get(&pod, SERVER_V4, a, &[]).body, "/origin/keep #1\n");
    assert_eq!(reached(&up, "/origin/keep"), 1);
    // `api` changed (a longer request timeout): its cache starts empty.
    let changed = more.replace(
        "    cache: { max_bytes: 200000",
        "    timeouts: { request: 20s }\n    cache: { max_bytes: 200000",
    );
    assert_ne!(changed, more);
    pod.rewrite_config(&changed);
    pod.hup_proxy();
    assert!(
        pod.wait_log_count("config reloaded", 2),
        "{}",
        pod.proxy_log()
    );
    assert_eq!(get(&pod, SERVER_V4, a, &[]).body, "/origin/keep #2\n");
}
