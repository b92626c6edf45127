//! What a service port keeps of a backend it no longer has, forgotten off the programming
//! path: session affinity to it, its UDP flows on the tc path, so that the next datagram
//! of such a flow is balanced again (as kube-proxy clears the kernel's conntrack entries of
//! UDP flows to a removed endpoint: DNS breaking after a CoreDNS pod moved is the classic),
//! and the connected sockets the socket hooks pointed at it (`stale_sockets`). TCP flows
//! keep their backend, as with kube-proxy. Finding the entries means scanning whole maps,
//! so a thread of its own does it, one scan for every batch of requests that queued up
//! meanwhile (well under a second for full maps); until then a sticky client or a UDP flow
//! can reach the removed backend once more.
use std::{
    collections::{HashMap, HashSet},
    sync::mpsc,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use proxy_common::{
    AffinityKey, AffinityValue, CT_FLAG_PASS, CT_FLAG_SHARED, CtEntryOf, CtKeyOf, IPPROTO_UDP,
};
use tracing::warn;

use crate::{
    conntrack::Conntracks, ct_account::CtAccount, reconcile::LostBackend,
    stale_sockets::StaleSockets,
};

/// Backend ids to forget, by service id.
type Stale = HashMap<u32, HashSet<u32>>;

type Request = (u32, Vec<LostBackend>);

/// Adds the backends of `request` that `pick` picks.
fn add(stale: &mut Stale, (service_id, lost): &Request, pick: fn(&LostBackend) -> bool) {
    stale
        .entry(*service_id)
        .or_default()
        .extend(lost.iter().filter(|l| pick(l)).map(|l| l.id));
}

fn every(_: &LostBackend) -> bool {
    true
}

fn not_serving(lost: &LostBackend) -> bool {
    !lost.serving
}

fn is_stale(stale: &Stale, service_id: u32, backend_id: u32) -> bool {
    stale
        .get(&service_id)
        .is_some_and(|backends| backends.contains(&backend_id))
}

/// A UDP flow of the tc path to a removed backend (any of its entries).
fn is_stale_flow<A>(stale: &Stale, key: &CtKeyOf<A>, entry: &CtEntryOf<A>) -> bool {
    key.proto == IPPROTO_UDP
        && entry.flags & CT_FLAG_PASS == 0
        && is_stale(stale, entry.rev_nat_id, entry.backend_id)
}

/// The maps the worker cleans.
pub struct Maps {
    pub affinity: BpfHashMap<MapData, AffinityKey, AffinityValue>,
    pub conntrack: Conntracks,
    pub account: CtAccount,
    /// `None` where sockets cannot be destroyed (said at start-up).
    pub sockets: Option<StaleSockets>,
}

/// Deletes the keys of `map` that `stale` picks; how many went.
fn remove_where<K: aya::Pod, V: aya::Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    stale: impl Fn(&K, &V) -> bool,
) -> u64 {
    let mut keys: Vec<K> = Vec::new();
    // A map that cannot be read now is cleaned at the next removal.
    let _ = crate::map_batch::for_each_chunk(map, |k, v| {
        keys.extend(
            k.iter()
                .zip(v)
                .filter(|(k, v)| stale(k, v))
                .map(|(k, _)| *k),
        );
    });
    // Already gone (evicted or dropped to make room, a datapath race) is fine.
    keys.iter().filter(|k| map.remove(k).is_ok()).count() as u64
}

/// Ends the UDP flows of `map` to backends of `stale` (each of their entries), as the
/// datapath ends a flow: a client key other flows need stays as an anchor. How many
/// entries went.
fn remove_flows<A>(map: &mut BpfHashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>, stale: &Stale) -> u64
where
    A: Copy + Default,
    CtKeyOf<A>: aya::Pod,
    CtEntryOf<A>: aya::Pod,
{
    let mut flows: Vec<(CtKeyOf<A>, bool)> = Vec::new();
    // A map that cannot be read now is cleaned at the next removal.
    let _ = crate::map_batch::for_each_chunk(map, |k, v| {
        flows.extend(
            k.iter()
                .zip(v)
                .filter(|(k, e)| is_stale_flow(stale, k, e))
                .map(|(k, e)| (*k, e.flags & CT_FLAG_SHARED != 0)),
        );
    });
    let removed = flows
        .iter()
        .filter(|(key, shared)| crate::conntrack::retire(map, key, *shared));
    removed.count() as u64
}

