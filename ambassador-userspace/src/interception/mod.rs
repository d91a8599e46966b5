//! Interception: loading the eBPF programs, configuring their maps, attaching
//! them to a Pod's cgroup, pinning what must outlive `init`, and taking it all
//! away again.

pub mod bpf_log;
pub mod cgroup;
pub mod error;
pub mod inbound;
mod layout;
pub mod link;
pub mod load;
pub mod pins;
pub mod shared;
pub mod status;

use std::path::Path;

pub use error::InterceptError;
pub use load::{
    ConnTable, LoadOptions, attach, attach_inbound, check_environment, configure,
    counters_into_metrics, load, no_counters_in_metrics, raise_memlock, read_counters,
    set_accelerate, take_tables,
};

use crate::config::Config;

/// Applies a reloaded file's `intercept` exclusions and inbound ports and
/// fail mode to the kernel maps (only where this process may write them).
pub type InterceptHook = Box<dyn Fn(&Config) -> Result<(), String> + Send + Sync>;

/// Gives a proxy what it may use of its Pod's maps: the counters for
/// `/metrics`, and the exclusion and inbound maps for reloads. From `dir` (the shared
/// `pod-<uid>` directory) when given, else from the pins of its own cgroup
/// when this process may read them. Returns the hook that applies a
/// reloaded file's settings to them, for the caller to install.
pub fn share_maps(dir: Option<&Path>, current: &Config) -> Option<InterceptHook> {
    let Some(dir) = dir else {
        match pins::own_counters() {
            Ok(counters) => counters_into_metrics(std::sync::Arc::new(counters)),
            Err(e) => no_counters_in_metrics(&e),
        }
        return None;
    };
    match shared::SharedMaps::open(dir) {
        Ok(mut maps) => {
            counters_into_metrics(std::sync::Arc::new(maps.counters));
            // From now on the proxy's view is the kernel's: its exclusions
            // and inbound ports (the file's and the command line's) go in
            // at once.
            if let Err(e) = maps.writable.write(current) {
                tracing::warn!("writing to the Pod's maps: {e}");
            }
            if !maps.writable.has_inbound() {
                tracing::warn!(
                    "the Pod's shared maps have no inbound ports (an older init): \
                     inbound ports and fail mode change at the next init"
                );
            }
            let writable = std::sync::Mutex::new(maps.writable);
            tracing::info!(dir = %dir.display(), "the Pod's kernel maps: counters in /metrics, exclusions and inbound ports follow reloads");
            Some(Box::new(move |next: &Config| {
                crate::sync::lock(&writable)
                    .write(next)
                    .map_err(|e| e.to_string())
            }))
        }
        Err(e) => {
            tracing::warn!(
                dir = %dir.display(),
                "cannot open the Pod's shared kernel maps ({e}; did init run with --pod-uid, and is the directory mounted?): \
                 no kernel counters in /metrics, and intercept changes wait for init"
            );
            None
        }
    }
}
