//! The HTTP section's client side: the check that a mode answers as it
//! should before it is measured (curl), and one oha run, with every request's
//! latency read back from oha's SQLite database.

use std::{fs, path::Path, process::Command};

use ambassador_tests::{Placement, SERVER_V4, placed};
use anyhow::{Context as _, ensure};

use super::{
    AMBASSADOR_H2_PORT, AMBASSADOR_TLS_PORT, AUTHORIZATION, BODY_BYTES, CONNECTIONS, HAPROXY_PORT,
    HAPROXY_TLS_PORT, Mode, NGINX_PORT, NGINX_TLS_PORT, ORIGIN_H2C_PORT, ORIGIN_PORT, TRAIN_PATH,
    TRAIN_REQUEST_BYTES, TRAIN_RESPONSE_BYTES, Via,
};

/// What one oha run measured.
pub(super) struct Load {
    pub(super) rps: f64,
    pub(super) requests: u64,
    /// Every request's latency (fixed-rate runs only), in microseconds,
    /// sorted.
    pub(super) latencies_us: Vec<f64>,
}

/// The same job every way: the origin must see the header the proxy set (and
/// none direct), and the whole body must come back.
pub(super) fn check(at: &Placement<'_>, mode: &Mode) -> anyhow::Result<()> {
    let base = url(mode);
    let want_auth = if mode.via == Via::Direct {
        ""
    } else {
        AUTHORIZATION
    };
    let auth = curl(at, &format!("{base}auth"), &[])
        .with_context(|| format!("checking {}", mode.label))?;
    ensure!(
        auth == want_auth,
        "{}: the origin saw Authorization {auth:?}, expected {want_auth:?}",
        mode.label
    );
    let got = curl(
        at,
        &base,
        &["-o", "/dev/null", "-w", "%{http_code} %{size_download}"],
    )
    .with_context(|| format!("checking {}", mode.label))?;
    ensure!(
        got == format!("200 {BODY_BYTES}"),
        "{}: GET / answered {got:?}, expected \"200 {BODY_BYTES}\"",
        mode.label
    );
    Ok(())
}

/// Where the client sends its requests in each mode.
fn url(m: &Mode) -> String {
    let (host, port) = match (m.via, m.tls) {
        (Via::Ambassador, true) if m.h2 => (SERVER_V4, AMBASSADOR_H2_PORT),
        (Via::Ambassador, false) if m.h2 => (SERVER_V4, ORIGIN_H2C_PORT),
        (Via::Direct, _) => (SERVER_V4, ORIGIN_PORT),
        (Via::Ambassador, false) => (SERVER_V4, ORIGIN_PORT),
        (Via::Ambassador, true) => (SERVER_V4, AMBASSADOR_TLS_PORT),
        (Via::Haproxy, false) => ("127.0.0.1", HAPROXY_PORT),
        (Via::Haproxy, true) => ("127.0.0.1", HAPROXY_TLS_PORT),
        (Via::Nginx, false) => ("127.0.0.1", NGINX_PORT),
        (Via::Nginx, true) => ("127.0.0.1", NGINX_TLS_PORT),
    };
    format!("http://{host}:{port}/")
}

fn curl(at: &Placement<'_>, url: &str, extra: &[&str]) -> anyhow::Result<String> {
    let out = placed("curl", at)
        .args(["-sS", "--max-time", "5"])
        .args(extra)
        .arg(url)
        .output()
        .context("cannot start curl")?;
    ensure!(
        out.status.success(),
        "curl {url} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One oha run: at `rate` with latency measured from when each request was
/// due (not when it went out), or unthrottled. With `db`, every request's
/// latency comes back too (oha writes them to that SQLite file).
pub(super) fn load(
    oha: &Path,
    at: &Placement<'_>,
    mode: &Mode,
    rate: Option<u32>,
    seconds: u32,
    db: Option<&Path>,
) -> anyhow::Result<Load> {
    let mut url = url(mode);
    let mut cmd = placed(oha, at);
    if mode.h2 && !mode.tls {
        // h2c with prior knowledge.
        cmd.arg("--http2");
    }
    let response_bytes = if mode.training {
        url.push_str(TRAIN_PATH);
        cmd.args(["-m", "POST", "-d", &"t".repeat(TRAIN_REQUEST_BYTES)])
            .args(["-H", "content-type: application/json"])
            .args(["-H", "accept: application/json"])
            .args(["-H", "x-request-id: pgo-training"]);
        TRAIN_RESPONSE_BYTES
    } else {
        BODY_BYTES
    };
    cmd.args(["-z", &format!("{seconds}s"), "-c", &CONNECTIONS.to_string()])
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
        .arg(&url)
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
                .all(|k| mode.h2 && k.as_str() == "aborted due to deadline")
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
        size == Some(response_bytes as u64),
        "oha {url}: {size:?} bytes per response, expected {response_bytes}"
    );
    let requests = statuses["200"].as_u64().unwrap_or(0);
    let latencies_us = match db {
        Some(db) => {
            let mut l = request_latencies(db)?;
            l.sort_by(f64::total_cmp);
            ensure!(
                l.len() as u64 == requests,
                "{}: {} requests recorded, oha counted {requests}",
                db.display(),
                l.len()
            );
            let _ = fs::remove_file(db);
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

/// Each request's latency in microseconds from oha's database: `duration`
/// runs from when the request was due (latency correction), as oha's own
/// percentiles do.
fn request_latencies(db: &Path) -> anyhow::Result<Vec<f64>> {
    let out = Command::new("sqlite3")
        .args(["-batch", "-noheader"])
        .arg(db)
        .arg("SELECT duration FROM oha")
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
            l.trim()
                .parse::<f64>()
                .map(|s| s * 1e6)
                .with_context(|| format!("{}: not a duration: {l:?}", db.display()))
        })
        .collect()
}