pub struct RemovedBackends {
    requests: mpsc::Sender<Request>,
}

impl RemovedBackends {
    /// Starts the worker; it ends when this handle is dropped.
    pub fn start(mut maps: Maps) -> anyhow::Result<Self> {
        let (requests, queue) = mpsc::channel();
        crate::background::spawn("removed-backends", move || {
            while let Ok(first) = queue.recv() {
                let mut batch = vec![first];
                batch.extend(queue.try_iter());
                // Affinity goes for every backend lost; flows and sockets only for those
                // that no longer serve.
                let (mut sticky, mut gone) = (Stale::new(), Stale::new());
                let mut endpoints = crate::stale_sockets::Removed::default();
                for request in &batch {
                    add(&mut sticky, request, every);
                    add(&mut gone, request, not_serving);
                    endpoints.add(request.0, &request.1);
                }
                // The cheapest scan first: the sockets' map is a fraction of conntrack.
                if let Some(sockets) = &mut maps.sockets {
                    sockets.destroy(&endpoints);
                }
                remove_where(&mut maps.affinity, |k, v| {
                    is_stale(&sticky, k.service_id, v.backend_id)
                });
                let flows = remove_flows(&mut maps.conntrack.v4, &gone)
                    + remove_flows(&mut maps.conntrack.v6, &gone);
                maps.account.add_deleted(flows);
            }
        })?;
        Ok(Self { requests })
    }

    /// Queues forgetting what `service_id` keeps of `lost`.
    pub fn forget(&self, service_id: u32, lost: &[LostBackend]) {
        if self.requests.send((service_id, lost.to_vec())).is_err() {
            warn!(
                "the removed-backend clean-up thread has stopped; affinity, UDP flows and \
                 connected sockets to removed backends stay until they expire"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::Addressed as _;

    use super::*;

    fn lost(id: u32, serving: bool) -> LostBackend {
        LostBackend {
            id,
            backend: proxy_common::Backend::default().with_addr([0, 0, 0, 0].into()),
            serving,
        }
    }

    #[test]
    fn a_batch_forgets_the_union_of_its_requests_only() {
        let mut stale = Stale::new();
        add(&mut stale, &(1, vec![lost(10, false)]), every);
        add(&mut stale, &(1, vec![lost(11, true)]), every);
        add(&mut stale, &(2, vec![lost(10, false)]), every);
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
        let stale_affinity = |service_id, backend_id| {
            is_stale(
                &stale,
                key(service_id).service_id,
                to(backend_id).backend_id,
            )
        };
        assert!(stale_affinity(1, 10));
        assert!(stale_affinity(1, 11));
        assert!(stale_affinity(2, 10));
        assert!(!stale_affinity(2, 11), "another service's backend");
        assert!(!stale_affinity(3, 10));
    }

    #[test]
    fn only_tc_path_udp_flows_to_backends_that_no_longer_serve_are_forgotten() {
        let mut stale = Stale::new();
        add(
            &mut stale,
            &(1, vec![lost(10, false), lost(11, true)]),
            not_serving,
        );
        let flow = |proto, flags, backend_id| {
            let key = proxy_common::CtKey {
                proto,
                ..Default::default()
            };
            let entry = proxy_common::CtEntry {
                rev_nat_id: 1,
                backend_id,
                flags,
                ..Default::default()
            };
            is_stale_flow(&stale, &key, &entry)
        };
        assert!(flow(IPPROTO_UDP, 0, 10));
        assert!(
            !flow(proxy_common::IPPROTO_TCP, 0, 10),
            "TCP keeps its backend"
        );
        assert!(
            !flow(IPPROTO_UDP, CT_FLAG_PASS, 10),
            "kube-proxy's own flow"
        );
        // kube-proxy's conntrack clean-up keeps what a serving endpoint answers
        // (`TestCleanStaleEntries`): a terminating one, or one a policy left out.
        assert!(!flow(IPPROTO_UDP, 0, 11), "a backend that still serves");
    }
}
