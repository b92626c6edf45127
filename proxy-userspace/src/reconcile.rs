//! Programs the maps to match a desired state, incrementally: a service port whose backends
//! did not change costs no map write. An update never exposes a half-written service: the
//! new generation's slots are written first, then the service entry flips to them in one
//! map update, then the old generation is deleted.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use anyhow::{Context as _, anyhow};
use proxy_common::{
    SVC_FLAG_AFFINITY, SVC_FLAG_DROP_IF_EMPTY, SVC_FLAG_INTERNAL_SCOPE, SVC_FLAG_MASQUERADE,
    SVC_FLAG_SOURCE_RANGES, ServiceValue, SlotKey, UnusedKey, maps,
};
use tracing::warn;

use crate::{
    cidr::Cidr,
    desired::{DesiredService, DesiredState, Frontend},
    family::{Backend, ServiceKey, UnusedEndpoint},
    map_error::{MapFailure, MapWriteError},
    model::ServiceType,
};

mod repair;
pub use repair::{Repair, Snapshot};

/// A backend a service port no longer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostBackend {
    pub id: u32,
    pub backend: Backend,
    /// It still serves (terminating, or left out by a traffic policy or hints): its flows
    /// are kept, as kube-proxy keeps them.
    pub serving: bool,
}

/// The map operations the reconciler needs; `crate::maps::Maps` implements them on the
/// pinned maps, the tests on memory.
pub trait ServiceMaps {
    fn put_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()>;
    /// Deletes backend `id`, which is `backend` (its family says which map holds it).
    fn delete_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()>;
    fn put_slot(&mut self, key: &SlotKey, backend_id: u32) -> anyhow::Result<()>;
    fn delete_slot(&mut self, key: &SlotKey) -> anyhow::Result<()>;
    /// Writes the service entry (the atomic flip) and its metadata.
    fn put_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
        meta: &ServiceMeta,
    ) -> anyhow::Result<()>;
    fn delete_service(&mut self, key: &ServiceKey, id: u32) -> anyhow::Result<()>;
    /// A client range of load-balancer frontend `id` (`loadBalancerSourceRanges`).
    fn put_source_range(&mut self, id: u32, range: &Cidr) -> anyhow::Result<()>;
    fn delete_source_range(&mut self, id: u32, range: &Cidr) -> anyhow::Result<()>;
    /// An entry of the list of endpoints a cluster IP does not use (for `proxyctl`).
    fn put_unused(&mut self, key: &UnusedKey, endpoint: &UnusedEndpoint) -> anyhow::Result<()>;
    /// Deletes the entry at `key`, which lists `listed` (its family says which map).
    fn delete_unused(&mut self, key: &UnusedKey, listed: &UnusedEndpoint) -> anyhow::Result<()>;
    fn reset_service_counters(&mut self, id: u32) -> anyhow::Result<()>;
    fn reset_backend_counters(&mut self, id: u32) -> anyhow::Result<()>;
    /// Forgets what `service_id` keeps of backends it no longer has: session affinity to
    /// them, and, for those that no longer serve, tc-path UDP flows and the connected
    /// sockets the socket hooks pointed at them.
    fn forget_backends(&mut self, service_id: u32, lost: &[LostBackend]) -> anyhow::Result<()>;
    /// What the maps already hold, e.g. from a previous agent.
    fn read_existing(&self) -> anyhow::Result<Existing>;
    /// How many service ids and backend ids the maps have room for (0 is never used).
    fn id_capacity(&self) -> (u32, u32);
    /// Map updates and deletes made so far.
    fn writes(&self) -> u64;
}

/// What operators see of a service frontend besides its entry: name, frontend and service
/// type, whether its backends are the serving-terminating fallback, its traffic policies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceMeta {
    pub name: String,
    pub frontend: Frontend,
    pub service_type: ServiceType,
    pub terminating: bool,
    pub internal_local: bool,
    pub external_local: bool,
}

impl ServiceMeta {
    pub fn of(want: &DesiredService) -> Self {
        Self {
            name: want.name.clone(),
            frontend: want.frontend,
            service_type: want.service_type,
            terminating: want.terminating,
            internal_local: want.internal_local,
            external_local: want.external_local,
        }
    }
}

#[derive(Debug, Default)]
pub struct Existing {
    pub services: Vec<(ServiceKey, ServiceValue, ServiceMeta)>,
    pub slots: Vec<(SlotKey, u32)>,
    pub backends: Vec<(u32, Backend)>,
    pub unused: Vec<(UnusedKey, UnusedEndpoint)>,
    pub source_ranges: Vec<(u32, Cidr)>,
}

/// Every id that indexes `map`'s entries (and their counters) is in use.
fn ids_used_up(map: &'static str, max: u32) -> MapWriteError {
    MapWriteError {
        map,
        failure: MapFailure::Full,
        detail: format!("all {} ids are in use", max - 1),
    }
}

/// Ids from 1 to `max - 1`; 0 means "none".
#[derive(Debug)]
struct Ids {
    max: u32,
    next: u32,
    free: Vec<u32>,
}

impl Ids {
    fn with_used(max: u32, used: &HashSet<u32>) -> Self {
        let next = used.iter().max().map_or(1, |m| m + 1);
        Self {
            max,
            next,
            free: (1..next).rev().filter(|id| !used.contains(id)).collect(),
        }
    }

    fn allocate(&mut self) -> Option<u32> {
        self.free.pop().or_else(|| {
            (self.next < self.max).then(|| {
                self.next += 1;
                self.next - 1
            })
        })
    }

    fn release(&mut self, id: u32) {
        self.free.push(id);
    }
}

