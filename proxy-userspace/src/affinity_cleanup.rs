//! Forgetting session affinity to removed backends, off the programming path: finding the
//! stale entries means scanning the whole affinity map, so a thread of its own does it, one
//! scan for every batch of requests that queued up meanwhile. Until that scan has run (well
//! under a second for a full map), a sticky client of a removed backend that another
//! service still uses can be sent to it once more; one whose backend is gone is re-balanced
//! by the datapath at once.
use std::{
    collections::{HashMap, HashSet},
    sync::mpsc,
};

use aya::maps::MapData;
use proxy_common::{AffinityKey, AffinityValue};
use tracing::warn;

/// Backend ids to forget, by service id.
type Stale = HashMap<u32, HashSet<u32>>;

fn add(stale: &mut Stale, (service_id, backend_ids): (u32, Vec<u32>)) {
    stale.entry(service_id).or_default().extend(backend_ids);
}

fn is_stale(stale: &Stale, key: &AffinityKey, value: &AffinityValue) -> bool {
    stale
        .get(&key.service_id)
        .is_some_and(|backends| backends.contains(&value.backend_id))
}

pub struct AffinityCleanup {
    requests: mpsc::Sender<(u32, Vec<u32>)>,
}

impl AffinityCleanup {
    /// Starts the worker; it ends when this handle is dropped.
    pub fn start(
        mut map: aya::maps::HashMap<MapData, AffinityKey, AffinityValue>,
    ) -> anyhow::Result<Self> {
        let (requests, queue) = mpsc::channel();
        crate::background::spawn("affinity-cleanup", move || {
            while let Ok(first) = queue.recv() {
                let mut stale = Stale::new();
                add(&mut stale, first);
                while let Ok(more) = queue.try_recv() {
                    add(&mut stale, more);
                }
                let mut keys: Vec<AffinityKey> = Vec::new();
                // A map that cannot be read now is cleaned at the next removal.
                let _ = crate::map_batch::for_each_chunk(&map, |k, v| {
                    let stale = k.iter().zip(v).filter(|(k, v)| is_stale(&stale, k, v));
                    keys.extend(stale.map(|(k, _)| *k));
                });
                for key in keys {
                    // Already gone (LRU eviction, a datapath refresh race) is fine.
                    let _ = map.remove(&key);
                }
            }
        })?;
        Ok(Self { requests })
    }

    /// Queues forgetting the affinity of `service_id` to `backend_ids`.
    pub fn forget(&self, service_id: u32, backend_ids: &[u32]) {
        if self
            .requests
            .send((service_id, backend_ids.to_vec()))
            .is_err()
        {
            warn!(
                "the affinity clean-up thread has stopped; stale affinity entries stay until they expire"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_forgets_the_union_of_its_requests_only() {
        let mut stale = Stale::new();
        add(&mut stale, (1, vec![10]));
        add(&mut stale, (1, vec![11]));
        add(&mut stale, (2, vec![10]));
        let key = |service_id| AffinityKey {
            client: 7,
            service_id,
            kind: 0,
            pad: [0; 3],
        };
        let to = |backend_id| AffinityValue {
            backend_id,
            pad: 0,
            last_used_ns: 0,
        };
        assert!(is_stale(&stale, &key(1), &to(10)));
        assert!(is_stale(&stale, &key(1), &to(11)));
        assert!(is_stale(&stale, &key(2), &to(10)));
        assert!(
            !is_stale(&stale, &key(2), &to(11)),
            "another service's backend"
        );
        assert!(!is_stale(&stale, &key(3), &to(10)));
    }
}
