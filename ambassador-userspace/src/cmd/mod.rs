//! The commands: each parses its own flags ([`clap::Args`]), calls the
//! entry points below it, and turns what happened into an exit code. The
//! one place, with `main.rs`, where errors are `anyhow`.

pub mod admin;
pub mod check;
pub mod init;
pub mod inject;
pub mod node;
pub mod probe;
pub mod proxy;
pub mod run;
pub mod sidecar;
pub mod status;

use std::path::PathBuf;

use crate::config::{Cidr, Config, InboundPorts, Overrides};

/// What the Pod's annotations add to the file (`inject` writes them): the
/// same on `init` and `proxy`, so the kernel's interception and the proxy's
/// listeners agree, and applied again at every reload.
#[derive(clap::Args, Clone)]
pub struct PodFlags {
    /// Outbound ports never intercepted, on top of `intercept.exclude_ports`
    /// (annotation `ambassador.io/exclude-outbound-ports`).
    #[arg(long, value_delimiter = ',', value_name = "PORT,...")]
    exclude_ports: Vec<u16>,
    /// Destinations never intercepted, on top of `intercept.exclude_cidrs`
    /// (`ambassador.io/exclude-outbound-cidrs`).
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    exclude_cidrs: Vec<Cidr>,
    /// The app's ports callers reach through the proxy, on top of
    /// `inbound.ports`, or `all` (`ambassador.io/inbound-ports`).
    #[arg(long, value_name = "PORT,...|all")]
    inbound_ports: Option<InboundPorts>,
    /// Ports callers reach the app on directly, on top of
    /// `inbound.exclude_ports` (`ambassador.io/exclude-inbound-ports`).
    #[arg(long, value_delimiter = ',', value_name = "PORT,...")]
    exclude_inbound_ports: Vec<u16>,
}

impl PodFlags {
    pub fn overrides(self) -> Overrides {
        Overrides {
            exclude_ports: self.exclude_ports,
            exclude_cidrs: self.exclude_cidrs,
            inbound_ports: self.inbound_ports,
            exclude_inbound_ports: self.exclude_inbound_ports,
        }
    }
}

/// The file with the Pod's flags applied.
pub fn load_with(path: Option<&PathBuf>, overrides: &Overrides) -> anyhow::Result<Config> {
    let mut cfg = load_config(path)?;
    overrides.apply(&mut cfg).map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

/// Log level of the kernel programs (aya-log), fixed when they are loaded.
#[derive(Clone, Copy, clap::ValueEnum, Default, PartialEq, Eq)]
pub enum BpfLog {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// The file, or the all-defaults config without one.
pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    })
}

/// The runtime `workers` asks for: one worker is a current-thread runtime,
/// without the work-stealing machinery (and its cross-thread wake-ups) that
/// one thread cannot use; 0 is min(2, cores).
pub fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = if workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
    } else {
        workers
    };
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    Ok(builder.enable_all().build()?)
}
