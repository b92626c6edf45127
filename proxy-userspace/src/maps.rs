//! Typed access to the datapath's pinned maps, for the agent and for `proxyctl`.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::{
    cidr::Cidr,
    ct_account::CtAccount,
    desired::Frontend,
    family::{Backend, ServiceKey, UnusedEndpoint, frontend_text},
    map_batch,
    map_error::MapWriteError,
    model::ServiceType,
    reconcile::{LostBackend, ServiceMeta},
    removed_backends::{self, RemovedBackends},
    stale_sockets::StaleSockets,
};
use anyhow::{Context as _, bail};
use aya::maps::{
    Array, HashMap, Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use proxy_common::{
    ByFamily, Counters, SERVICE_NAME_LEN, ServiceInfo, ServiceValue, SlotKey, SourceRange,
    SourceRange6, SourceRangeOf, UnusedKey, from_map, maps,
};

/// The pinned maps the reconciler writes; those holding addresses come in one map per
/// family, written through `ByFamily`.
pub struct Maps {
    pub services: HashMap<MapData, proxy_common::ServiceKey, ServiceValue>,
    pub services6: HashMap<MapData, proxy_common::ServiceKey6, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, proxy_common::Backend>,
    pub backends6: HashMap<MapData, u32, proxy_common::Backend6>,
    pub names: HashMap<MapData, u32, ServiceInfo>,
    pub unused: HashMap<MapData, UnusedKey, proxy_common::UnusedEndpoint>,
    pub unused6: HashMap<MapData, UnusedKey, proxy_common::UnusedEndpoint6>,
    pub source_ranges: LpmTrie<MapData, SourceRange, u8>,
    pub source_ranges6: LpmTrie<MapData, SourceRange6, u8>,
    pub service_stats: Array<MapData, Counters>,
    pub backend_stats: Array<MapData, Counters>,
    /// Where the maps are pinned.
    dir: PathBuf,
    /// Started on the first removed backend: `proxyctl` never needs it.
    removed_backends: Option<RemovedBackends>,
    /// Handed to `removed_backends` when it starts; the agent sets it.
    pub stale_sockets: Option<StaleSockets>,
    /// Updates and deletes made through this handle.
    pub writes: u64,
}

/// `BPF_NOEXIST` (linux/bpf.h): insert only if the key is absent.
pub const BPF_NOEXIST: u64 = 1;
/// `BPF_EXIST` (linux/bpf.h): replace only if the key is present.
pub const BPF_EXIST: u64 = 2;

/// Opens the map `name` pinned under `dir`, as type `T`.
pub fn open<T>(dir: &Path, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "map {name} is not pinned at {}: is proxy-agent running (or has it run) with --bpffs {}?",
            path.display(),
            dir.display()
        );
    }
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (reading BPF maps needs root or CAP_BPF)",
            path.display()
        )
    })?;
    let map =
        Map::from_map_data(data).with_context(|| format!("reading map {}", path.display()))?;
    T::try_from(map)
        .with_context(|| format!("map {} has an unexpected type or layout", path.display()))
}

/// Every entry of a family's two maps, read whole, with their addresses as `IpAddr`s
/// (`Addressed` in the key or in the value: `f` converts the entry).
fn read_both<K4, V4, K6, V6, T>(
    v4: (&HashMap<MapData, K4, V4>, &str),
    v6: (&HashMap<MapData, K6, V6>, &str),
    f4: impl Fn(K4, V4) -> T,
    f6: impl Fn(K6, V6) -> T,
) -> anyhow::Result<Vec<T>>
where
    K4: aya::Pod,
    V4: aya::Pod,
    K6: aya::Pod,
    V6: aya::Pod,
{
    let read = |name: &str| format!("reading map {name}");
    let mut out: Vec<T> = map_batch::read_all(v4.0)
        .with_context(|| read(v4.1))?
        .into_iter()
        .map(|(k, v)| f4(k, v))
        .collect();
    let six = map_batch::read_all(v6.0).with_context(|| read(v6.1))?;
    out.extend(six.into_iter().map(|(k, v)| f6(k, v)));
    Ok(out)
}

impl Maps {
    /// Every frontend, both families.
    pub fn read_services(&self) -> anyhow::Result<Vec<(ServiceKey, ServiceValue)>> {
        read_both(
            (&self.services, maps::SERVICES),
            (&self.services6, maps::SERVICES6),
            |k, v| (from_map(&k), v),
            |k, v| (from_map(&k), v),
        )
    }

