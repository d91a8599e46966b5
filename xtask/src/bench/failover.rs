//! The failover part of `cargo xtask bench`: tail latency at a fixed rate
//! while one of a service's two endpoints is killed and restarted, next to the
//! same load in steady state, and the share of requests that failed (the
//! target for idempotent requests is zero).

use std::{
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{Placement, Pod, SERVER_V4, SERVER2_V4, placed, upstream::HttpUpstream};
use anyhow::{Context as _, ensure};

use super::report;

const PORT: u16 = 8300;
const ORIGIN_PORT: u16 = 9300;
pub(super) const RATE: u32 = 1000;
pub(super) const SECONDS: u64 = 9;
/// The app dials a service address; both endpoints are behind it.
const SERVICE_IP: &str = "198.18.0.99";
pub(super) const KILL_AT: Duration = Duration::from_secs(2);
pub(super) const BACK_AT: Duration = Duration::from_secs(3);

pub(super) struct Run {
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) p999_ms: f64,
    pub(super) requests: u64,
    pub(super) failed: u64,
}

pub(super) fn run() -> anyhow::Result<String> {
    let oha = crate::toolchain::ensure_oha()?;
    let config = format!(
        r#"
telemetry: {{ access_log: false }}
services:
  - name: api
    match: {{ cidr: {SERVICE_IP}/32, port: {PORT} }}
    protocol: http
    outlier: {{ consecutive_failures: 3, base_ejection: 2s }}
    upstream:
      endpoints:
        - {{ address: "{SERVER_V4}:{ORIGIN_PORT}" }}
        - {{ address: "{SERVER2_V4}:{ORIGIN_PORT}" }}
"#
    );
    let mut pod = Pod::new(&config);
    pod.start_proxy_logging("warn,ambassador_userspace::proxy=info");
    let a = HttpUpstream::plain(pod.server_listener(SERVER_V4, ORIGIN_PORT));
    let _b = HttpUpstream::plain(pod.server_listener(SERVER2_V4, ORIGIN_PORT));
    let at = Placement {
        netns: &pod.netns,
        cgroup: &pod.app_cgroup,
        uid: None,
    };
    let steady = load(&oha, &at, |_| {}).context("steady-state run")?;
    // Kill endpoint A at KILL_AT, bring it back at BACK_AT: its first
    // ejection (2 s) ends after that, so it gets traffic again within the run.
    let mut a = Some(a);
    let mut restarted = false;
    let chaos = load(&oha, &at, |elapsed| {
        if elapsed >= KILL_AT && a.is_some() && !restarted {
            a = None;
        }
        if elapsed >= BACK_AT && a.is_none() {
            restarted = true;
            a = Some(HttpUpstream::plain(
                pod.server_listener(SERVER_V4, ORIGIN_PORT),
            ));
        }
    })
    .context("run with an endpoint killed and restarted")?;
    let back = a.as_ref().map_or(0, |a| a.seen().len());
    Ok(report::failover_table(&steady, &chaos, back))
}

/// One fixed-rate run; `tick` is called every 50 ms with the time elapsed.
fn load(
    oha: &std::path::Path,
    at: &Placement<'_>,
    mut tick: impl FnMut(Duration),
) -> anyhow::Result<Run> {
    let child = placed(oha, at)
        .args([
            "-z",
            &format!("{SECONDS}s"),
            "-c",
            "16",
            "-q",
            &RATE.to_string(),
        ])
        .args([
            "--latency-correction",
            "-w",
            "--no-tui",
            "--output-format",
            "json",
        ])
        .arg(format!("http://{SERVICE_IP}:{PORT}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start oha")?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(SECONDS + 20);
    let mut child = child;
    while child.try_wait()?.is_none() {
        ensure!(Instant::now() < deadline, "oha did not finish");
        tick(started.elapsed());
        thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "oha failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha's JSON output")?;
    let count = |m: &serde_json::Value| -> u64 {
        m.as_object()
            .map_or(0, |o| o.values().filter_map(|x| x.as_u64()).sum())
    };
    let statuses = &v["statusCodeDistribution"];
    let ok = statuses["200"].as_u64().unwrap_or(0);
    let requests = count(statuses) + count(&v["errorDistribution"]);
    let ms = |p: &str| -> anyhow::Result<f64> {
        Ok(v["latencyPercentiles"][p]
            .as_f64()
            .with_context(|| format!("no latencyPercentiles.{p} in oha's output"))?
            * 1e3)
    };
    Ok(Run {
        p50_ms: ms("p50")?,
        p99_ms: ms("p99")?,
        p999_ms: ms("p99.9")?,
        requests,
        failed: requests - ok,
    })
}
