//! The HTTP load both HTTP sections (outbound `http.rs`, inbound
//! `inbound.rs`) measure with: one oha run against a [`Target`], every
//! request's latency read back from oha's SQLite database; one mode in one
//! round ([`measure`]: unthrottled with the proxy's CPU time, then at a
//! fixed rate); and a mode's figures over its rounds ([`figures`]).

use std::{fs, path::Path, process::Command};

use ambassador_tests::{Placement, placed};
use anyhow::{Context as _, ensure};

use super::{
    machine::{cpu_ticks, ticks_per_second},
    stats::{median, percentile},
};

/// Requests per second for the latency runs: well under the slowest mode's
/// maximum on 2 cores (see the max column), so every mode holds it.
pub(super) const RATE: u32 = 2000;
pub(super) const CONNECTIONS: u32 = 32;
pub(super) const FIXED_SECONDS: u32 = 3;
pub(super) const MAX_SECONDS: u32 = 2;
/// Requests due in a fixed-rate run's first quarter second are left out of
/// its latencies: the client is still opening its connections (for HTTPS,
/// 32 handshakes and its certificate store), which is the client's start,
/// not the proxy's steady state the bench measures.
pub(super) const WARM_UP_SECONDS: f64 = 0.25;

/// What oha sends, where, and what must come back.
pub(super) struct Target {
    pub(super) label: String,
    pub(super) url: String,
    /// oha's arguments besides duration, connections, rate and URL
    /// (method, body, headers, `--cacert`, `--http2`).
    pub(super) args: Vec<String>,
    /// Every answer must be a 200 of this many bytes.
    pub(super) response_bytes: usize,
    /// HTTP/2: streams in flight at the deadline are cut, not failed.
    pub(super) h2: bool,
}

/// What one oha run measured.
pub(super) struct Load {
    pub(super) rps: f64,
    pub(super) requests: u64,
    /// Every request's latency after the warm-up (fixed-rate runs only), in
    /// microseconds, sorted.
    pub(super) latencies_us: Vec<f64>,
}

/// One mode's measurement in one round: (fixed-rate load, max req/s, proxy
/// CPU per request).
pub(super) type Run = (Load, f64, Option<(f64, f64)>);

/// One mode's medians over the rounds.
pub(super) struct Figures {
    pub(super) label: String,
    /// Over all rounds' requests pooled.
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
    pub(super) requests: usize,
    /// Each round's own p50 and p99, in round order (the same for every mode).
    pub(super) round_p50: Vec<f64>,
    pub(super) round_p99: Vec<f64>,
    pub(super) fixed_rps: f64,
    pub(super) max_rps: f64,
    /// The proxy's CPU time per request in the unthrottled run, user and
    /// system, in microseconds (none for direct).
    pub(super) cpu_us: Option<(f64, f64)>,
}

/// One mode in one round: unthrottled, with the proxy's CPU time (`pids`),
/// then at the fixed rate with every request's latency (by way of `db`).
pub(super) fn measure(
    oha: &Path,
    at: &Placement<'_>,
    t: &Target,
    pids: &[u32],
    fixed_seconds: u32,
    db: &Path,
) -> anyhow::Result<Run> {
    // Unthrottled first: it also warms the proxies' pools and TLS sessions
    // (emptied when ambassador restarts).
    let cpu_before = cpu_ticks(pids);
    let max = load(oha, at, t, None, MAX_SECONDS, None)
        .with_context(|| format!("max rate, {}", t.label))?;
    let cpu = cpu_before
        .zip(cpu_ticks(pids))
        .filter(|_| max.requests > 0)
        .map(|((u0, s0), (u1, s1))| {
            let per = |t: u64| t as f64 * 1e6 / ticks_per_second() / max.requests as f64;
            (per(u1 - u0), per(s1 - s0))
        });
    let fixed = load(oha, at, t, Some(RATE), fixed_seconds, Some(db))
        .with_context(|| format!("fixed rate, {}", t.label))?;
    Ok((fixed, max.rps, cpu))
}

