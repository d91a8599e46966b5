//! The proxy's side of inbound interception: its listeners go into the
//! map the sk_lookup program assigns connections from. A listener leaves
//! the map by itself when its socket closes (the proxy died, or stopped):
//! the program's fail mode then decides for new callers.

use std::{os::fd::AsRawFd, path::Path};

use ambassador_common::maps::{self as m, IN_LISTEN_V4, IN_LISTEN_V6};
use aya::maps::{Map, MapData, SockMap};

use super::{error::InterceptError, pins};

/// Puts the listeners (127.0.0.1 and, when bound, ::1) into the map.
pub fn register<T: std::borrow::BorrowMut<MapData>>(
    map: &mut SockMap<T>,
    v4: &impl AsRawFd,
    v6: Option<&impl AsRawFd>,
) -> Result<(), InterceptError> {
    map.set(IN_LISTEN_V4, v4, 0)
        .map_err(InterceptError::map(m::IN_LISTEN))?;
    if let Some(v6) = v6 {
        map.set(IN_LISTEN_V6, v6, 0)
            .map_err(InterceptError::map(m::IN_LISTEN))?;
    }
    Ok(())
}

/// The Pod's listener map, as a sidecar opens it: from the directory `init
/// --pod-uid` shared (`--kernel-maps`), else from the pins of the nearest
/// ancestor cgroup (a proxy with the rights to read them).
pub fn open_map(shared: Option<&Path>) -> Result<SockMap<MapData>, String> {
    let path = match shared {
        Some(dir) => dir.join(m::IN_LISTEN),
        None => pins::own_pin(m::IN_LISTEN)?,
    };
    let data = MapData::from_pin(&path).map_err(|e| {
        format!(
            "cannot open {}: {e} (did `init` run with inbound.ports set, and with --pod-uid for a sidecar?)",
            path.display()
        )
    })?;
    SockMap::try_from(Map::SockMap(data)).map_err(|e| e.to_string())
}

/// Takes the listener map out of a loaded object (`run`).
pub fn take_map(bpf: &mut aya::Ebpf) -> Result<SockMap<MapData>, InterceptError> {
    let map = bpf.take_map(m::IN_LISTEN).ok_or(InterceptError::Map {
        name: m::IN_LISTEN,
        source: Box::new(aya::maps::MapError::InvalidName {
            name: m::IN_LISTEN.into(),
        }),
    })?;
    SockMap::try_from(map).map_err(InterceptError::map(m::IN_LISTEN))
}
