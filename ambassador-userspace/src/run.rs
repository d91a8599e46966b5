//! `ambassador run -- CMD`: the Pod arrangement for one command tree on any
//! Linux host. A transient cgroup gets the programs; the proxy runs in this
//! process, outside that cgroup (so its own connects are never seen), on a port
//! of its own (so several runs coexist) and reads original destinations
//! straight from its private maps.

use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    os::fd::AsRawFd,
    process::ExitStatus,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};
use tracing::{debug, warn};

use crate::{
    access_log, admin,
    config::{AdminListen, Config},
    interception::{self, LoadOptions, cgroup},
    original_dst::OriginalDst,
    proxy::{self, Listeners, Settings},
    reload::{self, Live},
};

pub struct RunOptions {
    pub command: Vec<OsString>,
    /// The config file, for reloads.
    pub config_path: Option<std::path::PathBuf>,
    pub summary: bool,
    pub bpf_log_level: u8,
}

/// Runs the command under interception and returns the exit code to pass on
/// (128+N when it died of signal N).
pub async fn run(cfg: Config, opts: RunOptions) -> anyhow::Result<i32> {
    interception::check_environment()?;
    // Handlers first: a Ctrl-C from now on must reach our clean-up, not kill us.
    let signals = Signals::new()?;
    let (program, args) = opts
        .command
        .split_first()
        .context("no command given: usage is `ambassador run [OPTIONS] -- CMD [ARGS...]`")?;

    // Everything the config names is read now: a bad file stops us here.
    Settings::from_config(&cfg.proxy).check()?;
    let admin_at = match cfg.proxy.admin {
        Some(AdminListen::At(a)) => Some(a),
        _ => None,
    };
    let live = Live::start(cfg.clone(), opts.config_path.clone(), false).await?;
    let fd_limit = proxy::raise_fd_limit();
    let listeners = Listeners::bind(0)?;
    let port = listeners.port();
    let mount = cgroup::cgroup2_mount()?;
    cgroup::sweep_stale_runs(&mount);
    let cg = cgroup::TransientCgroup::create(
        mount.join(format!("ambassador-run-{}", std::process::id())),
    )?;
    let guard = CgroupGuard(Some(cg));
    let cg_path = guard.path().to_path_buf();

    let mut bpf = interception::load(&LoadOptions {
        pin_dir: None,
        table_size: cfg.intercept.table_size,
        log_level: opts.bpf_log_level,
    })?;
    interception::configure(&mut bpf, &cfg, port, None)?;
    // The proxy runs outside the command's cgroup, where `sockops` never sees
    // its sockets: the app<->proxy shortcut needs both ends, so it stays off.
    interception::set_accelerate(&mut bpf, false)?;
    let cg_dir = File::open(&cg_path).with_context(|| format!("open {}", cg_path.display()))?;
    let links = interception::attach(&mut bpf, &cg_dir)?;
    let (counters, conns) = interception::take_tables(&mut bpf)?;
    let counters = Arc::new(counters);
    let (log_stop, log_stop_rx) = watch::channel(false);
    let bpf_log = if opts.bpf_log_level > 0 {
        let logger = interception::bpf_log::open_loaded(&mut bpf)?;
        Some(tokio::spawn(interception::bpf_log::forward(
            logger,
            log_stop_rx,
        )))
    } else {
        None
    };
    debug!(port, cgroup = %cg_path.display(), "interception attached");
    // This process owns the maps: intercept changes apply on reload.
    let bpf = std::sync::Mutex::new(bpf);
    live.set_intercept_hook(Box::new(move |next: &Config| {
        let mut bpf = bpf
            .lock()
            .map_err(|_| "kernel maps lock poisoned".to_string())?;
        interception::configure(&mut bpf, next, port, None)
            .and_then(|()| interception::set_accelerate(&mut bpf, false))
            .map_err(|e| e.to_string())
    }));
    interception::counters_into_metrics(counters.clone());
    if let Some(at) = admin_at {
        admin::start(at, live.clone()).await?;
    }
    reload::watch(live.clone(), Duration::from_secs(2));
    live.set_ready(true);

    let (stop_tx, stop_rx) = watch::channel(false);
    let proxy = tokio::spawn(proxy::serve(
        listeners,
        OriginalDst::Table(Arc::new(conns)),
        live,
        stop_rx,
        Duration::from_secs(1),
    ));

    let procs = OpenOptions::new()
        .write(true)
        .open(cg_path.join("cgroup.procs"))
        .context("open cgroup.procs of the transient cgroup")?;
    let procs_fd = procs.as_raw_fd();
    let mut command = tokio::process::Command::new(program);
    command.args(args);
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe syscalls on values prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            // Join the cgroup before exec, so not one connect escapes it.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            // If ambassador dies, the command must not carry on unintercepted.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The command gets the open-files limit it would have had.
            if let Some(lim) = fd_limit.as_ref() {
                libc::setrlimit(libc::RLIMIT_NOFILE, lim);
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", program.to_string_lossy()))?;
    drop(procs);

    let status = signals.wait_forwarding(&mut child).await?;

    let _ = stop_tx.send(true);
    let _ = proxy.await;
    access_log::flush();
    drop(links); // detach
    if let Some(task) = bpf_log {
        let _ = log_stop.send(true);
        let _ = task.await;
    }
    if opts.summary {
        let line: Vec<String> = interception::read_counters(&counters)
            .into_iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        eprintln!("ambassador: {}", line.join(" "));
    }
    drop(guard); // kills leftovers, removes the cgroup
    Ok(exit_code(status))
}

/// The signals `run` handles, registered before the command starts.
struct Signals {
    term: Signal,
    hup: Signal,
    quit: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the child; SIGTERM, SIGHUP and SIGQUIT sent to ambassador are
    /// passed on. Ctrl-C needs no forwarding: the terminal sends SIGINT to the
    /// whole foreground group, the child included, and ambassador keeps waiting.
    async fn wait_forwarding(
        mut self,
        child: &mut tokio::process::Child,
    ) -> anyhow::Result<ExitStatus> {
        let pid = child
            .id()
            .context("child exited before it could be tracked")? as i32;
        loop {
            let sig = tokio::select! {
                status = child.wait() => return Ok(status?),
                _ = self.term.recv() => libc::SIGTERM,
                _ = self.hup.recv() => libc::SIGHUP,
                _ = self.quit.recv() => libc::SIGQUIT,
                _ = self.int.recv() => continue,
            };
            // SAFETY: plain syscall on our own, not yet reaped, child.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    }
}

/// Removes the transient cgroup on every path out of `run`, errors included.
struct CgroupGuard(Option<cgroup::TransientCgroup>);

impl CgroupGuard {
    fn path(&self) -> &std::path::Path {
        self.0.as_ref().expect("present until drop").path()
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cg) = self.0.take() {
            let path = cg.path().to_path_buf();
            if let Err(e) = cg.remove(Duration::from_secs(5)) {
                warn!(cgroup = %path.display(), error = %e, "could not remove transient cgroup");
            }
        }
    }
}
