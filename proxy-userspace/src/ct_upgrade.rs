//! Moving flows out of the LRU conntrack maps that earlier agents pinned. The datapath's
//! conntrack maps are plain hash maps now (a full one drops a flow never answered, or
//! refuses the new one; an LRU map evicted answered flows); a map pinned by an earlier
//! agent keeps its kind until replaced, and replacing it must not break its flows.
//!
//! An agent that finds an LRU map pinned pins it aside (`<name>_lru`: bpffs takes no dots
//! in names) before loading, so that the loader creates and pins a map of the new kind, as
//! large as the old one. It copies the old map's entries into it before its programs
//! replace the old programs (so that they find every flow), and once more after (the flows
//! the old programs recorded meanwhile), without replacing any entry, then removes the old
//! map. An agent that stops midway leaves the old map aside for the next one, which does
//! the same.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::{
    Pod,
    maps::{HashMap, MapData, MapInfo, MapType},
};
use proxy_common::{CtEntry, CtEntry6, CtKey, CtKey6, maps};
use tracing::{info, warn};

/// The conntrack maps, by name.
pub const CONNTRACK_MAPS: [&str; 2] = [maps::CONNTRACK, maps::CONNTRACK6];

/// Where an LRU conntrack map waits while its entries move: also removed by `--cleanup`.
pub fn aside_name(map: &str) -> String {
    format!("{map}_lru")
}

/// The pins set aside under `bpffs`: the maps whose entries are still to be moved.
pub struct CtUpgrade {
    bpffs: PathBuf,
    aside: Vec<&'static str>,
}

impl CtUpgrade {
    /// Before the datapath is loaded: moves each pinned LRU conntrack map aside. Returns
    /// the capacities the new maps take (the old maps', which `--map-size` may override).
    pub fn prepare(bpffs: &Path) -> anyhow::Result<(Self, Vec<(&'static str, u32)>)> {
        let mut aside = Vec::new();
        let mut capacities = Vec::new();
        for name in CONNTRACK_MAPS {
            let (pin, old) = (bpffs.join(name), bpffs.join(aside_name(name)));
            if pin.exists() && pinned_type(&pin)? == MapType::LruHash {
                // A map already aside (an agent stopped midway, then a downgrade pinned
                // this one) holds older flows: this one replaces it.
                set_aside(&pin, &old)?;
            }
            if old.exists() {
                let capacity = MapInfo::from_pin(&old)
                    .with_context(|| format!("reading the map {}", old.display()))?
                    .max_entries();
                capacities.push((name, capacity));
                aside.push(name);
            }
        }
        Ok((
            Self {
                bpffs: bpffs.to_path_buf(),
                aside,
            },
            capacities,
        ))
    }

    /// Copies the entries of the maps set aside into the new ones, keeping those there.
    pub fn copy(&self) -> anyhow::Result<()> {
        for (name, copied) in self.copy_all()? {
            info!(
                "conntrack map {name}: {copied} entries copied from the LRU map of an earlier \
                 agent"
            );
        }
        Ok(())
    }

    /// Once the new programs run: copies what the old ones recorded meanwhile, then removes
    /// the old maps.
    pub fn finish(self) -> anyhow::Result<()> {
        for (name, copied) in self.copy_all()? {
            let old = self.bpffs.join(aside_name(name));
            std::fs::remove_file(&old)
                .with_context(|| format!("removing the pin {}", old.display()))?;
            info!(
                "conntrack map {name}: now a hash map ({copied} more entries copied; the LRU \
                 map removed)"
            );
        }
        Ok(())
    }

    fn copy_all(&self) -> anyhow::Result<Vec<(&'static str, usize)>> {
        self.aside
            .iter()
            .map(|&name| {
                let copied = match name {
                    maps::CONNTRACK => copy::<CtKey, CtEntry>(&self.bpffs, name),
                    _ => copy::<CtKey6, CtEntry6>(&self.bpffs, name),
                }?;
                Ok((name, copied))
            })
            .collect()
    }
}

/// Pins the map at `pin` at `old` too, replacing what is there, then unpins it from `pin`
/// (bpffs renames nothing): the map stays pinned throughout.
fn set_aside(pin: &Path, old: &Path) -> anyhow::Result<()> {
    if old.exists() {
        std::fs::remove_file(old).with_context(|| format!("removing {}", old.display()))?;
    }
    MapData::from_pin(pin)
        .map_err(anyhow::Error::from)
        .and_then(|map| Ok(map.pin(old)?))
        .with_context(|| format!("pinning the LRU map {} at {}", pin.display(), old.display()))?;
    std::fs::remove_file(pin).with_context(|| format!("unpinning {}", pin.display()))
}

fn pinned_type(pin: &Path) -> anyhow::Result<MapType> {
    MapInfo::from_pin(pin)
        .and_then(|info| info.map_type())
        .with_context(|| format!("reading the type of the map pinned at {}", pin.display()))
}

/// Copies the entries of `name`'s map aside into `name`'s map, without replacing any;
/// returns how many it copied. A new map smaller than the old one (`--map-size`) takes
/// what fits: the flows left out are counted and reported.
fn copy<K: Pod, V: Pod>(bpffs: &Path, name: &str) -> anyhow::Result<usize> {
    let old: HashMap<MapData, K, V> = crate::maps::open(bpffs, &aside_name(name))?;
    let mut new: HashMap<MapData, K, V> = crate::maps::open(bpffs, name)?;
    let entries = crate::map_batch::read_all(&old)
        .with_context(|| format!("reading the map {}", aside_name(name)))?;
    let (mut copied, mut full) = (0, 0);
    for (key, value) in &entries {
        match new.insert(key, value, crate::maps::BPF_NOEXIST) {
            Ok(()) => copied += 1,
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                full += 1
            }
            Err(e) => {
                return Err(e).with_context(|| format!("copying an entry into the map {name}"));
            }
        }
    }
    if full > 0 {
        warn!(
            "conntrack map {name} full: {full} entries of the LRU map of an earlier agent left \
             out (their flows will be balanced anew); --map-size {name}= larger keeps them"
        );
    }
    Ok(copied)
}
