//! `cargo xtask bench`, DNS section. The app's queries (this binary's
//! hidden `__dns` client: threads each asking one name again and again over
//! one UDP socket with `sendto`/`recvfrom`, as a resolver library does)
//! answered by one resolver, a dnsmasq in the servers' namespace answering
//! from its hosts file, three ways in one run, rounds interleaved: direct to
//! the resolver (not intercepted); captured by the kernel and forwarded by
//! ambassador; and through dnsmasq as a plain forwarder in the Pod (cache
//! off, so every query is forwarded, as ambassador's are). Reported: queries
//! per second, p50 latency, added p50 paired round by round, and the
//! forwarder's CPU per query. Then TCP connect latency through the eBPF
//! redirect with the UDP programs (sendmsg4/6, recvmsg4/6) attached and
//! detached, paired round by round: the DNS and UDP hooks must not slow
//! TCP connects.

use std::{
    net::UdpSocket,
    path::Path,
    process::Stdio,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use ambassador_tests::{
    Placement, Pod, SERVER_V4, SERVER2_V4, cgroup2_mount, dns::Dnsmasq, placed,
};
use anyhow::{Context as _, bail};

use super::{
    Guard, client_at,
    machine::{Priority, cpu_ticks, ticks_per_second},
    stats::{added, median, quantile_at_index},
};

const ROUNDS: usize = 7;
const THREADS: usize = 2;
const EACH: usize = 5000;
const NAME: &str = "bench.test";
/// The dnsmasq forwarder's address in the Pod (loopback).
const FORWARDER: &str = "127.0.0.2";
const ECHO_PORT: u16 = 7000;
/// The UDP programs whose links are taken away for the comparison.
const UDP_LINKS: [&str; 4] = [
    ambassador_common::programs::SENDMSG4,
    ambassador_common::programs::SENDMSG6,
    ambassador_common::programs::RECVMSG4,
    ambassador_common::programs::RECVMSG6,
];

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Direct,
    Ambassador,
    Dnsmasq,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct to the resolver",
            Mode::Ambassador => "captured -> ambassador",
            Mode::Dnsmasq => "dnsmasq forwarder",
        }
    }
}

/// One mode's rounds: (p50 us, queries/s, forwarder CPU us per query).
#[derive(Default)]
struct Rounds {
    p50: Vec<f64>,
    qps: Vec<f64>,
    cpu: Vec<f64>,
}

pub fn run() -> anyhow::Result<String> {
    crate::toolchain::apt_install(&["dnsmasq-base"])?;
    let me = std::env::current_exe()?;
    let _priority = Priority::raise();
    let resolv = std::env::temp_dir().join(format!("amb-bench-resolv-{}", std::process::id()));
    std::fs::write(&resolv, format!("nameserver {SERVER2_V4}\n"))?;
    let mut pod = Pod::new(&format!(
        "telemetry: {{ access_log: false }}\nintercept: {{ udp: {{ resolvers_from: {} }} }}\n",
        resolv.display()
    ));
    // Thousands of short connections in the connect part.
    super::reuse_time_wait_ports(&pod)?;
    pod.start_proxy_logging(super::http::LOG_FILTER);
    let resolver = Dnsmasq::start_with(&pod.servers, SERVER2_V4, &[(NAME, SERVER_V4)], 300, false);
    let root_cg = cgroup2_mount();
    let forwarder = dnsmasq_forwarder(&pod)?;
    let modes = [Mode::Direct, Mode::Ambassador, Mode::Dnsmasq];
    let mut rounds: Vec<Rounds> = modes.iter().map(|_| Rounds::default()).collect();
    for round in 0..ROUNDS {
        for i in 0..modes.len() {
            let k = (i + round) % modes.len();
            let mode = modes[k];
            let at = client_at(&pod, &root_cg, mode == Mode::Ambassador);
            let (target, pid) = match mode {
                Mode::Direct => (SERVER2_V4, None),
                Mode::Ambassador => (SERVER2_V4, pod.proxy_pid()),
                Mode::Dnsmasq => (FORWARDER, Some(forwarder.0.id())),
            };
            let pids: Vec<u32> = pid.into_iter().collect();
            let before = cpu_ticks(&pids);
            let (p50, qps, n) = query_bench(&me, &at, target)?;
            let cpu = match (before, cpu_ticks(&pids)) {
                (Some(b), Some(a)) => {
                    ((a.0 + a.1 - b.0 - b.1) as f64 / ticks_per_second()) * 1e6 / n as f64
                }
                _ => f64::NAN,
            };
            rounds[k].p50.push(p50);
            rounds[k].qps.push(qps);
            rounds[k].cpu.push(cpu);
        }
        eprintln!("xtask: bench dns round {}/{ROUNDS} done", round + 1);
    }
    let connects = connect_rounds(&me, &pod, &root_cg)?;
    drop((forwarder, resolver));
    drop(pod);
    let _ = std::fs::remove_file(&resolv);
    Ok(table(&modes, &rounds, &connects))
}

