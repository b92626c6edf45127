//! Drift repair a bounded step at a time: a snapshot of the maps (read and indexed off the
//! programming path) is compared with what was programmed in steps of a bounded number of
//! entries, so that a change never waits behind a whole comparison. Programming goes on
//! between steps; whatever it writes after the snapshot began is left out of the
//! comparison, since the snapshot may predate it.
use std::collections::{HashMap, HashSet};

use proxy_common::{ServiceValue, SlotKey};

use super::{Existing, Reconciler, ServiceMaps, Touched};
use crate::family::{Backend, ServiceKey};

/// The maps as read, indexed for lookups.
pub struct Snapshot {
    services: HashMap<ServiceKey, ServiceValue>,
    slots: HashMap<SlotKey, u32>,
    backends: HashMap<u32, Backend>,
}

impl From<Existing> for Snapshot {
    fn from(existing: Existing) -> Self {
        Self {
            services: existing
                .services
                .into_iter()
                .map(|(k, v, _)| (k, v))
                .collect(),
            slots: existing.slots.into_iter().collect(),
            backends: existing.backends.into_iter().collect(),
        }
    }
}

/// A repair in progress.
pub struct Repair {
    snapshot: Snapshot,
    /// What is left to compare, in order: the programmed service ports (with their slots
    /// and backends), then the snapshot's entries that nothing programmed owns.
    programmed: Vec<ServiceKey>,
    services: Vec<ServiceKey>,
    slots: Vec<SlotKey>,
    backends: Vec<u32>,
    /// Backend ids checked or rewritten already (backends are shared).
    seen_backends: HashSet<u32>,
    pub repaired: usize,
}

impl Repair {
    /// Starts comparing `snapshot`, read since `begin_snapshot`, with what is programmed.
    pub fn new<M>(snapshot: Snapshot, reconciler: &Reconciler<M>) -> Self {
        Self {
            programmed: reconciler.services.keys().copied().collect(),
            services: snapshot.services.keys().copied().collect(),
            slots: snapshot.slots.keys().copied().collect(),
            backends: snapshot.backends.keys().copied().collect(),
            snapshot,
            seen_backends: HashSet::new(),
            repaired: 0,
        }
    }

    /// Compares at most `budget` entries (a service port with its slots counts as one);
    /// returns whether the repair is complete, after which programming stops recording.
    pub fn step<M: ServiceMaps>(
        &mut self,
        reconciler: &mut Reconciler<M>,
        budget: usize,
    ) -> anyhow::Result<bool> {
        let touched = reconciler.touched.take().unwrap_or_default();
        let result = self.compare(reconciler, &touched, budget);
        reconciler.touched = Some(touched);
        let done = result?;
        if done {
            reconciler.touched = None;
        }
        Ok(done)
    }

    fn compare<M: ServiceMaps>(
        &mut self,
        r: &mut Reconciler<M>,
        touched: &Touched,
        mut budget: usize,
    ) -> anyhow::Result<bool> {
        let snap = &self.snapshot;
        while budget > 0 {
            budget -= 1;
            if let Some(key) = self.programmed.pop() {
                let Some(p) = r.services.get(&key) else {
                    continue;
                };
                if touched.services.contains(&key) || touched.service_ids.contains(&p.value.id) {
                    continue;
                }
                for (i, (backend_id, backend)) in p.backends.iter().enumerate() {
                    let slot = SlotKey {
                        service_id: p.value.id,
                        generation: p.value.generation,
                        pad: 0,
                        slot: i as u16 + 1,
                    };
                    if snap.slots.get(&slot) != Some(backend_id) {
                        r.maps.put_slot(&slot, *backend_id)?;
                        self.repaired += 1;
                    }
                    if self.seen_backends.insert(*backend_id)
                        && !touched.backends.contains(backend_id)
                        && snap.backends.get(backend_id) != Some(backend)
                    {
                        r.maps.put_backend(*backend_id, backend)?;
                        self.repaired += 1;
                    }
                }
                if snap.services.get(&key) != Some(&p.value) {
                    r.maps.put_service(&key, &p.value, &p.meta)?;
                    self.repaired += 1;
                }
            } else if let Some(key) = self.services.pop() {
                if !r.services.contains_key(&key) && !touched.services.contains(&key) {
                    r.maps.delete_service(&key, snap.services[&key].id)?;
                    self.repaired += 1;
                }
            } else if let Some(slot) = self.slots.pop() {
                let live = r
                    .key_by_id
                    .get(&slot.service_id)
                    .and_then(|key| r.services.get(key))
                    .is_some_and(|p| {
                        p.value.generation == slot.generation && slot.slot <= p.value.count
                    });
                if !live && !touched.service_ids.contains(&slot.service_id) {
                    r.maps.delete_slot(&slot)?;
                    self.repaired += 1;
                }
            } else if let Some(id) = self.backends.pop() {
                if !r.backend_by_id.contains_key(&id)
                    && !touched.backends.contains(&id)
                    && let Some(backend) = snap.backends.get(&id)
                {
                    r.maps.delete_backend(id, backend)?;
                    self.repaired += 1;
                }
            } else {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
