//! `cargo xtask run`: the main job on an embedded default. A local HTTP
//! upstream, an unmodified curl under `ambassador run`, and what happened on
//! the way: the proxy's log line and the kernel counters.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::Path,
    process::Command,
};

use anyhow::{Context as _, bail};

/// The demo's config: the upstream is on loopback, which is not intercepted by
/// default, so turn that on; everything else is the default.
const DEMO_CONFIG: &str = "\
# cargo xtask run: intercept loopback too, so a local upstream can stand in for a remote one
intercept:
  loopback: true
";

pub fn run(bin: &Path) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo attaches eBPF programs to a cgroup: run it as root");
    }
    crate::toolchain::ensure_test_tools()?;
    let upstream = TcpListener::bind("127.0.0.1:0")?;
    let addr = upstream.local_addr()?;
    std::thread::spawn(move || {
        for conn in upstream.incoming().flatten() {
            let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            let mut reader = BufReader::new(&conn);
            let mut line = String::new();
            // Read the request head, then answer.
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let body = format!(
                "hello from the upstream at {addr}; this connection reached me from {peer} (the proxy)\n"
            );
            let _ = (&conn).write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });

    let cfg = std::env::temp_dir().join(format!("ambassador-demo-{}.yaml", std::process::id()));
    std::fs::write(&cfg, DEMO_CONFIG)?;
    let url = format!("http://{addr}/hello");
    println!("== upstream listening on {addr}");
    println!("== ambassador run --summary -- curl -sS {url}");
    println!("   (curl has no proxy settings; the eBPF connect4 hook sends it to the proxy)\n");
    let status = Command::new(bin)
        .args(["run", "--summary", "--config"])
        .arg(&cfg)
        .args(["--", "curl", "-sS", "--noproxy", "*", &url])
        .env("AMBASSADOR_LOG", "ambassador_userspace::proxy=debug")
        .status()
        .context("starting ambassador")?;
    let _ = std::fs::remove_file(&cfg);
    if !status.success() {
        bail!("ambassador run exited with {status}");
    }
    println!(
        "\nThe upstream saw the proxy as its peer, the proxy logged the original destination,"
    );
    println!("and `redirected=1` is the kernel counting the one connect it sent to the proxy.");
    Ok(())
}
