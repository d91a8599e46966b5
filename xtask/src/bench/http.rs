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
//!
//! This file runs the section; `http/` holds the configs, the servers, the
//! client and the machine measurements it uses.

pub(super) mod config;
pub(super) mod daemon;
mod load;

use std::{fs, path::Path};

use ambassador_tests::{
    Placement, Pod, SERVER_V4, cgroup2_mount,
    upstream::{CertKind, TestCa},
};
use anyhow::{Context as _, ensure};

pub(super) use self::daemon::Versions;
use self::{
    config::{ambassador_config, haproxy_config, nginx_proxy_config, origin_config},
    daemon::{Daemon, addr, haproxy, nginx, subdir},
    load::{check, target},
};
use super::{
    Bins, Pass, client_at,
    machine::{Priority, cpu_busy},
    oha::{Figures, Run, figures, measure},
    report, use_binary,
};
pub(super) use super::{
    machine::cores,
    oha::{CONNECTIONS, FIXED_SECONDS, RATE},
};

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
/// What the app dials for ambassador's cached service (its endpoint is
/// the origin's plain port); nginx's proxy_cache listens on
/// `NGINX_CACHED_PORT`. Both serve `CACHED_PATH`, which the origin marks
/// cacheable.
const AMBASSADOR_CACHED_PORT: u16 = 8084;
const NGINX_CACHED_PORT: u16 = 18082;
const CACHED_PATH: &str = "cached/";
const HAPROXY_PORT: u16 = 18080;
const HAPROXY_TLS_PORT: u16 = 18443;
const NGINX_PORT: u16 = 18081;
const NGINX_TLS_PORT: u16 = 18444;
pub(super) const ORIGIN_NAME: &str = "origin.bench.test";
/// The PGO training's requests (`Pass::Train`) differ from the measured
/// ones, so the build is not trained on exactly what the bench measures:
/// POST with a body of this size and other headers, to this path, whose
/// answer has another size.
const TRAIN_PATH: &str = "train";
const TRAIN_REQUEST_BYTES: usize = 4096;
const TRAIN_RESPONSE_BYTES: usize = 300;
const AUTHORIZATION: &str = "Bearer bench";
pub(super) const BODY_BYTES: usize = 1024;
/// Every mode is measured once per round, modes interleaved and their order
/// rotated, so a burst of other work on the machine lands on all of them
/// alike rather than on one. Added latency is paired: a mode's percentile
/// minus direct's in the same round, then the median over rounds, so a
/// stall or a slow minute of the shared VM (which moves every mode in that
/// stretch) decides neither the figure nor the comparison; two modes are
/// compared round by round too ("won"). Many short rounds rather than a few
/// long ones, for the same reason. Max and CPU are the median round.
pub(super) const ROUNDS: usize = 10;
/// Quiet, but the harness waits for the proxy's `proxy listening` line.
pub(super) const LOG_FILTER: &str = "warn,ambassador_userspace::proxy=info";

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Via {
    Direct,
    Ambassador,
    Haproxy,
    Nginx,
}

/// Which of the bench's ambassador binaries a mode runs.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Bin {
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
    /// Cache hits: the proxy answers from its response cache.
    cached: bool,
    label: String,
}

/// One mode's figures, with what the report needs to know of the mode.
pub(super) struct Row {
    pub(super) via: Via,
    pub(super) tls: bool,
    pub(super) bin: Bin,
    pub(super) workers: Option<u32>,
    pub(super) accelerate: bool,
    pub(super) cached: bool,
    pub(super) f: Figures,
}

/// The servers besides ambassador. Fields drop in declaration order, so the
/// proxies stop before the origin.
struct Servers {
    nginx_proxy: Daemon,
    haproxy: Daemon,
    /// Only held, to be stopped last.
    _origin: Daemon,
    _nginx_cache: ShmDir,
}

/// A directory on tmpfs, removed when dropped.
struct ShmDir(std::path::PathBuf);

impl ShmDir {
    fn new(name: &str) -> anyhow::Result<ShmDir> {
        use std::os::unix::fs::PermissionsExt;
        let d = Path::new("/dev/shm").join(format!("{name}-{}", std::process::id()));
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        // nginx's worker (not root) writes its cache there.
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777))?;
        Ok(ShmDir(d))
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
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
    let servers = Servers::start(&pod, &root_cg, &dir, &ca_file, (&cert_file, &key_file))?;
    let (modes, rounds, fixed_seconds) = modes(bins, &versions, pass);
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
            let at = client_at(&pod, &root_cg, m.via == Via::Ambassador);
            if round == 0 && !m.h2 {
                check(&at, m)?;
            }
            let pids = match m.via {
                Via::Direct => Vec::new(),
                Via::Ambassador => pod.proxy_pid().into_iter().collect(),
                Via::Haproxy => servers.haproxy.pids(),
                Via::Nginx => servers.nginx_proxy.pids(),
            };
            let db = dir.join("fixed-rate.db");
            runs[k].push(measure(&oha, &at, &target(m), &pids, fixed_seconds, &db)?);
        }
        eprintln!("xtask: bench http round {}/{rounds} done", round + 1);
    }
    let counters = pod.counters();
    // The sections after this one run the main binary.
    use_binary(&bins.main);
    if pass == Pass::Train {
        stop_ambassador(&mut pod, pass);
        return Ok(String::new());
    }
    drop(servers);
    drop(pod);

    let rows = rows(modes, runs);
    let notes = report::HttpNotes {
        redirected: counters.redirected,
        accelerated: counters.accelerated,
        busy_before,
        busy_after: cpu_busy(),
    };
    Ok(report::http_table(&rows, &versions, &notes))
}

