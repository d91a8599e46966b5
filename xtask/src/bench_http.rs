//! `cargo xtask bench`, HTTP section: the same job (keep-alive HTTP/1.1 GETs
//! of a 1 KiB body, from the Pod to an origin in the servers' namespace) done
//! direct, through ambassador (eBPF redirect, `protocol: http`), through
//! HAProxy and through nginx, in one run; each proxy sets the same
//! Authorization header, and the proxies are measured again originating TLS
//! to the origin. Reported as ratios to direct, and ambassador next to the
//! other two. It checks that every mode answers correctly, never how fast.
//!
//! Load: oha, at a fixed rate with latency corrected for coordinated omission,
//! then unthrottled for the maximum rate. The origin is nginx; HAProxy and
//! nginx-as-proxy listen on loopback in the Pod's namespace, outside the Pod's
//! cgroup (so nothing of theirs is intercepted), and the client dials them.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{
    Netns, Placement, Pod, SERVER_V4, cgroup2_mount, placed,
    upstream::{CertKind, TestCa},
};
use anyhow::{Context as _, bail, ensure};

use crate::bench::{Bins, Pass};

const ORIGIN_PORT: u16 = 8080;
const ORIGIN_TLS_PORT: u16 = 8443;
/// What the app dials for ambassador's TLS variant; the service sends it on to
/// `ORIGIN_TLS_PORT` over TLS.
const AMBASSADOR_TLS_PORT: u16 = 8081;
/// Training only (`Pass::Train`): the app dials this for a service whose
/// upstream is the origin's TLS listener that picks h2 ...
const AMBASSADOR_H2_PORT: u16 = 8082;
const ORIGIN_H2_PORT: u16 = 8444;
/// ... and speaks h2c (prior knowledge) to this one, which the service passes
/// through as HTTP/2.
const ORIGIN_H2C_PORT: u16 = 8083;
const HAPROXY_PORT: u16 = 18080;
const HAPROXY_TLS_PORT: u16 = 18443;
const NGINX_PORT: u16 = 18081;
const NGINX_TLS_PORT: u16 = 18444;
const ORIGIN_NAME: &str = "origin.bench.test";
/// The PGO training's requests (`Pass::Train`) differ from the measured
/// ones, so the build is not trained on exactly what the bench measures:
/// POST with a body of this size and other headers, to this path, whose
/// answer has another size.
const TRAIN_PATH: &str = "train";
const TRAIN_REQUEST_BYTES: usize = 4096;
const TRAIN_RESPONSE_BYTES: usize = 300;
const AUTHORIZATION: &str = "Bearer bench";
const BODY_BYTES: usize = 1024;
/// Requests per second for the latency runs: well under the slowest mode's
/// maximum on 2 cores (see the max column), so every mode holds it.
const RATE: u32 = 2000;
const CONNECTIONS: u32 = 32;
/// Every mode is measured once per round, modes interleaved and their order
/// rotated, so a burst of other work on the machine lands on all of them
/// alike rather than on one. Added latency is paired: a mode's percentile
/// minus direct's in the same round, then the median over rounds, so a
/// stall or a slow minute of the shared VM (which moves every mode in that
/// stretch) decides neither the figure nor the comparison; two modes are
/// compared round by round too ("won"). Many short rounds rather than a few
/// long ones, for the same reason. Max and CPU are the median round.
const ROUNDS: usize = 10;
const FIXED_SECONDS: u32 = 3;
const MAX_SECONDS: u32 = 2;
const LOG_FILTER: &str = "warn,ambassador_userspace::proxy=info";

#[derive(Clone, Copy, PartialEq)]
enum Via {
    Direct,
    Ambassador,
    Haproxy,
    Nginx,
}

/// Which of the bench's ambassador binaries a mode runs.
#[derive(Clone, Copy, PartialEq)]
enum Bin {
    /// `Bins::main`: the PGO build unless `--no-pgo`.
    Main,
    /// `Bins::plain`: the release build without PGO.
    Plain,
}

struct Mode {
    via: Via,
    tls: bool,
    /// HTTP/2 (training only): upstream over TLS (`tls`), or h2c from the app.
    h2: bool,
    /// The training's requests (see [`TRAIN_PATH`]) rather than the bench's.
    training: bool,
    bin: Bin,
    /// ambassador's `proxy.workers` (ignored for the others).
    workers: Option<u32>,
    /// ambassador's `intercept.accelerate` (ignored for the others).
    accelerate: bool,
    label: String,
}

