use super::*;

fn routes(yaml: &str) -> (Vec<RouteConfig>, Routes) {
    let cfg: Vec<RouteConfig> = serde_yaml_ng::from_str(yaml).unwrap();
    let r = Routes::new(&cfg, None).unwrap();
    (cfg, r)
}

/// The decision for `method uri` with these headers, as `kind name`.
fn decide(r: &Routes, method: &str, uri: &str, headers: &[(&str, &str)]) -> String {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let m = Method::from_bytes(method.as_bytes()).unwrap();
    match r.decide(&m, &uri.parse().unwrap(), &h, Instant::now()) {
        Decision::Service => "service".into(),
        Decision::NotNormal => "not-normal".into(),
        Decision::Forward(r) => format!("forward {}", r.name),
        Decision::Deny(r) => format!("deny {}", r.name),
        Decision::Respond(r) => format!("respond {}", r.name),
        Decision::Limited(r, _) => format!("limited {}", r.name),
    }
}

/// (method, URI, headers, the decision wanted)
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

const TABLE: &str = r#"
- name: no-deletes
  match: { path_prefix: /v1/invoices, methods: [DELETE] }
  deny: true
- name: health
  match: { path: /health }
  direct_response: { status: 200, body: ok }
- name: old
  match: { path_prefix: /old/ }
  redirect: { location: "https://new.example/", status: 301 }
- name: canary
  match: { path_prefix: /v2, headers: { x-canary: { exact: "1" } } }
  rewrite: { path_prefix: /v2-canary }
- name: beta
  match: { path_regex: "/items/[0-9]+", query: { beta: { present: true } } }
- name: tenant
  match: { headers: { x-tenant: { regex: "acme|globex" } }, query: { view: { exact: "full list" } } }
"#;

#[test]
fn the_first_route_that_matches_decides() {
    let (_, r) = routes(TABLE);
    let cases: &[Case] = &[
        ("DELETE", "/v1/invoices/7", &[], "deny no-deletes"),
        ("DELETE", "/v1/invoices", &[], "deny no-deletes"),
        ("GET", "/v1/invoices/7", &[], "service"),
        ("DELETE", "/v1/invoicesX", &[], "service"),
        ("GET", "/health", &[], "respond health"),
        ("GET", "/health/x", &[], "service"),
        ("GET", "/old/page", &[], "respond old"),
        ("GET", "/v2/a", &[("x-canary", "1")], "forward canary"),
        ("GET", "/v2/a", &[("x-canary", "0")], "service"),
        ("GET", "/v2/a", &[], "service"),
        ("GET", "/items/42?beta", &[], "forward beta"),
        ("GET", "/items/42?x=1&beta=yes", &[], "forward beta"),
        ("GET", "/items/42", &[], "service"),
        // Anchored: a regex matches the whole path, not a part of it.
        ("GET", "/items/42/more?beta", &[], "service"),
        ("GET", "/x/items/42?beta", &[], "service"),
        (
            "GET",
            "/any?view=full%20list",
            &[("x-tenant", "acme")],
            "forward tenant",
        ),
        (
            "GET",
            "/any?view=full%20list",
            &[("x-tenant", "acmex")],
            "service",
        ),
        (
            "GET",
            "/any?view=full",
            &[("x-tenant", "globex")],
            "service",
        ),
        // Two values of a header: one of them matching is enough.
        (
            "GET",
            "/any?view=full%20list",
            &[("x-tenant", "other"), ("x-tenant", "globex")],
            "forward tenant",
        ),
        // Spellings that another server reads as a path a route names.
        ("DELETE", "/v1/x/../invoices/7", &[], "not-normal"),
        ("DELETE", "/v1/%69nvoices/7", &[], "not-normal"),
        ("DELETE", "/v1//invoices/7", &[], "not-normal"),
        ("DELETE", "/v1/invoices%2F7", &[], "not-normal"),
        ("GET", "/caf%C3%A9", &[], "service"),
    ];
    for (m, uri, h, want) in cases {
        assert_eq!(decide(&r, m, uri, h), *want, "{m} {uri} {h:?}");
    }
}

#[test]
fn no_routes_is_the_service_and_paths_are_not_judged() {
    let (_, r) = routes("[]");
    assert_eq!(decide(&r, "GET", "/a/../b", &[]), "service");
    // Routes without path conditions leave paths alone.
    let (_, r) = routes("[{ match: { methods: [TRACE] }, deny: true }]");
    assert_eq!(decide(&r, "GET", "/a/../b", &[]), "service");
    assert_eq!(decide(&r, "TRACE", "/", &[]), "deny route-1");
}

