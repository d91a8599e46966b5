//! The one start-up sequence of a serving proxy, `proxy` and `run` alike:
//! the live config, the hook that carries reloads to the kernel maps, the
//! admin API's doors (reads on TCP, changes on the socket, metrics alone), reloads on
//! SIGHUP and file changes, then ready.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use crate::{
    admin,
    config::Config,
    interception::InterceptHook,
    reload::{self, Live},
};

/// What differs between the commands that serve.
pub struct Start {
    pub config: Config,
    /// The file, for reloads.
    pub path: Option<PathBuf>,
    /// Access logging when the file does not say.
    pub access_log_default: bool,
    pub admin: Option<SocketAddr>,
    /// The metrics listener (`GET /metrics` only).
    pub metrics: Option<SocketAddr>,
    /// The admin socket, and whether the file asked for it (then a socket
    /// that cannot be made stops the start; else it is a warning).
    pub admin_socket: Option<(PathBuf, bool)>,
}

/// Starts everything but the listeners' accept loop; the returned `Live` is
/// ready (`/ready` answers 200) once `hooks` have run on it.
pub async fn start(
    s: Start,
    hooks: impl FnOnce(&Live) -> Option<InterceptHook>,
) -> anyhow::Result<Arc<Live>> {
    let live = Live::start(s.config, s.path, s.access_log_default).await?;
    if let Some(hook) = hooks(&live) {
        live.set_intercept_hook(hook);
    }
    if let Some(at) = s.admin {
        admin::start(at, live.clone()).await?;
    }
    if let Some(at) = s.metrics {
        admin::start_metrics(at, live.clone()).await?;
    }
    if let Some((path, asked)) = s.admin_socket {
        match admin::start_socket(&path, live.clone()) {
            Err(e) if asked => return Err(e.into()),
            Err(e) => tracing::warn!(
                "{e}: no admin socket, so no log-level changes or reloads through it \
                 (SIGHUP and file changes still reload; set proxy.admin_socket)"
            ),
            Ok(()) => {}
        }
    }
    reload::watch(live.clone(), Duration::from_secs(2));
    live.set_ready(true);
    Ok(live)
}
