//! The config: parsing, errors, bounds, the examples.

use std::time::Duration;

use super::*;

#[test]
fn under_deny_exclusions_are_only_the_ones_written() {
    assert_eq!(Config::parse("").unwrap().intercept.exclude_ports, [22]);
    assert_eq!(
        Config::parse("default: passthrough")
            .unwrap()
            .intercept
            .exclude_ports,
        [22]
    );
    assert!(
        Config::parse("default: deny")
            .unwrap()
            .intercept
            .exclude_ports
            .is_empty()
    );
    assert_eq!(
        Config::parse("default: deny\nintercept: { exclude_ports: [22] }")
            .unwrap()
            .intercept
            .exclude_ports,
        [22]
    );
}

#[test]
fn every_duration_and_count_is_bounded() {
    for (text, field) in [
        ("proxy: { idle_timeout: 10000000000000000000s }", "too long"),
        ("proxy: { header_read_timeout: 366d }", "too long"),
        ("proxy: { workers: 1000000 }", "proxy.workers: at most 256"),
        (
            "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, outlier: { base_ejection: 1s, max_ejection: 100000000000s } }]",
            "too long",
        ),
        (
            "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, limits: { max_requests: 100000000 } }]",
            "services[0].limits.max_requests: between 1 and 1000000",
        ),
        (
            "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, retries: { attempts: 4000000000 } }]",
            "services[0].retries.attempts: at most 10",
        ),
        (
            "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, outlier: { consecutive_failures: 4000000000 } }]",
            "consecutive_failures: between 1 and 10000",
        ),
        (
            "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, upstream: { health_check: { interval: 1s, tcp: {}, healthy_threshold: 4000000000 } } }]",
            "thresholds between 1 and 10000",
        ),
        (
            "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, upstream: { health_check: { interval: 1s, http: { path: \"/a b\" } } } }]",
            "must be a path",
        ),
        (
            "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, upstream: { dns: { min_ttl: 500ms } } }]",
            "services[0].upstream.dns: min_ttl must be at least 1s",
        ),
        (
            "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, upstream: { dns: { min_ttl: 10s, max_ttl: 5s } } }]",
            "max_ttl must be at least min_ttl",
        ),
        (
            "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, upstream: { dns: { max_ttl: 366d } } }]",
            "too long",
        ),
    ] {
        let err = Config::parse(text).unwrap_err();
        assert!(err.contains(field), "{text}: {err}");
    }
    let max = Config::parse("proxy: { idle_timeout: 365d, workers: 256 }").unwrap();
    assert_eq!(max.proxy.idle_timeout, MAX_DURATION);
}

#[test]
fn a_huge_value_comes_back_as_a_short_error() {
    let huge = "x".repeat(4 << 20);
    for text in [
        format!("proxy: {{ idle_timeout: {huge} }}"),
        format!("default: {huge}"),
        format!("services: [{{ name: a, match: {{ host: {huge} }} }}]"),
        format!("{huge}: 1"),
    ] {
        let err = Config::parse(&text).unwrap_err();
        assert!(err.len() < 600, "{} bytes: {}", err.len(), &err[..200]);
        assert!(!err.contains(&"x".repeat(100)), "{err}");
    }
    assert_eq!(clip("short"), "short");
    let long = "é".repeat(1000);
    let c = clip(&long);
    assert!(c.ends_with("(2000 bytes)") && c.len() < 200, "{c}");
}

#[test]
fn empty_file_is_all_defaults() {
    for text in ["", "\n", "# nothing\n"] {
        assert_eq!(Config::parse(text).unwrap(), Config::default());
    }
    let d = Config::default();
    assert_eq!(d.proxy.port, 15001);
    assert_eq!(d.proxy.uid, 1337);
    assert_eq!(d.intercept.fail, FailMode::Closed);
    assert_eq!(d.intercept.exclude_ports, vec![22]);
    assert!(!d.intercept.loopback);
}

#[test]
fn documented_example_parses() {
    let cfg = Config::parse(
            "proxy:\n  port: 15001\n  uid: 1337\nintercept:\n  fail: closed\n  exclude_ports: [22]\n  exclude_cidrs: []\n  loopback: false\n",
        )
        .unwrap();
    assert_eq!(cfg, Config::default());
}

