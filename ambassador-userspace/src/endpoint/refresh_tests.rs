use std::sync::Mutex;

use tokio::time::Instant;

use super::*;
use crate::config::service::{Balance, EndpointConfig, HostPort, Outlier};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| ip(s)).collect()
}

/// What, the current list, the entry resolved, its answer, the next list.
type Case = (
    &'static str,
    Vec<Key>,
    usize,
    Vec<IpAddr>,
    Option<Vec<Slot>>,
);

#[test]
fn plans() {
    use Slot::{Keep, New};
    let a = ip("10.0.0.1");
    let b = ip("10.0.0.2");
    let c = ip("10.0.0.3");
    let six = ip("fd00::3");
    let cases: Vec<Case> = vec![
        (
            "the first answer replaces the stand-in, in address order",
            vec![(0, None)],
            0,
            vec![c, a, b],
            Some(vec![New(a), New(b), New(c)]),
        ),
        (
            "both families",
            vec![(0, None)],
            0,
            vec![six, a],
            Some(vec![New(a), New(six)]),
        ),
        (
            "the same addresses in another order change nothing",
            vec![(0, Some(a)), (0, Some(b))],
            0,
            vec![b, a, b],
            None,
        ),
        (
            "no addresses keep the last ones",
            vec![(0, Some(a))],
            0,
            vec![],
            None,
        ),
        (
            "no addresses keep the stand-in",
            vec![(0, None)],
            0,
            vec![],
            None,
        ),
        (
            "an address gone, one kept, one new",
            vec![(0, Some(a)), (0, Some(b))],
            0,
            vec![c, b],
            Some(vec![Keep(1), New(c)]),
        ),
        (
            "a subset",
            vec![(0, Some(a)), (0, Some(b)), (0, Some(c))],
            0,
            vec![a],
            Some(vec![Keep(0)]),
        ),
        (
            "other entries are kept where they are, the literal and the other name",
            vec![(0, None), (1, Some(a)), (2, None)],
            1,
            vec![a, b],
            Some(vec![Keep(0), Keep(2), Keep(1), New(b)]),
        ),
        (
            "two entries may share an address: each has its own endpoint",
            vec![(0, Some(a)), (1, None)],
            1,
            vec![a],
            Some(vec![Keep(0), New(a)]),
        ),
    ];
    for (what, current, source, answer, want) in cases {
        assert_eq!(plan(&current, source, &answer), want, "{what}");
    }
}

#[test]
fn ttls_are_clamped_and_failures_wait_the_shortest() {
    let dns = EndpointDns {
        min_ttl: Duration::from_secs(5),
        max_ttl: Duration::from_secs(300),
    };
    let s = Duration::from_secs;
    for (ttl, want) in [
        (Some(s(0)), s(5)),
        (Some(s(1)), s(5)),
        (Some(s(30)), s(30)),
        (Some(s(86_400)), s(300)),
        (None, s(5)),
    ] {
        assert_eq!(next_lookup(ttl, &dns), want, "{ttl:?}");
    }
}

fn named_set(dns: EndpointDns) -> Arc<EndpointSet> {
    let cfg = [
        EndpointConfig {
            address: HostPort::try_from("db.example:5432".to_string()).unwrap(),
            priority: 0,
        },
        EndpointConfig {
            address: HostPort::try_from("10.9.9.9:5432".to_string()).unwrap(),
            priority: 1,
        },
    ];
    Arc::new(EndpointSet::new(
        "refresh-test",
        &cfg,
        Balance::RoundRobin,
        Outlier::default(),
        dns,
    ))
}

