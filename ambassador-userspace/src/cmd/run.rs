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
    process::{ExitCode, ExitStatus, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};
use tracing::{debug, warn};

use super::{
    BpfLog,
    sidecar::{self, Start},
};
use crate::{
    access_log,
    config::{AdminListen, AdminSocket, Config},
    dns, inbound,
    interception::{self, LoadOptions, cgroup, pins},
    net::{self, Listeners, Settings},
    original_dst::OriginalDst,
    proxy,
};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the kernel counters to stderr when the command ends.
    #[arg(long)]
    summary: bool,
    #[arg(long, value_enum, default_value_t)]
    bpf_log: BpfLog,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

impl Args {
    pub fn bpf_log(&self) -> BpfLog {
        self.bpf_log
    }
}

/// The `run` command: the command's exit code is ours.
pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = super::load_config(args.config.as_ref())?;
    let tracing = crate::trace::init_configured(&cfg)?;
    let rt = super::runtime(cfg.proxy.workers)?;
    let opts = RunOptions {
        command: args.command,
        config_path: args.config.map(|p| std::path::absolute(&p).unwrap_or(p)),
        summary: args.summary,
        bpf_log_level: args.bpf_log as u8,
    };
    let code = rt.block_on(run(cfg, opts)).context("ambassador run")?;
    drop(rt);
    if let Some(t) = tracing {
        t.shutdown();
    }
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

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
    let fd_limit = net::raise_fd_limit();
    let listeners = Listeners::bind(0)?;
    let port = listeners.port();
    // The forwarder's ports: any free ones (several `run`s share a host).
    let (dns_listeners, dns_port) = dns::udp::bind_anywhere(&cfg.dns_resolvers())?;
    let (guard, mut kernel) = intercept(&cfg, port, dns_port, opts.bpf_log_level)?;
    // Callers of this network namespace's ports, when the config names
    // some: the listeners' own port does not matter (the program assigns).
    let inbound_listeners = match cfg.inbound.enabled() {
        true => {
            let l = Listeners::bind(0)?;
            let mut map = interception::inbound::take_map(&mut kernel.bpf)?;
            interception::inbound::register(&mut map, &l.v4, l.v6.as_ref())?;
            Some(l)
        }
        false => None,
    };
    let start = Start {
        admin: AdminListen::given(cfg.proxy.admin),
        metrics: AdminListen::given(cfg.proxy.metrics),
        admin_socket: match &cfg.proxy.admin_socket {
            Some(AdminSocket::At(p)) => Some((p.clone(), true)),
            _ => None,
        },
        config: cfg,
        path: opts.config_path,
        access_log_default: false,
    };
    // This process owns the maps: intercept changes apply on reload.
    let bpf = std::sync::Mutex::new(kernel.bpf);
    let live = sidecar::start(start, |_| {
        Some(Box::new(move |next: &Config| {
            let mut bpf = crate::sync::lock(&bpf);
            interception::configure(&mut bpf, next, port, dns_port, None)
                .and_then(|()| interception::set_accelerate(&mut bpf, false))
                .map_err(|e| e.to_string())
        }))
    })
    .await?;
    interception::counters_into_metrics(kernel.counters.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let inbound = inbound_listeners.map(|l| {
        tokio::spawn(inbound::serve(
            l,
            live.clone(),
            stop_rx.clone(),
            Duration::from_secs(1),
        ))
    });
    let tables = live.clone();
    let forwarder = tokio::spawn(dns::udp::serve(
        dns_listeners,
        Arc::new(move || tables.table()),
        stop_rx.clone(),
    ));
    let proxy = tokio::spawn(proxy::serve(
        listeners,
        OriginalDst::Table(Arc::new(kernel.conns)),
        live,
        stop_rx,
        Duration::from_secs(1),
    ));
    let mut child = spawn_command(program, args, guard.path(), fd_limit)?;
    let status = signals.wait_forwarding(&mut child).await?;
    let _ = stop_tx.send(true);
    let _ = proxy.await;
    let _ = forwarder.await;
    if let Some(i) = inbound {
        let _ = i.await;
    }
    access_log::flush();
    if let Some((task, stop)) = kernel.log {
        let _ = stop.send(true);
        let _ = task.await;
    }
    if opts.summary {
        let line: Vec<String> = interception::read_counters(&kernel.counters)
            .into_iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        eprintln!("ambassador: {}", line.join(" "));
    }
    drop(guard); // kills leftovers, removes the cgroup, then the pins
    Ok(exit_code(status))
}