/// One mode's medians over the rounds.
struct Row {
    via: Via,
    tls: bool,
    bin: Bin,
    workers: Option<u32>,
    accelerate: bool,
    label: String,
    /// Over all rounds' requests pooled.
    p50_us: f64,
    p99_us: f64,
    requests: usize,
    /// Each round's own p50 and p99, in round order (the same for every mode).
    round_p50: Vec<f64>,
    round_p99: Vec<f64>,
    fixed_rps: f64,
    max_rps: f64,
    /// The proxy's CPU time per request in the unthrottled run, user and
    /// system, in microseconds (none for direct).
    cpu_us: Option<(f64, f64)>,
}

/// What one oha run measured.
struct Load {
    rps: f64,
    requests: u64,
    /// Every request's latency (fixed-rate runs only), in microseconds,
    /// sorted.
    latencies_us: Vec<f64>,
}

/// Runs the HTTP section; returns its report (empty for [`Pass::Train`]).
pub fn run(bins: &Bins, pass: Pass) -> anyhow::Result<String> {
    crate::toolchain::apt_install(&["haproxy", "nginx", "curl", "sqlite3"])?;
    let oha = crate::toolchain::ensure_oha()?;
    let versions = Versions::find(&oha)?;
    let busy_before = cpu_busy();
    let _priority = Priority::raise();

    let mut pod = Pod::new("");
    // Readable by the proxy's uid (the CA file) and removed with the Pod.
    let dir = pod.shared_dir();
    let ca = TestCa::new("ambassador bench CA");
    let ca_file = ca.write_ca_file(&dir);
    let (cert, key) = ca.issue(CertKind::Valid, ORIGIN_NAME, None);
    let (cert_file, key_file) = (dir.join("origin-cert.pem"), dir.join("origin-key.pem"));
    fs::write(&cert_file, cert).context("writing the origin certificate")?;
    fs::write(&key_file, key).context("writing the origin key")?;

    // One proxy thread, like HAProxy's nbthread 1 and nginx's one worker.
    let mut setup = (Some(1), true, Bin::Main);
    start_ambassador(&mut pod, setup, &ca_file, bins)?;

    let root_cg = cgroup2_mount();
    let servers_at = Placement {
        netns: &pod.servers,
        cgroup: &root_cg,
        uid: None,
    };
    let pod_at = Placement {
        netns: &pod.netns,
        cgroup: &root_cg,
        uid: None,
    };

    let origin_dir = subdir(&dir, "origin")?;
    let mut origin = nginx(
        "origin nginx",
        &servers_at,
        &origin_dir,
        &origin_config(&origin_dir, &cert_file, &key_file),
    )?;
    origin.wait_listening(
        &pod.servers,
        &[
            addr(SERVER_V4, ORIGIN_PORT),
            addr(SERVER_V4, ORIGIN_TLS_PORT),
            addr(SERVER_V4, ORIGIN_H2_PORT),
            addr(SERVER_V4, ORIGIN_H2C_PORT),
        ],
    )?;
    let haproxy_dir = subdir(&dir, "haproxy")?;
    let mut haproxy = haproxy(&pod_at, &haproxy_dir, &ca_file)?;
    haproxy.wait_listening(
        &pod.netns,
        &[
            addr("127.0.0.1", HAPROXY_PORT),
            addr("127.0.0.1", HAPROXY_TLS_PORT),
        ],
    )?;
    let proxy_dir = subdir(&dir, "nginx-proxy")?;
    let mut nginx_proxy = nginx(
        "nginx (proxy)",
        &pod_at,
        &proxy_dir,
        &nginx_proxy_config(&proxy_dir, &ca_file),
    )?;
    nginx_proxy.wait_listening(
        &pod.netns,
        &[
            addr("127.0.0.1", NGINX_PORT),
            addr("127.0.0.1", NGINX_TLS_PORT),
        ],
    )?;

    let mode = |via, tls, workers, label: String| Mode {
        via,
        tls,
        h2: false,
        training: false,
        bin: Bin::Main,
        workers,
        accelerate: true,
        label,
    };
    let mut modes = vec![
        mode(Via::Direct, false, None, "direct".into()),
        mode(
            Via::Ambassador,
            false,
            Some(1),
            "ambassador (eBPF, http service)".into(),
        ),
        mode(
            Via::Haproxy,
            false,
            None,
            format!("HAProxy {}", versions.haproxy),
        ),
        mode(Via::Nginx, false, None, format!("nginx {}", versions.nginx)),
        mode(
            Via::Ambassador,
            true,
            Some(1),
            "ambassador, TLS to origin".into(),
        ),
        mode(Via::Haproxy, true, None, "HAProxy, TLS to origin".into()),
        mode(Via::Nginx, true, None, "nginx, TLS to origin".into()),
        // Two workers, next to the default one.
        mode(
            Via::Ambassador,
            false,
            Some(2),
            "ambassador, 2 workers".into(),
        ),
        // The app<->proxy hop over loopback TCP, as HAProxy and nginx have it.
        Mode {
            accelerate: false,
            ..mode(
                Via::Ambassador,
                false,
                Some(1),
                "ambassador, accelerate: false".into(),
            )
        },
    ];
    if bins.plain.is_some() {
        modes.push(Mode {
            bin: Bin::Plain,
            ..mode(Via::Ambassador, false, Some(1), "ambassador, no PGO".into())
        });
    }
    let (rounds, fixed_seconds) = match pass {
        Pass::Measure => (ROUNDS, FIXED_SECONDS),
        // ambassador's paths, each briefly: HTTP/1.1 plain and with TLS
        // origination, HTTP/2 both ways, and the multi-threaded runtime (its
        // default where there are 2 cores).
        Pass::Train => {
            let amb = |tls, h2, workers, label: &str| Mode {
                h2,
                training: true,
                ..mode(Via::Ambassador, tls, workers, label.into())
            };
            modes = vec![
                amb(false, false, Some(1), "plain"),
                amb(true, false, Some(1), "TLS"),
                amb(true, true, Some(1), "TLS, h2 upstream"),
                amb(false, true, Some(1), "h2c from the app"),
                amb(false, false, None, "plain, default workers"),
            ];
            (1, 1)
        }
    };
    // Per mode: (fixed-rate load, max req/s, proxy CPU per request) for each
    // round.
    type Run = (Load, f64, Option<(f64, f64)>);
    let mut runs: Vec<Vec<Run>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for i in 0..modes.len() {
            let k = (i + round) % modes.len();
            let m = &modes[k];
            if m.via == Via::Ambassador && (m.workers, m.accelerate, m.bin) != setup {
                setup = (m.workers, m.accelerate, m.bin);
                stop_ambassador(&mut pod, pass);
                start_ambassador(&mut pod, setup, &ca_file, bins)?;
            }
            let at = crate::bench::client_at(&pod, &root_cg, m.via == Via::Ambassador);
            if round == 0 && !m.h2 {
                check(&at, m)?;
            }
            let pids = match m.via {
                Via::Direct => Vec::new(),
                Via::Ambassador => pod.proxy_pid().into_iter().collect(),
                Via::Haproxy => haproxy.pids(),
                Via::Nginx => nginx_proxy.pids(),
            };
            // Unthrottled first: it also warms the proxies' upstream pools
            // (emptied when ambassador restarts).
            let cpu_before = cpu_ticks(&pids);
            let max = load(&oha, &at, m, None, MAX_SECONDS, None)
                .with_context(|| format!("max rate, {}", m.label))?;
            let cpu = cpu_before
                .zip(cpu_ticks(&pids))
                .filter(|_| max.requests > 0)
                .map(|((u0, s0), (u1, s1))| {
                    let per = |t: u64| t as f64 * 1e6 / ticks_per_second() / max.requests as f64;
                    (per(u1 - u0), per(s1 - s0))
                });
            let db = dir.join("fixed-rate.db");
            let fixed = load(&oha, &at, m, Some(RATE), fixed_seconds, Some(&db))
                .with_context(|| format!("fixed rate, {}", m.label))?;
            runs[k].push((fixed, max.rps, cpu));
        }
        eprintln!("xtask: bench http round {}/{rounds} done", round + 1);
    }
    let counters = pod.counters();
    // The sections after this one run the main binary.
    crate::bench::use_binary(&bins.main);
    if pass == Pass::Train {
        stop_ambassador(&mut pod, pass);
        return Ok(String::new());
    }
    drop((nginx_proxy, haproxy, origin));
    drop(pod);

    let rows: Vec<Row> = modes
        .into_iter()
        .zip(runs)
        .map(|(m, r)| {
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
            Row {
                via: m.via,
                tls: m.tls,
                bin: m.bin,
                workers: m.workers,
                accelerate: m.accelerate,
                label: m.label,
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
        })
        .collect();
    let notes = Notes {
        redirected: counters.redirected,
        accelerated: counters.accelerated,
        busy_before,
        busy_after: cpu_busy(),
    };
    Ok(report(&rows, &versions, &notes))
}