#[test]
fn values_are_read() {
    let cfg = Config::parse(
            "proxy: { port: 16001, idle_timeout: 1500ms }\nintercept:\n  fail: open\n  exclude_cidrs: [10.0.0.0/8, 'fd00::1']\n",
        )
        .unwrap();
    assert_eq!(cfg.proxy.port, 16001);
    assert_eq!(cfg.proxy.idle_timeout, Duration::from_millis(1500));
    assert_eq!(cfg.intercept.fail, FailMode::Open);
    assert_eq!(cfg.intercept.exclude_cidrs[1].to_string(), "fd00::1/128");
}

#[test]
fn http_egress_example_parses() {
    use service::{DefaultPolicy, Protocol, SourceKind};
    let text = include_str!("../../../examples/http-egress.yaml");
    let cfg = Config::parse(text).unwrap();
    assert_eq!(cfg.default, DefaultPolicy::Deny);
    assert_eq!(cfg.services.len(), 2);
    let pay = &cfg.services[0];
    assert_eq!(pay.matcher.host.as_deref(), Some("payments.example.com"));
    assert_eq!(pay.protocol, Protocol::Http);
    assert_eq!(
        pay.upstream.endpoints[0].address.to_string(),
        "payments.example.com:443"
    );
    let tls = pay.upstream.tls.as_ref().unwrap();
    assert_eq!(tls.alpn, ["h2", "http/1.1"]);
    let auth = &pay.request.set_headers[&service::HeaderKey("authorization".into())];
    assert_eq!(auth.prefix, "Bearer ");
    assert!(matches!(auth.kind, SourceKind::File(_)));
    let api = &cfg.services[1];
    assert!(matches!(
        api.request.set_headers.values().next().unwrap().kind,
        SourceKind::OAuth2(_)
    ));
}

#[test]
fn postgres_example_parses() {
    use service::{PoolMode, Protocol, TargetRole};
    let cfg = Config::parse(include_str!("../../../examples/postgres.yaml")).unwrap();
    let s = &cfg.services[0];
    assert_eq!(s.name, "orders-db");
    assert_eq!(s.protocol, Protocol::Postgres);
    assert_eq!(s.upstream.target, Some(TargetRole::ReadWrite));
    assert_eq!(s.upstream.endpoints.len(), 2);
    let tls = s.upstream.tls.as_ref().unwrap();
    assert_eq!(tls.server_name.as_deref(), Some("orders-db.internal"));
    let pg = s.postgres.as_ref().unwrap();
    assert_eq!(
        pg.credentials_file,
        std::path::Path::new("/var/run/secrets/orders-db/credentials.yaml")
    );
    assert_eq!(pg.pool.mode, PoolMode::Transaction);
    assert_eq!(pg.pool.size, 20);
    assert_eq!(pg.pool.min_idle, 2);
    assert_eq!(pg.pool.max_clients, 500);
    assert_eq!(pg.pool.queue_timeout, Duration::from_secs(5));
}

#[test]
fn postgres_errors_name_field_and_line() {
    let base = "services:\n  - name: db\n    match: { cidr: 10.0.0.1, port: 5432 }\n";
    let e = Config::parse(&format!("{base}    protocol: postgres\n")).unwrap_err();
    assert!(e.contains("line 2: services[0].postgres"), "{e}");
    let e = Config::parse(&format!(
        "{base}    postgres: {{ credentials_file: /c.yaml }}\n"
    ))
    .unwrap_err();
    assert!(e.contains("needs `protocol: postgres`"), "{e}");
    let e = Config::parse(&format!(
            "{base}    protocol: postgres\n    postgres: {{ credentials_file: /c.yaml, pool: {{ mode: statement }} }}\n"
        ))
        .unwrap_err();
    assert!(
        e.contains("line 5: services[0].postgres.pool.mode: unknown variant `statement`"),
        "{e}"
    );
    let e = Config::parse(&format!(
            "{base}    protocol: postgres\n    postgres: {{ credentials_file: /c.yaml, pool: {{ size: 2, min_idle: 3 }} }}\n"
        ))
        .unwrap_err();
    assert!(e.contains("min_idle: at most pool.size (2)"), "{e}");
    let e = Config::parse(&format!("{base}    upstream: {{ target: any }}\n")).unwrap_err();
    assert!(e.contains("upstream.target: only postgres"), "{e}");
    let e = Config::parse(&format!(
            "{base}    protocol: postgres\n    upstream: {{ target: replica }}\n    postgres: {{ credentials_file: /c.yaml }}\n"
        ))
        .unwrap_err();
    assert!(
        e.contains("unknown variant `replica`, expected one of `read-write`, `any`, `read-only`, `primary`, `standby`, `prefer-standby`"),
        "{e}"
    );
}

