//! `cargo xtask bench`: the same job done direct, through the eBPF redirect to
//! the ambassador proxy, and through iptables REDIRECT to the same proxy, in one
//! run, reported as ratios to direct. A benchmark, not a test: it asserts
//! nothing about speed.
//!
//! Setup: a simulated Pod (the test harness's: Pod cgroup with app/proxy
//! children, a network namespace joined by veth to a servers' namespace), the
//! proxy as uid 1337. The client and the echo server are this binary's hidden
//! `__connect` / `__echo` commands; throughput is iperf3. The HTTP section
//! (ambassador vs HAProxy vs nginx) follows, in `bench_http.rs`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{Placement, Pod, SERVER_V4, cgroup2_mount, placed};
use anyhow::{Context as _, bail};

const ECHO_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;
const SEQUENTIAL: usize = 2000;
const PARALLEL_THREADS: usize = 4;
const PARALLEL_EACH: usize = 1500;
const IPERF_SECONDS: &str = "5";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Direct,
    Ebpf,
    Iptables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Ebpf => "eBPF redirect -> ambassador",
            Mode::Iptables => "iptables REDIRECT -> ambassador",
        }
    }
}

struct ConnectResult {
    p50_us: f64,
    p99_us: f64,
    rate: f64,
}

/// What a section's run is for.
#[derive(Clone, Copy, PartialEq)]
pub enum Pass {
    /// Every mode, timed, reported.
    Measure,
    /// ambassador's modes only, briefly, to record its profile (`pgo.rs`);
    /// the proxy is stopped with SIGTERM, so that it exits and writes it.
    Train,
}

/// The ambassador binaries a bench run measures: `main` (the PGO build,
/// unless `--no-pgo`), and the plain release build beside it when `main` is
/// the PGO one.
pub struct Bins {
    pub main: PathBuf,
    pub plain: Option<PathBuf>,
}

/// Makes `bin` the binary the test harness's Pod runs (its `bin()` reads
/// `AMBASSADOR_BIN` at every start).
pub fn use_binary(bin: &Path) {
    // SAFETY: the bench's other threads only pump child processes' output;
    // none reads the environment through libc, and std's accesses are locked.
    unsafe { std::env::set_var("AMBASSADOR_BIN", bin) };
}

pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark attaches eBPF programs and creates network namespaces: run it as root"
        );
    }
    Ok(())
}

/// Where a section's client runs: in the Pod's app container when it goes
/// through ambassador (so eBPF intercepts it), otherwise in the Pod's network
/// namespace outside the Pod's cgroup.
pub fn client_at<'a>(pod: &'a Pod, root_cg: &'a Path, intercepted: bool) -> Placement<'a> {
    Placement {
        netns: &pod.netns,
        cgroup: if intercepted {
            &pod.app_cgroup
        } else {
            root_cg
        },
        uid: None,
    }
}

/// The tools the L4 section needs besides the test harness's.
pub fn l4_tools() -> anyhow::Result<()> {
    crate::toolchain::ensure_test_tools()?;
    crate::toolchain::apt_install(&["iptables", "iperf3"])
}