/// Clock ticks of user and system time the processes have used so far
/// (`/proc/PID/stat`, all threads); none if one of them is gone.
fn cpu_ticks(pids: &[u32]) -> Option<(u64, u64)> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold((0, 0), |(u, s), pid| {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces: fields count from after ')'.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line.
        Some((
            u + f.get(11)?.parse::<u64>().ok()?,
            s + f.get(12)?.parse::<u64>().ok()?,
        ))
    })
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn cores() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// The `q` quantile of sorted values (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    quartiles(values.collect()).1
}

/// The lower quartile, median and upper quartile (each the mean of the two
/// middle values where the count splits evenly).
fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let mid = |v: &[f64]| match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    let half = v.len() / 2;
    (mid(&v[..half]), mid(&v), mid(&v[v.len() - half..]))
}

/// A mode's per-round percentiles minus direct's in the same round.
fn added(mode: &[f64], direct: &[f64]) -> Vec<f64> {
    mode.iter().zip(direct).map(|(m, d)| m - d).collect()
}

/// Everything the section starts (client, proxies, origin) inherits a nice
/// value of -10 from this thread, so other work on the machine (a build, say)
/// disturbs the measurement less; they all share it, so none is favoured.
/// The previous value comes back on drop.
struct Priority(libc::c_int);