#[derive(Clone, Debug)]
struct Programmed {
    value: ServiceValue,
    meta: ServiceMeta,
    /// (backend id, backend) in slot order.
    backends: Vec<(u32, Backend)>,
    /// The endpoints listed as unused under its id.
    unused: Vec<UnusedEndpoint>,
    /// The client ranges under its id (sorted).
    source_ranges: Vec<Cidr>,
    /// Backends it no longer balances to that still serve (`DesiredService::still_serving`),
    /// held so that their ids stay theirs: when one stops serving, its UDP flows and
    /// sockets go. Not adopted by a restarted agent, which cannot tell them.
    draining: Vec<(u32, Backend)>,
}

impl Programmed {
    fn matches(&self, want: &DesiredService) -> bool {
        self.meta == ServiceMeta::of(want)
            && flags(want) == (self.value.flags, self.value.affinity_timeout_secs)
            && usize::from(self.value.count) == want.backends.len()
            && self.backends.len() == want.backends.len()
            && self
                .backends
                .iter()
                .zip(&want.backends)
                .all(|((_, a), b)| a == b)
            && self.unused == want.unused
            && *self.source_ranges == *want.source_ranges.as_deref().unwrap_or_default()
            && self
                .draining
                .iter()
                .all(|(_, b)| want.still_serving.contains(&(b.addr, b.port)))
    }
}

/// `ServiceValue::flags` and the affinity timeout.
fn flags(want: &DesiredService) -> (u8, u32) {
    let (mut flags, timeout) = match want.affinity_timeout_secs {
        Some(t) => (SVC_FLAG_AFFINITY, t),
        None => (0, 0),
    };
    if want.masquerade {
        flags |= SVC_FLAG_MASQUERADE;
    }
    if want.internal_scope {
        flags |= SVC_FLAG_INTERNAL_SCOPE;
    }
    if want.drop_if_empty {
        flags |= SVC_FLAG_DROP_IF_EMPTY;
    }
    if want.source_ranges.is_some() {
        flags |= SVC_FLAG_SOURCE_RANGES;
    }
    (flags, timeout)
}

/// The slots the current generation of each service uses.
fn live_slots<'a>(services: impl Iterator<Item = &'a Programmed>) -> HashSet<SlotKey> {
    services
        .flat_map(|p| {
            (1..=p.value.count).map(|slot| SlotKey {
                service_id: p.value.id,
                generation: p.value.generation,
                pad: 0,
                slot,
            })
        })
        .collect()
}

struct BackendRef {
    id: u32,
    refs: u32,
}

/// A backend as one service port uses it: each port has its own backend ids, so that a
/// backend's counters are that port's traffic to it (metrics label them with the service)
/// even when another service selects the same pod. The frontends of one port share them.
/// The port is its name's 64-bit hash: two ports would share counters only on a collision
/// (odds about 10⁻⁹ at 100,000 ports), which costs nothing else.
type PortBackend = (u64, Backend);

fn port_of(name: &str) -> u64 {
    use std::hash::BuildHasher as _;
    foldhash::fast::FixedState::with_seed(0).hash_one(name)
}

/// What `sync_key` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyChange {
    Unchanged,
    Programmed,
    Removed,
}

/// Service ports (map keys) programmed, removed, or found unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyCounts {
    pub changed: usize,
    pub removed: usize,
    pub unchanged: usize,
}

impl KeyCounts {
    pub fn add(&mut self, change: KeyChange) {
        match change {
            KeyChange::Unchanged => self.unchanged += 1,
            KeyChange::Programmed => self.changed += 1,
            KeyChange::Removed => self.removed += 1,
        }
    }
}

/// What one `apply` did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub keys: KeyCounts,
    /// Service ports that could not be programmed (they keep their previous state).
    pub errors: Vec<(String, anyhow::Error)>,
}

impl SyncReport {
    fn count(&mut self, name: &str, result: anyhow::Result<KeyChange>) {
        match result {
            Ok(change) => self.keys.add(change),
            Err(e) => self.errors.push((name.to_owned(), e)),
        }
    }
}

/// What was written since a snapshot of the maps began.
#[derive(Debug, Default)]
struct Touched {
    services: HashSet<ServiceKey>,
    /// Service ids whose slots were written.
    service_ids: HashSet<u32>,
    backends: HashSet<u32>,
}

pub struct Reconciler<M> {
    maps: M,
    services: HashMap<ServiceKey, Programmed>,
    backends: HashMap<PortBackend, BackendRef>,
    service_ids: Ids,
    backend_ids: Ids,
    /// Recording since `begin_snapshot`.
    touched: Option<Touched>,
    /// The key programmed under each service id, and the backend under each backend id:
    /// what a drift repair checks map entries against, one entry at a time.
    key_by_id: HashMap<u32, ServiceKey>,
    backend_by_id: HashMap<u32, Backend>,
    /// A failure to list unused endpoints was logged.
    unused_warned: bool,
}

