//! The `ambassador` binary: the command line, logging, and the one place
//! errors become exit codes. Each command lives in `cmd/`.

use std::{process::ExitCode, sync::Arc};

use ambassador_userspace::{
    admin,
    cmd::{self, BpfLog},
    config::Config,
};
use clap::{Parser, Subcommand};
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

#[derive(Subcommand)]
enum Command {
    /// Load the eBPF programs, attach them to a Pod's cgroup and pin them (init container).
    Init(cmd::init::Args),
    /// Run the proxy for connections redirected by `init` (sidecar; needs no privileges).
    Proxy(cmd::proxy::Args),
    /// Validate a config file as the proxy would (and a bit more), and summarise it.
    Check(cmd::check::Args),
    /// Print the JSON Schema of the config file (for editor completion).
    Schema,
    /// Show what is attached where, the counters and the pins, and what the
    /// proxy's admin API reports (services, endpoints, health).
    Status(cmd::status::Args),
    /// Follow the kernel programs' log lines (needs `init --bpf-log LEVEL`).
    BpfLog(cmd::node::CgroupArgs),
    /// Remove what `init` left for Pods that are gone (their cgroup was removed).
    Gc(cmd::node::GcArgs),
    /// Add the ambassador to Kubernetes workloads: YAML in, YAML out.
    Inject(cmd::inject::Args),
    /// Ask the proxy's admin API whether it is live or ready (exit 0 if so): the
    /// sidecar's probes, since the kubelet cannot reach the Pod's loopback.
    Probe(cmd::probe::Args),
    /// Make the proxy read its config file again now (through its admin socket).
    Reload(cmd::admin::ReloadArgs),
    /// Show, or with FILTER set, the proxy's log filter (through its admin socket).
    LogLevel(cmd::admin::LogLevelArgs),
    /// Detach and unpin everything `init` left for a cgroup.
    Uninstall(cmd::node::CgroupArgs),
    /// (Started by `run`: cleans up after it, however it ends.)
    #[command(hide = true)]
    ReapRun(cmd::run::ReapArgs),
    /// Run one command with its connections intercepted and proxied.
    Run(cmd::run::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match &cli.command {
        Command::Run(a) if a.bpf_log() != BpfLog::Off => "warn,ambassador_ebpf=trace",
        Command::Run(_) => "warn",
        Command::BpfLog(_) => "info,ambassador_ebpf=trace",
        _ => "info",
    };
    let filter = EnvFilter::try_new(cli.log.as_deref().unwrap_or(default_level))
        .unwrap_or_else(|_| EnvFilter::new(default_level));
    init_logging(filter);
    let result = match cli.command {
        Command::Init(a) => cmd::init::main(a),
        Command::Proxy(a) => cmd::proxy::main(a),
        Command::Check(a) => cmd::check::main(a),
        Command::Schema => {
            print!("{}", Config::json_schema());
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(a) => cmd::status::main(a),
        Command::BpfLog(a) => cmd::node::bpf_log(a),
        Command::Gc(a) => cmd::node::gc(a),
        Command::Inject(a) => cmd::inject::main(a),
        Command::Probe(a) => cmd::probe::main(a),
        Command::Reload(a) => cmd::admin::reload(a),
        Command::LogLevel(a) => cmd::admin::log_level(a),
        Command::Uninstall(a) => cmd::node::uninstall(a),
        Command::ReapRun(a) => cmd::run::reap_main(a),
        Command::Run(a) => cmd::run::main(a),
    };
    match result {
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
