use super::*;

#[test]
fn service_series_are_shared_by_name_and_classed() {
    let m = get();
    let a = m.service("svc-test-a");
    let b = m.service("svc-test-a");
    a.response(200);
    b.response(204);
    a.response(503);
    a.response(42); // nonsense status: counted in the lowest class, no panic
    let text = m.encode();
    assert!(
        text.contains(
            r#"ambassador_http_requests_total{service="svc-test-a",direction="outbound",status_class="2xx"} 2"#
        ),
        "{text}"
    );
    assert!(text.contains(
        r#"ambassador_http_requests_total{service="svc-test-a",direction="outbound",status_class="5xx"} 1"#
    ));
    assert!(text.contains(
        r#"ambassador_http_requests_total{service="svc-test-a",direction="outbound",status_class="1xx"} 1"#
    ));
}

#[test]
fn state_sources_render_at_scrape() {
    let m = get();
    m.state().set(
        "unit-test",
        Box::new(|rows: &mut StateRows| {
            rows.endpoint_up
                .push(("s".into(), "10.0.0.1:80".into(), true));
            rows.kernel.push(("redirected", 7));
            rows.kernel.push(("accelerated", 5));
            rows.kernel.push(("udp_refused", 3));
            rows.gauges.push(("pool_idle", "idle", "db".into(), 3));
        }),
    );
    let text = m.encode();
    assert!(
        text.contains(r#"ambassador_endpoint_up{service="s",endpoint="10.0.0.1:80"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"ambassador_kernel_connects_total{outcome="redirected"} 7"#),
        "{text}"
    );
    // Not a connect outcome: a series of its own.
    assert!(
        text.contains("ambassador_kernel_accelerated_streams_total 5"),
        "{text}"
    );
    assert!(!text.contains(r#"outcome="accelerated""#), "{text}");
    // UDP verdicts are not connects: a series of their own.
    assert!(
        text.contains(r#"ambassador_kernel_udp_total{outcome="refused"} 3"#),
        "{text}"
    );
    assert!(!text.contains(r#"outcome="udp_refused""#), "{text}");
    assert!(
        text.contains(r#"ambassador_pool_idle{service="db"} 3"#),
        "{text}"
    );
}
