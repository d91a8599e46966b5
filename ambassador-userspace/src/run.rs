//! `ambassador run -- CMD`: the Pod arrangement for one command tree on any
//! Linux host. A transient cgroup gets the programs; the proxy runs in this
//! process, outside that cgroup (so its own connects are never seen), on a port
//! of its own (so several runs coexist) and reads original destinations
//! straight from its private maps.

use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
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
    config::{AdminListen, AdminSocket, Config},
    interception::{self, LoadOptions, cgroup, pins},
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
    // Runs killed outright before us (their reapers too): their trees go,
    // then the pins their cgroups held.
    pins::sweep_stale_runs(&mount);
    let cg = cgroup::TransientCgroup::create(
        mount.join(format!("ambassador-run-{}", std::process::id())),
    )?;
    let mut guard = RunGuard {
        cgroup: Some(cg),
        pins: None,
    };
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
    // Pinned, the programs outlive this process however it ends: the
    // command tree can never go direct behind the fail mode's back.
    let pin_dir = pins::pin_links(&cg_path, &links)?;
    guard.pins = Some(pin_dir.clone());
    drop(links);
    let _reaper = spawn_reaper(&cg_path, &pin_dir)?;
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
        let mut bpf = crate::sync::lock(&bpf);
        interception::configure(&mut bpf, next, port, None)
            .and_then(|()| interception::set_accelerate(&mut bpf, false))
            .map_err(|e| e.to_string())
    }));
    interception::counters_into_metrics(counters.clone());
    if let Some(at) = admin_at {
        admin::start(at, live.clone()).await?;
    }
    if let Some(AdminSocket::At(p)) = &cfg.proxy.admin_socket {
        admin::start_socket(p, live.clone())?;
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
    drop(guard); // kills leftovers, removes the cgroup, then the pins
    Ok(exit_code(status))
}

/// Starts the reaper: this program again, outside the command's cgroup and
/// in a session of its own (a terminal's Ctrl-C or hang-up does not reach
/// it), reading a pipe whose write end only this process holds. However
/// `run` ends (`kill -9` included), the pipe closes; the reaper then kills
/// what is left of the command tree and removes the pins, unless `run` did.
fn spawn_reaper(cgroup: &Path, pins: &Path) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe().context("cannot find this program for the reaper")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("reap-run")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--pins")
        .arg(pins)
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    // SAFETY: setsid is async-signal-safe and changes only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().context("cannot start the reaper of `run`")
}

/// The reaper's work (`ambassador reap-run`, started by `run` only): waits
/// until its `run` is gone, then kills what is left in the run's cgroup and
/// removes it and the pins.
pub fn reap(cgroup: &Path, pins: &Path) -> anyhow::Result<()> {
    use std::io::Read as _;
    let is_run = |p: &Path, prefix: &str| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix))
    };
    anyhow::ensure!(
        is_run(cgroup, "ambassador-run-") && is_run(pins, "cgroup-"),
        "reap-run is started by `ambassador run` with its own cgroup and pins"
    );
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if cgroup.exists() {
        eprintln!(
            "ambassador: `run` ended without cleaning up: killing what is left of its command ({})",
            cgroup.display()
        );
        cgroup::TransientCgroup::adopt(cgroup.to_path_buf())
            .remove(Duration::from_secs(5))
            .with_context(|| format!("cannot remove {}", cgroup.display()))?;
    }
    pins::remove_dir(pins)?;
    Ok(())
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

/// Removes the transient cgroup on every path out of `run`, errors included:
/// what is left of the command is killed first, while the pinned programs
/// still hold it, then the pins go.
struct RunGuard {
    cgroup: Option<cgroup::TransientCgroup>,
    pins: Option<PathBuf>,
}

impl RunGuard {
    fn path(&self) -> &Path {
        self.cgroup.as_ref().expect("present until drop").path()
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            let path = cg.path().to_path_buf();
            if let Err(e) = cg.remove(Duration::from_secs(5)) {
                warn!(cgroup = %path.display(), error = %e, "could not remove transient cgroup");
            }
        }
        if let Some(dir) = self.pins.take()
            && let Err(e) = pins::remove_dir(&dir)
        {
            warn!(pins = %dir.display(), "could not remove the pins: {e}");
        }
    }
}
