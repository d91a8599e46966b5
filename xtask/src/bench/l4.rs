//! The L4 section: TCP connect latency and rate (connect, 1-byte echo,
//! close), from the Pod to a server across the veth, direct, through the
//! eBPF redirect to ambassador, and through iptables REDIRECT to the same
//! proxy. Relay throughput is measured in the relay section (`relay.rs`);
//! here the PGO training (`Pass::Train`) still relays with iperf3. Also the
//! hidden `__echo` server and `__connect` client commands it runs in the
//! namespaces.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{Counters, Placement, Pod, SERVER_V4, cgroup2_mount, placed};
use anyhow::bail;

use super::{Guard, Pass, client_at, reuse_time_wait_ports, stats::quantile_at_index};

const ECHO_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;
pub(super) const SEQUENTIAL: usize = 2000;
pub(super) const PARALLEL_THREADS: usize = 4;
pub(super) const PARALLEL_EACH: usize = 1500;

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Mode {
    Direct,
    Ebpf,
    Iptables,
}

impl Mode {
    pub(super) fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Ebpf => "eBPF redirect -> ambassador",
            Mode::Iptables => "iptables REDIRECT -> ambassador",
        }
    }
}

pub(super) struct ConnectResult {
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
    pub(super) rate: f64,
}

/// Per mode: sequential connects, parallel connects; and the kernel counters
/// after the eBPF run.
pub(super) type L4Results = (Vec<(Mode, ConnectResult, ConnectResult)>, Counters);

/// The tools the L4 section needs besides the test harness's.
pub fn l4_tools() -> anyhow::Result<()> {
    crate::toolchain::ensure_test_tools()?;
    crate::toolchain::apt_install(&["iptables", "iperf3"])
}

/// The L4 section as training (see [`Pass::Train`]).
pub fn train_l4() -> anyhow::Result<()> {
    run(Pass::Train).map(drop)
}

/// The L4 section: connects by mode (and, training, relayed iperf3 traffic).
pub(super) fn run(pass: Pass) -> anyhow::Result<L4Results> {
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
    let iperf = match pass {
        Pass::Train => Some(Guard(
            placed("iperf3", &server_at)
                .args(["-s", "-B", SERVER_V4, "-p", &IPERF_PORT.to_string()])
                .stdout(Stdio::null())
                .spawn()?,
        )),
        Pass::Measure => None,
    };
    thread::sleep(Duration::from_millis(300));

    let modes: &[Mode] = match pass {
        Pass::Measure => &[Mode::Direct, Mode::Ebpf, Mode::Iptables],
        Pass::Train => &[Mode::Ebpf],
    };
    // Training needs the paths taken, not precise figures.
    let scale = match pass {
        Pass::Measure => 1,
        Pass::Train => 4,
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
        // Training relays with the server sending, in 16 KiB writes: the
        // same code, other traffic than the relay section's measured runs.
        if pass == Pass::Train {
            iperf_train(&at)?;
        }
        if mode == Mode::Iptables {
            iptables(&pod, "-D")?;
        }
        eprintln!("xtask: bench {} done", mode.name());
        results.push((mode, seq, par));
    }
    let counters = pod.counters();
    if pass == Pass::Train {
        pod.terminate_proxy();
    }
    drop((echo, iperf));
    drop(pod);
    Ok((results, counters))
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
    let args = ["__connect", target, &each.to_string(), &threads.to_string()].map(String::from);
    let f = super::client_figures(me, at, &args, 3, "bench client")?;
    Ok(ConnectResult {
        p50_us: f[0],
        p99_us: f[1],
        rate: f[2],
    })
}

/// The p50 of sequential connects (1-byte echo, close) in microseconds.
pub(super) fn connect_p50(me: &Path, at: &Placement<'_>, target: &str) -> anyhow::Result<f64> {
    Ok(connect_bench(me, at, target, SEQUENTIAL, 1)?.p50_us)
}

/// Two seconds of iperf3 with the server sending, for the training.
fn iperf_train(at: &Placement<'_>) -> anyhow::Result<()> {
    let out = placed("iperf3", at)
        .args(["-c", SERVER_V4, "-p", &IPERF_PORT.to_string()])
        .args(["-t", "2", "-J", "-R", "-l", "16K"])
        .output()?;
    if !out.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
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
    println!(
        "{} {} {}",
        quantile_at_index(&all, 0.50),
        quantile_at_index(&all, 0.99),
        all.len() as f64 / secs
    );
    Ok(())
}