    /// Every backend, both families.
    pub fn read_backends(&self) -> anyhow::Result<Vec<(u32, Backend)>> {
        read_both(
            (&self.backends, maps::BACKENDS),
            (&self.backends6, maps::BACKENDS6),
            |id, b| (id, from_map(&b)),
            |id, b| (id, from_map(&b)),
        )
    }

    /// Every listed unused endpoint, both families.
    pub fn read_unused(&self) -> anyhow::Result<Vec<(UnusedKey, UnusedEndpoint)>> {
        read_both(
            (&self.unused, maps::UNUSED_ENDPOINTS),
            (&self.unused6, maps::UNUSED_ENDPOINTS6),
            |k, e| (k, from_map(&e)),
            |k, e| (k, from_map(&e)),
        )
    }

    /// Opens the maps pinned under `dir` (the agent's `--bpffs`).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            services: open(dir, maps::SERVICES)?,
            services6: open(dir, maps::SERVICES6)?,
            slots: open(dir, maps::BACKEND_SLOTS)?,
            backends: open(dir, maps::BACKENDS)?,
            backends6: open(dir, maps::BACKENDS6)?,
            names: open(dir, maps::SERVICE_NAMES)?,
            unused: open(dir, maps::UNUSED_ENDPOINTS)?,
            unused6: open(dir, maps::UNUSED_ENDPOINTS6)?,
            source_ranges: open(dir, maps::SOURCE_RANGES)?,
            source_ranges6: open(dir, maps::SOURCE_RANGES6)?,
            service_stats: open(dir, maps::SERVICE_STATS)?,
            backend_stats: open(dir, maps::BACKEND_STATS)?,
            dir: dir.to_path_buf(),
            removed_backends: None,
            stale_sockets: None,
            writes: 0,
        })
    }
}

pub fn encode_info(meta: &ServiceMeta) -> ServiceInfo {
    let mut out = ServiceInfo {
        terminating: meta.terminating.into(),
        internal_local: meta.internal_local.into(),
        frontend: meta.frontend.code(),
        service_type: meta.service_type.code(),
        external_local: meta.external_local.into(),
        ..ServiceInfo::default()
    };
    let bytes = meta.name.as_bytes();
    let len = bytes.len().min(SERVICE_NAME_LEN - 1);
    out.name[..len].copy_from_slice(&bytes[..len]);
    out
}

pub fn decode_info(info: &ServiceInfo) -> ServiceMeta {
    let end = info
        .name
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(SERVICE_NAME_LEN);
    ServiceMeta {
        name: String::from_utf8_lossy(&info.name[..end]).into_owned(),
        terminating: info.terminating != 0,
        internal_local: info.internal_local != 0,
        frontend: Frontend::from_code(info.frontend),
        service_type: ServiceType::from_code(info.service_type),
        external_local: info.external_local != 0,
    }
}

/// The `source_ranges` (`source_ranges6`) key of range `range` of frontend `id`: the id's
/// 32 bits, then the range's.
fn range_key<A>(id: u32, addr: A, range: &Cidr) -> Key<SourceRangeOf<A>>
where
    SourceRangeOf<A>: aya::Pod,
{
    let data = SourceRangeOf {
        service_id: id,
        addr,
    };
    Key::new(32 + u32::from(range.len), data)
}

/// A range as its family's trie holds it.
enum RangeKey {
    V4(Key<SourceRange>),
    V6(Key<SourceRange6>),
}

impl RangeKey {
    fn of(id: u32, range: &Cidr) -> Self {
        match range.addr {
            IpAddr::V4(a) => RangeKey::V4(range_key(id, a.octets(), range)),
            IpAddr::V6(a) => RangeKey::V6(range_key(id, a.octets(), range)),
        }
    }
}

/// The range a trie key holds.
fn range_of<A: Into<IpAddr> + Copy>(key: &Key<SourceRangeOf<A>>) -> (u32, Cidr)
where
    SourceRangeOf<A>: aya::Pod,
{
    let range = Cidr {
        addr: key.data().addr.into(),
        len: (key.prefix_len() - 32) as u8,
    };
    (key.data().service_id, range)
}

// Keys as messages name them.
fn slot_name(key: &SlotKey) -> String {
    format!(
        "slot {} of service id {} (generation {})",
        key.slot, key.service_id, key.generation
    )
}

