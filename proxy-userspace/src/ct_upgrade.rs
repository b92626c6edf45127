//! Moving flows out of the conntrack maps that earlier agents pinned: LRU maps (a full one
//! evicted answered flows; today's are hash maps, where a full one drops a flow never
//! answered, or refuses the new one), and maps of the former entry layout, two entries per
//! flow (today's records one, under the client's key, `former::convert`). A map pinned by an
//! earlier agent keeps its kind and layout until replaced, and replacing it must not break
//! its flows.
//!
//! Today's maps have names of their own (`ct_flows`, `ct_flows6`), so that an earlier agent
//! (a rollback) never reads entries it cannot: it creates its own map afresh. An agent that
//! finds an earlier agent's map pinned (`conntrack`, `conntrack6`) pins it aside
//! (`<name>_lru`: bpffs takes no dots in names) before loading, and the loader creates and
//! pins a map of today's kind and layout, as large as the old one. It copies the old map's flows into it, converted,
//! before its programs replace the old programs (so that they find every flow). Once they
//! have, it replays what the old programs changed in the old map meanwhile (new flows,
//! flows answered or closed) onto the entries the new programs have not changed since
//! (`Moving::finish`), then removes the old map. An agent that stops midway leaves the old
//! map aside for the next one, which does the same.
mod former;