pub fn run(bins: &Bins) -> anyhow::Result<()> {
    require_root()?;
    l4_tools()?;
    use_binary(&bins.main);
    let (results, counters) = l4(Pass::Measure)?;

    let base = &results[0];
    let mut report = String::new();
    report.push_str(&format!(
        "ambassador bench ({} sequential connects, {}x{} parallel, iperf3 {} s; ratio = mode / direct)\n\n",
        SEQUENTIAL, PARALLEL_THREADS, PARALLEL_EACH, IPERF_SECONDS
    ));
    report.push_str(&format!(
        "{:<34} {:>10} {:>10} {:>8} {:>12} {:>8} {:>10} {:>8}\n",
        "mode", "p50 us", "p99 us", "ratio", "connects/s", "ratio", "Gbit/s", "ratio"
    ));
    for (mode, seq, par, gbps) in &results {
        report.push_str(&format!(
            "{:<34} {:>10.1} {:>10.1} {:>8.2} {:>12.0} {:>8.2} {:>10.2} {:>8.2}\n",
            mode.name(),
            seq.p50_us,
            seq.p99_us,
            seq.p50_us / base.1.p50_us,
            par.rate,
            par.rate / base.2.rate,
            gbps,
            gbps / base.3,
        ));
    }
    report.push_str(&format!(
        "\nconnect = TCP connect + 1-byte echo + close, from the Pod to a server across a veth.\n\
         kernel counters for the eBPF run: redirected {} refused {} passed {}\n\
         {}",
        counters.redirected,
        counters.refused,
        counters.passed,
        crate::pgo::described(bins)
    ));
    print!("{report}");
    let out = crate::root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    // Written now so the L4 results are kept if the HTTP section fails.
    std::fs::write(out.join("report.txt"), &report)?;

    // Its own Pod: its config names HTTP services.
    let http = crate::bench_http::run(bins, Pass::Measure)?;
    print!("\n{http}");
    report.push('\n');
    report.push_str(&http);
    std::fs::write(out.join("report.txt"), &report)?;

    let failover = crate::bench_failover::run()?;
    print!("{failover}");
    report.push_str(&failover);
    std::fs::write(out.join("report.txt"), &report)?;

    let postgres = crate::bench_postgres::run(Pass::Measure)?;
    print!("{postgres}");
    report.push_str(&postgres);
    std::fs::write(out.join("report.txt"), &report)?;
    println!("(written to {})", out.join("report.txt").display());
    Ok(())
}

type L4Results = (
    Vec<(Mode, ConnectResult, ConnectResult, f64)>,
    ambassador_tests::Counters,
);

/// The L4 section as training (see [`Pass::Train`]).
pub fn train_l4() -> anyhow::Result<()> {
    l4(Pass::Train).map(drop)
}

/// The L4 section: connects and relay throughput, by mode.
fn l4(pass: Pass) -> anyhow::Result<L4Results> {
    let me = std::env::current_exe()?;
    // Access logs off, as for HAProxy and nginx: the same work compared.
    let mut pod = Pod::new("telemetry: { access_log: false }\n");
    // Thousands of short connections per mode.
    reuse_time_wait_ports(&pod)?;
    pod.start_proxy_logging("ambassador_userspace=info");
    let root_cg = cgroup2_mount();
    let server_at = Placement {
        netns: &pod.servers,
        cgroup: &root_cg,
        uid: None,
    };
    let echo = Guard(
        placed(&me, &server_at)
            .args(["__echo", &format!("{SERVER_V4}:{ECHO_PORT}"), "16"])
            .spawn()?,
    );
    let iperf = Guard(
        placed("iperf3", &server_at)
            .args(["-s", "-B", SERVER_V4, "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .spawn()?,
    );
    thread::sleep(Duration::from_millis(300));

    let modes: &[Mode] = match pass {
        Pass::Measure => &[Mode::Direct, Mode::Ebpf, Mode::Iptables],
        Pass::Train => &[Mode::Ebpf],
    };
    // Training needs the paths taken, not precise figures.
    let (scale, iperf_seconds) = match pass {
        Pass::Measure => (1, IPERF_SECONDS),
        Pass::Train => (4, "2"),
    };
    let mut results = Vec::new();
    for &mode in modes {
        if mode == Mode::Iptables {
            iptables(&pod, "-A")?;
        }
        let at = client_at(&pod, &root_cg, mode == Mode::Ebpf);
        let target = format!("{SERVER_V4}:{ECHO_PORT}");
        let seq = connect_bench(&me, &at, &target, SEQUENTIAL / scale, 1)?;
        let par = connect_bench(&me, &at, &target, PARALLEL_EACH / scale, PARALLEL_THREADS)?;
        // Training relays the other way (the server sends, in 16 KiB
        // writes): the same code, other traffic than the measured run's.
        let gbps = iperf_gbps(&at, iperf_seconds, pass == Pass::Train)?;
        if mode == Mode::Iptables {
            iptables(&pod, "-D")?;
        }
        eprintln!("xtask: bench {} done", mode.name());
        results.push((mode, seq, par, gbps));
    }
    let counters = pod.counters();
    if pass == Pass::Train {
        pod.terminate_proxy();
    }
    drop((echo, iperf));
    drop(pod);
    Ok((results, counters))
}

/// `cargo xtask bench --only http|postgres`: one section alone.
pub fn run_section(bins: &Bins, section: &str) -> anyhow::Result<()> {
    require_root()?;
    crate::toolchain::ensure_test_tools()?;
    use_binary(&bins.main);
    let report = match section {
        "http" => crate::bench_http::run(bins, Pass::Measure)?,
        _ => crate::bench_postgres::run(Pass::Measure)?,
    };
    let report = format!("{report}{}", crate::pgo::described(bins));
    print!("{report}");
    let out = crate::root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let file = out.join(format!("{section}.txt"));
    std::fs::write(&file, &report)?;
    println!("(written to {})", file.display());
    Ok(())
}

/// For benches that open many short connections: TIME_WAIT ports may be
/// reused, from a wide range (in the bench's own namespace only).
pub fn reuse_time_wait_ports(pod: &Pod) -> anyhow::Result<()> {
    let sysctl = Command::new("ip")
        .args(["netns", "exec", &pod.netns.name, "sysctl", "-qw"])
        .args([
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ])
        .status()?;
    if !sysctl.success() {
        bail!("cannot set sysctls in the bench namespace");
    }
    Ok(())
}

fn iptables(pod: &Pod, action: &str) -> anyhow::Result<()> {
    // Istio's rule, inside the Pod's namespace only: app traffic to the server,
    // except the proxy's own, goes to the proxy.
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.netns.name,
            "iptables",
            "-t",
            "nat",
            action,
            "OUTPUT",
        ])
        .args([
            "-p",
            "tcp",
            "-d",
            SERVER_V4,
            "-m",
            "owner",
            "!",
            "--uid-owner",
            "1337",
        ])
        .args(["-j", "REDIRECT", "--to-ports", "15001"])
        .status()?;
    if !status.success() {
        bail!("iptables {action} failed (is the nat table available in this kernel?)");
    }
    Ok(())
}