#[test]
fn failover_example_parses() {
    use service::{Balance, CheckKind};
    let cfg = Config::parse(include_str!("../../../examples/failover.yaml")).unwrap();
    let s = &cfg.services[0];
    assert_eq!(s.timeouts.request, Some(Duration::from_secs(15)));
    assert_eq!(s.retries.attempts, 2);
    assert_eq!(s.retries.budget, 0.2);
    assert_eq!(s.limits.max_pending, 1024);
    assert_eq!(s.outlier.consecutive_failures, 5);
    assert_eq!(s.upstream.balance, Balance::P2c);
    assert_eq!(s.upstream.endpoints[1].priority, 1);
    // As the file has them (the defaults).
    assert_eq!(s.upstream.dns.min_ttl, Duration::from_secs(5));
    assert_eq!(s.upstream.dns.max_ttl, Duration::from_secs(300));
    let one = Config::parse(
        "services: [{ name: a, match: { cidr: 10.0.0.0/8 }, upstream: { dns: { min_ttl: 10m } } }]",
    )
    .unwrap();
    let dns = one.services[0].upstream.dns;
    assert_eq!(
        (dns.min_ttl, dns.max_ttl),
        (Duration::from_secs(600), Duration::from_secs(600))
    );
    let hc = s.upstream.health_check.as_ref().unwrap();
    assert_eq!(hc.interval, Duration::from_secs(2));
    assert_eq!(
        hc.kind,
        CheckKind::Http {
            path: "/healthz".into(),
            expect: 200
        }
    );
}

#[test]
fn service_errors_name_field_and_line() {
    let e = Config::parse("services:\n  - name: a\n    match: { port: 80 }\n").unwrap_err();
    // The line is the service's (serde_yaml_ng marks the enclosing mapping).
    assert!(
        e.starts_with("line 2: ") && e.contains("services[0].match"),
        "{e}"
    );

    let e = Config::parse(
            "services:\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n    protocol: http\n    request:\n      set_headers:\n        x-a: { value: a, env: B }\n",
        )
        .unwrap_err();
    assert!(
        e.starts_with("line 7: ") && e.contains("set_headers.x-a"),
        "{e}"
    );
    assert!(e.contains("exactly one of"), "{e}");

    let e = Config::parse(
            "services:\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n    upstream:\n      endpoints:\n        - address: nope\n",
        )
        .unwrap_err();
    assert!(
        e.starts_with("line 6: ") && e.contains("endpoints[0].address"),
        "{e}"
    );

    let e = Config::parse(
            "services:\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n    request: { remove_headers: [x-a] }\n",
        )
        .unwrap_err();
    assert!(
        e.contains("line 2: services[0].request") && e.contains("protocol: http"),
        "{e}"
    );

    let e = Config::parse(
        "services:\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n    upstream: { tls: {} }\n",
    )
    .unwrap_err();
    assert!(e.contains("server_name: required"), "{e}");

    let e = Config::parse(
            "services:\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n",
        )
        .unwrap_err();
    assert!(e.contains("used twice"), "{e}");
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let cfg = Config::parse(
            "services:\n  - name: a\n    match: { cidr: 10.0.0.0/8 }\n    protocol: http\n    request:\n      set_headers:\n        authorization: { value: s3cr3t-canary }\n",
        )
        .unwrap();
    let dump = format!("{cfg:?}");
    assert!(!dump.contains("s3cr3t-canary"), "{dump}");
    assert!(dump.contains("<redacted>"));
}

#[test]
fn errors_name_field_and_line() {
    let e = Config::parse("proxy:\n  port: 15001\n  prot: 1\n").unwrap_err();
    assert!(e.starts_with("line 3: "), "{e}");
    assert!(e.contains("proxy") && e.contains("prot"), "{e}");

    let e = Config::parse("intercept:\n  fail: maybe\n").unwrap_err();
    assert!(
        e.starts_with("line 2: ") && e.contains("intercept.fail"),
        "{e}"
    );

    let e = Config::parse("proxy:\n  port: nope\n").unwrap_err();
    assert!(e.starts_with("line 2: ") && e.contains("proxy.port"), "{e}");

    let e = Config::parse("intercept:\n  exclude_cidrs: [10.0.0.0/33]\n").unwrap_err();
    assert!(e.contains("line 2") && e.contains("exclude_cidrs"), "{e}");

    let e = Config::parse("proxy:\n  idle_timeout: soon\n").unwrap_err();
    assert!(e.contains("line 2") && e.contains("idle_timeout"), "{e}");

    let e = Config::parse("proxy:\n  port: 0\n").unwrap_err();
    assert_eq!(e, "line 2: proxy.port: must be 1-65535");

    let e = Config::parse("service: []\n").unwrap_err();
    assert!(e.starts_with("line 1: ") && e.contains("service"), "{e}");
}