impl<M: ServiceMaps> Reconciler<M> {
    /// Adopts what the maps already hold: complete services become the programmed state
    /// (so an unchanged service costs no write after an agent restart); slots and backends
    /// that no service reaches are deleted.
    pub fn adopt(mut maps: M) -> anyhow::Result<Self> {
        let existing = maps
            .read_existing()
            .context("reading the existing map contents")?;
        let slots: HashMap<SlotKey, u32> = existing.slots.iter().copied().collect();
        let listed: HashMap<UnusedKey, UnusedEndpoint> = existing.unused.iter().copied().collect();
        let mut ranges: HashMap<u32, Vec<Cidr>> = HashMap::new();
        for (id, range) in &existing.source_ranges {
            ranges.entry(*id).or_default().push(*range);
        }
        let backend_by_id: HashMap<u32, Backend> = existing.backends.iter().copied().collect();
        let mut services = HashMap::new();
        let mut backends: HashMap<PortBackend, BackendRef> = HashMap::new();
        let mut owners: HashMap<u32, PortBackend> = HashMap::new();
        for (key, value, meta) in existing.services {
            let resolved: Option<Vec<(u32, Backend)>> = (1..=value.count)
                .map(|slot| {
                    let id = *slots.get(&SlotKey {
                        service_id: value.id,
                        generation: value.generation,
                        pad: 0,
                        slot,
                    })?;
                    Some((id, *backend_by_id.get(&id)?))
                })
                .collect();
            let Some(resolved) = resolved else {
                warn!(service = %meta.name, "adopted service entry has missing slots or backends; deleting it");
                maps.delete_service(&key, value.id)?;
                continue;
            };
            let port = port_of(&meta.name);
            // An agent before per-port backend ids shared them between service ports: such
            // a port keeps its entries until the first sync reprograms it with its own.
            let shared = resolved
                .iter()
                .any(|(id, b)| owners.get(id).is_some_and(|owner| *owner != (port, *b)));
            let resolved = if shared { Vec::new() } else { resolved };
            for (id, backend) in &resolved {
                owners.insert(*id, (port, *backend));
                backends
                    .entry((port, *backend))
                    .or_insert(BackendRef { id: *id, refs: 0 })
                    .refs += 1;
            }
            let unused = (1..)
                .map_while(|index| {
                    listed
                        .get(&UnusedKey {
                            service_id: value.id,
                            index,
                            pad: 0,
                        })
                        .copied()
                })
                .collect();
            let mut source_ranges = ranges.remove(&value.id).unwrap_or_default();
            source_ranges.sort();
            services.insert(
                key,
                Programmed {
                    value,
                    meta,
                    backends: resolved,
                    unused,
                    source_ranges,
                    draining: Vec::new(),
                },
            );
        }
        let live_slots = live_slots(services.values());
        for (key, _) in existing
            .slots
            .iter()
            .filter(|(k, _)| !live_slots.contains(k))
        {
            maps.delete_slot(key)?;
        }
        // Ranges of services gone.
        for (id, stale) in ranges {
            for range in stale {
                maps.delete_source_range(id, &range)?;
            }
        }
        // Entries past an adopted list, or of a service gone.
        let listed_len: HashMap<u32, usize> = services
            .values()
            .map(|p| (p.value.id, p.unused.len()))
            .collect();
        for (key, listed) in &existing.unused {
            if usize::from(key.index) > listed_len.get(&key.service_id).copied().unwrap_or(0) {
                maps.delete_unused(key, listed)?;
            }
        }
        let live_backends: HashSet<u32> = backends.values().map(|b| b.id).collect();
        for (id, backend) in existing
            .backends
            .iter()
            .filter(|(id, _)| !live_backends.contains(id))
        {
            maps.delete_backend(*id, backend)?;
        }
        let (max_services, max_backends) = maps.id_capacity();
        let service_ids = Ids::with_used(
            max_services,
            &services.values().map(|p| p.value.id).collect(),
        );
        let backend_ids = Ids::with_used(max_backends, &live_backends);
        Ok(Self {
            maps,
            key_by_id: services.iter().map(|(k, p)| (p.value.id, *k)).collect(),
            backend_by_id: backends.iter().map(|((_, b), r)| (r.id, *b)).collect(),
            services,
            backends,
            service_ids,
            backend_ids,
            touched: None,
            unused_warned: false,
        })
    }