fn labels(set: &EndpointSet) -> Vec<String> {
    set.endpoints()
        .iter()
        .map(|e| e.label().to_string())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn addresses_still_answered_keep_their_endpoint_and_its_health() {
    let set = named_set(EndpointDns::default());
    assert_eq!(labels(&set), ["db.example:5432", "10.9.9.9:5432"]);
    let c = set.resolved(0, &ips(&["10.0.0.2", "10.0.0.1"])).unwrap();
    assert_eq!(c.removed, ["db.example:5432"]);
    assert_eq!(
        labels(&set),
        [
            "db.example:5432@10.0.0.1",
            "db.example:5432@10.0.0.2",
            "10.9.9.9:5432"
        ]
    );
    let first = set.endpoints()[0].clone();
    let second = set.endpoints()[1].clone();
    // A live connection to the one about to go, and an ejection of the one
    // that stays.
    let live = set.hold(&second);
    let ejected = (0..5).find_map(|_| set.failure(&first));
    assert!(ejected.is_some());
    let generation = set.generation();
    let c = set.resolved(0, &ips(&["10.0.0.1", "10.0.0.3"])).unwrap();
    assert_eq!(
        (c.added, c.removed),
        (
            vec!["db.example:5432@10.0.0.3".to_string()],
            vec!["db.example:5432@10.0.0.2".to_string()]
        )
    );
    assert!(set.generation() > generation);
    assert!(Arc::ptr_eq(&set.endpoints()[0], &first));
    assert!(set.is_ejected(&first), "health went on");
    assert!(!set.contains(&second));
    // The connection still has its endpoint, and it still counts.
    assert_eq!(live.endpoint.outstanding(), 1);
    assert_eq!(
        live.endpoint.socket_addr().await.unwrap(),
        "10.0.0.2:5432".parse().unwrap()
    );
    drop(live);
    // Nothing new: no swap.
    let generation = set.generation();
    assert!(set.resolved(0, &ips(&["10.0.0.3", "10.0.0.1"])).is_none());
    assert!(set.resolved(0, &[]).is_none());
    assert_eq!(set.generation(), generation);
    // The new one takes traffic; the literal is still the fallback.
    let picked: Vec<String> = (0..4)
        .map(|_| set.pick(&[]).unwrap().endpoint.label().to_string())
        .collect();
    assert!(
        picked.iter().all(|l| l == "db.example:5432@10.0.0.3"),
        "{picked:?}"
    );
}

/// A scripted resolver: answers in turn (the last one again), and when it
/// was asked.
struct Script {
    answers: Vec<Result<Answer, LookupError>>,
    asked: Vec<Duration>,
}

fn answer(list: &[&str], ttl: u64) -> Result<Answer, LookupError> {
    Ok(Answer {
        ips: ips(list),
        ttl: Some(Duration::from_secs(ttl)),
    })
}

fn again(r: &Result<Answer, LookupError>) -> Result<Answer, LookupError> {
    match r {
        Ok(a) => Ok(a.clone()),
        Err(_) => Err(LookupError::Empty),
    }
}

#[tokio::test(start_paused = true)]
async fn names_are_looked_up_again_when_their_ttl_runs_out_within_bounds() {
    let dns = EndpointDns {
        min_ttl: Duration::from_secs(5),
        max_ttl: Duration::from_secs(60),
    };
    let set = named_set(dns);
    let script = Arc::new(Mutex::new(Script {
        answers: vec![
            answer(&["10.0.0.1", "10.0.0.2"], 1),     // below min: 5 s
            answer(&["10.0.0.1"], 30),                // 30 s
            Err(LookupError::Dns("SERVFAIL".into())), // kept, 5 s
            answer(&["10.0.0.1", "10.0.0.3"], 3600),  // above max: 60 s
        ],
        asked: Vec::new(),
    }));
    let start = Instant::now();
    let s = script.clone();
    let task = tokio::spawn(keep_resolved(
        Arc::downgrade(&set),
        0,
        move |host: String| {
            assert_eq!(host, "db.example");
            let mut s = s.lock().unwrap();
            s.asked.push(start.elapsed());
            let i = (s.asked.len() - 1).min(s.answers.len() - 1);
            let r = again(&s.answers[i]);
            async move { r }
        },
    ));
    let at = |secs: u64| start + Duration::from_secs(secs) + Duration::from_millis(1);
    tokio::time::sleep_until(at(0)).await;
    assert_eq!(set.endpoints().len(), 3);
    tokio::time::sleep_until(at(5)).await;
    assert_eq!(labels(&set), ["db.example:5432@10.0.0.1", "10.9.9.9:5432"]);
    tokio::time::sleep_until(at(35)).await;
    assert_eq!(
        labels(&set),
        ["db.example:5432@10.0.0.1", "10.9.9.9:5432"],
        "a failed lookup keeps the last addresses"
    );
    tokio::time::sleep_until(at(40)).await;
    assert_eq!(set.endpoints().len(), 3);
    tokio::time::sleep_until(at(200)).await;
    let asked: Vec<u64> = script
        .lock()
        .unwrap()
        .asked
        .iter()
        .map(|d| d.as_secs())
        .collect();
    assert_eq!(asked, [0, 5, 35, 40, 100, 160]);
    // The set gone (a reload), the task ends at its next wake.
    drop(set);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(task.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_reloaded_set_starts_from_the_addresses_the_old_one_had() {
    let old = named_set(EndpointDns::default());
    old.resolved(0, &ips(&["10.0.0.1", "10.0.0.2"]));
    let new = named_set(EndpointDns::default());
    new.adopt(&old);
    assert_eq!(labels(&new), labels(&old));
    // Its own endpoints: the old set's go with it.
    assert!(!Arc::ptr_eq(&new.endpoints()[0], &old.endpoints()[0]));
    // Nothing resolved yet: nothing to adopt, the stand-in stays.
    let fresh = named_set(EndpointDns::default());
    let newer = named_set(EndpointDns::default());
    newer.adopt(&fresh);
    assert_eq!(labels(&newer), ["db.example:5432", "10.9.9.9:5432"]);
}
