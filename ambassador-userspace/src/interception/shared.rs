//! A Pod's maps as its own proxy opens them (`proxy --kernel-maps DIR`,
//! the `pod-<uid>/` directory `init --pod-uid` pinned them in, mounted into
//! the sidecar): counters to read; exclusions, the UDP allow list, inbound
//! ports and the inbound fail mode to write on reload.

use std::path::Path;

use ambassador_common::{InboundConfig as KernelInbound, maps as m};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};

use super::{
    error::InterceptError,
    load::{inbound_entry, write_exclusions, write_inbound_ports, write_udp},
};
use crate::config::Config;

/// A Pod's shared maps as its proxy opens them (`proxy --kernel-maps DIR`,
/// the `pod-<uid>/` directory mounted into the sidecar).
pub struct SharedMaps {
    pub counters: PerCpuArray<MapData, u64>,
    pub writable: Writable,
}

/// What a reload writes: the exclusion maps, and the inbound ports and
/// config entry (absent when an older `init` did not share them).
pub struct Writable {
    ports: HashMap<MapData, u16, u8>,
    v4: aya::maps::LpmTrie<MapData, [u8; 4], u8>,
    v6: aya::maps::LpmTrie<MapData, [u8; 16], u8>,
    inbound: Option<InboundMaps>,
    /// The UDP allow tries (absent when an older `init` did not share them).
    udp: Option<UdpMaps>,
}

type UdpMaps = (
    aya::maps::LpmTrie<MapData, [u8; 6], u8>,
    aya::maps::LpmTrie<MapData, [u8; 18], u8>,
);

/// The inbound program's ports and its config entry.
type InboundMaps = (HashMap<MapData, u16, u8>, Array<MapData, KernelInbound>);

fn open(dir: &Path, name: &'static str) -> Result<MapData, InterceptError> {
    MapData::from_pin(dir.join(name)).map_err(|e| InterceptError::Map {
        name,
        source: Box::new(e),
    })
}

impl SharedMaps {
    pub fn open(dir: &Path) -> Result<SharedMaps, InterceptError> {
        let inbound = match (open(dir, m::IN_PORTS), open(dir, m::IN_CONFIG)) {
            (Ok(ports), Ok(conf)) => Some((
                HashMap::try_from(Map::HashMap(ports)).map_err(InterceptError::map(m::IN_PORTS))?,
                Array::try_from(Map::Array(conf)).map_err(InterceptError::map(m::IN_CONFIG))?,
            )),
            _ => None,
        };
        let udp = match (open(dir, m::UDP_V4), open(dir, m::UDP_V6)) {
            (Ok(v4), Ok(v6)) => Some((
                aya::maps::LpmTrie::try_from(Map::LpmTrie(v4))
                    .map_err(InterceptError::map(m::UDP_V4))?,
                aya::maps::LpmTrie::try_from(Map::LpmTrie(v6))
                    .map_err(InterceptError::map(m::UDP_V6))?,
            )),
            _ => None,
        };
        Ok(SharedMaps {
            counters: PerCpuArray::try_from(Map::PerCpuArray(open(dir, m::COUNTERS)?))
                .map_err(InterceptError::map(m::COUNTERS))?,
            writable: Writable {
                ports: HashMap::try_from(Map::HashMap(open(dir, m::EXCLUDE_PORTS)?))
                    .map_err(InterceptError::map(m::EXCLUDE_PORTS))?,
                v4: aya::maps::LpmTrie::try_from(Map::LpmTrie(open(dir, m::EXCLUDE_V4)?))
                    .map_err(InterceptError::map(m::EXCLUDE_V4))?,
                v6: aya::maps::LpmTrie::try_from(Map::LpmTrie(open(dir, m::EXCLUDE_V6)?))
                    .map_err(InterceptError::map(m::EXCLUDE_V6))?,
                inbound,
                udp,
            },
        })
    }
}

impl Writable {
    /// Makes the maps say what `cfg` says. The inbound ports go before the
    /// config entry, as at `init`, so the program never sees the new mode
    /// with the old ports.
    pub fn write(&mut self, cfg: &Config) -> Result<(), InterceptError> {
        write_exclusions(&mut self.ports, &mut self.v4, &mut self.v6, cfg)?;
        if let Some((v4, v6)) = &mut self.udp {
            write_udp(v4, v6, cfg)?;
        }
        match &mut self.inbound {
            Some((ports, conf)) => {
                write_inbound_ports(ports, cfg)?;
                conf.set(0, inbound_entry(cfg), 0)
                    .map_err(InterceptError::map(m::IN_CONFIG))
            }
            None => Ok(()),
        }
    }

    /// Whether the inbound maps were shared (by an `init` of this version).
    pub fn has_inbound(&self) -> bool {
        self.inbound.is_some()
    }
}