    /// Number of service ports programmed.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Brings the maps to `desired`, touching only the service ports that differ.
    pub fn apply(&mut self, desired: &DesiredState) -> SyncReport {
        let mut report = SyncReport::default();
        for (key, want) in desired {
            report.count(&want.name, self.sync_key(key, Some(want)));
        }
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            let name = self.services[&key].meta.name.clone();
            report.count(&name, self.sync_key(&key, None));
        }
        report
    }

    /// Brings the entry of `key` to `want` (`None`: no entry).
    pub fn sync_key(
        &mut self,
        key: &ServiceKey,
        want: Option<&DesiredService>,
    ) -> anyhow::Result<KeyChange> {
        match want {
            Some(want) if self.services.get(key).is_some_and(|p| p.matches(want)) => {
                Ok(KeyChange::Unchanged)
            }
            Some(want) => self.program(key, want).map(|()| KeyChange::Programmed),
            None if self.services.contains_key(key) => {
                self.remove(key).map(|()| KeyChange::Removed)
            }
            None => Ok(KeyChange::Unchanged),
        }
    }

    /// The service port programmed under `key`.
    pub fn programmed_name(&self, key: &ServiceKey) -> Option<&str> {
        Some(&self.services.get(key)?.meta.name)
    }

    /// The keys programmed now.
    pub fn keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// Starts recording what is written from now on, for `repair` with a snapshot of the
    /// maps that is read meanwhile (off the programming path).
    pub fn begin_snapshot(&mut self) {
        self.touched = Some(Touched::default());
    }

    /// The snapshot could not be read: stops recording.
    pub fn abandon_snapshot(&mut self) {
        self.touched = None;
    }

    /// Map updates and deletes made so far.
    pub fn writes(&self) -> u64 {
        self.maps.writes()
    }

    #[cfg(test)]
    pub fn maps(&self) -> &M {
        &self.maps
    }

    #[cfg(test)]
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    fn touch_service(&mut self, key: &ServiceKey, id: u32) {
        if let Some(t) = &mut self.touched {
            t.services.insert(*key);
            t.service_ids.insert(id);
        }
    }

    /// Deletes client ranges of frontend `id`. A range that fails to go keeps admitting its
    /// clients: logged; the next agent's adoption finds and removes it.
    fn withdraw_ranges(&mut self, id: u32, ranges: &[Cidr]) {
        for range in ranges {
            if let Err(e) = self.maps.delete_source_range(id, range) {
                warn!(service_id = id, %range, "deleting a source range: {e:#}");
            }
        }
    }

    /// Brings the list of unused endpoints under service id `id` from `previous` to `now`,
    /// writing only the entries that differ. A failure affects only what `proxyctl` lists:
    /// it is logged once, and traffic is programmed all the same.
    fn list_unused(
        &mut self,
        id: u32,
        now: &[UnusedEndpoint],
        previous: &[UnusedEndpoint],
        name: &str,
    ) {
        let key = |i: usize| UnusedKey {
            service_id: id,
            index: i as u16 + 1,
            pad: 0,
        };
        let mut result = Ok(());
        for (i, endpoint) in now.iter().enumerate() {
            if previous.get(i) != Some(endpoint) {
                result = result.and(self.maps.put_unused(&key(i), endpoint));
            }
        }
        for (i, listed) in previous.iter().enumerate().skip(now.len()) {
            result = result.and(self.maps.delete_unused(&key(i), listed));
        }
        if let Err(e) = result
            && !std::mem::replace(&mut self.unused_warned, true)
        {
            warn!(
                service = %name,
                "listing the endpoints a service does not use (for proxyctl) failed; traffic \
                 is not affected; not said again: {e:#}"
            );
        }
    }

    fn touch_backend(&mut self, id: u32) {
        if let Some(t) = &mut self.touched {
            t.backends.insert(id);
        }
    }

    fn acquire_backend(&mut self, port: u64, backend: &Backend) -> anyhow::Result<u32> {
        if let Some(b) = self.backends.get_mut(&(port, *backend)) {
            b.refs += 1;
            return Ok(b.id);
        }
        let id = self
            .backend_ids
            .allocate()
            .ok_or_else(|| ids_used_up(maps::BACKENDS, self.backend_ids.max))?;
        self.touch_backend(id);
        let written = self
            .maps
            .reset_backend_counters(id)
            .and_then(|()| self.maps.put_backend(id, backend));
        if let Err(e) = written {
            self.backend_ids.release(id);
            return Err(e);
        }
        self.backends
            .insert((port, *backend), BackendRef { id, refs: 1 });
        self.backend_by_id.insert(id, *backend);
        Ok(id)
    }

    fn release_backend(&mut self, port: u64, backend: &Backend) {
        let Some(b) = self.backends.get_mut(&(port, *backend)) else {
            return;
        };
        b.refs -= 1;
        if b.refs == 0 {
            let id = b.id;
            self.touch_backend(id);
            self.backends.remove(&(port, *backend));
            self.backend_by_id.remove(&id);
            if let Err(e) = self.maps.delete_backend(id, backend) {
                warn!(backend_id = id, "deleting backend: {e:#}");
            }
            self.backend_ids.release(id);
        }
    }

    fn delete_slots(&mut self, id: u32, generation: u8, count: u16) {
        for slot in 1..=count {
            if let Err(e) = self.maps.delete_slot(&SlotKey {
                service_id: id,
                generation,
                pad: 0,
                slot,
            }) {
                warn!(service_id = id, slot, "deleting backend slot: {e:#}");
            }
        }
    }

    /// Undoes a failed `program`: the slots written so far, the backends acquired, a new id.
    fn abandon(
        &mut self,
        id: u32,
        generation: u8,
        written: u16,
        port: u64,
        acquired: &[(u32, Backend)],
        new_id: bool,
    ) {
        self.delete_slots(id, generation, written);
        for (_, b) in acquired {
            self.release_backend(port, b);
        }
        if new_id {
            self.service_ids.release(id);
        }
    }

    fn program(&mut self, key: &ServiceKey, want: &DesiredService) -> anyhow::Result<()> {
        let count = u16::try_from(want.backends.len()).map_err(|_| {
            anyhow!(
                "{} backends is more than a service port can have (65535)",
                want.backends.len()
            )
        })?;
        let port = port_of(&want.name);
        let mut acquired = Vec::with_capacity(want.backends.len());
        for backend in &want.backends {
            match self.acquire_backend(port, backend) {
                Ok(id) => acquired.push((id, *backend)),
                Err(e) => {
                    self.abandon(0, 0, 0, port, &acquired, false);
                    return Err(e);
                }
            }
        }
        let previous = self.services.get(key).map(|p| p.value);
        let (id, generation, new_id) = match previous {
            Some(v) => (v.id, v.generation ^ 1, false),
            None => match self.service_ids.allocate() {
                Some(id) => (id, 0, true),
                None => {
                    self.abandon(0, 0, 0, port, &acquired, false);
                    return Err(ids_used_up(maps::SERVICES, self.service_ids.max).into());
                }
            },
        };
        self.touch_service(key, id);
        if new_id && let Err(e) = self.maps.reset_service_counters(id) {
            self.abandon(id, generation, 0, port, &acquired, new_id);
            return Err(e);
        }
        for (i, (backend_id, _)) in acquired.iter().enumerate() {
            let slot = SlotKey {
                service_id: id,
                generation,
                pad: 0,
                slot: i as u16 + 1,
            };
            if let Err(e) = self.maps.put_slot(&slot, *backend_id) {
                self.abandon(id, generation, i as u16, port, &acquired, new_id);
                return Err(e.context(format!("writing backend slot {} of {count}", i + 1)));
            }
        }
        let old_ranges = self
            .services
            .get(key)
            .map_or(&[][..], |p| &p.source_ranges)
            .to_vec();
        let new_ranges = want.source_ranges.clone().unwrap_or_default();
        // Ranges are admitted before the entry flips to them, and taken away after.
        let mut added = Vec::new();
        for range in new_ranges.iter().filter(|r| !old_ranges.contains(r)) {
            if let Err(e) = self.maps.put_source_range(id, range) {
                self.withdraw_ranges(id, &added);
                self.abandon(id, generation, count, port, &acquired, new_id);
                return Err(e);
            }
            added.push(*range);
        }
        let (flags, affinity_timeout_secs) = flags(want);
        let value = ServiceValue {
            id,
            count,
            generation,
            flags,
            affinity_timeout_secs,
        };
        let meta = ServiceMeta::of(want);
        if let Err(e) = self.maps.put_service(key, &value, &meta) {
            self.withdraw_ranges(id, &added);
            self.abandon(id, generation, count, port, &acquired, new_id);
            return Err(e);
        }
        let removed: Vec<Cidr> = old_ranges
            .iter()
            .filter(|r| !new_ranges.contains(r))
            .copied()
            .collect();
        self.withdraw_ranges(id, &removed);
        let previous = self
            .services
            .get(key)
            .map_or(&[][..], |p| &p.unused)
            .to_vec();
        self.list_unused(id, &want.unused, &previous, &want.name);
        let kept: HashSet<u32> = acquired.iter().map(|(id, _)| *id).collect();
        let draining = self.draining(key, &kept, &want.still_serving, port);
        let programmed = Programmed {
            value,
            meta,
            backends: acquired,
            unused: want.unused.clone(),
            source_ranges: new_ranges,
            draining,
        };
        self.key_by_id.insert(id, *key);
        if let Some(old) = self.services.insert(*key, programmed) {
            let draining = self.services[key]
                .draining
                .iter()
                .map(|(id, _)| *id)
                .collect();
            self.retire(&old, &kept, &draining);
        }
        Ok(())
    }

    /// The backends `key` had (in its slots or draining) that its new slots lack and that
    /// still serve, each with a reference of its own (the old ones go with `retire`).
    fn draining(
        &mut self,
        key: &ServiceKey,
        kept: &HashSet<u32>,
        still_serving: &[(IpAddr, u16)],
        port: u64,
    ) -> Vec<(u32, Backend)> {
        let Some(old) = self.services.get(key) else {
            return Vec::new();
        };
        let draining: Vec<Backend> = old
            .backends
            .iter()
            .chain(&old.draining)
            .filter(|(id, b)| !kept.contains(id) && still_serving.contains(&(b.addr, b.port)))
            .map(|(_, b)| *b)
            .collect();
        // A backend still held by `old` is found, not allocated: this cannot fail.
        draining
            .into_iter()
            .filter_map(|b| Some((self.acquire_backend(port, &b).ok()?, b)))
            .collect()
    }

    /// Cleans up after a service port moved off `old`: its slots, what is kept of the
    /// backend ids it no longer balances to (`kept` are its new ones; `draining`, those it
    /// holds while they still serve), and one reference to each of its backends.
    fn retire(&mut self, old: &Programmed, kept: &HashSet<u32>, draining: &HashSet<u32>) {
        self.delete_slots(old.value.id, old.value.generation, old.value.count);
        // Newly out of the slots (still serving or not), and draining ones that stopped.
        let out_of_slots = old.backends.iter().filter(|(id, _)| !kept.contains(id));
        let stopped = old
            .draining
            .iter()
            .filter(|(id, _)| !kept.contains(id) && !draining.contains(id));
        let lost: Vec<LostBackend> = out_of_slots
            .chain(stopped)
            .map(|(id, backend)| LostBackend {
                id: *id,
                backend: *backend,
                serving: draining.contains(id),
            })
            .collect();
        if !lost.is_empty()
            && let Err(e) = self.maps.forget_backends(old.value.id, &lost)
        {
            warn!(service = %old.meta.name, "forgetting affinity, UDP flows and sockets of removed backends: {e:#}");
        }
        let port = port_of(&old.meta.name);
        for (_, b) in old.backends.iter().chain(&old.draining) {
            self.release_backend(port, b);
        }
    }

    fn remove(&mut self, key: &ServiceKey) -> anyhow::Result<()> {
        let Some(old) = self.services.get(key).cloned() else {
            return Ok(());
        };
        self.touch_service(key, old.value.id);
        self.maps.delete_service(key, old.value.id)?;
        self.list_unused(old.value.id, &[], &old.unused, &old.meta.name);
        self.withdraw_ranges(old.value.id, &old.source_ranges);
        self.services.remove(key);
        self.key_by_id.remove(&old.value.id);
        self.retire(&old, &HashSet::new(), &HashSet::new());
        self.service_ids.release(old.value.id);
        Ok(())
    }
}