/// A mode's figures from its rounds: percentiles of the requests pooled and
/// of each round, the median round's rates and CPU.
pub(super) fn figures(label: String, r: &[Run]) -> Figures {
    let (round_p50, round_p99) = r
        .iter()
        .map(|(f, ..)| {
            let l = &f.latencies_us;
            (percentile(l, 0.50), percentile(l, 0.99))
        })
        .unzip();
    let mut pooled: Vec<f64> = r
        .iter()
        .flat_map(|(f, ..)| f.latencies_us.iter().copied())
        .collect();
    pooled.sort_by(f64::total_cmp);
    let cpu: Vec<(f64, f64)> = r.iter().filter_map(|(.., c)| *c).collect();
    Figures {
        label,
        p50_us: percentile(&pooled, 0.50),
        p99_us: percentile(&pooled, 0.99),
        requests: pooled.len(),
        round_p50,
        round_p99,
        fixed_rps: median(r.iter().map(|(f, ..)| f.rps)),
        max_rps: median(r.iter().map(|(_, m, _)| *m)),
        cpu_us: (!cpu.is_empty()).then(|| {
            (
                median(cpu.iter().map(|c| c.0)),
                median(cpu.iter().map(|c| c.1)),
            )
        }),
    }
}

/// One oha run: at `rate` with latency measured from when each request was
/// due (not when it went out), or unthrottled. With `db`, every request's
/// latency comes back too (oha writes them to that SQLite file).
pub(super) fn load(
    oha: &Path,
    at: &Placement<'_>,
    t: &Target,
    rate: Option<u32>,
    seconds: u32,
    db: Option<&Path>,
) -> anyhow::Result<Load> {
    let url = &t.url;
    let mut cmd = placed(oha, at);
    cmd.args(&t.args)
        .args(["-z", &format!("{seconds}s"), "-c", &CONNECTIONS.to_string()])
        // Requests in flight at the deadline finish rather than count as errors.
        .args(["-w", "--no-tui", "--output-format", "json"]);
    if let Some(q) = rate {
        cmd.args(["-q", &q.to_string(), "--latency-correction"]);
    }
    if let Some(db) = db {
        // oha adds to an existing file.
        let _ = fs::remove_file(db);
        cmd.arg("--db-url").arg(db);
    }
    let out = cmd
        .arg(url)
        .output()
        .with_context(|| format!("cannot start {}", oha.display()))?;
    ensure!(
        out.status.success(),
        "oha {url} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("oha's JSON output")?;
    let errors = &v["errorDistribution"];
    ensure!(
        errors.as_object().is_some_and(|e| {
            // oha's `-w` does not wait for HTTP/2 streams in flight at the
            // deadline (training only): those are cut, not failed.
            e.keys()
                .all(|k| t.h2 && k.as_str() == "aborted due to deadline")
        }),
        "oha {url}: request errors {errors}"
    );
    let statuses = &v["statusCodeDistribution"];
    ensure!(
        statuses
            .as_object()
            .is_some_and(|s| s.keys().all(|k| k == "200")),
        "oha {url}: statuses {statuses}"
    );
    let size = v["summary"]["sizePerRequest"].as_u64();
    ensure!(
        size == Some(t.response_bytes as u64),
        "oha {url}: {size:?} bytes per response, expected {}",
        t.response_bytes
    );
    let requests = statuses["200"].as_u64().unwrap_or(0);
    let latencies_us = match db {
        Some(db) => {
            let all = request_latencies(db)?;
            ensure!(
                all.len() as u64 == requests,
                "{}: {} requests recorded, oha counted {requests}",
                db.display(),
                all.len()
            );
            let _ = fs::remove_file(db);
            let mut l: Vec<f64> = all
                .into_iter()
                .filter(|(due, _)| *due >= WARM_UP_SECONDS)
                .map(|(_, us)| us)
                .collect();
            l.sort_by(f64::total_cmp);
            l
        }
        None => Vec::new(),
    };
    Ok(Load {
        requests,
        latencies_us,
        rps: v["summary"]["requestsPerSec"]
            .as_f64()
            .context("no summary.requestsPerSec in oha's output")?,
    })
}

/// Each request's (when it was due, in seconds from the run's start;
/// latency in microseconds) from oha's database: `duration` runs from when
/// the request was due (latency correction), as oha's own percentiles do.
fn request_latencies(db: &Path) -> anyhow::Result<Vec<(f64, f64)>> {
    let out = Command::new("sqlite3")
        .args(["-batch", "-noheader", "-separator", " "])
        .arg(db)
        .arg("SELECT start_latency_correction, duration FROM oha")
        .output()
        .context("cannot start sqlite3")?;
    ensure!(
        out.status.success(),
        "sqlite3 {}: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace().map(str::parse::<f64>);
            match (f.next(), f.next()) {
                (Some(Ok(due)), Some(Ok(d))) => Ok((due, d * 1e6)),
                _ => anyhow::bail!("{}: not a start and a duration: {l:?}", db.display()),
            }
        })
        .collect()
}