use std::{
    collections::HashMap as StdHashMap,
    hash::{DefaultHasher, Hash, Hasher as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Pod,
    maps::{HashMap, MapData, MapError, MapInfo},
};
use proxy_common::{CtEntryOf, CtKeyOf, maps};
use tracing::{info, warn};

use crate::maps::{BPF_EXIST, BPF_NOEXIST};
pub use former::FormerEntryOf;

/// The conntrack maps, by name.
pub const CONNTRACK_MAPS: [&str; 2] = [maps::CONNTRACK, maps::CONNTRACK6];

/// Where the earlier agent's conntrack map that `map` replaces waits while its flows move
/// (`conntrack_lru`: the name earlier agents set their LRU maps aside under): also removed
/// by `--cleanup`.
pub fn aside_name(map: &str) -> String {
    format!("{}_lru", former_name(map))
}

/// The name of the earlier agents' map that `map` replaces.
fn former_name(map: &str) -> &str {
    maps::FORMER_CONNTRACK
        .iter()
        .find(|(name, _)| *name == map)
        .map_or(map, |(_, former)| former)
}

/// The conntrack maps set aside under `bpffs`, whose entries are still to be moved.
pub struct CtUpgrade {
    bpffs: PathBuf,
    v4: Option<Moving<[u8; 4]>>,
    v6: Option<Moving<[u8; 16]>>,
}

impl CtUpgrade {
    /// Before the datapath is loaded: moves each pinned conntrack map of an earlier agent
    /// aside. Returns the capacities the new maps take (the old maps', which `--map-size`
    /// may override).
    pub fn prepare(bpffs: &Path) -> anyhow::Result<(Self, Vec<(&'static str, u32)>)> {
        let mut capacities = Vec::new();
        for (name, former) in maps::FORMER_CONNTRACK {
            let (pin, old) = (bpffs.join(name), bpffs.join(aside_name(name)));
            let earlier = bpffs.join(former);
            if earlier.exists() {
                // A map already aside (an agent stopped midway, then a downgrade pinned
                // this one) holds older flows: this one replaces it. So does a map of
                // today's pinned before that earlier agent ran.
                set_aside(&earlier, &old)?;
                if pin.exists() {
                    std::fs::remove_file(&pin)
                        .with_context(|| format!("removing {}", pin.display()))?;
                }
            }
            if old.exists() {
                let capacity = MapInfo::from_pin(&old)
                    .with_context(|| format!("reading the map {}", old.display()))?
                    .max_entries();
                capacities.push((name, capacity));
            }
        }
        let upgrade = Self {
            bpffs: bpffs.to_path_buf(),
            v4: Moving::aside(bpffs, maps::CONNTRACK),
            v6: Moving::aside(bpffs, maps::CONNTRACK6),
        };
        Ok((upgrade, capacities))
    }

    /// Copies the flows of the maps set aside into the new ones, keeping those there.
    pub fn copy(&mut self) -> anyhow::Result<()> {
        if let Some(v4) = &mut self.v4 {
            v4.copy(&self.bpffs)?;
        }
        if let Some(v6) = &mut self.v6 {
            v6.copy(&self.bpffs)?;
        }
        Ok(())
    }

    /// Once the new programs run: replays what the old ones changed meanwhile, then removes
    /// the old maps.
    pub fn finish(self) -> anyhow::Result<()> {
        if let Some(v4) = self.v4 {
            v4.finish(&self.bpffs)?;
        }
        if let Some(v6) = self.v6 {
            v6.finish(&self.bpffs)?;
        }
        Ok(())
    }
}

type CtMap<K, V> = HashMap<MapData, K, V>;
/// Today's map of family `A`, and entries for it.
type NewMap<A> = CtMap<CtKeyOf<A>, CtEntryOf<A>>;
type Entries<A> = StdHashMap<CtKeyOf<A>, CtEntryOf<A>>;

/// One conntrack map whose flows are moving, and a fingerprint of each entry `copy` wrote
/// (a hash rather than the entry: half the memory, which an agent needs most at an upgrade
/// of a busy node).
struct Moving<A> {
    name: &'static str,
    copied: StdHashMap<CtKeyOf<A>, u64>,
}

impl<A> Moving<A>
where
    A: Copy + Default + Eq + Hash,
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
    FormerEntryOf<A>: Pod,
{
    /// The map `name`, if its old map is aside.
    fn aside(bpffs: &Path, name: &'static str) -> Option<Self> {
        bpffs.join(aside_name(name)).exists().then(|| Self {
            name,
            copied: StdHashMap::new(),
        })
    }

    /// The new map, and today's entries for the old map's flows (read whole: a flow's
    /// entries are converted together).
    fn read(&self, bpffs: &Path) -> anyhow::Result<(NewMap<A>, Entries<A>)> {
        let old: CtMap<CtKeyOf<A>, FormerEntryOf<A>> =
            crate::maps::open(bpffs, &aside_name(self.name))?;
        let entries = crate::map_batch::read_all(&old)
            .with_context(|| format!("reading the map {}", aside_name(self.name)))?;
        let converted = former::convert(&entries.into_iter().collect());
        Ok((crate::maps::open(bpffs, self.name)?, converted))
    }

    fn copy(&mut self, bpffs: &Path) -> anyhow::Result<()> {
        let (mut new, entries) = self.read(bpffs)?;
        let written = write(
            &mut new,
            self.name,
            entries.iter().map(|(k, v)| (k, v, false)),
        )?;
        self.copied = entries.iter().map(|(k, v)| (*k, fingerprint(v))).collect();
        info!(
            "conntrack map {}: {written} entries copied from the map of an earlier agent",
            self.name
        );
        Ok(())
    }

    /// Replays what the old programs changed in the old map since `copy`, and removes it.
    /// Only onto entries the new programs have left as `copy` wrote them (or absent, as they
    /// were): whatever those recorded since is newer. A flow the old map lost meanwhile
    /// (closed, or evicted by an LRU) stays in the new map, whose GC removes it once it has
    /// ended.
    fn finish(self, bpffs: &Path) -> anyhow::Result<()> {
        let (mut new, entries) = self.read(bpffs)?;
        let mut replayed = Vec::new();
        for (key, entry) in &entries {
            let copied = self.copied.get(key).copied();
            if copied == Some(fingerprint(entry)) {
                continue;
            }
            let current = match new.get(key, 0) {
                Ok(current) => Some(current),
                Err(MapError::KeyNotFound) => None,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading an entry of the map {}", self.name));
                }
            };
            if current.as_ref().map(fingerprint) == copied {
                replayed.push((*key, *entry, current.is_some()));
            }
        }
        let written = write(
            &mut new,
            self.name,
            replayed.iter().map(|(k, v, replace)| (k, v, *replace)),
        )?;
        let old_pin = bpffs.join(aside_name(self.name));
        std::fs::remove_file(&old_pin)
            .with_context(|| format!("removing the pin {}", old_pin.display()))?;
        info!(
            "conntrack map {}: now of this agent's kind and layout ({written} entries the \
             earlier agent's programs recorded or changed meanwhile copied; its map removed)",
            self.name
        );
        Ok(())
    }
}

/// A 64-bit hash of `entry`, the same for equal entries across calls (`DefaultHasher::new`
/// has fixed keys): two different entries taken for equal are vanishingly rare, and only
/// leave a change of the old programs unreplayed.
fn fingerprint<V: Hash>(entry: &V) -> u64 {
    let mut hasher = DefaultHasher::new();
    entry.hash(&mut hasher);
    hasher.finish()
}

/// Writes `entries` into the map `name`: each an insert, or with `true` a replacement of
/// the entry there. An entry that the datapath made or removed meanwhile is left to it; one
/// that does not fit (a new map smaller than the old one, `--map-size`) is counted and
/// reported. Returns how many were written.
fn write<'a, K: Pod + 'a, V: Pod + 'a>(
    map: &mut CtMap<K, V>,
    name: &str,
    entries: impl Iterator<Item = (&'a K, &'a V, bool)>,
) -> anyhow::Result<usize> {
    let (mut written, mut full) = (0, 0);
    for (key, value, replace) in entries {
        let flags = if replace { BPF_EXIST } else { BPF_NOEXIST };
        match map.insert(key, value, flags) {
            Ok(()) => written += 1,
            Err(MapError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::EEXIST | libc::ENOENT)) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                full += 1
            }
            Err(e) => {
                return Err(e).with_context(|| format!("copying an entry into the map {name}"));
            }
        }
    }
    if full > 0 {
        warn!(
            "conntrack map {name} full: {full} entries of the map of an earlier agent left \
             out (their flows will be balanced anew); --map-size {name}= larger keeps them"
        );
    }
    Ok(written)
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
        .with_context(|| format!("pinning the map {} at {}", pin.display(), old.display()))?;
    std::fs::remove_file(pin).with_context(|| format!("unpinning {}", pin.display()))
}