/// In-memory maps that log every write, for the tests of what drives the maps.
#[cfg(test)]
pub mod fake {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    #[derive(Default)]
    pub struct Fake {
        pub services: BTreeMap<ServiceKey, (ServiceValue, ServiceMeta)>,
        pub slots: HashMap<SlotKey, u32>,
        pub backends: HashMap<u32, Backend>,
        pub unused: HashMap<UnusedKey, UnusedEndpoint>,
        pub source_ranges: std::collections::BTreeSet<(u32, Cidr)>,
        pub slot_capacity: Option<usize>,
        /// Service entries cannot be deleted (a refused write).
        pub refuse_deletes: bool,
        pub log: Vec<String>,
    }

    impl ServiceMaps for &mut Fake {
        fn put_backend(&mut self, id: u32, b: &Backend) -> anyhow::Result<()> {
            self.log.push(format!("put backend {id}"));
            self.backends.insert(id, *b);
            Ok(())
        }
        fn delete_backend(&mut self, id: u32, _: &Backend) -> anyhow::Result<()> {
            self.log.push(format!("delete backend {id}"));
            self.backends.remove(&id);
            Ok(())
        }
        fn put_slot(&mut self, k: &SlotKey, id: u32) -> anyhow::Result<()> {
            if self.slot_capacity.is_some_and(|c| self.slots.len() >= c) {
                anyhow::bail!("slots map full");
            }
            self.log.push(format!(
                "put slot {}/{}/{}",
                k.service_id, k.generation, k.slot
            ));
            self.slots.insert(*k, id);
            Ok(())
        }
        fn delete_slot(&mut self, k: &SlotKey) -> anyhow::Result<()> {
            self.log.push(format!(
                "delete slot {}/{}/{}",
                k.service_id, k.generation, k.slot
            ));
            self.slots.remove(k);
            Ok(())
        }
        fn put_service(
            &mut self,
            k: &ServiceKey,
            v: &ServiceValue,
            meta: &ServiceMeta,
        ) -> anyhow::Result<()> {
            self.log.push(format!(
                "put service {} gen {} count {}",
                v.id, v.generation, v.count
            ));
            self.services.insert(*k, (*v, meta.clone()));
            Ok(())
        }
        fn delete_service(&mut self, k: &ServiceKey, id: u32) -> anyhow::Result<()> {
            if self.refuse_deletes {
                anyhow::bail!("deleting service {id} refused");
            }
            self.log.push(format!("delete service {id}"));
            self.services.remove(k);
            Ok(())
        }
        fn put_source_range(&mut self, id: u32, range: &Cidr) -> anyhow::Result<()> {
            self.log.push(format!("put range {id} {range}"));
            self.source_ranges.insert((id, *range));
            Ok(())
        }
        fn delete_source_range(&mut self, id: u32, range: &Cidr) -> anyhow::Result<()> {
            self.log.push(format!("delete range {id} {range}"));
            self.source_ranges.remove(&(id, *range));
            Ok(())
        }
        fn put_unused(&mut self, k: &UnusedKey, u: &UnusedEndpoint) -> anyhow::Result<()> {
            self.log
                .push(format!("put unused {}/{}", k.service_id, k.index));
            self.unused.insert(*k, *u);
            Ok(())
        }
        fn delete_unused(&mut self, k: &UnusedKey, _: &UnusedEndpoint) -> anyhow::Result<()> {
            self.log
                .push(format!("delete unused {}/{}", k.service_id, k.index));
            self.unused.remove(k);
            Ok(())
        }
        fn reset_service_counters(&mut self, _: u32) -> anyhow::Result<()> {
            Ok(())
        }
        fn reset_backend_counters(&mut self, _: u32) -> anyhow::Result<()> {
            Ok(())
        }
        fn forget_backends(&mut self, id: u32, lost: &[LostBackend]) -> anyhow::Result<()> {
            let ids: Vec<String> = lost
                .iter()
                .map(|l| format!("{}{}", l.id, if l.serving { " serving" } else { "" }))
                .collect();
            self.log.push(format!("forget backends {id} {ids:?}"));
            Ok(())
        }
        fn writes(&self) -> u64 {
            self.log
                .iter()
                .filter(|l| l.starts_with("put") || l.starts_with("delete"))
                .count() as u64
        }
        fn id_capacity(&self) -> (u32, u32) {
            (
                proxy_common::maps::MAX_SERVICES,
                proxy_common::maps::MAX_BACKENDS,
            )
        }
        fn read_existing(&self) -> anyhow::Result<Existing> {
            Ok(Existing {
                services: self
                    .services
                    .iter()
                    .map(|(k, (v, n))| (*k, *v, n.clone()))
                    .collect(),
                slots: self.slots.iter().map(|(k, v)| (*k, *v)).collect(),
                backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
                unused: self.unused.iter().map(|(k, v)| (*k, *v)).collect(),
                source_ranges: self.source_ranges.iter().copied().collect(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::Fake, *};

    fn key(port: u16) -> ServiceKey {
        ServiceKey::new([10, 96, 0, 1].into(), port, 6)
    }

    fn backend(last: u8) -> Backend {
        Backend {
            addr: [10, 244, 0, last].into(),
            port: 8080,
            proto: 6,
            flags: 0,
        }
    }

    fn state(services: &[(u16, &[u8])]) -> DesiredState {
        services
            .iter()
            .map(|(port, backends)| {
                let backends = backends.iter().map(|b| backend(*b)).collect();
                (
                    key(*port),
                    DesiredService {
                        name: format!("ns/svc-{port}"),
                        backends,
                        ..DesiredService::default()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn update_writes_new_slots_before_the_flip_and_deletes_old_after() {
        let mut fake = Fake::default();
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        assert_eq!(r.apply(&state(&[(80, &[1, 2])])).keys.changed, 1);
        r.maps.log.clear();
        let report = r.apply(&state(&[(80, &[2, 3])]));
        assert_eq!((report.keys.changed, report.errors.len()), (1, 0));
        assert_eq!(
            r.maps.log,
            [
                "put backend 3",
                "put slot 1/1/1",
                "put slot 1/1/2",
                "put service 1 gen 1 count 2",
                "delete slot 1/0/1",
                "delete slot 1/0/2",
                "forget backends 1 [\"1\"]",
                "delete backend 1",
            ]
        );
    }

    #[test]
    fn a_backend_that_still_serves_is_held_until_it_stops() {
        let mut fake = Fake::default();
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        r.apply(&state(&[(80, &[1, 2, 3])]));
        r.maps.log.clear();
        let forgotten = |log: &[String]| -> Vec<String> {
            log.iter()
                .filter(|l| l.starts_with("forget") || l.starts_with("delete backend"))
                .cloned()
                .collect()
        };
        // 2 terminates (still serving) and 3 goes: flows to 2 are kept, to 3 forgotten.
        let mut next = state(&[(80, &[1])]);
        for service in next.values_mut() {
            service.still_serving = vec![([10, 244, 0, 2].into(), 8080)];
        }
        r.apply(&next);
        assert_eq!(
            forgotten(&r.maps.log),
            [
                "forget backends 1 [\"2 serving\", \"3\"]",
                "delete backend 3"
            ]
        );
        // Unchanged while it serves.
        r.maps.log.clear();
        assert_eq!(r.apply(&next).keys.unchanged, 1);
        // It stops serving: now its flows go, and so does its entry.
        r.apply(&state(&[(80, &[1])]));
        assert_eq!(
            forgotten(&r.maps.log),
            ["forget backends 1 [\"2\"]", "delete backend 2"]
        );
    }

    #[test]
    fn unchanged_state_costs_no_write() {
        let mut fake = Fake::default();
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        r.apply(&state(&[(80, &[1, 2]), (81, &[])]));
        r.maps.log.clear();
        let report = r.apply(&state(&[(80, &[1, 2]), (81, &[])]));
        assert_eq!(report.keys.unchanged, 2);
        assert!(r.maps.log.is_empty(), "{:?}", r.maps.log);
    }

    #[test]
    fn restarted_agent_adopts_the_maps_without_rewriting() {
        let mut fake = Fake::default();
        Reconciler::adopt(&mut fake)
            .unwrap()
            .apply(&state(&[(80, &[1, 2]), (81, &[2])]));
        // A stale slot of an old generation, as a crash mid-update could leave.
        fake.slots.insert(
            SlotKey {
                service_id: 1,
                generation: 1,
                pad: 0,
                slot: 1,
            },
            7,
        );
        fake.log.clear();
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        assert_eq!(r.maps.log, ["delete slot 1/1/1"]);
        r.maps.log.clear();
        let report = r.apply(&state(&[(80, &[1, 2]), (81, &[2])]));
        assert_eq!(report.keys.unchanged, 2);
        assert!(r.maps.log.is_empty(), "{:?}", r.maps.log);
        // New ids do not collide with adopted ones.
        r.apply(&state(&[(80, &[1, 2]), (81, &[2]), (82, &[4])]));
        assert!(
            r.maps
                .log
                .contains(&"put service 3 gen 0 count 1".to_owned()),
            "{:?}",
            r.maps.log
        );
    }

    /// `state`, with the frontends at `ports` all of one service port, `ns/web:http`.
    fn one_port(ports: &[u16], backends: &[u8]) -> DesiredState {
        let mut state = state(&ports.iter().map(|p| (*p, backends)).collect::<Vec<_>>());
        for want in state.values_mut() {
            want.name = "ns/web:http".to_owned();
        }
        state
    }

    #[test]
    fn frontends_of_a_port_share_its_backend_ids_until_the_last_goes() {
        let mut fake = Fake::default();
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        r.apply(&one_port(&[80, 81], &[1]));
        assert_eq!(r.maps.backends.len(), 1);
        r.apply(&one_port(&[81], &[1]));
        assert_eq!(r.maps.backends.len(), 1);
        assert_eq!(r.apply(&state(&[])).keys.removed, 1);
        assert!(
            r.maps.backends.is_empty() && r.maps.slots.is_empty() && r.maps.services.is_empty()
        );
    }

    #[test]
    fn each_service_port_has_its_own_backend_ids() {
        let mut fake = Fake::default();
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        // Two services selecting the same pod count their traffic to it apart.
        r.apply(&state(&[(80, &[1]), (81, &[1])]));
        assert_eq!(r.maps.backends.len(), 2);
        r.apply(&state(&[(81, &[1])]));
        assert_eq!(r.maps.backends.len(), 1);
    }

    #[test]
    fn ports_sharing_backend_ids_from_an_older_agent_get_their_own_at_the_first_sync() {
        // The older layout: ports 80 and 81 (service ids 1 and 2) both use backend id 1.
        let mut fake = Fake::default();
        fake.backends.insert(1, backend(3));
        for (port, id) in [(80, 1), (81, 2)] {
            let value = ServiceValue {
                id,
                count: 1,
                ..ServiceValue::default()
            };
            let meta = ServiceMeta {
                name: format!("ns/svc-{port}"),
                ..ServiceMeta::default()
            };
            fake.services.insert(key(port), (value, meta));
            let slot = SlotKey {
                service_id: id,
                generation: 0,
                pad: 0,
                slot: 1,
            };
            fake.slots.insert(slot, 1);
        }
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        assert!(
            r.maps.log.is_empty(),
            "adopting deletes nothing: {:?}",
            r.maps.log
        );
        let report = r.apply(&state(&[(80, &[3]), (81, &[3])]));
        assert_eq!((report.keys.unchanged, report.keys.changed), (1, 1));
        assert!(
            !r.maps.log.iter().any(|l| l == "delete backend 1"),
            "the backend port 80 keeps stays: {:?}",
            r.maps.log
        );
        let ids: HashSet<u32> = r.maps.slots.values().copied().collect();
        assert_eq!(ids.len(), 2, "each port has its own backend id now");
        assert_eq!(r.maps.backends.len(), 2);
    }

    fn unused(last: u8, reason: u8) -> UnusedEndpoint {
        UnusedEndpoint {
            addr: [10, 244, 0, last].into(),
            port: 8080,
            proto: 6,
            reason,
        }
    }

    #[test]
    fn unused_endpoints_are_listed_by_difference_and_adopted_without_rewriting() {
        let mut fake = Fake::default();
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        let with = |list: Vec<UnusedEndpoint>| {
            let mut s = state(&[(80, &[1])]);
            s.get_mut(&key(80)).unwrap().unused = list;
            s
        };
        r.apply(&with(vec![unused(2, 1), unused(3, 2)]));
        assert_eq!(r.maps.unused.len(), 2);
        r.maps.log.clear();
        r.apply(&with(vec![unused(2, 1)]));
        // A new generation for the service, and one list entry deleted.
        assert!(
            r.maps.log.contains(&"delete unused 1/2".to_owned())
                && !r.maps.log.iter().any(|l| l.starts_with("put unused")),
            "{:?}",
            r.maps.log
        );
        drop(r);
        fake.log.clear();
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        assert_eq!(r.apply(&with(vec![unused(2, 1)])).keys.unchanged, 1);
        assert!(r.maps.log.is_empty(), "{:?}", r.maps.log);
        r.apply(&state(&[]));
        assert!(r.maps.unused.is_empty(), "removed with its service");
    }

    #[test]
    fn source_ranges_are_admitted_before_the_flip_and_withdrawn_after() {
        let mut fake = Fake::default();
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        let with = |ranges: Option<&[&str]>| {
            let mut s = state(&[(80, &[1])]);
            s.get_mut(&key(80)).unwrap().source_ranges =
                ranges.map(|r| r.iter().map(|c| c.parse().unwrap()).collect());
            s
        };
        r.apply(&with(Some(&["10.0.0.0/8"])));
        assert_eq!(
            r.maps.services[&key(80)].0.flags & SVC_FLAG_SOURCE_RANGES,
            SVC_FLAG_SOURCE_RANGES
        );
        r.maps.log.clear();
        r.apply(&with(Some(&["192.168.0.0/16"])));
        let log: Vec<&str> = r
            .maps
            .log
            .iter()
            .map(String::as_str)
            .filter(|l| l.contains("range") || l.starts_with("put service"))
            .collect();
        assert_eq!(
            log,
            [
                "put range 1 192.168.0.0/16",
                "put service 1 gen 1 count 1",
                "delete range 1 10.0.0.0/8"
            ]
        );
        // A restarted agent adopts them; without ranges the flag and the entries go.
        drop(r);
        fake.log.clear();
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        assert_eq!(r.apply(&with(Some(&["192.168.0.0/16"]))).keys.unchanged, 1);
        r.apply(&with(None));
        assert_eq!(
            r.maps.services[&key(80)].0.flags & SVC_FLAG_SOURCE_RANGES,
            0
        );
        assert!(r.maps.source_ranges.is_empty());
        // Some(empty): the flag with no range lets nobody in.
        r.apply(&with(Some(&[])));
        assert_eq!(
            r.maps.services[&key(80)].0.flags & SVC_FLAG_SOURCE_RANGES,
            SVC_FLAG_SOURCE_RANGES
        );
    }

    #[test]
    fn full_map_keeps_the_previous_state() {
        let mut fake = Fake {
            slot_capacity: Some(3),
            ..Fake::default()
        };
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        r.apply(&state(&[(80, &[1, 2])]));
        let report = r.apply(&state(&[(80, &[1, 2, 3])]));
        assert_eq!(report.errors.len(), 1);
        assert!(format!("{:#}", report.errors[0].1).contains("slots map full"));
        let (value, _) = r.maps.services[&key(80)];
        assert_eq!(
            (value.generation, value.count),
            (0, 2),
            "service still points at the old slots"
        );
        assert_eq!(r.maps.slots.len(), 2, "partial new generation cleaned up");
        assert_eq!(
            r.maps.backends.len(),
            2,
            "backend acquired for the failed update released"
        );
    }

    fn repair(r: &mut Reconciler<&mut Fake>) -> usize {
        r.begin_snapshot();
        let snapshot = r.maps.read_existing().unwrap();
        repair_from(r, snapshot)
    }

    /// Runs a repair one entry per step, as the agent does between changes.
    fn repair_from(r: &mut Reconciler<&mut Fake>, snapshot: Existing) -> usize {
        let mut repair = Repair::new(snapshot.into(), r);
        for _ in 0..1000 {
            if repair.step(r, 1).unwrap() {
                assert!(r.touched.is_none(), "recording stops with the repair");
                return repair.repaired;
            }
        }
        panic!("the repair did not finish in 1000 steps")
    }

    #[test]
    fn repair_restores_what_was_changed_behind_its_back() {
        let mut fake = Fake::default();
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        r.apply(&state(&[(80, &[1, 2]), (81, &[3])]));
        assert_eq!(repair(&mut r), 0, "nothing to repair");
        // Someone deletes a service entry and a slot, and adds a stray service.
        r.maps.services.remove(&key(80));
        r.maps.slots.remove(&SlotKey {
            service_id: 2,
            generation: 0,
            pad: 0,
            slot: 1,
        });
        let stray = ServiceValue {
            id: 9,
            count: 0,
            generation: 0,
            flags: 0,
            affinity_timeout_secs: 0,
        };
        r.maps.services.insert(
            key(99),
            (
                stray,
                ServiceMeta {
                    name: "stray".into(),
                    ..ServiceMeta::default()
                },
            ),
        );
        assert_eq!(repair(&mut r), 3);
        assert_eq!(r.maps.services.len(), 2);
        assert!(r.maps.services.contains_key(&key(80)));
        assert_eq!(r.maps.slots.len(), 3);
        assert_eq!(repair(&mut r), 0);
    }

    #[test]
    fn writes_after_the_snapshot_began_are_not_drift() {
        let mut fake = Fake::default();
        let mut r = Reconciler::adopt(&mut fake).unwrap();
        r.apply(&state(&[(80, &[1, 2]), (81, &[3])]));
        r.begin_snapshot();
        let snapshot = r.maps.read_existing().unwrap();
        // Programming goes on while the snapshot is compared.
        r.apply(&state(&[(80, &[2, 4]), (82, &[5])]));
        r.maps.log.clear();
        assert_eq!(repair_from(&mut r, snapshot), 0, "{:?}", r.maps.log);
        assert!(r.maps.log.is_empty(), "{:?}", r.maps.log);
        assert_eq!(repair(&mut r), 0);
    }
}
