//! The `ambassador` binary: the one place errors become exit codes.

use std::{ffi::OsString, path::PathBuf, process::ExitCode, sync::Arc};

use ambassador_userspace::{
    access_log, admin,
    config::{self, AdminListen, AdminSocket, Cidr, Config, DEFAULT_ADMIN, DEFAULT_ADMIN_SOCKET},
    inject,
    interception::{self, pins},
    original_dst::OriginalDst,
    probe,
    proxy::{self, Listeners, Settings},
    reload::{self, Live},
    run::{self, RunOptions},
    status,
};
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "ambassador",
    version,
    about = "eBPF-accelerated transparent ambassador sidecar"
)]
struct Cli {
    /// Process log filter (tracing syntax: `info`, `ambassador_userspace=debug`).
    /// Default: `warn` for `run` (it shares the terminal with the command), `info` otherwise.
    #[arg(long, global = true, env = "AMBASSADOR_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, Default)]
enum BpfLog {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Subcommand)]
enum Command {
    /// Load the eBPF programs, attach them to a Pod's cgroup and pin them (init container).
    Init {
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
        /// Ports never intercepted, on top of `intercept.exclude_ports` (what the
        /// Pod annotation `ambassador.io/exclude-outbound-ports` becomes).
        #[arg(long, value_delimiter = ',', value_name = "PORT,...")]
        exclude_ports: Vec<u16>,
        /// Destinations never intercepted, on top of `intercept.exclude_cidrs`.
        #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
        exclude_cidrs: Vec<Cidr>,
        /// Log level of the kernel programs (aya-log), fixed at load.
        #[arg(long, value_enum, default_value_t)]
        bpf_log: BpfLog,
    },
    /// Run the proxy for connections redirected by `init` (sidecar; needs no privileges).
    Proxy {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The Pod's maps that `init --pod-uid` shared with the proxy (its
        /// `pod-<uid>` pin directory, mounted into the sidecar): kernel counters
        /// in /metrics, and `intercept` exclusions applied on reload.
        #[arg(long, env = "AMBASSADOR_KERNEL_MAPS", value_name = "DIR")]
        kernel_maps: Option<PathBuf>,
        /// The same `--exclude-ports` `init` was given, so reloads keep them.
        #[arg(long, value_delimiter = ',', value_name = "PORT,...")]
        exclude_ports: Vec<u16>,
        /// The same `--exclude-cidrs` `init` was given.
        #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
        exclude_cidrs: Vec<Cidr>,
    },
    /// Validate a config file as the proxy would (and a bit more), and summarise it.
    Check {
        /// The config file.
        file: PathBuf,
    },
    /// Print the JSON Schema of the config file (for editor completion).
    Schema,
    /// Show what is attached where, the counters and the pins, and what the
    /// proxy's admin API reports (services, endpoints, health).
    Status {
        /// The proxy's admin API.
        #[arg(long, default_value_t = DEFAULT_ADMIN)]
        admin: std::net::SocketAddr,
    },
    /// Follow the kernel programs' log lines (needs `init --bpf-log LEVEL`).
    BpfLog {
        #[arg(long)]
        cgroup: PathBuf,
    },
    /// Remove what `init` left for Pods that are gone (their cgroup was removed).
    Gc {
        /// Keep running and sweep this often (a node DaemonSet); default: once.
        #[arg(long, value_parser = config::parse_duration)]
        every: Option<std::time::Duration>,
    },
    /// Add the ambassador to Kubernetes workloads: YAML in, YAML out.
    Inject {
        /// The manifests (several documents, any kinds); `-` or none: stdin.
        file: Option<PathBuf>,
        /// Write here instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// The ambassador image for both containers.
        #[arg(long, default_value = inject::DEFAULT_IMAGE)]
        image: String,
        /// The ConfigMap holding `config.yaml` (a Pod annotation can override it).
        #[arg(long, default_value = inject::DEFAULT_CONFIG_MAP)]
        config_map: String,
    },
    /// Ask the proxy's admin API whether it is live or ready (exit 0 if so): the
    /// sidecar's probes, since the kubelet cannot reach the Pod's loopback.
    Probe {
        #[arg(value_enum)]
        what: probe::Check,
        /// The admin API's address.
        #[arg(long, default_value = probe::DEFAULT_ADMIN)]
        admin: std::net::SocketAddr,
    },
    /// Make the proxy read its config file again now (through its admin socket).
    Reload {
        /// The proxy's admin socket (`proxy.admin_socket`).
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
    },
    /// Show, or with FILTER set, the proxy's log filter (through its admin socket).
    LogLevel {
        /// A tracing filter such as `info` or `ambassador_userspace=debug`.
        filter: Option<String>,
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
    },
    /// Detach and unpin everything `init` left for a cgroup.
    Uninstall {
        #[arg(long)]
        cgroup: PathBuf,
    },
    /// (Started by `run`: cleans up after it, however it ends.)
    #[command(hide = true)]
    ReapRun {
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long)]
        pins: PathBuf,
    },
    /// Run one command with its connections intercepted and proxied.
    Run {
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
    },
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

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    })
}

fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = if workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
    } else {
        workers
    };
    // One worker: a current-thread runtime, without the work-stealing
    // machinery (and its cross-thread wake-ups) that one thread cannot use.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    Ok(builder.enable_all().build()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match &cli.command {
        Command::Run { bpf_log, .. } if !matches!(bpf_log, BpfLog::Off) => {
            "warn,ambassador_ebpf=trace"
        }
        Command::Run { .. } => "warn",
        Command::BpfLog { .. } => "info,ambassador_ebpf=trace",
        _ => "info",
    };
    let filter = EnvFilter::try_new(cli.log.as_deref().unwrap_or(default_level))
        .unwrap_or_else(|_| EnvFilter::new(default_level));
    init_logging(filter);
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ambassador: error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// Process logs on stderr, with a filter the admin API can change at run time.
fn init_logging(filter: EnvFilter) {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    admin::set_log_control(Arc::new(move |new: Option<&str>| {
        if let Some(f) = new {
            let next = EnvFilter::try_new(f).map_err(|e| format!("bad log filter `{f}`: {e}"))?;
            handle.reload(next).map_err(|e| e.to_string())?;
        }
        handle
            .with_current(|f| f.to_string())
            .map_err(|e| e.to_string())
    }));
}

/// The chain of causes on one line, outermost first, skipping a cause whose
/// text its parent already quoted.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}

