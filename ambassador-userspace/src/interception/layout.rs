//! Whether a pinned map can be reused by a newly loaded object.

use std::path::PathBuf;

/// A pinned map whose key, value or type differs from this object's (an
/// upgrade changed its layout) cannot be reused: the new programs would
/// fail verification. Its pin is removed, so the load makes a fresh map; the
/// old programs keep theirs until their links move to the new ones.
pub fn drop_changed(pins: &[(&'static str, PathBuf)], object: &[u8]) {
    let Ok(obj) = aya_obj::Object::parse(object) else {
        return;
    };
    for (name, path) in pins {
        let (Some(want), Ok(have)) = (obj.maps.get(*name), aya::maps::MapInfo::from_pin(path))
        else {
            continue;
        };
        let same = have.key_size() == want.key_size()
            && have.value_size() == want.value_size()
            && have.map_type().ok().map(|t| t as u32) == Some(want.map_type());
        if !same {
            tracing::info!(
                map = name,
                "the pinned map's layout changed: a new map replaces it"
            );
            if let Err(e) = std::fs::remove_file(path) {
                // The load then fails on the old map; this says why.
                tracing::warn!(
                    map = name,
                    "cannot remove the changed map's pin {}: {e}",
                    path.display()
                );
            }
        }
    }
}