fn unused_name(key: &UnusedKey) -> String {
    format!(
        "unused endpoint {} of service id {}",
        key.index, key.service_id
    )
}

impl crate::reconcile::ServiceMaps for Maps {
    fn put_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()> {
        self.writes += 1;
        let (map, result) = match ByFamily::of(backend) {
            ByFamily::V4(b) => (maps::BACKENDS, self.backends.insert(id, b, 0)),
            ByFamily::V6(b) => (maps::BACKENDS6, self.backends6.insert(id, b, 0)),
        };
        result
            .map_err(|e| MapWriteError::from_aya(map, e))
            .with_context(|| format!("writing backend {id} to map {map}"))
    }

    fn delete_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()> {
        self.writes += 1;
        let (map, result) = match backend.addr.is_ipv4() {
            true => (maps::BACKENDS, self.backends.remove(&id)),
            false => (maps::BACKENDS6, self.backends6.remove(&id)),
        };
        result
            .map_err(|e| MapWriteError::from_aya(map, e))
            .with_context(|| format!("deleting backend {id} from map {map}"))
    }

    fn put_slot(&mut self, key: &SlotKey, backend_id: u32) -> anyhow::Result<()> {
        self.writes += 1;
        self.slots
            .insert(key, backend_id, 0)
            .map_err(|e| MapWriteError::from_aya(maps::BACKEND_SLOTS, e))
            .with_context(|| format!("writing {} to map {}", slot_name(key), maps::BACKEND_SLOTS))
    }

    fn delete_slot(&mut self, key: &SlotKey) -> anyhow::Result<()> {
        self.writes += 1;
        self.slots
            .remove(key)
            .map_err(|e| MapWriteError::from_aya(maps::BACKEND_SLOTS, e))
            .with_context(|| {
                format!(
                    "deleting {} from map {}",
                    slot_name(key),
                    maps::BACKEND_SLOTS
                )
            })
    }

