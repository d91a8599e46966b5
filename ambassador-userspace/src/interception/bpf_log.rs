//! Log lines from the kernel programs (aya-log), forwarded to the process log
//! under the target `ambassador_ebpf`. The programs only write them when loaded
//! with `--bpf-log LEVEL`; the level is fixed at load.

use std::path::Path;

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::warn;

use super::{error::InterceptError, link, pins};

/// Re-emits aya-log records as tracing events with a target of our own (the
/// programs' module path, `ambassador`, would also match our userspace targets).
pub struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        match r.level() {
            log::Level::Error => tracing::error!(target: "ambassador_ebpf", "{}", r.args()),
            log::Level::Warn => tracing::warn!(target: "ambassador_ebpf", "{}", r.args()),
            log::Level::Info => tracing::info!(target: "ambassador_ebpf", "{}", r.args()),
            log::Level::Debug => tracing::debug!(target: "ambassador_ebpf", "{}", r.args()),
            log::Level::Trace => tracing::trace!(target: "ambassador_ebpf", "{}", r.args()),
        }
    }

    fn flush(&self) {}
}

pub type Logger = EbpfLogger<Forward>;

fn log_err(e: aya_log::Error) -> InterceptError {
    InterceptError::Environment {
        what: "cannot open the eBPF log buffer".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// The log buffer of programs this process loaded.
pub fn open_loaded(bpf: &mut Ebpf) -> Result<Logger, InterceptError> {
    EbpfLogger::init_with_logger(bpf, Forward).map_err(log_err)
}

/// The log buffer of the programs `init` attached at `cgroup`.
pub fn open_installed(cgroup: &Path) -> Result<Logger, InterceptError> {
    let id = super::cgroup::cgroup_id(cgroup)?;
    let link_path =
        pins::dir_for(id).join(format!("link_{}", ambassador_common::programs::CONNECT4));
    let env = |what: &str, source| InterceptError::Environment {
        what: format!("{what} {}", link_path.display()),
        source,
    };
    let fd = link::open_pinned(&link_path)
        .map_err(|e| env("cannot open", e))?
        .ok_or_else(|| InterceptError::NotInstalled(cgroup.to_path_buf()))?;
    let prog = link::prog_id(&fd).map_err(|e| env("cannot inspect", e))?;
    EbpfLogger::init_from_id_with_logger(prog, Forward).map_err(log_err)
}

/// Forwards log lines as they arrive until `stop` turns true, then drains
/// what is left.
pub async fn forward(logger: Logger, mut stop: watch::Receiver<bool>) {
    // SAFETY: the logger owns the ring buffer's fd and keeps it open for as
    // long as the AsyncFd (which owns the logger) exists.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot watch the eBPF log buffer");
            return;
        }
    };
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let Ok(mut ready) = ready else { return };
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
            _ = stop.wait_for(|s| *s) => {
                fd.get_mut().flush();
                return;
            }
        }
    }
}
