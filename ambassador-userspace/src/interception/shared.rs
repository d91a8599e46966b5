//! A Pod's maps as its own proxy opens them (`proxy --kernel-maps DIR`,
//! the `pod-<uid>/` directory `init --pod-uid` pinned them in, mounted into
//! the sidecar): counters to read, exclusions to write on reload.

use std::path::Path;

use ambassador_common::maps as m;
use aya::maps::{HashMap, Map, MapData, PerCpuArray};

use super::{error::InterceptError, load::write_exclusions};
use crate::config::Config;

/// A Pod's shared maps as its proxy opens them (`proxy --kernel-maps DIR`,
/// the `pod-<uid>/` directory mounted into the sidecar).
pub struct SharedMaps {
    pub counters: PerCpuArray<MapData, u64>,
    pub exclusions: Exclusions,
}

/// The exclusion maps, written on reload.
pub struct Exclusions {
    ports: HashMap<MapData, u16, u8>,
    v4: aya::maps::LpmTrie<MapData, [u8; 4], u8>,
    v6: aya::maps::LpmTrie<MapData, [u8; 16], u8>,
}

impl SharedMaps {
    pub fn open(dir: &Path) -> Result<SharedMaps, InterceptError> {
        let open = |name: &'static str| {
            MapData::from_pin(dir.join(name)).map_err(|e| InterceptError::Map {
                name,
                source: Box::new(e),
            })
        };
        let conv = |name: &'static str| {
            move |e| InterceptError::Map {
                name,
                source: Box::new(e),
            }
        };
        Ok(SharedMaps {
            counters: PerCpuArray::try_from(Map::PerCpuArray(open(m::COUNTERS)?))
                .map_err(conv(m::COUNTERS))?,
            exclusions: Exclusions {
                ports: HashMap::try_from(Map::HashMap(open(m::EXCLUDE_PORTS)?))
                    .map_err(conv(m::EXCLUDE_PORTS))?,
                v4: aya::maps::LpmTrie::try_from(Map::LpmTrie(open(m::EXCLUDE_V4)?))
                    .map_err(conv(m::EXCLUDE_V4))?,
                v6: aya::maps::LpmTrie::try_from(Map::LpmTrie(open(m::EXCLUDE_V6)?))
                    .map_err(conv(m::EXCLUDE_V6))?,
            },
        })
    }
}

impl Exclusions {
    pub fn write(&mut self, cfg: &Config) -> Result<(), InterceptError> {
        write_exclusions(&mut self.ports, &mut self.v4, &mut self.v6, cfg)
    }
}
