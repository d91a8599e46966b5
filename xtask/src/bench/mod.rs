//! `cargo xtask bench`: the same job done direct, through the eBPF redirect to
//! the ambassador proxy, and through iptables REDIRECT to the same proxy, in one
//! run, reported as ratios to direct. A benchmark, not a test: it asserts
//! nothing about speed.
//!
//! Setup: a simulated Pod (the test harness's: Pod cgroup with app/proxy
//! children, a network namespace joined by veth to a servers' namespace), the
//! proxy as uid 1337. The client and the echo server are this binary's hidden
//! `__connect` / `__echo` commands (`l4.rs`); relay throughput is iperf3,
//! ambassador vs nginx stream vs HAProxy mode tcp (`relay.rs`). The HTTP
//! section (ambassador vs HAProxy vs nginx, `http.rs`), transcoding
//! (`transcode.rs`), failover
//! (`failover.rs`) and PostgreSQL (`postgres.rs`) follow; `stats.rs` holds
//! the statistics and `report.rs` the tables. This file runs the sections
//! and holds what they share.

mod dns;
mod failover;
pub mod http;
mod inbound;
mod l4;
mod machine;
mod oha;
pub mod postgres;
mod relay;
mod report;
mod stats;
mod transcode;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
};

use ambassador_tests::{Placement, Pod};
use anyhow::bail;

pub use dns::dns_client;
pub use l4::{connect_client, echo_server, l4_tools, train_l4};

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
    /// What the second binary is, for its rows: `no PGO`, or `baseline`.
    pub plain_label: &'static str,
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

pub fn run(bins: &Bins) -> anyhow::Result<()> {
    require_root()?;
    l4_tools()?;
    use_binary(&bins.main);
    let l4 = l4::run(Pass::Measure)?;
    let mut report = report::l4_table(&l4, &crate::pgo::described(bins));
    print!("{report}");
    let out = crate::root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    // Written now so the L4 results are kept if the HTTP section fails.
    std::fs::write(out.join("report.txt"), &report)?;

    let relay = relay::run()?;
    print!("{relay}");
    report.push_str(&relay);
    std::fs::write(out.join("report.txt"), &report)?;

    // Its own Pod: its config names HTTP services.
    let http = http::run(bins, Pass::Measure)?;
    print!("\n{http}");
    report.push('\n');
    report.push_str(&http);
    std::fs::write(out.join("report.txt"), &report)?;

    let inbound = inbound::run()?;
    print!("{inbound}");
    report.push_str(&inbound);
    std::fs::write(out.join("report.txt"), &report)?;

    let transcoded = transcode::run()?;
    print!("{transcoded}");
    report.push_str(&transcoded);
    std::fs::write(out.join("report.txt"), &report)?;

    let failover = failover::run()?;
    print!("{failover}");
    report.push_str(&failover);
    std::fs::write(out.join("report.txt"), &report)?;

    let postgres = postgres::run(Pass::Measure)?;
    print!("{postgres}");
    report.push_str(&postgres);
    std::fs::write(out.join("report.txt"), &report)?;

    let dns = dns::run()?;
    print!("{dns}");
    report.push_str(&dns);
    std::fs::write(out.join("report.txt"), &report)?;
    println!("(written to {})", out.join("report.txt").display());
    Ok(())
}

/// `cargo xtask bench --only relay|http|inbound|transcode|postgres|dns`: one
/// section alone.
pub fn run_section(bins: &Bins, section: &str) -> anyhow::Result<()> {
    require_root()?;
    crate::toolchain::ensure_test_tools()?;
    use_binary(&bins.main);
    let report = match section {
        "relay" => relay::run()?,
        "http" => http::run(bins, Pass::Measure)?,
        "inbound" => inbound::run()?,
        "transcode" => transcode::run()?,
        "dns" => dns::run()?,
        _ => postgres::run(Pass::Measure)?,
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

/// Runs this binary (`me`)'s hidden client command `args` where `at` says
/// and returns the `n` numbers it printed (`what` names it in errors).
pub(super) fn client_figures(
    me: &Path,
    at: &Placement<'_>,
    args: &[String],
    n: usize,
    what: &str,
) -> anyhow::Result<Vec<f64>> {
    let out = ambassador_tests::placed(me, at).args(args).output()?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    if f.len() != n {
        bail!("{what} printed {text:?}");
    }
    Ok(f)
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

/// Kills a helper process by its PID when the benchmark ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
