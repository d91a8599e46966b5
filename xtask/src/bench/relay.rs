//! `cargo xtask bench`, relay section: L4 throughput (iperf3) from the Pod to
//! a server across the veth, four ways, rounds interleaved: direct (not
//! intercepted); through the eBPF redirect to ambassador, which relays a
//! destination no service names as plain TCP; through nginx's stream module;
//! and through HAProxy in `mode tcp`. nginx and HAProxy run one worker
//! thread each, as ambassador does by default, on loopback in the Pod's
//! namespace outside the Pod's cgroup (as in the HTTP section), and the
//! client dials them. Loads: one stream and eight streams with the client
//! sending, and one stream with the server sending (`-R`). Reported per
//! load: Gbit/s, the ratio to direct paired round by round, and CPU per GB
//! moved, the proxy's (its processes' user and system time) and the whole
//! machine's (/proc/stat: also the kernel's softirq and kworker time, which
//! no process is charged for).

use std::{path::Path, process::Stdio, thread, time::Duration};

use ambassador_tests::{Placement, Pod, SERVER_V4, cgroup2_mount, placed};
use anyhow::{Context as _, bail};

use super::{
    Guard, client_at,
    http::daemon::{Daemon, addr, haproxy, nginx, subdir},
    machine::{Priority, busy_ticks, cores, cpu_busy, cpu_ticks, ticks_per_second},
    stats::median,
};

/// Every load and mode runs once per round, in a rotating order.
const ROUNDS: usize = 3;
/// iperf3's `-t` for each run.
const SECONDS: &str = "3";
const IPERF_PORT: u16 = 5201;
const NGINX_PORT: u16 = 15211;
const HAPROXY_PORT: u16 = 15212;
/// A round within this fraction of direct's Gbit/s counts as keeping up.
const WITHIN: f64 = 0.10;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Direct,
    Ambassador,
    Nginx,
    Haproxy,
}

const MODES: [Mode; 4] = [Mode::Direct, Mode::Ambassador, Mode::Nginx, Mode::Haproxy];

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Ambassador => "ambassador (eBPF redirect)",
            Mode::Nginx => "nginx stream",
            Mode::Haproxy => "HAProxy mode tcp",
        }
    }
}

/// iperf3's parallel streams, and whether the server sends (`-R`).
#[derive(Clone, Copy)]
struct Load {
    streams: u32,
    reverse: bool,
}

const LOADS: [Load; 3] = [
    Load {
        streams: 1,
        reverse: false,
    },
    Load {
        streams: 8,
        reverse: false,
    },
    Load {
        streams: 1,
        reverse: true,
    },
];

impl Load {
    fn label(self) -> String {
        format!(
            "{} stream{}, {} sends",
            self.streams,
            if self.streams == 1 { "" } else { "s" },
            if self.reverse { "server" } else { "client" }
        )
    }
}

/// One iperf3 run's figures.
struct Run {
    gbps: f64,
    /// Bytes received.
    bytes: f64,
    /// The proxy's user and system clock ticks over the run (none direct).
    proxy: Option<(u64, u64)>,
    /// The machine's busy clock ticks over the run.
    machine: u64,
}

/// nginx and HAProxy, stopped by their PIDs on drop.
struct Proxies {
    nginx: Daemon,
    haproxy: Daemon,
}