#[test]
fn inbound_mistakes_are_named() {
    for (text, want) in [
        (
            "inbound: { ports: some }",
            "neither `all` nor a list of ports",
        ),
        (
            "inbound: { ports: [8080], policies: [{ port: 9090 }] }",
            "port 9090 is not intercepted",
        ),
        (
            "inbound: { ports: all, exclude_ports: [8080], policies: [{ port: 8080 }] }",
            "port 8080 is not intercepted",
        ),
        (
            "inbound: { ports: [8080], policies: [{ port: 8080 }, { port: 8080 }] }",
            "port 8080 has two policies",
        ),
        ("inbound: { ports: [8080], app: 0.0.0.0 }", "inbound.app"),
        ("inbound: { ports: [8080], app: '::1' }", "inbound.app"),
        ("inbound: { ports: [0] }", "0 is not a port"),
        ("inbound: { ports: [8080], port: 15001 }", "proxy.port too"),
        (
            "inbound: { ports: [8080], policies: [{ port: 8080, tls: { cert: a, key: b, alpn: [spdy] } }] }",
            "alpn `spdy` is not supported",
        ),
    ] {
        let e = Config::parse(text).expect_err(text);
        assert!(e.contains(want), "{text}: {e}");
    }
    let ok = Config::parse("inbound: { ports: all, exclude_ports: [15020] }").unwrap();
    assert!(ok.inbound.enabled() && ok.inbound.intercepts(8080));
    assert!(!ok.inbound.intercepts(15020));
    assert!(!Config::parse("").unwrap().inbound.enabled());
}

#[test]
fn inbound_auth_mistakes_are_named() {
    let with = |auth: &str| {
        format!("inbound: {{ ports: [8080], policies: [{{ port: 8080, auth: {auth} }}] }}")
    };
    for (auth, want) in [
        (
            "{ jwt: { jwks_file: k, algorithms: [HS256] } }",
            "HS256 is HMAC",
        ),
        (
            "{ jwt: { jwks_file: k, algorithms: [none] } }",
            "unsigned tokens",
        ),
        (
            "{ jwt: { jwks_file: k, algorithms: [] } }",
            "name at least one",
        ),
        (
            "{ jwt: { jwks_file: k, jwks_url: 'https://a.test/k' } }",
            "one of jwks_file and jwks_url",
        ),
        (
            "{ jwt: { jwks_url: 'http://a.test/k' } }",
            "must be an https:// URL",
        ),
        (
            "{ jwt: { jwks_file: k, jwks_refresh: 1m } }",
            "go with jwks_url",
        ),
        ("{ required: false }", "give jwt, api_keys or both"),
        (
            "{ api_keys: { file: k }, forward_claims: { sub: x-user } }",
            "needs auth.jwt",
        ),
        (
            "{ api_keys: { file: k, header: 'bad header' } }",
            "not an HTTP header name",
        ),
    ] {
        let text = with(auth);
        let e = Config::parse(&text).expect_err(&text);
        assert!(e.contains(want), "{text}: {e}");
    }
    let tcp = "inbound: { ports: [5432], policies: [{ port: 5432, protocol: tcp, auth: { api_keys: { file: k } } }] }";
    assert!(
        Config::parse(tcp)
            .unwrap_err()
            .contains("auth needs protocol: http")
    );
}

