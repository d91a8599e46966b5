//! An HTTP service's routes against the app's unmodified curl in a
//! simulated Pod and a real upstream: first match wins, denials and the
//! proxy's own answers never reach the upstream, forwarding routes rewrite
//! and change headers both ways, a route's rate limit counts exactly, and
//! `check` prints the routes and names the one that can never match.

use ambassador_tests::{upstream::HttpUpstream, *};

const ROUTES: &str = r#"
services:
  - name: api
    match: { cidr: 198.18.0.2/32, port: 8080 }
    protocol: http
    routes:
      - name: no-deletes
        match: { path_prefix: /v1/invoices, methods: [DELETE] }
        deny: true
      - name: health
        match: { path: /health }
        direct_response: { status: 200, body: "healthy\n" }
        response_headers: { set: { x-answered-by: ambassador } }
      - name: moved
        match: { path_prefix: /old }
        redirect: { location: "http://198.18.0.2:8080/new", status: 301 }
      - name: canary
        match: { path_prefix: /v2, headers: { x-canary: { exact: "1" } } }
        rewrite: { path_prefix: /v2-canary, add_query: { via: amb }, remove_query: [debug] }
        request_headers: { set: { x-route: canary }, remove: [x-debug-token] }
        response_headers: { set: { x-served-by: canary }, remove: [x-upstream-version] }
      - name: payments
        match: { path_prefix: /pay, methods: [POST] }
        rate_limit: { requests_per_second: 0.01, burst: 2 }
      - name: images
        match: { path_prefix: /img }
        upstream: images
        rewrite: { path_prefix: /static }
      - name: never
        match: { path: /v1/invoices/7, methods: [DELETE] }
        deny: true
  - name: images
    match: { cidr: 198.18.0.3/32, port: 9000 }
    protocol: http
    upstream: { endpoints: [{ address: "img.internal:8081" }] }
    request: { set_headers: { x-images-key: { value: "k-123" } } }
"#;

fn status(pod: &Pod, method: &str, path: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "-X",
        method,
        "--path-as-is",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ];
    args.extend_from_slice(extra);
    stdout(&pod.curl(&format!("http://{SERVER_V4}:8080{path}"), &args))
}

#[test]
fn routes_decide_in_order_and_change_requests_and_answers() {
    let mut pod = Pod::new(ROUTES);
    pod.proxy_hosts = vec![("img.internal".into(), SERVER2_V4.into())];
    pod.start_proxy();
    let up = HttpUpstream::plain(pod.server_listener(SERVER_V4, 8080));

    // Denied and answered requests never reach the upstream.
    let head = stdout(&pod.curl(
        &format!("http://{SERVER_V4}:8080/v1/invoices/7"),
        &["-X", "DELETE", "-i"],
    ));
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.contains("x-ambassador-error: denied by route no-deletes of api"),
        "{head}"
    );
    let health = stdout(&pod.curl(&format!("http://{SERVER_V4}:8080/health"), &["-i"]));
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("x-answered-by: ambassador"), "{health}");
    assert!(health.ends_with("healthy\n"), "{health}");
    let moved = stdout(&pod.curl(&format!("http://{SERVER_V4}:8080/old/page"), &["-i"]));
    assert!(moved.starts_with("HTTP/1.1 301"), "{moved}");
    assert!(
        moved.contains(&format!("location: http://{SERVER_V4}:8080/new")),
        "{moved}"
    );
    // A spelling that the upstream could read as a denied path is refused.
    assert_eq!(status(&pod, "DELETE", "/v1/x/../invoices/7", &[]), "400");
    assert_eq!(status(&pod, "DELETE", "/v1/%69nvoices/7", &[]), "400");
    assert!(up.seen().is_empty(), "{:?}", up.seen());

    // Not matched by any route: the service's own way.
    assert_eq!(status(&pod, "GET", "/v1/invoices/7", &[]), "200");
    assert_eq!(up.seen()[0].uri, "/v1/invoices/7");

    // The canary route rewrites the path and query, and headers both ways.
    let out = stdout(&pod.curl(
        &format!("http://{SERVER_V4}:8080/v2/orders?debug=1&page=3"),
        &["-i", "-H", "x-canary: 1", "-H", "x-debug-token: secret"],
    ));
    assert!(out.contains("x-served-by: canary"), "{out}");
    assert!(!out.contains("x-upstream-version"), "{out}");
    let seen = up.seen().last().unwrap().clone();
    assert_eq!(seen.uri, "/v2-canary/orders?page=3&via=amb");
    assert_eq!(seen.header("x-route"), Some("canary"));
    assert_eq!(seen.header("x-debug-token"), None);
    // Without the header the route does not match.
    assert_eq!(status(&pod, "GET", "/v2/orders", &[]), "200");
    assert_eq!(up.seen().last().unwrap().uri, "/v2/orders");

    // The route's bucket: exactly its burst goes through.
    let before = up.seen().len();
    let got: Vec<String> = (0..5).map(|_| status(&pod, "POST", "/pay", &[])).collect();
    assert_eq!(got, ["200", "200", "429", "429", "429"]);
    assert_eq!(up.seen().len(), before + 2);
    let out = stdout(&pod.curl(
        &format!("http://{SERVER_V4}:8080/pay"),
        &["-X", "POST", "-i"],
    ));
    assert!(out.to_ascii_lowercase().contains("retry-after: "), "{out}");
    // GETs are not the route's.
    assert_eq!(status(&pod, "GET", "/pay", &[]), "200");

    // A route to another service: its endpoint, its name, its credentials.
    let img = HttpUpstream::plain(pod.server_listener(SERVER2_V4, 8081));
    assert_eq!(status(&pod, "GET", "/img/logo.png", &[]), "200");
    let seen = img.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].uri, "/static/logo.png");
    assert_eq!(seen[0].header("host"), Some("img.internal:8081"));
    assert_eq!(seen[0].header("x-images-key"), Some("k-123"));

    let m = pod.metrics();
    assert!(
        m.contains(r#"ambassador_http_requests_total{service="api",direction="outbound",status_class="4xx"}"#),
        "{m}"
    );
    for (reason, n) in [
        ("forbidden", 1),
        ("path_not_normal", 2),
        ("rate_limited", 4),
    ] {
        let series = format!(
            r#"ambassador_refusals_total{{service="api",direction="outbound",reason="{reason}"}} {n}"#
        );
        assert!(m.contains(&series), "{series}\n{m}");
    }
}