impl Priority {
    fn raise() -> Priority {
        // SAFETY: getpriority/setpriority take no pointers; `0` is this
        // thread (Linux keeps nice values per thread).
        unsafe {
            let before = libc::getpriority(libc::PRIO_PROCESS, 0);
            libc::setpriority(libc::PRIO_PROCESS, 0, -10);
            Priority(before)
        }
    }
}

impl Drop for Priority {
    fn drop(&mut self) {
        // SAFETY: as in `raise`.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, self.0) };
    }
}

/// How busy the machine's CPUs were over one second, in percent, from
/// /proc/stat: other work running around the section (the load average would
/// mostly show the L4 section that just ran).
fn cpu_busy() -> String {
    // (idle, total) jiffies since boot.
    let sample = || -> Option<(u64, u64)> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let f: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        (f.len() == 8).then(|| (f[3] + f[4], f.iter().sum()))
    };
    let Some((idle0, total0)) = sample() else {
        return "?".into();
    };
    thread::sleep(Duration::from_secs(1));
    match sample() {
        Some((idle1, total1)) if total1 > total0 => format!(
            "{:.0}%",
            100.0 * (1.0 - (idle1 - idle0) as f64 / (total1 - total0) as f64)
        ),
        _ => "?".into(),
    }
}

/// (Re)writes the Pod's config for (`workers` (`None`: ambassador's
/// default), `accelerate`), applies it to the kernel side (`init` again:
/// `accelerate` is read there) and starts the proxy.
/// and starts the proxy.
fn start_ambassador(
    pod: &mut Pod,
    (workers, accelerate, bin): (Option<u32>, bool, Bin),
    ca_file: &Path,
    bins: &Bins,
) -> anyhow::Result<()> {
    crate::bench::use_binary(match (bin, &bins.plain) {
        (Bin::Plain, Some(plain)) => plain,
        _ => &bins.main,
    });
    fs::write(&pod.config, ambassador_config(workers, accelerate, ca_file))
        .context("writing the ambassador config")?;
    let init = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup.clone()));
    ensure!(
        init.status.success(),
        "ambassador init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    pod.start_proxy_logging(LOG_FILTER);
    Ok(())
}

/// Ends the running proxy: SIGTERM when training, so it exits (writing its
/// profile) as in a Pod's shutdown; SIGKILL otherwise, the quicker.
fn stop_ambassador(pod: &mut Pod, pass: Pass) {
    match pass {
        Pass::Train => drop(pod.terminate_proxy()),
        Pass::Measure => pod.kill_proxy(),
    }
}

