//! Typed access to the datapath's pinned maps, for the agent and for `proxyctl`.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use crate::{
    cidr::Cidr,
    ct_account::CtAccount,
    desired::Frontend,
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
    Backend, Counters, SERVICE_NAME_LEN, ServiceInfo, ServiceKey, ServiceValue, SlotKey,
    SourceRange, UnusedEndpoint, UnusedKey, maps,
};

pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub names: HashMap<MapData, u32, ServiceInfo>,
    pub unused: HashMap<MapData, UnusedKey, UnusedEndpoint>,
    pub source_ranges: LpmTrie<MapData, SourceRange, u8>,
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

impl Maps {
    /// Opens the maps pinned under `dir` (the agent's `--bpffs`).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            services: open(dir, maps::SERVICES)?,
            slots: open(dir, maps::BACKEND_SLOTS)?,
            backends: open(dir, maps::BACKENDS)?,
            names: open(dir, maps::SERVICE_NAMES)?,
            unused: open(dir, maps::UNUSED_ENDPOINTS)?,
            source_ranges: open(dir, maps::SOURCE_RANGES)?,
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

/// The `source_ranges` key of range `range` of frontend `id`: the id's 32 bits, then the
/// range's.
fn range_key(id: u32, range: &Cidr) -> Key<SourceRange> {
    let data = SourceRange {
        service_id: id,
        addr: range.addr.octets(),
    };
    Key::new(32 + u32::from(range.len), data)
}

// Keys as messages name them.
fn slot_name(key: &SlotKey) -> String {
    format!(
        "slot {} of service id {} (generation {})",
        key.slot, key.service_id, key.generation
    )
}

fn frontend_name(key: &ServiceKey) -> String {
    format!(
        "{}:{}/{}",
        std::net::Ipv4Addr::from(key.addr),
        key.port,
        crate::inspect::protocol(key.proto)
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
        self.backends
            .insert(id, backend, 0)
            .map_err(|e| MapWriteError::from_aya(maps::BACKENDS, e))
            .with_context(|| format!("writing backend {id} to map {}", maps::BACKENDS))
    }

    fn delete_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.writes += 1;
        self.backends
            .remove(&id)
            .map_err(|e| MapWriteError::from_aya(maps::BACKENDS, e))
            .with_context(|| format!("deleting backend {id} from map {}", maps::BACKENDS))
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
        self.services
            .insert(key, value, 0)
            .map_err(|e| MapWriteError::from_aya(maps::SERVICES, e))
            .with_context(|| format!("writing {} to map {}", meta.name, maps::SERVICES))
    }

    fn delete_service(&mut self, key: &ServiceKey, id: u32) -> anyhow::Result<()> {
        self.writes += 1;
        self.services
            .remove(key)
            .map_err(|e| MapWriteError::from_aya(maps::SERVICES, e))
            .with_context(|| {
                format!(
                    "deleting {} from map {}",
                    frontend_name(key),
                    maps::SERVICES
                )
            })?;
        self.names
            .remove(&id)
            .map_err(|e| MapWriteError::from_aya(maps::SERVICE_NAMES, e))
            .with_context(|| format!("deleting service id {id} from map {}", maps::SERVICE_NAMES))
    }

    fn put_source_range(&mut self, id: u32, range: &Cidr) -> anyhow::Result<()> {
        self.writes += 1;
        self.source_ranges
            .insert(&range_key(id, range), 1, 0)
            .map_err(|e| MapWriteError::from_aya(maps::SOURCE_RANGES, e))
            .with_context(|| {
                format!(
                    "writing range {range} of service id {id} to map {}",
                    maps::SOURCE_RANGES
                )
            })
    }

    fn delete_source_range(&mut self, id: u32, range: &Cidr) -> anyhow::Result<()> {
        self.writes += 1;
        self.source_ranges
            .remove(&range_key(id, range))
            .map_err(|e| MapWriteError::from_aya(maps::SOURCE_RANGES, e))
            .with_context(|| {
                format!(
                    "deleting range {range} of service id {id} from map {}",
                    maps::SOURCE_RANGES
                )
            })
    }

    fn put_unused(&mut self, key: &UnusedKey, endpoint: &UnusedEndpoint) -> anyhow::Result<()> {
        self.writes += 1;
        self.unused
            .insert(key, endpoint, 0)
            .map_err(|e| MapWriteError::from_aya(maps::UNUSED_ENDPOINTS, e))
            .with_context(|| {
                format!(
                    "writing {} to map {}",
                    unused_name(key),
                    maps::UNUSED_ENDPOINTS
                )
            })
    }

    fn delete_unused(&mut self, key: &UnusedKey) -> anyhow::Result<()> {
        self.writes += 1;
        self.unused
            .remove(key)
            .map_err(|e| MapWriteError::from_aya(maps::UNUSED_ENDPOINTS, e))
            .with_context(|| {
                format!(
                    "deleting {} from map {}",
                    unused_name(key),
                    maps::UNUSED_ENDPOINTS
                )
            })
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
                    conntrack: open(&self.dir, maps::CONNTRACK)?,
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
            services: map_batch::read_all(&self.services)
                .with_context(|| read(maps::SERVICES))?
                .into_iter()
                .map(|(k, v)| (k, v, meta_of(v.id)))
                .collect(),
            slots: map_batch::read_all(&self.slots).with_context(|| read(maps::BACKEND_SLOTS))?,
            backends: map_batch::read_all(&self.backends).with_context(|| read(maps::BACKENDS))?,
            unused: map_batch::read_all(&self.unused)
                .with_context(|| read(maps::UNUSED_ENDPOINTS))?,
            source_ranges: self
                .source_ranges
                .keys()
                .map(|k| {
                    let k = k.with_context(|| read(maps::SOURCE_RANGES))?;
                    let range = Cidr {
                        addr: Ipv4Addr::from(k.data().addr),
                        len: (k.prefix_len() - 32) as u8,
                    };
                    Ok((k.data().service_id, range))
                })
                .collect::<anyhow::Result<_>>()?,
        })
    }
}