fn report_sweep(sweep: &pins::Sweep) {
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

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Init {
            cgroup,
            pod_uid,
            config,
            exclude_ports,
            exclude_cidrs,
            bpf_log,
        } => {
            let mut cfg = load_config(config.as_ref())?;
            cfg.intercept.exclude_ports.extend(exclude_ports);
            cfg.intercept.exclude_cidrs.extend(exclude_cidrs);
            interception::check_environment()?;
            interception::raise_memlock();
            let cgroup = match cgroup {
                CgroupArg::Path(p) => p,
                CgroupArg::Auto => {
                    pins::require_bpffs()?;
                    let found = interception::cgroup::find_pod_cgroup(pod_uid.as_deref())?;
                    println!(
                        "ambassador: Pod cgroup {} ({})",
                        found.path.display(),
                        found.how
                    );
                    found.path
                }
            };
            // Every init on a node cleans up after the Pods deleted before it.
            report_sweep(&pins::sweep_stale());
            let done = pins::install(&cgroup, &cfg, bpf_log as u8)?;
            if let Some(uid) = &pod_uid {
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
        Command::Proxy {
            config,
            kernel_maps,
            exclude_ports,
            exclude_cidrs,
        } => {
            let mut cfg = load_config(config.as_ref())?;
            cfg.intercept.exclude_ports.extend(&exclude_ports);
            cfg.intercept.exclude_cidrs.extend(&exclude_cidrs);
            let config = config.map(|p| std::path::absolute(&p).unwrap_or(p));
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            if euid != cfg.proxy.uid && cfg.proxy.mark.is_none() {
                anyhow::bail!(
                    "ambassador proxy runs as uid {euid} but proxy.uid is {}: its own connections would be \
                     redirected back to it; run it as uid {} (securityContext.runAsUser) or set proxy.mark",
                    cfg.proxy.uid,
                    cfg.proxy.uid
                );
            }
            proxy::raise_fd_limit();
            let rt = runtime(cfg.proxy.workers)?;
            Settings::from_config(&cfg.proxy).check()?;
            let (port, drain) = (cfg.proxy.port, cfg.proxy.drain_timeout);
            let tracing = ambassador_userspace::trace::init_configured(&cfg)?;
            let admin_at = match cfg.proxy.admin {
                None => Some(DEFAULT_ADMIN),
                Some(AdminListen::At(a)) => Some(a),
                Some(AdminListen::Off) => None,
            };
            // Not given: the default place, where a sidecar has it; a proxy
            // started elsewhere goes on without (SIGHUP still reloads).
            let admin_socket = match &cfg.proxy.admin_socket {
                None => Some((PathBuf::from(DEFAULT_ADMIN_SOCKET), false)),
                Some(AdminSocket::At(p)) => Some((p.clone(), true)),
                Some(AdminSocket::Off) => None,
            };
            rt.block_on(async {
                // The port first: a taken one is the likeliest start failure.
                let listeners = Listeners::bind(port)?;
                let live = Live::start(cfg, config, true).await?;
                live.set_extra_exclusions(exclude_ports, exclude_cidrs);
                interception::share_maps_with(&live, kernel_maps.as_deref());
                if let Some(at) = admin_at {
                    admin::start(at, live.clone()).await?;
                }
                match admin_socket.map(|(p, asked)| (admin::start_socket(&p, live.clone()), asked))
                {
                    Some((Err(e), true)) => return Err(e.into()),
                    Some((Err(e), false)) => tracing::warn!(
                        "{e}: no admin socket, so no log-level changes or reloads through it \
                         (SIGHUP and file changes still reload; set proxy.admin_socket)"
                    ),
                    _ => {}
                }
                reload::watch(live.clone(), std::time::Duration::from_secs(2));
                live.set_ready(true);
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    use tokio::signal::unix::{SignalKind, signal};
                    let (Ok(mut term), Ok(mut int)) = (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::interrupt()),
                    ) else {
                        return;
                    };
                    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                    let _ = tx.send(true);
                });
                proxy::serve(listeners, OriginalDst::SocketOption, live, rx, drain).await;
                access_log::flush();
                anyhow::Ok(())
            })?;
            drop(rt);
            if let Some(t) = tracing {
                t.shutdown();
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { file } => {
            let rt = runtime(1)?;
            let summary = rt.block_on(ambassador_userspace::check::check(&file))?;
            print!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema => {
            print!("{}", Config::json_schema());
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { admin } => {
            let proxy = status::proxy_view(admin);
            // In a locked-down sidecar the pins are not visible: the proxy's
            // view alone is still worth showing.
            match interception::check_environment() {
                Ok(()) => print!("{}", status::render(&pins::list())),
                Err(e) if proxy.is_some() => println!("interception: not visible here ({e})"),
                Err(e) => return Err(e.into()),
            }
            match proxy {
                Some(p) => print!("{p}"),
                None => println!("proxy: no admin API answers at {admin}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::BpfLog { cgroup } => {
            interception::check_environment()?;
            let logger = interception::bpf_log::open_installed(&cgroup)?;
            let rt = runtime(1)?;
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
        Command::Gc { every } => {
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
                if every.is_none() && sweep.removed.is_empty() && sweep.failed.is_empty() {
                    println!("ambassador: no installs of deleted Pods");
                }
                match every {
                    Some(d) => std::thread::sleep(d),
                    None if sweep.failed.is_empty() => return Ok(ExitCode::SUCCESS),
                    None => return Ok(ExitCode::from(1)),
                }
            }
        }
        Command::Inject {
            file,
            output,
            image,
            config_map,
        } => {
            let (name, text) = match &file {
                Some(p) if p.as_os_str() != "-" => (
                    p.display().to_string(),
                    std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read {}", p.display()))?,
                ),
                _ => {
                    let mut t = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
                        .context("cannot read stdin")?;
                    ("stdin".to_string(), t)
                }
            };
            let opts = inject::Options { image, config_map };
            let out = inject::inject(&text, &opts).with_context(|| name.clone())?;
            for line in &out.report {
                eprintln!("{line}");
            }
            match output {
                Some(p) => std::fs::write(&p, &out.text)
                    .with_context(|| format!("cannot write {}", p.display()))?,
                None => print!("{}", out.text),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe { what, admin } => {
            probe::probe(what, admin)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { socket } => {
            let (status, body) = admin::ask_socket(&socket, "POST", "/reload", "")?;
            anyhow::ensure!(
                status == 200,
                "the proxy refused the reload: {}",
                body.trim()
            );
            println!("ambassador: {}", body.trim());
            Ok(ExitCode::SUCCESS)
        }
        Command::LogLevel { filter, socket } => {
            let (status, body) = match &filter {
                Some(f) => admin::ask_socket(&socket, "PUT", "/log-level", f)?,
                None => admin::ask_socket(&socket, "GET", "/log-level", "")?,
            };
            anyhow::ensure!(status == 200, "{}", body.trim());
            println!("{}", body.trim());
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninstall { cgroup } => {
            interception::check_environment()?;
            if pins::uninstall(&cgroup)? {
                println!("ambassador: removed interception from {}", cgroup.display());
            } else {
                println!("ambassador: nothing installed at {}", cgroup.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ReapRun { cgroup, pins } => {
            run::reap(&cgroup, &pins)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            summary,
            bpf_log,
            command,
        } => {
            let cfg = load_config(config.as_ref())?;
            let tracing = ambassador_userspace::trace::init_configured(&cfg)?;
            let rt = runtime(cfg.proxy.workers)?;
            let code = rt
                .block_on(run::run(
                    cfg,
                    RunOptions {
                        command,
                        config_path: config.map(|p| std::path::absolute(&p).unwrap_or(p)),
                        summary,
                        bpf_log_level: bpf_log as u8,
                    },
                ))
                .context("ambassador run")?;
            drop(rt);
            if let Some(t) = tracing {
                t.shutdown();
            }
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
    }
}