/// The same job every way: the origin must see the header the proxy set (and
/// none direct), and the whole body must come back.
fn check(at: &Placement<'_>, mode: &Mode) -> anyhow::Result<()> {
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
fn load(
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

/// `workers: None` leaves ambassador's default.
fn ambassador_config(workers: Option<u32>, accelerate: bool, ca_file: &Path) -> String {
    let mut proxy = workers
        .map(|w| format!("proxy:\n  workers: {w}\n"))
        .unwrap_or_default();
    if !accelerate {
        proxy.push_str("intercept: { accelerate: false }\n");
    }
    let auth = format!("{{ set_headers: {{ authorization: {{ value: \"{AUTHORIZATION}\" }} }} }}");
    // ALPN as users leave it ([h2, http/1.1]): the origin picks http/1.1, the
    // protocol HAProxy and nginx speak to it, and after the first response
    // the service's requests take the HTTP/1.1 pool.
    // What the app dials -> the origin's TLS listener, verified.
    let tls_service = |name: &str, port: u16, origin_port: u16| {
        format!(
            "\x20 - name: {name}\n\
             \x20   match: {{ cidr: {SERVER_V4}/32, port: {port} }}\n\
             \x20   protocol: http\n\
             \x20   upstream:\n\
             \x20     endpoints: [{{ address: \"{SERVER_V4}:{origin_port}\" }}]\n\
             \x20     tls: {{ server_name: {ORIGIN_NAME}, ca_file: \"{}\" }}\n\
             \x20   request: {auth}\n",
            ca_file.display()
        )
    };
    // Access logs off: HAProxy and nginx run without them too.
    format!(
        "{proxy}telemetry: {{ access_log: false }}\n\
         services:\n\
         \x20 - name: origin\n\
         \x20   match: {{ cidr: {SERVER_V4}/32, port: {ORIGIN_PORT} }}\n\
         \x20   protocol: http\n\
         \x20   request: {auth}\n\
         {}\
         {}\
         \x20 - name: origin-h2c\n\
         \x20   match: {{ cidr: {SERVER_V4}/32, port: {ORIGIN_H2C_PORT} }}\n\
         \x20   protocol: http\n\
         \x20   request: {auth}\n",
        tls_service("origin-tls", AMBASSADOR_TLS_PORT, ORIGIN_TLS_PORT),
        tls_service("origin-h2", AMBASSADOR_H2_PORT, ORIGIN_H2_PORT),
    )
}

/// What every nginx here shares: one worker, files in its own directory, and
/// keep-alive connections that are never closed for having served too many
/// requests (the default, 1000, would add reconnects to the measurement).
fn nginx_common(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 keepalive_requests 1000000;\n\
         \x20 default_type text/plain;\n\
         \x20 client_body_temp_path {d}/body;\n\
         \x20 proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n\
         \x20 scgi_temp_path {d}/scgi;\n"
    )
}

fn origin_config(dir: &Path, cert: &Path, key: &Path) -> String {
    let body = "x".repeat(BODY_BYTES);
    let trained = "y".repeat(TRAIN_RESPONSE_BYTES);
    // /auth shows which Authorization arrived, for the checks before each run.
    let locations = format!(
        "location = /auth {{ return 200 \"$http_authorization\"; }}\n\
         \x20   location = /{TRAIN_PATH} {{ return 200 \"{trained}\"; }}\n\
         \x20   location / {{ return 200 \"{body}\"; }}"
    );
    format!(
        "{}\
         \x20 server {{\n\
         \x20   listen {SERVER_V4}:{ORIGIN_PORT};\n\
         \x20   {locations}\n\
         \x20 }}\n\
         \x20 server {{\n\
         \x20   listen {SERVER_V4}:{ORIGIN_TLS_PORT} ssl;\n\
         \x20   ssl_certificate {cert};\n\
         \x20   ssl_certificate_key {key};\n\
         \x20   {locations}\n\
         \x20 }}\n\
         \x20 server {{\n\
         \x20   listen {SERVER_V4}:{ORIGIN_H2_PORT} ssl http2;\n\
         \x20   ssl_certificate {cert};\n\
         \x20   ssl_certificate_key {key};\n\
         \x20   {locations}\n\
         \x20 }}\n\
         \x20 server {{\n\
         \x20   listen {SERVER_V4}:{ORIGIN_H2C_PORT} http2;\n\
         \x20   {locations}\n\
         \x20 }}\n\
         }}\n",
        nginx_common(dir),
        cert = cert.display(),
        key = key.display()
    )
}

fn nginx_proxy_config(dir: &Path, ca_file: &Path) -> String {
    // HTTP/1.1 with `Connection ""` is what lets nginx keep upstream
    // connections open (it sends `Connection: close` otherwise).
    let proxying = format!(
        "proxy_http_version 1.1;\n\
         \x20     proxy_set_header Connection \"\";\n\
         \x20     proxy_set_header Authorization \"{AUTHORIZATION}\";"
    );
    format!(
        "{}\
         \x20 upstream origin {{ server {SERVER_V4}:{ORIGIN_PORT}; keepalive 32; keepalive_requests 1000000; }}\n\
         \x20 upstream origin_tls {{ server {SERVER_V4}:{ORIGIN_TLS_PORT}; keepalive 32; keepalive_requests 1000000; }}\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{NGINX_PORT};\n\
         \x20   location / {{\n\
         \x20     proxy_pass http://origin;\n\
         \x20     {proxying}\n\
         \x20   }}\n\
         \x20 }}\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{NGINX_TLS_PORT};\n\
         \x20   location / {{\n\
         \x20     proxy_pass https://origin_tls;\n\
         \x20     {proxying}\n\
         \x20     proxy_ssl_verify on;\n\
         \x20     proxy_ssl_trusted_certificate {};\n\
         \x20     proxy_ssl_server_name on;\n\
         \x20     proxy_ssl_name {ORIGIN_NAME};\n\
         \x20   }}\n\
         \x20 }}\n\
         }}\n",
        nginx_common(dir),
        ca_file.display()
    )
}

fn haproxy_config(ca_file: &Path) -> String {
    let ca = ca_file.display();
    format!(
        "global\n\
         \x20 nbthread 1\n\
         \x20 maxconn 4096\n\
         defaults\n\
         \x20 mode http\n\
         \x20 option http-keep-alive\n\
         \x20 timeout connect 5s\n\
         \x20 timeout client 30s\n\
         \x20 timeout server 30s\n\
         \x20 timeout http-keep-alive 30s\n\
         frontend plain\n\
         \x20 bind 127.0.0.1:{HAPROXY_PORT}\n\
         \x20 http-request set-header Authorization \"{AUTHORIZATION}\"\n\
         \x20 default_backend origin\n\
         frontend tls\n\
         \x20 bind 127.0.0.1:{HAPROXY_TLS_PORT}\n\
         \x20 http-request set-header Authorization \"{AUTHORIZATION}\"\n\
         \x20 default_backend origin_tls\n\
         backend origin\n\
         \x20 server s {SERVER_V4}:{ORIGIN_PORT}\n\
         backend origin_tls\n\
         \x20 server s {SERVER_V4}:{ORIGIN_TLS_PORT} ssl verify required ca-file {ca} sni str({ORIGIN_NAME}) verifyhost {ORIGIN_NAME}\n"
    )
}

fn nginx(
    name: &'static str,
    at: &Placement<'_>,
    dir: &Path,
    config: &str,
) -> anyhow::Result<Daemon> {
    let conf = dir.join("nginx.conf");
    fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = placed("nginx", at);
    // -e: errors before the config is read go here too, not to /var/log.
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"]);
    Daemon::spawn(name, cmd, dir.join("stderr.log"))
}

fn haproxy(at: &Placement<'_>, dir: &Path, ca_file: &Path) -> anyhow::Result<Daemon> {
    let conf = dir.join("haproxy.cfg");
    fs::write(&conf, haproxy_config(ca_file))
        .with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = placed("haproxy", at);
    // -db: stay in the foreground, one process, so its PID is the one to stop.
    cmd.arg("-db").arg("-f").arg(&conf);
    Daemon::spawn("haproxy", cmd, dir.join("stderr.log"))
}

fn subdir(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let d = dir.join(name);
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}")
        .parse()
        .expect("a literal address and a port")
}

