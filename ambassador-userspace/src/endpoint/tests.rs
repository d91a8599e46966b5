use super::*;

fn set(specs: &[(&str, u32)], balance: Balance) -> EndpointSet {
    let cfg: Vec<EndpointConfig> = specs
        .iter()
        .map(|(a, p)| EndpointConfig {
            address: HostPort::try_from(a.to_string()).unwrap(),
            priority: *p,
        })
        .collect();
    EndpointSet::new(
        "test",
        &cfg,
        balance,
        Outlier {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected: 0.5,
        },
        EndpointDns::default(),
    )
}

fn name(p: &Picked) -> String {
    p.endpoint.address.to_string()
}

#[tokio::test(start_paused = true)]
async fn priority_failover_and_readmission() {
    let s = set(
        &[("10.0.0.2:80", 1), ("10.0.0.1:80", 0)],
        Balance::RoundRobin,
    );
    let primary = s.endpoints()[0].clone();
    assert_eq!(primary.address.to_string(), "10.0.0.1:80");
    assert_eq!(name(&s.pick(&[]).unwrap()), "10.0.0.1:80");
    assert_eq!(s.failure(&primary), None);
    assert_eq!(s.failure(&primary), None);
    assert_eq!(s.failure(&primary), Some(Duration::from_secs(30)));
    // Ejected: the secondary takes the traffic.
    assert_eq!(name(&s.pick(&[]).unwrap()), "10.0.0.2:80");
    tokio::time::advance(Duration::from_secs(31)).await;
    // Back after its ejection time.
    assert_eq!(name(&s.pick(&[]).unwrap()), "10.0.0.1:80");
}

#[tokio::test(start_paused = true)]
async fn ejections_grow_and_are_capped_and_forgotten() {
    let s = set(
        &[("10.0.0.1:80", 0), ("10.0.0.2:80", 0)],
        Balance::RoundRobin,
    );
    let ep = s.endpoints()[0].clone();
    let mut times = Vec::new();
    for _ in 0..6 {
        let t = (0..3).find_map(|_| s.failure(&ep)).unwrap();
        times.push(t.as_secs());
        tokio::time::advance(t + Duration::from_secs(1)).await;
    }
    assert_eq!(times, [30, 60, 120, 240, 300, 300]);
    // A healthy stretch longer than the cap resets the growth.
    tokio::time::advance(Duration::from_secs(301)).await;
    s.success(&ep);
    let t = (0..3).find_map(|_| s.failure(&ep)).unwrap();
    assert_eq!(t, Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn never_more_than_the_share_but_always_one() {
    let s = set(
        &[("10.0.0.1:80", 0), ("10.0.0.2:80", 0), ("10.0.0.3:80", 0)],
        Balance::RoundRobin,
    );
    let eject = |i: usize| (0..3).find_map(|_| s.failure(&s.endpoints()[i]));
    // 0.5 of 3 is 1.
    assert!(eject(0).is_some());
    assert!(
        eject(1).is_none(),
        "a second ejection would exceed the share"
    );
    let single = set(&[("10.0.0.1:80", 0)], Balance::RoundRobin);
    assert!(
        (0..3)
            .find_map(|_| single.failure(&single.endpoints()[0]))
            .is_some()
    );
    // All ejected: still answers, with the best priority.
    assert_eq!(name(&single.pick(&[]).unwrap()), "10.0.0.1:80");
}

#[tokio::test(start_paused = true)]
async fn a_success_breaks_the_failure_streak() {
    let s = set(
        &[("10.0.0.1:80", 0), ("10.0.0.2:80", 0)],
        Balance::RoundRobin,
    );
    let ep = s.endpoints()[0].clone();
    s.failure(&ep);
    s.failure(&ep);
    s.success(&ep);
    assert_eq!(s.failure(&ep), None);
    assert_eq!(s.failure(&ep), None);
    assert!(!s.is_ejected(&ep));
}

#[test]
fn p2c_always_compares_two_different_endpoints() {
    let s = set(
        &[("10.0.0.1:80", 0), ("10.0.0.2:80", 0), ("10.0.0.3:80", 0)],
        Balance::P2c,
    );
    // With one endpoint loaded, it must never win against an idle one.
    let busy = s.pick(&[]).unwrap();
    for _ in 0..30 {
        let p = s.pick(&[]).unwrap();
        assert!(!Arc::ptr_eq(&p.endpoint, &busy.endpoint) || busy.endpoint.outstanding() == 0);
    }
}

#[tokio::test(start_paused = true)]
async fn p2c_prefers_the_less_loaded_and_skips_what_was_tried() {
    let s = set(&[("10.0.0.1:80", 0), ("10.0.0.2:80", 0)], Balance::P2c);
    // Hold many picks of whatever comes: the load stays balanced.
    let held: Vec<Picked> = (0..100).map(|_| s.pick(&[]).unwrap()).collect();
    let a = s.endpoints()[0].outstanding();
    let b = s.endpoints()[1].outstanding();
    assert_eq!(a + b, 100);
    assert!(a.abs_diff(b) <= 2, "{a} vs {b}");
    drop(held);
    assert_eq!(s.endpoints()[0].outstanding(), 0);
    let first = s.pick(&[]).unwrap();
    let tried = [first.endpoint.clone()];
    let second = s.pick(&tried).unwrap();
    assert!(!Arc::ptr_eq(&first.endpoint, &second.endpoint));
    assert!(
        s.pick(&[first.endpoint.clone(), second.endpoint.clone()])
            .is_none()
    );
}
