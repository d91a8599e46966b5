//! Attach/detach cycles leave the kernel as they found it. Its own test binary:
//! it counts every BPF object on the host, so nothing else may run beside it.

use std::{
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::*;

#[test]
fn hundred_attach_detach_cycles_return_to_baseline() {
    let pod = Pod::new("");
    let out = pod.ambassador(&["uninstall", "--cgroup"], Some(&pod.cgroup));
    assert!(out.status.success(), "{}", stderr(&out));
    let baseline = settle(None);
    for i in 0..100 {
        let out = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup));
        assert!(out.status.success(), "cycle {i} init: {}", stderr(&out));
        let out = pod.ambassador(&["uninstall", "--cgroup"], Some(&pod.cgroup));
        assert!(
            out.status.success(),
            "cycle {i} uninstall: {}",
            stderr(&out)
        );
    }
    // The kernel frees programs and maps after an RCU grace period: wait for it.
    let after = settle(Some(baseline));
    assert_eq!(
        after, baseline,
        "(programs, maps, links) before vs after 100 cycles"
    );
    assert!(!pod.pin_dir().exists());
}

/// Counts once things stop moving (or reach `target`), up to 10 s.
fn settle(target: Option<(usize, usize, usize)>) -> (usize, usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = bpf_object_counts();
    loop {
        thread::sleep(Duration::from_millis(200));
        let now = bpf_object_counts();
        if Some(now) == target || (target.is_none() && now == last) || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}