/// dnsmasq as a forwarder only, in the Pod's namespace outside its cgroup
/// (its own queries are not captured), cache off.
fn dnsmasq_forwarder(pod: &Pod) -> anyhow::Result<Guard> {
    let child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.netns.name,
            "dnsmasq",
            "--keep-in-foreground",
        ])
        .args([
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
        ])
        .args([
            "--bind-interfaces",
            "--port=53",
            "--user=root",
            "--pid-file=",
        ])
        .arg(format!("--listen-address={FORWARDER}"))
        .arg(format!("--server={SERVER2_V4}"))
        .args(["--cache-size=0", "--log-facility=/dev/null"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting the dnsmasq forwarder")?;
    let g = Guard(child);
    thread::sleep(Duration::from_millis(300));
    Ok(g)
}

/// (p50 us, queries/s, queries) of one run of the client.
fn query_bench(me: &Path, at: &Placement<'_>, target: &str) -> anyhow::Result<(f64, f64, usize)> {
    let args = [
        "__dns".to_string(),
        format!("{target}:53"),
        NAME.to_string(),
        EACH.to_string(),
        THREADS.to_string(),
    ];
    let f = super::client_figures(me, at, &args, 2, "DNS bench client")?;
    Ok((f[0], f[1], EACH * THREADS))
}

/// Sequential TCP connects through the redirect, UDP programs attached then
/// detached (their pinned links removed; `init` again attaches them), p50
/// us each, round by round.
fn connect_rounds(me: &Path, pod: &Pod, root_cg: &Path) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let server_at = Placement {
        netns: &pod.servers,
        cgroup: root_cg,
        uid: None,
    };
    let target = format!("{SERVER_V4}:{ECHO_PORT}");
    let _echo = Guard(
        placed(me, &server_at)
            .args(["__echo", &target, "4"])
            .spawn()?,
    );
    thread::sleep(Duration::from_millis(300));
    let at = client_at(pod, root_cg, true);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        with.push(super::l4::connect_p50(me, &at, &target)?);
        for prog in UDP_LINKS {
            std::fs::remove_file(pod.pin_dir().join(format!("link_{prog}")))
                .with_context(|| format!("detaching {prog}"))?;
        }
        without.push(super::l4::connect_p50(me, &at, &target)?);
        let out = pod.ambassador(&["init", "--cgroup"], Some(&pod.cgroup));
        if !out.status.success() {
            bail!("init again: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok((with, without))
}

fn table(modes: &[Mode], rounds: &[Rounds], connects: &(Vec<f64>, Vec<f64>)) -> String {
    let direct = &rounds[0];
    let mut out = format!(
        "\n## DNS: {ROUNDS} rounds, {THREADS} client threads x {EACH} queries each, one resolver (dnsmasq, from its hosts file)\n\n\
         | path | queries/s | p50 us | added p50 us | forwarder CPU us/query |\n| --- | ---: | ---: | ---: | ---: |\n"
    );
    for (m, r) in modes.iter().zip(rounds) {
        let add = match m {
            Mode::Direct => "-".to_string(),
            _ => format!("{:.0}", median(added(&r.p50, &direct.p50).into_iter())),
        };
        let cpu = match m {
            Mode::Direct => "-".to_string(),
            _ => format!("{:.1}", median(r.cpu.iter().copied())),
        };
        out.push_str(&format!(
            "| {} | {:.0} | {:.0} | {add} | {cpu} |\n",
            m.label(),
            median(r.qps.iter().copied()),
            median(r.p50.iter().copied()),
        ));
    }
    let (amb, dm) = (&rounds[1], &rounds[2]);
    let ratio = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y));
    let wins = amb.qps.iter().zip(&dm.qps).filter(|(a, d)| a > d).count();
    out.push_str(&format!(
        "\nambassador vs dnsmasq, paired by round: {:.2}x queries/s (ahead in {wins}/{ROUNDS} rounds), {:.2}x added p50, {:.2}x CPU per query; vs direct: {:.2}x queries/s\n",
        ratio(&amb.qps, &dm.qps),
        ratio(&added(&amb.p50, &direct.p50), &added(&dm.p50, &direct.p50)),
        ratio(&amb.cpu, &dm.cpu),
        ratio(&amb.qps, &direct.qps),
    ));
    let (with, without) = connects;
    let each = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    out.push_str(&format!(
        "TCP connect through the redirect, sequential, p50: {:.0} us with the UDP programs attached, {:.0} us without (paired difference {:+.1} us; rounds: {} / {})\n",
        median(with.iter().copied()),
        median(without.iter().copied()),
        median(added(with, without).into_iter()),
        each(with),
        each(without),
    ));
    out
}

/// `__dns ADDR NAME EACH THREADS`: each thread asks NAME (type A) EACH
/// times, one query at a time, and checks each answer. Prints "p50_us qps".
pub fn dns_client(addr: &str, name: &str, each: usize, threads: usize) -> anyhow::Result<()> {
    let query = Arc::new(build_query(name));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (addr, query) = (addr.to_string(), query.clone());
            thread::spawn(move || -> anyhow::Result<Vec<u32>> {
                let sock = UdpSocket::bind("0.0.0.0:0")?;
                sock.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut q = query.to_vec();
                let mut buf = [0u8; 512];
                let mut times = Vec::with_capacity(each);
                for i in 0..each {
                    let id = ((t * each + i) & 0xffff) as u16;
                    q[..2].copy_from_slice(&id.to_be_bytes());
                    let sent = Instant::now();
                    sock.send_to(&q, &addr)?;
                    let n = loop {
                        let (n, _) = sock.recv_from(&mut buf).context("no answer in 2 s")?;
                        if n >= 12 && buf[..2] == id.to_be_bytes() {
                            break n;
                        }
                    };
                    // NOERROR with one answer, or the run measures nothing.
                    if buf[3] & 0x0f != 0 || buf[6..8] != [0, 1] || n < q.len() {
                        bail!("unexpected answer {:?}", &buf[..n]);
                    }
                    times.push(sent.elapsed().as_micros() as u32);
                }
                Ok(times)
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(
            w.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??,
        );
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "{} {:.0}",
        quantile_at_index(&all, 0.5),
        all.len() as f64 / secs
    );
    Ok(())
}

/// A recursion-desired query for `name`, type A, class IN (id set per send).
fn build_query(name: &str) -> Vec<u8> {
    let mut q = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}