fn connect_bench(
    me: &Path,
    at: &Placement<'_>,
    target: &str,
    each: usize,
    threads: usize,
) -> anyhow::Result<ConnectResult> {
    let out = placed(me, at)
        .args(["__connect", target, &each.to_string(), &threads.to_string()])
        .output()?;
    if !out.status.success() {
        bail!(
            "bench client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    if f.len() != 3 {
        bail!("bench client printed {text:?}");
    }
    Ok(ConnectResult {
        p50_us: f[0],
        p99_us: f[1],
        rate: f[2],
    })
}

fn iperf_gbps(at: &Placement<'_>, seconds: &str, reverse: bool) -> anyhow::Result<f64> {
    let mut cmd = placed("iperf3", at);
    cmd.args([
        "-c",
        SERVER_V4,
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        seconds,
        "-J",
    ]);
    if reverse {
        cmd.args(["-R", "-l", "16K"]);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no sum_received in iperf3 output")
}

/// Kills a helper process by its PID when the benchmark ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `__echo ADDR THREADS`: accept, echo until EOF, close; a fixed pool of
/// threads so no thread is spawned per connection.
pub fn echo_server(addr: &str, threads: usize) -> anyhow::Result<()> {
    let l = Arc::new(TcpListener::bind(addr.parse::<SocketAddr>()?)?);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let l = l.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 64 * 1024];
                loop {
                    let Ok((mut c, _)) = l.accept() else { continue };
                    let _ = c.set_nodelay(true);
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

/// `__connect ADDR EACH THREADS`: each thread does EACH rounds of connect,
/// 1-byte echo, close. Prints "p50_us p99_us connects_per_second".
pub fn connect_client(addr: &str, each: usize, threads: usize) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            thread::spawn(move || -> std::io::Result<Vec<u32>> {
                let mut lat = Vec::with_capacity(each);
                for _ in 0..each {
                    let t = Instant::now();
                    let mut s = TcpStream::connect(addr)?;
                    s.set_nodelay(true)?;
                    s.write_all(b"x")?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b)?;
                    drop(s);
                    lat.push(t.elapsed().as_micros() as u32);
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(each * threads);
    for h in handles {
        all.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
        );
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64;
    println!("{} {} {}", pct(0.50), pct(0.99), all.len() as f64 / secs);
    Ok(())
}