#[cfg(test)]
mod tests {
    use aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LRU_HASH;
    use proxy_common::{CT_FORWARD, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CtEntry, CtKey};

    use super::*;

    /// A directory of bpffs for this test's pins, removed with them however it ends.
    struct Pins(PathBuf);

    impl Drop for Pins {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    type Former = FormerEntryOf<[u8; 4]>;

    fn client(i: u8) -> [u8; 4] {
        [10, 1, 0, i]
    }

    /// Flow `i`'s forward 5-tuple, as earlier agents keyed it.
    fn key(i: u8) -> CtKey {
        CtKey::tuple(client(i), [10, 96, 0, 10], 40000, 80, 6)
    }

    /// Flow `i`'s forward entry as an earlier agent recorded it.
    fn former(i: u8, backend: u8, state: u8, last_seen_ns: u64) -> Former {
        Former {
            nat_addr: [10, 244, 1, backend],
            nat_port: 8080,
            direction: CT_FORWARD,
            state,
            peer_addr: client(i),
            peer_port: 40000,
            last_seen_ns,
            ..Former::default()
        }
    }

    /// Flow `i`'s one entry today, and its key.
    fn today(i: u8, backend: u8, state: u8, last_seen_ns: u64) -> (CtKey, CtEntry) {
        let entry = CtEntry {
            nat_addr: [10, 244, 1, backend],
            nat_port: 8080,
            direction: CT_FORWARD,
            state,
            peer_addr: [10, 96, 0, 10],
            peer_port: 80,
            src_addr: client(i),
            src_port: 40000,
            last_seen_ns,
            ..CtEntry::default()
        };
        (CtKey::client(client(i), 40000, 6), entry)
    }