#[test]
fn a_routes_bucket_refuses_past_its_burst_and_refills() {
    let (_, r) =
        routes("[{ match: { path: /pay }, rate_limit: { requests_per_second: 1, burst: 2 } }]");
    let (m, uri, h) = (
        Method::POST,
        "/pay".parse::<Uri>().unwrap(),
        HeaderMap::new(),
    );
    let t0 = Instant::now();
    for _ in 0..2 {
        assert!(matches!(r.decide(&m, &uri, &h, t0), Decision::Forward(_)));
    }
    match r.decide(&m, &uri, &h, t0) {
        Decision::Limited(_, wait) => assert!(wait <= Duration::from_secs(1)),
        other => panic!("{other:?}"),
    }
    let later = t0 + Duration::from_millis(1100);
    assert!(matches!(
        r.decide(&m, &uri, &h, later),
        Decision::Forward(_)
    ));
    // Other paths do not take from the route's bucket.
    let other = "/other".parse::<Uri>().unwrap();
    assert!(matches!(r.decide(&m, &other, &h, t0), Decision::Service));
}

/// `GET uri` with three headers, as the route it forwards by sends it.
fn forwarded<'a>(r: &'a Routes, uri: &str) -> (Parts, &'a Route) {
    let req = http::Request::get(uri)
        .header("x-secret", "s")
        .header("x-tag", "a")
        .header("x-route", "app")
        .body(())
        .unwrap();
    let Decision::Forward(route) = r.decide(req.method(), req.uri(), req.headers(), Instant::now())
    else {
        panic!("{uri} did not forward");
    };
    let (mut parts, ()) = req.into_parts();
    route.apply_request(&mut parts).unwrap();
    (parts, route)
}

#[test]
fn a_forwarding_route_rewrites_path_query_and_headers() {
    let (_, r) = routes(
        r#"
- match: { path_prefix: /api/v1 }
  rewrite: { path_prefix: /v1, add_query: { src: amb }, remove_query: [debug] }
  request_headers: { set: { x-route: one }, add: { x-tag: b }, remove: [x-secret] }
  response_headers: { set: { cache-control: no-store }, remove: [server] }
- match: { path_prefix: /strip }
  rewrite: { path_prefix: / }
- match: { path_regex: "/users/[^/]+/avatar" }
  rewrite: { path_regex: ["^/users/([^/]+)/avatar$", "/avatars/$1.png"], host: img.internal }
"#,
    );
    let head = |uri: &str| forwarded(&r, uri);
    let (p, route) = head("/api/v1/orders/7?debug=1&page=2&src=app");
    assert_eq!(p.uri, "/v1/orders/7?page=2&src=amb");
    assert_eq!(p.headers["x-route"], "one");
    assert!(p.headers.get("x-secret").is_none());
    let tags: Vec<_> = p.headers.get_all("x-tag").iter().collect();
    assert_eq!(tags, ["a", "b"]);
    let mut resp = HeaderMap::new();
    resp.insert("server", HeaderValue::from_static("upstream/1"));
    route.apply_response(&mut resp);
    assert_eq!(resp["cache-control"], "no-store");
    assert!(resp.get("server").is_none());

    assert_eq!(head("/api/v1").0.uri, "/v1?src=amb");
    assert_eq!(head("/strip/a/b?x=1").0.uri, "/a/b?x=1");
    assert_eq!(head("/strip").0.uri, "/");
    let (p, route) = head("/users/ann/avatar");
    assert_eq!(p.uri, "/avatars/ann.png");
    assert_eq!(route.host().unwrap().0, "img.internal");
}

#[test]
fn routes_an_earlier_one_covers_are_found() {
    let (cfg, _) = routes(
        r#"
- { name: all-get, match: { path_prefix: /api, methods: [GET] } }
- { name: one-get, match: { path: /api/x, methods: [GET] } }
- { name: one-post, match: { path: /api/x, methods: [POST] } }
- { name: any, match: {} }
- { name: after-any, match: { path: /z } }
- { name: canary, match: { headers: { x-c: { exact: "1" } } } }
"#,
    );
    assert_eq!(Routes::shadowed(&cfg), vec![(1, 0), (4, 3), (5, 3)]);
}

#[test]
fn percent_escapes_of_plain_characters_are_not_normal() {
    for p in [
        "/a/b",
        "/",
        "/a%20b",
        "/caf%C3%A9",
        "/.well-known/x",
        "/a?b",
    ] {
        assert!(is_normal(p), "{p}");
    }
    for p in [
        "/%61dmin",
        "/a/%2e%2e/b",
        "/a%2Fb",
        "/a%5cb",
        "/a%7e",
        "/a%",
        "/a%zz",
        "//a",
        "/a/./b",
    ] {
        assert!(!is_normal(p), "{p}");
    }
}

#[test]
fn a_rewrite_that_makes_no_valid_target_is_an_error_not_the_old_path() {
    let (_, r) =
        routes(r#"[{ match: { path_prefix: /a }, rewrite: { path_regex: ["^/a/(.*)$", "$1"] } }]"#);
    // `/a/` leaves nothing for `$1`: an empty target.
    let req = http::Request::get("/a/").body(()).unwrap();
    let Decision::Forward(route) = r.decide(req.method(), req.uri(), req.headers(), Instant::now())
    else {
        panic!("did not forward");
    };
    let (mut parts, ()) = req.into_parts();
    let e = route.apply_request(&mut parts).unwrap_err();
    assert!(e.contains("made no valid request target"), "{e}");
}