    fn put_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
        meta: &ServiceMeta,
    ) -> anyhow::Result<()> {
        self.writes += 1;
        self.names
            .insert(value.id, encode_info(meta), 0)
            .map_err(|e| MapWriteError::from_aya(maps::SERVICE_NAMES, e))
            .with_context(|| {
                format!(
                    "writing the name of service id {} to map {}",
                    value.id,
                    maps::SERVICE_NAMES
                )
            })?;
        let (map, result) = match ByFamily::of(key) {
            ByFamily::V4(k) => (maps::SERVICES, self.services.insert(k, value, 0)),
            ByFamily::V6(k) => (maps::SERVICES6, self.services6.insert(k, value, 0)),
        };
        result
            .map_err(|e| MapWriteError::from_aya(map, e))
            .with_context(|| format!("writing {} to map {map}", meta.name))
    }

    fn delete_service(&mut self, key: &ServiceKey, id: u32) -> anyhow::Result<()> {
        self.writes += 1;
        let (map, result) = match ByFamily::of(key) {
            ByFamily::V4(k) => (maps::SERVICES, self.services.remove(&k)),
            ByFamily::V6(k) => (maps::SERVICES6, self.services6.remove(&k)),
        };
        result
            .map_err(|e| MapWriteError::from_aya(map, e))
            .with_context(|| format!("deleting {} from map {map}", frontend_text(key)))?;
        self.names
            .remove(&id)
            .map_err(|e| MapWriteError::from_aya(maps::SERVICE_NAMES, e))
            .with_context(|| format!("deleting service id {id} from map {}", maps::SERVICE_NAMES))
    }

    fn put_source_range(&mut self, id: u32, range: &Cidr) -> anyhow::Result<()> {
        self.writes += 1;
        let (map, result) = match RangeKey::of(id, range) {
            RangeKey::V4(k) => (maps::SOURCE_RANGES, self.source_ranges.insert(&k, 1, 0)),
            RangeKey::V6(k) => (maps::SOURCE_RANGES6, self.source_ranges6.insert(&k, 1, 0)),
        };
        result
            .map_err(|e| MapWriteError::from_aya(map, e))
            .with_context(|| format!("writing range {range} of service id {id} to map {map}"))
    }

    fn delete_source_range(&mut self, id: u32, range: &Cidr) -> anyhow::Result<()> {
        self.writes += 1;
        let (map, result) = match RangeKey::of(id, range) {
            RangeKey::V4(k) => (maps::SOURCE_RANGES, self.source_ranges.remove(&k)),
            RangeKey::V6(k) => (maps::SOURCE_RANGES6, self.source_ranges6.remove(&k)),
        };
        result
            .map_err(|e| MapWriteError::from_aya(map, e))
            .with_context(|| format!("deleting range {range} of service id {id} from map {map}"))
    }

    fn put_unused(&mut self, key: &UnusedKey, endpoint: &UnusedEndpoint) -> anyhow::Result<()> {
        self.writes += 1;
        let (map, result) = match ByFamily::of(endpoint) {
            ByFamily::V4(e) => (maps::UNUSED_ENDPOINTS, self.unused.insert(key, e, 0)),
            ByFamily::V6(e) => (maps::UNUSED_ENDPOINTS6, self.unused6.insert(key, e, 0)),
        };
        result
            .map_err(|e| MapWriteError::from_aya(map, e))
            .with_context(|| format!("writing {} to map {map}", unused_name(key)))
    }

    fn delete_unused(&mut self, key: &UnusedKey, listed: &UnusedEndpoint) -> anyhow::Result<()> {
        self.writes += 1;
        let (map, result) = match listed.addr.is_ipv4() {
            true => (maps::UNUSED_ENDPOINTS, self.unused.remove(key)),
            false => (maps::UNUSED_ENDPOINTS6, self.unused6.remove(key)),
        };
        result
            .map_err(|e| MapWriteError::from_aya(map, e))
            .with_context(|| format!("deleting {} from map {map}", unused_name(key)))
    }

    fn reset_service_counters(&mut self, id: u32) -> anyhow::Result<()> {
        self.service_stats
            .set(id, Counters::default(), 0)
            .map_err(|e| MapWriteError::from_aya(maps::SERVICE_STATS, e))
            .with_context(|| format!("zeroing counters of service id {id}"))
    }

    fn reset_backend_counters(&mut self, id: u32) -> anyhow::Result<()> {
        self.backend_stats
            .set(id, Counters::default(), 0)
            .map_err(|e| MapWriteError::from_aya(maps::BACKEND_STATS, e))
            .with_context(|| format!("zeroing counters of backend id {id}"))
    }

    fn forget_backends(&mut self, service_id: u32, lost: &[LostBackend]) -> anyhow::Result<()> {
        let cleanup = match &mut self.removed_backends {
            Some(cleanup) => cleanup,
            None => {
                let maps = removed_backends::Maps {
                    affinity: open(&self.dir, maps::AFFINITY)?,
                    conntrack: crate::conntrack::Conntracks::open(&self.dir)?,
                    account: CtAccount::open(&self.dir)?,
                    sockets: self.stale_sockets.take(),
                };
                self.removed_backends.insert(RemovedBackends::start(maps)?)
            }
        };
        cleanup.forget(service_id, lost);
        Ok(())
    }

    fn writes(&self) -> u64 {
        self.writes
    }

    fn id_capacity(&self) -> (u32, u32) {
        (self.service_stats.len(), self.backend_stats.len())
    }

    fn read_existing(&self) -> anyhow::Result<crate::reconcile::Existing> {
        let read = |name: &str| format!("reading map {name}");
        let names: std::collections::HashMap<u32, ServiceInfo> = map_batch::read_all(&self.names)
            .with_context(|| read(maps::SERVICE_NAMES))?
            .into_iter()
            .collect();
        let meta_of = |id: u32| names.get(&id).map(decode_info).unwrap_or_default();
        Ok(crate::reconcile::Existing {
            services: self
                .read_services()?
                .into_iter()
                .map(|(k, v)| (k, v, meta_of(v.id)))
                .collect(),
            slots: map_batch::read_all(&self.slots).with_context(|| read(maps::BACKEND_SLOTS))?,
            backends: self.read_backends()?,
            unused: self.read_unused()?,
            source_ranges: self
                .source_ranges
                .keys()
                .map(|k| Ok(range_of(&k.with_context(|| read(maps::SOURCE_RANGES))?)))
                .chain(
                    self.source_ranges6
                        .keys()
                        .map(|k| Ok(range_of(&k.with_context(|| read(maps::SOURCE_RANGES6))?))),
                )
                .collect::<anyhow::Result<_>>()?,
        })
    }
}