#[test]
fn inbound_gateway_mistakes_are_named() {
    let with =
        |rest: &str| format!("inbound: {{ ports: [8080], policies: [{{ port: 8080, {rest} }}] }}");
    for (rest, want) in [
        (
            "protocol: tcp, access: { rules: [] }",
            "access needs protocol: http",
        ),
        (
            "protocol: tcp, limits: { max_body_bytes: 10 }",
            "max_body_bytes needs protocol: http",
        ),
        (
            "rate_limit: { requests_per_second: 0, burst: 1 }",
            "more than 0",
        ),
        (
            "rate_limit: { requests_per_second: 1, burst: 0 }",
            "burst: between 1",
        ),
        (
            "rate_limit: { requests_per_second: 1, burst: 1, key: cookie }",
            "not a rate-limit key",
        ),
        (
            "rate_limit: { requests_per_second: 1, burst: 1, key: 'claim:sub' }",
            "needs auth.jwt",
        ),
        (
            "access: { rules: [{ action: allow, claims: { role: admin } }] }",
            "no auth.jwt",
        ),
        (
            "access: { rules: [{ action: allow, clients: [billing] }] }",
            "no auth.api_keys",
        ),
        (
            "access: { rules: [{ action: allow, path: /a, path_prefix: /b }] }",
            "not both",
        ),
        (
            "access: { rules: [{ action: allow, path: 'a/b' }] }",
            "not a plain path",
        ),
        (
            "access: { rules: [{ action: allow, path: '/a%2fb' }] }",
            "not a plain path",
        ),
        (
            "access: { rules: [{ action: allow, methods: ['GE T'] }] }",
            "not an HTTP method",
        ),
        ("access: { rules: [{ action: maybe }] }", "maybe"),
        (
            "limits: { max_connections: 0 }",
            "0 would refuse everything",
        ),
    ] {
        let text = with(rest);
        let e = Config::parse(&text).expect_err(&text);
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn inbound_tls_and_proxy_protocol_mistakes_are_named() {
    for (text, want) in [
        (
            "inbound: { ports: [8443], policies: [{ port: 8443, tls: { cert: c, key: k, allowed_sans: [a.test] } }] }",
            "allowed_sans needs client_ca",
        ),
        (
            "inbound: { ports: [8080], policies: [{ port: 8080, proxy_protocol: true }] }",
            "proxy_protocol is for protocol: tcp",
        ),
        (
            "inbound: { ports: [8080], policies: [{ port: 8080, protocol: tcp, app_protocol: http2 }] }",
            "app_protocol needs protocol: http",
        ),
        (
            "inbound: { ports: [8080], policies: [{ port: 8080, app_protocol: grpc }] }",
            "unknown variant `grpc`",
        ),
    ] {
        let e = Config::parse(text).expect_err(text);
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn target_roles_choose_servers_as_libpq_does() {
    use service::{Fit, ServerRole, TargetRole::*};
    let primary = ServerRole {
        standby: false,
        read_only_default: false,
    };
    let standby = ServerRole {
        standby: true,
        read_only_default: false,
    };
    let ro_primary = ServerRole {
        standby: false,
        read_only_default: true,
    };
    let table = [
        (ReadWrite, [Fit::Yes, Fit::No, Fit::No]),
        (Any, [Fit::Yes, Fit::Yes, Fit::Yes]),
        (ReadOnly, [Fit::No, Fit::Yes, Fit::Yes]),
        (Primary, [Fit::Yes, Fit::No, Fit::Yes]),
        (Standby, [Fit::No, Fit::Yes, Fit::No]),
        (PreferStandby, [Fit::Fallback, Fit::Yes, Fit::Fallback]),
    ];
    for (target, want) in table {
        let got = [primary, standby, ro_primary].map(|r| target.fits(r));
        assert_eq!(got, want, "{}", target.as_str());
    }
}

#[test]
fn hosts_as_users_write_them() {
    let svc = |host: &str| {
        format!(
            "services:\n  - name: s\n    match: {{ host: \"{host}\", port: 80 }}\n    protocol: http\n"
        )
    };
    for ok in [
        "*.example.com",
        "*.a.b.example.com",
        "payments",
        "Payments.Default",
    ] {
        assert!(Config::parse(&svc(ok)).is_ok(), "{ok}");
    }
    let c = Config::parse(&svc("*.Example.COM")).unwrap();
    assert_eq!(c.services[0].matcher.host.as_deref(), Some("*.example.com"));
    for (bad, why) in [
        ("*.com", "two labels or more"),
        ("a.*.com", "is not a host name"),
        ("*", "is not a host name"),
        ("**.example.com", "is not a host name"),
    ] {
        let e = Config::parse(&svc(bad)).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
    let e = Config::parse("proxy: { search_domains: [\"bad domain\"] }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("proxy.search_domains"), "{e}");
}
