//! `ambassador reload` and `ambassador log-level`: changes through the
//! proxy's admin socket (the TCP side takes none).

use std::{path::PathBuf, process::ExitCode};

use crate::{admin, config::DEFAULT_ADMIN_SOCKET};

#[derive(clap::Args)]
pub struct ReloadArgs {
    /// The proxy's admin socket (`proxy.admin_socket`).
    #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
    socket: PathBuf,
}

#[derive(clap::Args)]
pub struct LogLevelArgs {
    /// A tracing filter such as `info` or `ambassador_userspace=debug`.
    filter: Option<String>,
    #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
    socket: PathBuf,
}

pub fn reload(args: ReloadArgs) -> anyhow::Result<ExitCode> {
    let (status, body) = admin::ask_socket(&args.socket, "POST", "/reload", "")?;
    anyhow::ensure!(
        status == 200,
        "the proxy refused the reload: {}",
        body.trim()
    );
    println!("ambassador: {}", body.trim());
    Ok(ExitCode::SUCCESS)
}

pub fn log_level(args: LogLevelArgs) -> anyhow::Result<ExitCode> {
    let (status, body) = match &args.filter {
        Some(f) => admin::ask_socket(&args.socket, "PUT", "/log-level", f)?,
        None => admin::ask_socket(&args.socket, "GET", "/log-level", "")?,
    };
    anyhow::ensure!(status == 200, "{}", body.trim());
    println!("{}", body.trim());
    Ok(ExitCode::SUCCESS)
}