pub fn run() -> anyhow::Result<String> {
    crate::toolchain::apt_install(&["iperf3", "haproxy", "nginx", "libnginx-mod-stream"])?;
    let busy_before = cpu_busy();
    let _priority = Priority::raise();
    let mut pod = Pod::new("telemetry: { access_log: false }\n");
    pod.start_proxy_logging(super::http::LOG_FILTER);
    let root_cg = cgroup2_mount();
    let server_at = Placement {
        netns: &pod.servers,
        cgroup: &root_cg,
        uid: None,
    };
    let iperf = Guard(
        placed("iperf3", &server_at)
            .args(["-s", "-B", SERVER_V4, "-p", &IPERF_PORT.to_string()])
            // Quiet: the proxies' readiness probes reach it as connections
            // that send no test, which it reports on stderr; a run that
            // fails shows in the client's output.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the iperf3 server")?,
    );
    thread::sleep(Duration::from_millis(300));
    let proxies = Proxies::start(&pod, &root_cg)?;

    // runs[load][mode]: one Run per round.
    let mut runs: Vec<Vec<Vec<Run>>> = LOADS
        .iter()
        .map(|_| MODES.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..ROUNDS {
        for j in 0..LOADS.len() {
            let l = (j + round) % LOADS.len();
            for i in 0..MODES.len() {
                let k = (i + j + round) % MODES.len();
                let run = measure(&pod, &root_cg, &proxies, MODES[k], LOADS[l])?;
                runs[l][k].push(run);
            }
        }
        eprintln!("xtask: bench relay round {}/{ROUNDS} done", round + 1);
    }
    let counters = pod.counters();
    drop(proxies);
    drop(iperf);
    drop(pod);
    let mut out = format!(
        "\n## L4 relay throughput (iperf3 -t {SECONDS}, {ROUNDS} rounds interleaved, every load and mode once per round in a rotating order)\n"
    );
    for (load, by_mode) in LOADS.iter().zip(&runs) {
        out.push_str(&table(*load, by_mode));
    }
    out.push_str(&notes(counters.redirected, &busy_before, &cpu_busy()));
    Ok(out)
}

impl Proxies {
    /// nginx (stream module) and HAProxy (mode tcp), one worker thread each,
    /// on loopback in the Pod's namespace outside the Pod's cgroup, both
    /// relaying to the iperf3 server.
    fn start(pod: &Pod, root_cg: &Path) -> anyhow::Result<Proxies> {
        let pod_at = Placement {
            netns: &pod.netns,
            cgroup: root_cg,
            uid: None,
        };
        let dir = pod.shared_dir();
        let nginx_dir = subdir(&dir, "relay-nginx")?;
        let d = nginx_dir.display();
        let config = format!(
            r#"load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
stream {{
  server {{
    listen 127.0.0.1:{NGINX_PORT};
    proxy_pass {SERVER_V4}:{IPERF_PORT};
  }}
}}
"#
        );
        let mut nginx = nginx("nginx (stream)", &pod_at, &nginx_dir, &config)?;
        nginx.wait_listening(&pod.netns, &[addr("127.0.0.1", NGINX_PORT)])?;
        let haproxy_dir = subdir(&dir, "relay-haproxy")?;
        let config = format!(
            r#"
global
  nbthread 1
  maxconn 1024
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
listen relay
  bind 127.0.0.1:{HAPROXY_PORT}
  server s {SERVER_V4}:{IPERF_PORT}
"#
        );
        let mut haproxy = haproxy(&pod_at, &haproxy_dir, &config)?;
        haproxy.wait_listening(&pod.netns, &[addr("127.0.0.1", HAPROXY_PORT)])?;
        Ok(Proxies { nginx, haproxy })
    }
}

/// One iperf3 run of `load` through `mode`, with the CPU it took.
fn measure(
    pod: &Pod,
    root_cg: &Path,
    proxies: &Proxies,
    mode: Mode,
    load: Load,
) -> anyhow::Result<Run> {
    let at = client_at(pod, root_cg, mode == Mode::Ambassador);
    let (host, port, pids) = match mode {
        Mode::Direct => (SERVER_V4, IPERF_PORT, Vec::new()),
        Mode::Ambassador => (SERVER_V4, IPERF_PORT, pod.proxy_pid().into_iter().collect()),
        Mode::Nginx => ("127.0.0.1", NGINX_PORT, proxies.nginx.pids()),
        Mode::Haproxy => ("127.0.0.1", HAPROXY_PORT, proxies.haproxy.pids()),
    };
    let proxy_before = cpu_ticks(&pids);
    let machine_before = busy_ticks().context("reading /proc/stat")?;
    let (gbps, bytes) = iperf(&at, host, port, load)
        .with_context(|| format!("{}, {}", mode.label(), load.label()))?;
    let machine = busy_ticks().context("reading /proc/stat")? - machine_before;
    let proxy = match (mode, proxy_before, cpu_ticks(&pids)) {
        (Mode::Direct, ..) => None,
        (_, Some(b), Some(a)) => Some((a.0 - b.0, a.1 - b.1)),
        _ => bail!("the {} proxy's CPU time could not be read", mode.label()),
    };
    Ok(Run {
        gbps,
        bytes,
        proxy,
        machine,
    })
}

/// (Gbit/s, bytes) received in one iperf3 run.
fn iperf(at: &Placement<'_>, host: &str, port: u16, load: Load) -> anyhow::Result<(f64, f64)> {
    let mut cmd = placed("iperf3", at);
    cmd.args(["-c", host, "-p", &port.to_string(), "-t", SECONDS, "-J"]);
    if load.streams > 1 {
        cmd.args(["-P", &load.streams.to_string()]);
    }
    if load.reverse {
        cmd.arg("-R");
    }
    let out = cmd.output().context("running iperf3")?;
    if !out.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    let sum = &v["end"]["sum_received"];
    match (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64()) {
        (Some(bps), Some(bytes)) if bytes > 0.0 => Ok((bps / 1e9, bytes)),
        _ => bail!("no sum_received in iperf3's output"),
    }
}

/// One load's table: a line per mode.
fn table(load: Load, by_mode: &[Vec<Run>]) -> String {
    let direct: Vec<f64> = by_mode[0].iter().map(|r| r.gbps).collect();
    let mut out = format!(
        "\n### {}\n\n| mode | Gbit/s | each round | x direct | within {:.0} % | proxy CPU s/GB | user | system | machine CPU s/GB |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        load.label(),
        WITHIN * 100.0
    );
    let tps = ticks_per_second();
    for (mode, runs) in MODES.iter().zip(by_mode) {
        let gbps: Vec<f64> = runs.iter().map(|r| r.gbps).collect();
        let ratios: Vec<f64> = gbps.iter().zip(&direct).map(|(m, d)| m / d).collect();
        let within = ratios.iter().filter(|r| **r >= 1.0 - WITHIN).count();
        // Pooled over the rounds: ticks per GB moved, in seconds.
        let gb: f64 = runs.iter().map(|r| r.bytes).sum::<f64>() / 1e9;
        let per_gb = |ticks: u64| format!("{:.2}", ticks as f64 / tps / gb);
        let (ratio, within, proxy) = match mode {
            Mode::Direct => (
                "-".to_string(),
                "-".to_string(),
                ["-".to_string(), "-".into(), "-".into()],
            ),
            _ => {
                let (u, s) = runs
                    .iter()
                    .filter_map(|r| r.proxy)
                    .fold((0, 0), |(u, s), (ru, rs)| (u + ru, s + rs));
                (
                    format!("{:.2}", median(ratios.iter().copied())),
                    format!("{within}/{}", runs.len()),
                    [per_gb(u + s), per_gb(u), per_gb(s)],
                )
            }
        };
        let [both, user, system] = proxy;
        out.push_str(&format!(
            "| {} | {:.2} | {} | {ratio} | {within} | {both} | {user} | {system} | {} |\n",
            mode.label(),
            median(gbps.iter().copied()),
            gbps.iter()
                .map(|g| format!("{g:.1}"))
                .collect::<Vec<_>>()
                .join(" "),
            per_gb(runs.iter().map(|r| r.machine).sum()),
        ));
    }
    out
}

fn notes(redirected: u64, busy_before: &str, busy_after: &str) -> String {
    format!(
        "\nGbit/s: iperf3's end.sum_received, the median over rounds; each round: in round order. x direct:\n\
         the median over rounds of (mode / direct in the same round). within {w:.0} %: the rounds in which the\n\
         mode moved at least {keep:.0} % of direct's Gbit/s. proxy CPU s/GB: the proxy's processes' user + system CPU seconds over\n\
         the runs per GB (1e9 bytes) received, pooled over the rounds, then user and system apart. machine CPU\n\
         s/GB: the whole machine's busy time over the runs (/proc/stat user+nice+system+irq+softirq+steal,\n\
         all {cores} cores) per GB, pooled likewise: it counts the iperf3 client and server too, and the\n\
         kernel's softirq and kworker work that no process is charged for.\n\
         The server: iperf3 -s on {SERVER_V4}:{IPERF_PORT} in the servers' namespace, across a veth. direct and\n\
         ambassador: the client dials it (ambassador: from the Pod's app cgroup; the eBPF redirect takes it to\n\
         the proxy, one worker, default config with access logs off, relaying as plain TCP). nginx stream\n\
         (worker_processes 1) and HAProxy (nbthread 1, mode tcp) listen on 127.0.0.1:{NGINX_PORT} / {HAPROXY_PORT}\n\
         in the Pod's namespace outside its cgroup, and the client dials them. Everything runs at nice -10;\n\
         CPU busy in the second before/after: {busy_before} / {busy_after} (other work on the machine adds to machine CPU).\n\
         kernel counters: connections redirected to ambassador {redirected}\n",
        w = WITHIN * 100.0,
        keep = (1.0 - WITHIN) * 100.0,
        cores = cores(),
    )
}