#[test]
fn check_prints_the_routes_and_the_one_that_can_never_match() {
    // check resolves endpoint names on this host: an address here.
    let pod = Pod::new(&ROUTES.replace("img.internal:8081", "198.18.0.3:8081"));
    let out = std::process::Command::new(bin())
        .arg("check")
        .arg(&pod.config)
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    for want in [
        "route 1 no-deletes: path /v1/invoices/..., DELETE -> deny (403)",
        "route 2 health: path /health -> answer 200",
        "route 3 moved: path /old/... -> redirect 301 to http://198.18.0.2:8080/new",
        "route 4 canary: path /v2/..., x-canary = \"1\" -> forward, rewritten",
        "route 5 payments: path /pay/..., POST -> forward, 0.01 req/s burst 2",
        "route 6 images: path /img/... -> forward to service images, rewritten",
        "WARNING: route 7 can never match: route 1 before it matches every request it would",
    ] {
        assert!(text.contains(want), "{want}\n{text}");
    }
}

#[test]
fn route_mistakes_are_one_line_naming_the_field() {
    for (route, want) in [
        (
            "{ match: { path_regex: \"(\" }, deny: true }",
            "match.path_regex",
        ),
        (
            "{ match: { path: /a }, deny: true, redirect: { location: /b } }",
            "give at most one of deny, direct_response, redirect",
        ),
        (
            "{ match: { path: /a }, redirect: { location: /b, status: 200 } }",
            "redirect.status",
        ),
        (
            "{ match: { path: /a }, rewrite: { path_prefix: /b } }",
            "rewrite.path_prefix: needs match.path_prefix",
        ),
        (
            "{ match: { path: /a }, deny: true, timeout: 1s }",
            "are for routes that forward",
        ),
        (
            "{ match: { headers: { x-a: { exact: a, present: true } } } }",
            "give one of exact, regex, present",
        ),
        (
            "{ match: { path_prefix: /a }, rewrite: { path_regex: [\"^/a(.*)$\", \"/b $1\"] } }",
            "rewrite.path_regex: the replacement `/b $1` holds characters a path cannot",
        ),
        (
            "{ match: { path: /a }, upstream: nowhere }",
            ".routes[0].upstream: `nowhere`: no service has that name",
        ),
        (
            "{ match: { path: /a }, upstream: api }",
            "that is this service",
        ),
    ] {
        let file = std::env::temp_dir().join(format!("amb-routes-{}.yaml", std::process::id()));
        std::fs::write(
            &file,
            format!(
                "services:\n  - name: api\n    match: {{ cidr: 10.0.0.1/32, port: 8080 }}\n    protocol: http\n    routes: [{route}]\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(bin())
            .arg("check")
            .arg(&file)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&file);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{route}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{route}: {err}");
        assert!(err.contains(want), "{route}: {err}");
    }
}