/// A server the benchmark started, stopped by its PID on drop.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Daemon> {
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Daemon { name, child, log })
    }

    /// The process and its children (nginx's workers).
    fn pids(&self) -> Vec<u32> {
        let pid = self.child.id();
        let children =
            fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        std::iter::once(pid)
            .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
            .collect()
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Waits until every address accepts a connection from `netns`.
    fn wait_listening(&mut self, netns: &Netns, addrs: &[SocketAddr]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} did not start ({status}): {}", self.name, self.output());
            }
            let probe = addrs.to_vec();
            let up = netns.enter(move || {
                probe
                    .iter()
                    .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
            });
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {addrs:?} within 10 s: {}",
                    self.name,
                    self.output()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id();
        // nginx's master stops its workers on SIGTERM; its children are
        // noted first in case it has to be killed outright and leaves them.
        let children =
            fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        // SAFETY: kill(2) touches no memory, and `pid` is our own unreaped
        // child, so it cannot name another process.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        for child in children
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            // Only if the PID still names the same program.
            if fs::read_to_string(format!("/proc/{child}/comm")).ok() == Some(comm.clone()) {
                // SAFETY: as above; the PID was just checked to still be the
                // program's.
                unsafe { libc::kill(child, libc::SIGKILL) };
            }
        }
    }
}

struct Versions {
    oha: String,
    haproxy: String,
    nginx: String,
}

