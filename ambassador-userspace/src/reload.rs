//! The live config and service table, and replacing them while serving.
//!
//! A reload (SIGHUP, or the file changing on disk) reads and validates the
//! whole file and builds a complete new service table before anything
//! changes; then one atomic swap makes it current. Connections already
//! accepted keep the table they started with (they hold an `Arc` to it), so
//! a reload never changes policy under a request in flight. A bad file
//! changes nothing: it is logged, counted, and shown at `/status`.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::{
    access_log,
    config::{Config, Overrides},
    inbound::table::InboundTable,
    metrics,
    net::Settings,
    service::{ServiceError, ServiceTable},
};

pub use crate::interception::InterceptHook;

/// What the proxy serves with now.
pub struct Live {
    table: ArcSwap<ServiceTable>,
    inbound: ArcSwap<InboundTable>,
    config: ArcSwap<Config>,
    path: Option<PathBuf>,
    /// Listening, config loaded, interception in place; false again while draining.
    ready: AtomicBool,
    reloading: tokio::sync::Mutex<()>,
    last_error: Mutex<Option<String>>,
    last_reload: Mutex<Option<SystemTime>>,
    intercept: Mutex<Option<InterceptHook>>,
    /// Access logging when the file does not say.
    access_log_default: bool,
    /// The Pod's flags (annotations), added to every file read, as `init`
    /// added them.
    overrides: Mutex<Overrides>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Services(#[from] ServiceError),
    #[error("no config file to reload (the proxy started without --config)")]
    NoFile,
    #[error("{0}")]
    Flags(String),
    #[error("updating the kernel maps: {0}")]
    Intercept(String),
}

impl Live {
    /// Builds the first table from a config already validated.
    pub async fn start(
        cfg: Config,
        path: Option<PathBuf>,
        access_log_default: bool,
    ) -> Result<Arc<Live>, ServiceError> {
        let (table, inbound) = build(&cfg, None).await?;
        access_log::set_enabled(cfg.telemetry.access_log.unwrap_or(access_log_default));
        Ok(Arc::new(Live {
            table: ArcSwap::from(table),
            inbound: ArcSwap::from_pointee(inbound),
            config: ArcSwap::from_pointee(cfg),
            path,
            ready: AtomicBool::new(false),
            reloading: tokio::sync::Mutex::new(()),
            last_error: Mutex::new(None),
            last_reload: Mutex::new(None),
            intercept: Mutex::new(None),
            access_log_default,
            overrides: Mutex::new(Overrides::default()),
        }))
    }

    /// The table for one new connection.
    pub fn table(&self) -> Arc<ServiceTable> {
        self.table.load_full()
    }

    /// The inbound policies for one new caller's connection.
    pub fn inbound(&self) -> Arc<InboundTable> {
        self.inbound.load_full()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// What every reloaded file gets on top of its own (the config given to
    /// `start` must already have it).
    pub fn set_overrides(&self, overrides: Overrides) {
        *crate::sync::lock(&self.overrides) = overrides;
    }

    pub fn set_intercept_hook(&self, hook: InterceptHook) {
        *crate::sync::lock(&self.intercept) = Some(hook);
    }

    /// The last rejected reload's reason, if the last reload failed.
    pub fn last_error(&self) -> Option<String> {
        crate::sync::lock(&self.last_error).clone()
    }

    pub fn last_reload(&self) -> Option<SystemTime> {
        *crate::sync::lock(&self.last_reload)
    }

    /// Reads the file again and, when it is valid, serves with it.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let result = self.try_reload().await;
        metrics::get().reload(result.is_ok());
        *crate::sync::lock(&self.last_reload) = Some(SystemTime::now());
        *crate::sync::lock(&self.last_error) = result.as_ref().err().map(|e| e.to_string());
        match &result {
            Ok(()) => info!("config reloaded"),
            Err(e) => warn!("config reload rejected, the previous config keeps serving: {e}"),
        }
        result
    }

    async fn try_reload(&self) -> Result<(), ReloadError> {
        let path = self.path.clone().ok_or(ReloadError::NoFile)?;
        // Reading and checking a big file is work for a blocking thread too.
        let mut next = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| ReloadError::Services(ServiceError::Build(e.to_string())))??;
        crate::sync::lock(&self.overrides)
            .apply(&mut next)
            .map_err(ReloadError::Flags)?;
        let (table, inbound) = build(&next, Some(&self.table())).await?;
        let old = self.config.load();
        for what in restart_only(&old, &next) {
            warn!("config reload: `{what}` changed; it takes effect at the next start");
        }
        let inbound_changed = kernel_inbound(&old) != kernel_inbound(&next);
        if old.intercept != next.intercept || inbound_changed {
            match crate::sync::lock(&self.intercept).as_ref() {
                Some(hook) => hook(&next).map_err(ReloadError::Intercept)?,
                None if inbound_changed => warn!(
                    "config reload: the inbound ports and fail mode change at the next init \
                     (this proxy cannot write its Pod's maps: give it --kernel-maps)"
                ),
                None => {}
            }
        }
        access_log::set_enabled(next.telemetry.access_log.unwrap_or(self.access_log_default));
        self.table.store(table);
        self.inbound.store(Arc::new(inbound));
        self.config.store(Arc::new(next));
        Ok(())
    }
}

