//! `ambassador proxy`: the sidecar. Needs no privileges: it reads original
//! destinations with `getsockopt(SO_ORIGINAL_DST)`, answered by the kernel
//! programs `init` attached.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use super::sidecar::{self, Start};
use crate::{
    access_log,
    config::{AdminListen, AdminSocket, DEFAULT_ADMIN, DEFAULT_ADMIN_SOCKET, DEFAULT_METRICS},
    dns, inbound, interception,
    net::{self, Listeners, Settings},
    original_dst::OriginalDst,
    proxy,
};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    config: Option<PathBuf>,
    /// The Pod's maps that `init --pod-uid` shared with the proxy (its
    /// `pod-<uid>` pin directory, mounted into the sidecar): kernel counters
    /// in /metrics, and `intercept` exclusions applied on reload.
    #[arg(long, env = "AMBASSADOR_KERNEL_MAPS", value_name = "DIR")]
    kernel_maps: Option<PathBuf>,
    /// The same flags `init` was given: the inbound ports decide the
    /// listener, and reloads keep them all.
    #[command(flatten)]
    pod: super::PodFlags,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let overrides = args.pod.overrides();
    let cfg = super::load_with(args.config.as_ref(), &overrides)?;
    let path = args.config.map(|p| std::path::absolute(&p).unwrap_or(p));
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
    net::raise_fd_limit();
    let rt = super::runtime(cfg.proxy.workers)?;
    Settings::from_config(&cfg.proxy).check()?;
    let (port, drain) = (cfg.proxy.port, cfg.proxy.drain_timeout);
    let inbound_port = cfg.inbound.enabled().then_some(cfg.inbound.port);
    let (dns_resolvers, dns_port) = (cfg.dns_resolvers(), cfg.dns.port);
    let tracing = crate::trace::init_configured(&cfg)?;
    let start = Start {
        admin: AdminListen::or_default(cfg.proxy.admin, DEFAULT_ADMIN),
        metrics: AdminListen::or_default(cfg.proxy.metrics, DEFAULT_METRICS),
        // Not given: the default place, where a sidecar has it; a proxy
        // started elsewhere goes on without (SIGHUP still reloads).
        admin_socket: match &cfg.proxy.admin_socket {
            None => Some((PathBuf::from(DEFAULT_ADMIN_SOCKET), false)),
            Some(AdminSocket::At(p)) => Some((p.clone(), true)),
            Some(AdminSocket::Off) => None,
        },
        config: cfg,
        path,
        access_log_default: true,
    };
    let maps = args.kernel_maps;
    rt.block_on(async {
        // The port first: a taken one is the likeliest start failure.
        let listeners = Listeners::bind(port)?;
        let dns_listeners = dns::udp::bind(&dns_resolvers, dns_port)?;
        let inbound_listeners = match inbound_port {
            Some(p) => Some(inbound_listen(p, maps.as_deref())?),
            None => None,
        };
        let live = sidecar::start(start, |live| {
            live.set_overrides(overrides);
            interception::share_maps(maps.as_deref(), &live.config())
        })
        .await?;
        let stop = stop_on_signal();
        let tables = live.clone();
        let forwarder = tokio::spawn(dns::udp::serve(
            dns_listeners,
            Arc::new(move || tables.table()),
            stop.clone(),
        ));
        let outbound = proxy::serve(
            listeners,
            OriginalDst::SocketOption,
            live.clone(),
            stop.clone(),
            drain,
        );
        match inbound_listeners {
            Some(l) => {
                tokio::join!(outbound, inbound::serve(l, live, stop, drain));
            }
            None => outbound.await,
        }
        let _ = forwarder.await;
        access_log::flush();
        anyhow::Ok(())
    })?;
    drop(rt);
    if let Some(t) = tracing {
        t.shutdown();
    }
    Ok(ExitCode::SUCCESS)
}

/// The inbound listeners, put where the Pod's sk_lookup program finds them.
fn inbound_listen(port: u16, maps: Option<&std::path::Path>) -> anyhow::Result<Listeners> {
    let l = Listeners::bind(port)?;
    let mut map = interception::inbound::open_map(maps)
        .map_err(|e| anyhow::anyhow!("inbound.ports is set, but {e}"))?;
    interception::inbound::register(&mut map, &l.v4, l.v6.as_ref())?;
    Ok(l)
}

/// Turns true on SIGTERM or SIGINT: stop accepting, drain.
fn stop_on_signal() -> tokio::sync::watch::Receiver<bool> {
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
    rx
}
