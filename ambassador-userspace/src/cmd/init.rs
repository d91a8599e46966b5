//! `ambassador init`: the Pod's init container. Loads the eBPF programs,
//! attaches them at the Pod's cgroup and pins them, then exits.

use std::{path::PathBuf, process::ExitCode};

use super::BpfLog;
use crate::interception::{self, pins};

#[derive(clap::Args)]
pub struct Args {
    /// The Pod's cgroup: the parent of every container's cgroup; `auto`: find
    /// it from inside the Pod's init container (see deploy/README.md).
    #[arg(long, value_name = "PATH|auto")]
    cgroup: CgroupArg,
    /// With `--cgroup auto`: the Pod's UID (downward API `metadata.uid`), a
    /// cross-check, and the way to the cgroup when its own is not visible.
    #[arg(long, env = "AMBASSADOR_POD_UID")]
    pod_uid: Option<String>,
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    pod: super::PodFlags,
    /// The Pod's network namespace, for inbound interception: the init
    /// container's own by default (it shares the Pod's).
    #[arg(long, value_name = "PATH", default_value = "/proc/self/ns/net")]
    netns: PathBuf,
    /// Log level of the kernel programs (aya-log), fixed at load.
    #[arg(long, value_enum, default_value_t)]
    bpf_log: BpfLog,
}

/// `--cgroup PATH` or `--cgroup auto` (a cgroup literally named `auto`: `./auto`).
#[derive(Clone, Debug)]
enum CgroupArg {
    Auto,
    Path(PathBuf),
}

impl std::str::FromStr for CgroupArg {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "auto" {
            CgroupArg::Auto
        } else {
            CgroupArg::Path(s.into())
        })
    }
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = super::load_with(args.config.as_ref(), &args.pod.overrides())?;
    interception::check_environment()?;
    interception::raise_memlock();
    let cgroup = match args.cgroup {
        CgroupArg::Path(p) => p,
        CgroupArg::Auto => {
            pins::require_bpffs()?;
            let found = interception::cgroup::find_pod_cgroup(args.pod_uid.as_deref())?;
            println!(
                "ambassador: Pod cgroup {} ({})",
                found.path.display(),
                found.how
            );
            found.path
        }
    };
    // Every init on a node cleans up after the Pods deleted before it.
    super::node::report_sweep(&pins::sweep_stale());
    let done = pins::install(&cgroup, &args.netns, &cfg, args.bpf_log as u8)?;
    if let Some(uid) = &args.pod_uid {
        let shared = pins::share_with_proxy(&done.dir, uid)?;
        println!(
            "ambassador: counters and exclusions shared with the Pod's proxy in {}",
            shared.display()
        );
    }
    println!(
        "ambassador: {} interception at {} (pins in {})",
        if done.upgraded {
            "upgraded"
        } else {
            "installed"
        },
        cgroup.display(),
        done.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