impl Versions {
    fn find(oha: &Path) -> anyhow::Result<Versions> {
        let text = |cmd: &mut Command| -> anyhow::Result<String> {
            let out = cmd
                .output()
                .with_context(|| format!("cannot run {cmd:?}"))?;
            // nginx -v prints to stderr.
            Ok(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        };
        let word_after = |s: &str, prefix: &str| {
            s.split_whitespace()
                .skip_while(|w| *w != prefix)
                .nth(1)
                .unwrap_or("?")
                .to_string()
        };
        let oha_v = text(Command::new(oha).arg("--version"))?;
        let haproxy_v = text(Command::new("haproxy").arg("-v"))?;
        let nginx_v = text(Command::new("nginx").arg("-v"))?;
        Ok(Versions {
            oha: word_after(&oha_v, "oha"),
            // "HAProxy version 2.6.12-1+deb12u4 ..." -> 2.6.12
            haproxy: word_after(&haproxy_v, "version")
                .split('-')
                .next()
                .unwrap_or("?")
                .to_string(),
            // "nginx version: nginx/1.22.1"
            nginx: nginx_v
                .split_once("nginx/")
                .map(|(_, v)| v.split_whitespace().next().unwrap_or("?").to_string())
                .unwrap_or_else(|| "?".into()),
        })
    }
}

/// What the report says besides the numbers.
struct Notes {
    redirected: u64,
    accelerated: u64,
    busy_before: String,
    busy_after: String,
}

fn report(rows: &[Row], v: &Versions, notes: &Notes) -> String {
    let base = &rows[0];
    let mut r = format!(
        "ambassador HTTP bench (oha {}: keep-alive HTTP/1.1 GET, {BODY_BYTES}-byte body, {CONNECTIONS} connections;\n\
         latency at a fixed {RATE} req/s for {FIXED_SECONDS} s, corrected for coordinated omission; max = unthrottled for {MAX_SECONDS} s;\n\
         {ROUNDS} interleaved rounds, every mode once per round; p50/p99 = over all their requests pooled ({} per mode);\n\
         +p50/+p99 = added over direct: the median over rounds of (mode - direct in the same round), IQR = its middle half;\n\
         x = pooled mode / pooled direct; max and CPU the median round)\n\n",
        v.oha, base.requests
    );
    r.push_str(&format!(
        "{:<34} {:>6} {:>6} {:>5} {:>9} {:>5} {:>9} {:>5} {:>5} {:>9} {:>5} {:>10}\n",
        "mode",
        "p50 us",
        "p99 us",
        "+p50",
        "IQR",
        "+p99",
        "IQR",
        "p50 x",
        "p99 x",
        "max req/s",
        "max x",
        "CPU us/req"
    ));
    let spread = |(lo, _, hi): (f64, f64, f64)| format!("{lo:.0}..{hi:.0}");
    for row in rows {
        // A mode that fell behind the fixed rate has latencies that mean
        // "saturated", not "slow": say so.
        let held = if row.fixed_rps < f64::from(RATE) * 0.95 {
            format!("  (held only {:.0} req/s)", row.fixed_rps)
        } else {
            String::new()
        };
        let cpu = row
            .cpu_us
            .map_or(String::new(), |(u, s)| format!("{u:.1}+{s:.1}"));
        let (a50, a99) = (
            quartiles(added(&row.round_p50, &base.round_p50)),
            quartiles(added(&row.round_p99, &base.round_p99)),
        );
        r.push_str(&format!(
            "{:<34} {:>6.0} {:>6.0} {:>5.0} {:>9} {:>5.0} {:>9} {:>5.2} {:>5.2} {:>9.0} {:>5.2} {cpu:>10}{held}\n",
            row.label,
            row.p50_us,
            row.p99_us,
            a50.1,
            spread(a50),
            a99.1,
            spread(a99),
            row.p50_us / base.p50_us,
            row.p99_us / base.p99_us,
            row.max_rps,
            row.max_rps / base.max_rps,
        ));
    }

    // The one-thread ambassador rows are the ones set against the others.
    let find = |via: Via, tls: bool, bin: Bin| {
        rows.iter().find(|x| {
            x.via == via
                && x.tls == tls
                && (via != Via::Ambassador
                    || (x.workers == Some(1) && x.accelerate && x.bin == bin))
        })
    };
    // Added latency can come out ~0 or below in a noisy run; a ratio with
    // that in it means nothing, so it is left out.
    let ratio = |a: f64, b: f64| {
        if a >= 1.0 && b >= 1.0 {
            format!("{:.2}", a / b)
        } else {
            "-".into()
        }
    };
    let median_added =
        |row: &Row, pick: fn(&Row) -> &[f64]| quartiles(added(pick(row), pick(base))).1;
    let p50s: fn(&Row) -> &[f64] = |x| &x.round_p50;
    let p99s: fn(&Row) -> &[f64] = |x| &x.round_p99;
    r.push_str(&format!(
        "\nambassador (1 worker) / other: below 1 = less added latency, above 1 = more req/s;\n\
         won = rounds in which ambassador's percentile was the lower of the two\n\
         {:<34} {:>6} {:>6} {:>6} {:>6} {:>9} {:>7}\n",
        "", "+p50", "won", "+p99", "won", "max req/s", "CPU/req"
    ));
    for (tls, bin) in [(false, Bin::Main), (true, Bin::Main), (false, Bin::Plain)] {
        let Some(amb) = find(Via::Ambassador, tls, bin) else {
            continue;
        };
        for (via, name) in [(Via::Haproxy, "HAProxy"), (Via::Nginx, "nginx")] {
            let Some(other) = find(via, tls, Bin::Main) else {
                continue;
            };
            let cpu = match (amb.cpu_us, other.cpu_us) {
                (Some((au, asys)), Some((ou, osys))) if ou + osys > 0.0 => {
                    format!("{:.2}", (au + asys) / (ou + osys))
                }
                _ => "-".into(),
            };
            let won = |pick: fn(&Row) -> &[f64]| {
                let rounds = pick(amb).len().min(pick(other).len());
                let won = pick(amb)
                    .iter()
                    .zip(pick(other))
                    .filter(|(a, o)| a < o)
                    .count();
                format!("{won}/{rounds}")
            };
            r.push_str(&format!(
                "{:<34} {:>6} {:>6} {:>6} {:>6} {:>9.2} {cpu:>7}\n",
                format!(
                    "{}{} vs {name}",
                    if tls { "TLS" } else { "plain" },
                    if bin == Bin::Plain { ", no PGO" } else { "" }
                ),
                ratio(median_added(amb, p50s), median_added(other, p50s)),
                won(p50s),
                ratio(median_added(amb, p99s), median_added(other, p99s)),
                won(p99s),
                amb.max_rps / other.max_rps,
            ));
        }
    }
    r.push_str(&format!(
        "\nOrigin: nginx {ngx} (1 worker) on {SERVER_V4} in the servers' namespace, across a veth.\n\
         Each proxy sets Authorization (checked at the origin first) and runs one thread:\n\
         ambassador proxy.workers 1, HAProxy nbthread 1, nginx worker_processes 1 (upstream keepalive 32);\n\
         the last rows are ambassador with 2 workers, with the app<->proxy hop over loopback TCP\n\
         (intercept.accelerate false, as HAProxy and nginx have it), and (if any) the release build without PGO.\n\
         ambassador: the client runs in the Pod's app cgroup\n\
         and dials the origin; the eBPF redirect takes it to the proxy. HAProxy and nginx listen on\n\
         127.0.0.1 in the Pod's namespace and the client dials them. TLS rows: plain from the client,\n\
         verified TLS (SNI {ORIGIN_NAME}) from the proxy to the origin, which picks http/1.1\n\
         (ambassador offers ALPN [h2, http/1.1], its default); x still to plain direct.\n\
         Client (oha), proxy and origin share the machine's {cores} cores; \"-\": an added latency\n\
         came out at or below 0. CPU us/req = the proxy's\n\
         user+system CPU time per request in the unthrottled run (all its processes and threads).\n\
         Everything runs at nice -10; CPU busy in the second before/after: {} / {} (other work on the machine still adds noise).\n\
         kernel counters for the ambassador runs: redirected {}, accelerated (sk_msg) {}\n",
        notes.busy_before,
        notes.busy_after,
        notes.redirected,
        notes.accelerated,
        ngx = v.nginx,
        cores = cores(),
    ));
    r
}

#[cfg(test)]
mod tests {
    use super::{added, percentile, quartiles};

    #[test]
    fn quartiles_split_even_and_odd_counts() {
        let q = quartiles(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(q, (1.5, 2.5, 3.5));
        let q = quartiles(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(q, (1.5, 3.0, 4.5));
        assert_eq!(quartiles(vec![7.0]).1, 7.0);
    }

    #[test]
    fn added_latency_pairs_rounds() {
        // A slow round moves both; paired, it stays out of the difference.
        let direct = [70.0, 70.0, 140.0];
        let mode = [100.0, 110.0, 180.0];
        assert_eq!(added(&mode, &direct), vec![30.0, 40.0, 40.0]);
        assert_eq!(quartiles(added(&mode, &direct)).1, 40.0);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), 100.0);
        assert_eq!(percentile(&v, 0.99), 198.0);
        assert_eq!(percentile(&v[..1], 0.99), 1.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
