//! The node's own commands: `gc` (what deleted Pods and killed runs left),
//! `uninstall` (one cgroup's interception), `bpf-log` (the kernel programs'
//! log lines).

use std::{path::PathBuf, process::ExitCode};

use crate::{
    config,
    interception::{self, pins},
};

#[derive(clap::Args)]
pub struct GcArgs {
    /// Keep running and sweep this often (a node DaemonSet); default: once.
    #[arg(long, value_parser = config::parse_duration)]
    every: Option<std::time::Duration>,
}

#[derive(clap::Args)]
pub struct CgroupArgs {
    #[arg(long)]
    cgroup: PathBuf,
}

pub fn gc(args: GcArgs) -> anyhow::Result<ExitCode> {
    interception::check_environment()?;
    let mount = interception::cgroup::cgroup2_mount()?;
    loop {
        for cg in pins::sweep_stale_runs(&mount) {
            println!(
                "ambassador: removed {} (its `ambassador run` was killed) and what was left in it",
                cg.display()
            );
        }
        let sweep = pins::sweep_stale();
        report_sweep(&sweep);
        if args.every.is_none() && sweep.removed.is_empty() && sweep.failed.is_empty() {
            println!("ambassador: no installs of deleted Pods");
        }
        match args.every {
            Some(d) => std::thread::sleep(d),
            None if sweep.failed.is_empty() => return Ok(ExitCode::SUCCESS),
            None => return Ok(ExitCode::from(1)),
        }
    }
}

pub fn uninstall(args: CgroupArgs) -> anyhow::Result<ExitCode> {
    interception::check_environment()?;
    if pins::uninstall(&args.cgroup)? {
        println!(
            "ambassador: removed interception from {}",
            args.cgroup.display()
        );
    } else {
        println!("ambassador: nothing installed at {}", args.cgroup.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn bpf_log(args: CgroupArgs) -> anyhow::Result<ExitCode> {
    interception::check_environment()?;
    let logger = interception::bpf_log::open_installed(&args.cgroup)?;
    let rt = super::runtime(1)?;
    rt.block_on(async {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            let _ = stop.send(true);
        });
        interception::bpf_log::forward(logger, stop_rx).await
    });
    Ok(ExitCode::SUCCESS)
}

pub fn report_sweep(sweep: &pins::Sweep) {
    if !sweep.removed.is_empty() {
        let ids: Vec<String> = sweep.removed.iter().map(u64::to_string).collect();
        println!(
            "ambassador: removed the pins of {} deleted Pod cgroup(s) (ids {})",
            ids.len(),
            ids.join(", ")
        );
    }
    for e in &sweep.failed {
        eprintln!("ambassador: warning: cannot remove stale pins: {e}");
    }
}