/// What `run` holds of the kernel side while the command runs.
struct Kernel {
    bpf: aya::Ebpf,
    counters: Arc<aya::maps::PerCpuArray<aya::maps::MapData, u64>>,
    conns: interception::ConnTable,
    /// The kernel programs' log forwarder, and its stop switch.
    log: Option<(tokio::task::JoinHandle<()>, watch::Sender<bool>)>,
}

/// The transient cgroup with the programs attached and pinned (pinned, they
/// outlive this process however it ends: the command tree can never go
/// direct behind the fail mode's back), and its reaper started.
fn intercept(
    cfg: &Config,
    port: u16,
    dns_port: u16,
    log_level: u8,
) -> anyhow::Result<(RunGuard, Kernel)> {
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
        reaper: None,
    };
    let cg_path = guard.path().to_path_buf();
    let mut bpf = interception::load(&LoadOptions {
        pin_dir: None,
        table_size: cfg.intercept.table_size,
        log_level,
    })?;
    interception::configure(&mut bpf, cfg, port, dns_port, None)?;
    // The proxy runs outside the command's cgroup, where `sockops` never sees
    // its sockets: the app<->proxy shortcut needs both ends, so it stays off.
    interception::set_accelerate(&mut bpf, false)?;
    let cg_dir = File::open(&cg_path).with_context(|| format!("open {}", cg_path.display()))?;
    let mut links = interception::attach(&mut bpf, &cg_dir)?;
    if cfg.inbound.enabled() {
        // This process's network namespace: run it in a namespace of its
        // own (`ip netns exec`) to try the inbound half without touching
        // the host's ports.
        let ns = File::open("/proc/self/ns/net").context("open /proc/self/ns/net")?;
        links.push((
            ambassador_common::programs::INBOUND,
            interception::attach_inbound(&bpf, &ns)?,
        ));
    }
    let pin_dir = pins::pin_links(&cg_path, &links)?;
    guard.pins = Some(pin_dir.clone());
    drop(links);
    guard.reaper = Some(spawn_reaper(&cg_path, &pin_dir)?);
    let (counters, conns) = interception::take_tables(&mut bpf)?;
    let log = if log_level > 0 {
        let logger = interception::bpf_log::open_loaded(&mut bpf)?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(interception::bpf_log::forward(logger, stop_rx));
        Some((task, stop))
    } else {
        None
    };
    debug!(port, cgroup = %cg_path.display(), "interception attached");
    let kernel = Kernel {
        bpf,
        counters: Arc::new(counters),
        conns,
        log,
    };
    Ok((guard, kernel))
}

/// Starts the command inside the cgroup.
fn spawn_command(
    program: &OsString,
    args: &[OsString],
    cg_path: &Path,
    fd_limit: Option<libc::rlimit>,
) -> anyhow::Result<tokio::process::Child> {
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
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {}", program.to_string_lossy()))?;
    drop(procs);
    Ok(child)
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

#[derive(clap::Args)]
pub struct ReapArgs {
    #[arg(long)]
    cgroup: PathBuf,
    #[arg(long)]
    pins: PathBuf,
}

pub fn reap_main(args: ReapArgs) -> anyhow::Result<ExitCode> {
    reap(&args.cgroup, &args.pins)?;
    Ok(ExitCode::SUCCESS)
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
    /// Holds the reaper's pipe open until everything above is cleaned up.
    reaper: Option<std::process::Child>,
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