    /// Real kernel maps (the tests run as root), changed between the two copies as the old
    /// and the new programs would change them.
    #[test]
    fn the_last_copy_replays_the_old_programs_changes_onto_entries_the_new_ones_left() {
        let pins = Pins(PathBuf::from(format!(
            "/sys/fs/bpf/proxy-test-ct-upgrade-{}",
            std::process::id()
        )));
        std::fs::create_dir_all(&pins.0).unwrap();
        let lru = aya_obj::Map::new_from_params(
            BPF_MAP_TYPE_LRU_HASH as u32,
            size_of::<CtKey>() as u32,
            size_of::<Former>() as u32,
            64,
            0,
        );
        MapData::create(lru, "conntrack", None)
            .unwrap()
            .pin(pins.0.join("conntrack"))
            .unwrap();
        let mut old: HashMap<MapData, CtKey, Former> =
            crate::maps::open(&pins.0, "conntrack").unwrap();
        for i in 1..=4 {
            old.insert(key(i), former(i, 1, CT_STATE_ESTABLISHED, 100), 0)
                .unwrap();
        }

        let (mut upgrade, capacities) = CtUpgrade::prepare(&pins.0).unwrap();
        assert_eq!(capacities, [(maps::CONNTRACK, 64)]);
        assert!(!pins.0.join("conntrack").exists());
        // What the loader does: a hash map as large, pinned where the old one was.
        let mut new: HashMap<MapData, CtKey, CtEntry> = HashMap::create(64, 0).unwrap();
        aya::maps::IterableMap::map(&new)
            .pin(pins.0.join(maps::CONNTRACK))
            .unwrap();
        upgrade.copy().unwrap();
        assert_eq!(new.keys().count(), 4);
        let (k, e) = today(1, 1, CT_STATE_ESTABLISHED, 100);
        assert_eq!(new.get(&k, 0).unwrap(), e, "one entry under the client key");

        // The old programs, until replaced: flow 2 closes, flows 3 and 4 see packets, flow
        // 5 starts.
        let mut old: HashMap<MapData, CtKey, Former> =
            crate::maps::open(&pins.0, &aside_name(maps::CONNTRACK)).unwrap();
        for (i, state, backend) in [
            (2, CT_STATE_CLOSING, 1),
            (3, CT_STATE_ESTABLISHED, 1),
            (4, CT_STATE_ESTABLISHED, 1),
            (5, CT_STATE_ESTABLISHED, 2),
        ] {
            old.insert(key(i), former(i, backend, state, 200), 0)
                .unwrap();
        }
        // The new programs, meanwhile: flow 3 sees a later packet, flow 4's entry is
        // removed (a new connection on its tuple retired it), flow 6 starts.
        let (k, e) = today(3, 1, CT_STATE_ESTABLISHED, 300);
        new.insert(k, e, 0).unwrap();
        new.remove(&today(4, 1, 0, 0).0).unwrap();
        let (k, e) = today(6, 3, CT_STATE_ESTABLISHED, 300);
        new.insert(k, e, 0).unwrap();

        upgrade.finish().unwrap();
        let established = |i, backend, at| Some(today(i, backend, CT_STATE_ESTABLISHED, at).1);
        for (i, expected, why) in [
            (1, established(1, 1, 100), "unchanged"),
            (
                2,
                Some(today(2, 1, CT_STATE_CLOSING, 200).1),
                "closed by the old programs",
            ),
            (
                3,
                established(3, 1, 300),
                "the new programs' change is newer",
            ),
            (4, None, "removed by the new programs, not brought back"),
            (5, established(5, 2, 200), "started under the old programs"),
            (6, established(6, 3, 300), "started under the new programs"),
        ] {
            assert_eq!(
                new.get(&today(i, 0, 0, 0).0, 0).ok(),
                expected,
                "flow {i}: {why}"
            );
        }
        assert!(!pins.0.join(aside_name(maps::CONNTRACK)).exists());
    }
}