/// Builds the service table (and the inbound one) on a blocking thread, off the data path (with
/// thousands of services that is seconds of work the runtime's workers
/// must not spend: with one worker, traffic would wait for it). A first
/// table resolves its names before it serves; one replacing `previous`
/// starts from the addresses that one knew and resolves in the background.
async fn build(
    cfg: &Config,
    previous: Option<&ServiceTable>,
) -> Result<(Arc<ServiceTable>, InboundTable), ServiceError> {
    let settings = Settings::from_config(&cfg.proxy);
    let owned = cfg.clone();
    let (table, inbound) = tokio::task::spawn_blocking(move || {
        Ok::<_, ServiceError>((
            ServiceTable::new(&owned, &settings)?,
            build_inbound(&owned, &settings)?,
        ))
    })
    .await
    .map_err(|e| ServiceError::Build(e.to_string()))??;
    let mut table = table;
    if let Some(p) = previous {
        table.keep_learned(p);
    }
    let table = Arc::new(table);
    if let Some(p) = previous {
        table.adopt_names(p);
        for svc in table.services() {
            if let Some(old) = p.by_name(&svc.name) {
                svc.endpoints.adopt(&old.endpoints);
            }
        }
    }
    table
        .keep_names_resolved(cfg.proxy.dns_refresh, previous.is_none())
        .await;
    table.start_health_checks();
    // Endpoints named by host: each address an endpoint, kept current.
    for svc in table.services() {
        crate::endpoint::refresh::spawn(&svc.endpoints);
    }
    Ok((table, inbound))
}

/// The inbound policies (certificates read now: a file that cannot be used
/// fails the start or the reload, not a caller's handshake).
fn build_inbound(cfg: &Config, settings: &Settings) -> Result<InboundTable, ServiceError> {
    InboundTable::new(cfg, settings).map_err(|e| ServiceError::Build(e.to_string()))
}

/// What the kernel's inbound program is told: the rest of `inbound` is the
/// proxy's own.
fn kernel_inbound(c: &Config) -> impl PartialEq + '_ {
    (&c.inbound.ports, &c.inbound.exclude_ports, c.inbound.fail)
}

/// Settings a running proxy cannot change.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.proxy, &new.proxy);
    let mut changed = Vec::new();
    if o.port != n.port {
        changed.push("proxy.port");
    }
    if o.uid != n.uid {
        changed.push("proxy.uid");
    }
    if o.mark != n.mark {
        changed.push("proxy.mark");
    }
    if o.workers != n.workers {
        changed.push("proxy.workers");
    }
    if o.admin != n.admin {
        changed.push("proxy.admin");
    }
    let (oi, ni) = (&old.inbound, &new.inbound);
    if !oi.enabled() && ni.enabled() {
        changed.push("inbound.ports (turned on: init attaches the program, and the proxy opens its listener at start)");
    }
    if oi.port != ni.port {
        changed.push("inbound.port");
    }
    if old.dns.port != new.dns.port || old.dns.capture != new.dns.capture {
        changed.push("dns.port and dns.capture (the forwarder's sockets and the kernel's resolver list are set at start)");
    }
    if old.telemetry.tracing != new.telemetry.tracing {
        changed.push("telemetry.tracing");
    }
    changed
}

/// Reloads on SIGHUP and when the file changes (checked every `every`: a
/// Kubernetes ConfigMap update swaps a symlink, which inotify on the path
/// would miss).
pub fn watch(live: Arc<Live>, every: Duration) {
    let Some(path) = live.path.clone() else {
        return;
    };
    // Both before the caller says ready, not when the task first runs: a
    // SIGHUP right after `/ready` (or the first log line) must reload, not
    // end the process (SIGHUP's default), and a change made then must count.
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("cannot watch SIGHUP ({e}): reloads only on file change");
            None
        }
    };
    let mut seen = stamp(&path);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let signalled = tokio::select! {
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                _ = tick.tick() => false,
            };
            let now = stamp(&path);
            if signalled || now != seen {
                seen = now;
                if signalled {
                    info!("SIGHUP: reloading the config");
                }
                let _ = live.reload().await;
            }
        }
    });
}

/// What tells a changed file: its identity, size and time.
fn stamp(path: &Path) -> Option<(u64, u64, SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}
