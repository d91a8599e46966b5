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

use crate::config::Config;

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