impl Servers {
    /// The origin in the servers' namespace; HAProxy and nginx as proxies on
    /// loopback in the Pod's namespace, outside the Pod's cgroup. Each one
    /// listens before the next starts.
    fn start(
        pod: &Pod,
        root_cg: &Path,
        dir: &Path,
        ca_file: &Path,
        (cert_file, key_file): (&Path, &Path),
    ) -> anyhow::Result<Servers> {
        let servers_at = Placement {
            netns: &pod.servers,
            cgroup: root_cg,
            uid: None,
        };
        let pod_at = Placement {
            netns: &pod.netns,
            cgroup: root_cg,
            uid: None,
        };

        let origin_dir = subdir(dir, "origin")?;
        let mut origin = nginx(
            "origin nginx",
            &servers_at,
            &origin_dir,
            &origin_config(&origin_dir, cert_file, key_file),
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
        let haproxy_dir = subdir(dir, "haproxy")?;
        let mut haproxy = haproxy(&pod_at, &haproxy_dir, &haproxy_config(ca_file))?;
        haproxy.wait_listening(
            &pod.netns,
            &[
                addr("127.0.0.1", HAPROXY_PORT),
                addr("127.0.0.1", HAPROXY_TLS_PORT),
            ],
        )?;
        let proxy_dir = subdir(dir, "nginx-proxy")?;
        let cache = ShmDir::new("ambassador-bench-nginx-cache")?;
        let mut nginx_proxy = nginx(
            "nginx (proxy)",
            &pod_at,
            &proxy_dir,
            &nginx_proxy_config(&proxy_dir, ca_file, &cache.0),
        )?;
        nginx_proxy.wait_listening(
            &pod.netns,
            &[
                addr("127.0.0.1", NGINX_PORT),
                addr("127.0.0.1", NGINX_TLS_PORT),
                addr("127.0.0.1", NGINX_CACHED_PORT),
            ],
        )?;
        Ok(Servers {
            nginx_proxy,
            haproxy,
            _origin: origin,
            _nginx_cache: cache,
        })
    }
}

/// The modes a pass measures, with its number of rounds and the seconds of
/// each fixed-rate run.
fn modes(bins: &Bins, versions: &Versions, pass: Pass) -> (Vec<Mode>, usize, u32) {
    let mode = |via, tls, workers, label: String| Mode {
        via,
        tls,
        h2: false,
        training: false,
        bin: Bin::Main,
        workers,
        accelerate: true,
        cached: false,
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
        // Cache hits, ambassador's and nginx proxy_cache's.
        Mode {
            cached: true,
            ..mode(
                Via::Ambassador,
                false,
                Some(1),
                "ambassador, cache hits".into(),
            )
        },
        Mode {
            cached: true,
            ..mode(Via::Nginx, false, None, "nginx proxy_cache hits".into())
        },
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
            ..mode(
                Via::Ambassador,
                false,
                Some(1),
                format!("ambassador, {}", bins.plain_label),
            )
        });
    }
    match pass {
        Pass::Measure => (modes, ROUNDS, FIXED_SECONDS),
        // ambassador's paths, each briefly: HTTP/1.1 plain and with TLS
        // origination, HTTP/2 both ways, and the multi-threaded runtime (its
        // default where there are 2 cores).
        Pass::Train => {
            let amb = |tls, h2, workers, label: &str| Mode {
                h2,
                training: true,
                ..mode(Via::Ambassador, tls, workers, label.into())
            };
            let modes = vec![
                amb(false, false, Some(1), "plain"),
                amb(true, false, Some(1), "TLS"),
                amb(true, true, Some(1), "TLS, h2 upstream"),
                amb(false, true, Some(1), "h2c from the app"),
                amb(false, false, None, "plain, default workers"),
            ];
            (modes, 1, 1)
        }
    }
}

fn rows(modes: Vec<Mode>, runs: Vec<Vec<Run>>) -> Vec<Row> {
    modes
        .into_iter()
        .zip(runs)
        .map(|(m, r)| Row {
            via: m.via,
            tls: m.tls,
            bin: m.bin,
            workers: m.workers,
            accelerate: m.accelerate,
            cached: m.cached,
            f: figures(m.label, &r),
        })
        .collect()
}

/// (Re)writes the Pod's config for (`workers` (`None`: ambassador's
/// default), `accelerate`), applies it to the kernel side (`init` again:
/// `accelerate` is read there) and starts the proxy.
fn start_ambassador(
    pod: &mut Pod,
    (workers, accelerate, bin): (Option<u32>, bool, Bin),
    ca_file: &Path,
    bins: &Bins,
) -> anyhow::Result<()> {
    super::use_binary(match (bin, &bins.plain) {
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
