//! The accept loop both directions share: take connections from a pair of
//! listeners, refuse them at once near the open-files limit, run each in
//! its own task, and on shutdown stop accepting and let live ones finish.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tracing::{info, warn};

use crate::net::{self, FdBudget, Listeners};

/// Says at most once a second that connections are being refused.
struct Throttled {
    last: Option<Instant>,
    since: u64,
}

impl Throttled {
    fn refused(&mut self, budget: FdBudget) {
        self.since += 1;
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            warn!(
                refused = self.since,
                fds_for_apps = budget.last_for_apps,
                "near the open-files limit: resetting new connections (raise the limit, or find what holds them)"
            );
            self.last = Some(Instant::now());
            self.since = 0;
        }
    }
}

/// Accepts until `shutdown` turns true, calls `stopped` once the listeners
/// are closed, then waits up to `drain` for live connections.
pub async fn serve<F, Fut>(
    listeners: Listeners,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    stopped: impl FnOnce(),
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    let (v4, v6) = (listeners.v4, listeners.v6);
    let budget = FdBudget::now();
    let mut refusals = Throttled {
        last: None,
        since: 0,
    };
    loop {
        let accepted = tokio::select! {
            r = v4.accept() => r,
            r = accept_opt(v6.as_ref()) => r,
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        match accepted {
            Ok((stream, _)) if !budget.allows(std::os::fd::AsRawFd::as_raw_fd(&stream)) => {
                crate::metrics::get().refused_fd_limit.inc();
                refusals.refused(budget);
                net::reset(&stream);
            }
            Ok((stream, peer)) => {
                conns.spawn(handle(stream, peer));
            }
            Err(e) => {
                // Out of fds or memory: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop((v4, v6));
    stopped();
    if conns.is_empty() {
        info!("no connections in flight: stopping");
        return;
    }
    info!(connections = conns.len(), deadline = ?drain, "draining: no new connections, in-flight ones finish");
    let done =
        tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    match done {
        Ok(()) => info!("drained"),
        Err(_) => warn!(
            left = conns.len(),
            "drain deadline reached: closing what is left"
        ),
    }
}

async fn accept_opt(l: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}
