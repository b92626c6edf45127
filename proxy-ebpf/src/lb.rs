//! Service lookup, backend selection (random, or sticky for session affinity and UDP sockets)
//! and counters: the parts shared by the socket hooks and the tc programs.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    btf_maps::{Array, lpm_trie::Key},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use proxy_common::{
    AFFINITY_CLIENT_SOCKET, AffinityKey, AffinityValue, BackendOf, CT_TIMEOUT_UDP_SECS, Counters,
    CtKey, CtKeyOf, DropFlow, DropReason, SCOPE_INTERNAL, SVC_FLAG_AFFINITY,
    SVC_FLAG_INTERNAL_SCOPE, SVC_FLAG_SOURCE_RANGES, ServiceKeyOf, ServiceValue, SlotKey,
    SourceRangeOf,
};

use crate::{
    family::Family,
    maps::{AFFINITY, BACKEND_SLOTS, BACKEND_STATS, DROPS, EVENTS, SERVICE_STATS},
};

const NS_PER_SEC: u64 = 1_000_000_000;

pub struct Chosen<A = [u8; 4]> {
    pub backend_id: u32,
    pub backend: BackendOf<A>,
}

/// A client's claim to keep the backend it had: an affinity entry and its idle timeout.
pub struct Sticky {
    key: AffinityKey,
    timeout_ns: u64,
}

impl Sticky {
    /// `sessionAffinity: ClientIP`, if the service has it.
    #[inline(always)]
    pub fn client_affinity(svc: &ServiceValue, client: u64, kind: u8) -> Option<Self> {
        if svc.flags & SVC_FLAG_AFFINITY == 0 {
            return None;
        }
        Some(Self {
            key: AffinityKey {
                client,
                service_id: svc.id,
                kind,
                pad: [0; 3],
            },
            timeout_ns: svc.affinity_timeout_secs as u64 * NS_PER_SEC,
        })
    }

    /// An unconnected UDP socket's datagrams to one service stay on one backend.
    #[inline(always)]
    pub fn socket(svc: &ServiceValue, cookie: u64) -> Self {
        Self {
            key: AffinityKey {
                client: cookie,
                service_id: svc.id,
                kind: AFFINITY_CLIENT_SOCKET,
                pad: [0; 3],
            },
            timeout_ns: CT_TIMEOUT_UDP_SECS * NS_PER_SEC,
        }
    }

    /// The remembered backend, if the entry exists, has not expired and the backend still
    /// exists; refreshes the entry's idle timer.
    #[inline(always)]
    pub fn backend<A: Family>(&self, now: u64) -> Option<Chosen<A>> {
        let entry = AFFINITY.get_ptr_mut(self.key)?;
        // SAFETY: LRU values stay valid for the program's run; a concurrent update of the
        // timestamp is harmless.
        unsafe {
            if now.wrapping_sub((*entry).last_used_ns) > self.timeout_ns {
                return None;
            }
            let backend_id = (*entry).backend_id;
            let backend = *A::backends().get(backend_id)?;
            (*entry).last_used_ns = now;
            Some(Chosen {
                backend_id,
                backend,
            })
        }
    }

    #[inline(always)]
    pub fn remember<A>(&self, chosen: &Chosen<A>, now: u64) {
        let value = AffinityValue {
            backend_id: chosen.backend_id,
            pad: 0,
            last_used_ns: now,
        };
        // An LRU map insert only fails on memory pressure; the flow still works, unsticky.
        let _ = AFFINITY.insert(self.key, value, 0);
    }
}

#[inline(always)]
pub fn service<A: Family>(key: &ServiceKeyOf<A>) -> Option<ServiceValue> {
    // SAFETY: copied out at once; the agent replaces values whole, never in place.
    unsafe { A::services().get(key).copied() }
}

/// The service port at `key`: a cluster, external or load-balancer IP exactly, else a
/// NodePort when the address is one of this node's. At most three lookups.
#[inline(always)]
pub fn service_for<A: Family>(key: &ServiceKeyOf<A>) -> Option<ServiceValue> {
    if let Some(svc) = service(key) {
        return Some(svc);
    }
    // SAFETY: only tests for presence.
    unsafe { A::node_addrs().get(key.addr) }?;
    service(&ServiceKeyOf {
        addr: A::ZERO,
        ..*key
    })
}

/// `service_for` as a client inside the cluster (a pod or the node, through the socket
/// hooks) reaches it: a frontend flagged `SVC_FLAG_INTERNAL_SCOPE` serves those clients
/// from its `SCOPE_INTERNAL` entry; one with `loadBalancerSourceRanges` is left to tc,
/// which sees the client's address (kube-proxy filters pods by theirs; a socket has none
/// yet at connect()). At most five lookups.
#[inline(always)]
pub fn service_in_cluster<A: Family>(key: &ServiceKeyOf<A>) -> Option<ServiceValue> {
    let svc = service_for(key)?;
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        return None;
    }
    if svc.flags & SVC_FLAG_INTERNAL_SCOPE == 0 {
        return Some(svc);
    }
    let internal = ServiceKeyOf {
        scope: SCOPE_INTERNAL,
        ..*key
    };
    // The frontend matched exactly, or as a NodePort.
    service(&internal)
        .or_else(|| {
            service(&ServiceKeyOf {
                addr: A::ZERO,
                ..internal
            })
        })
        .or(Some(svc))
}

pub fn random() -> u32 {
    // SAFETY: no preconditions.
    unsafe { bpf_get_prandom_u32() }
}

/// The time that flows, affinities and sticky sockets are stamped with: CLOCK_MONOTONIC as
/// of the last timer tick (1-10 ms behind), read without the time stamp counter. What reads
/// these stamps wants 20 ms or coarser (`LAST_SEEN_GRANULARITY_NS`, the masquerade port's
/// 250 ms grace, timeouts in seconds); the precise clock cost 17 ns of an established flow's
/// packet (repeat-mode runs, 173 to 156 ns).
pub fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Picks the backend of a new connection: the sticky one if still valid, else a uniformly
/// random slot of the current generation. `None` when the service has no usable backend.
#[inline(always)]
pub fn select_backend<A: Family>(
    svc: &ServiceValue,
    sticky: Option<&Sticky>,
    now: u64,
) -> Option<Chosen<A>> {
    if svc.count == 0 {
        return None;
    }
    if let Some(chosen) = sticky.and_then(|s| s.backend(now)) {
        return Some(chosen);
    }
    let slot = (random() % svc.count as u32) as u16 + 1;
    let slot_key = SlotKey {
        service_id: svc.id,
        generation: svc.generation,
        pad: 0,
        slot,
    };
    // SAFETY: both values are copied out at once.
    let backend_id = unsafe { *BACKEND_SLOTS.get(slot_key)? };
    let backend = unsafe { *A::backends().get(backend_id)? };
    let chosen = Chosen {
        backend_id,
        backend,
    };
    if let Some(s) = sticky {
        s.remember(&chosen, now);
    }
    Some(chosen)
}

/// Adds `delta` to a counter that every CPU adds to (an add without fetch, its result
/// unused: BPF's oldest atomic instruction).
///
/// # Safety
/// `field` points into a live map value, 8-byte aligned.
#[inline(always)]
pub unsafe fn atomic_add(field: *mut u64, delta: u64) {
    if delta != 0 {
        // SAFETY: the caller's guarantee.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, delta) };
    }
}

#[inline(always)]
fn add<const N: usize>(stats: &Array<Counters, N>, id: u32, delta: &Counters) {
    if let Some(c) = stats.get_ptr_mut(id) {
        // SAFETY: an array value lives as long as the map; `Counters` is 8-byte aligned.
        unsafe {
            atomic_add(&raw mut (*c).conns, delta.conns);
            atomic_add(&raw mut (*c).packets, delta.packets);
            atomic_add(&raw mut (*c).bytes, delta.bytes);
        }
    }
}

/// Whether `client` may open connections to load-balancer frontend `service_id`, which
/// has `loadBalancerSourceRanges`: a range under its id holds the address.
#[inline(always)]
pub fn source_allowed<A: Family>(service_id: u32, client: A) -> bool {
    let bits = 32 + 8 * core::mem::size_of::<A>() as u32;
    let key = Key::new(
        bits,
        SourceRangeOf {
            service_id,
            addr: client,
        },
    );
    A::source_ranges().get(&key).is_some()
}

/// What was dropped or refused, where: for the `drops` counters and `proxyctl monitor`.
/// `F` is the flow as the hook knows it: a packet's `CtKey` (kept as small as it is, the tc
/// programs are near the stack limit), or a refused socket's `DropFlow`.
pub struct Dropped<F = CtKey> {
    pub reason: DropReason,
    /// The service frontend's id; 0 when not known.
    pub service_id: u32,
    pub flow: F,
    /// `HOOK_*`.
    pub hook: u8,
    /// The process refused (socket hooks); 0 for packets.
    pub pid: u32,
}

impl<F: EventFlow> Dropped<F> {
    pub fn packet(reason: DropReason, service_id: u32, flow: F, hook: u8) -> Self {
        Self {
            reason,
            service_id,
            flow,
            hook,
            pid: 0,
        }
    }
}

/// A flow as a `DropEvent` holds it, written field by field where it goes.
pub trait EventFlow {
    /// # Safety
    /// `out` points to writable memory for a `DropFlow`.
    unsafe fn write_to(&self, out: *mut DropFlow);
}

/// Field by field, in place: a `DropFlow` built first would take its 40 bytes of stack in
/// `count_drop`'s frame, on top of its callers' (near the limit on the IPv6 path).
impl<A: Family> EventFlow for CtKeyOf<A> {
    unsafe fn write_to(&self, out: *mut DropFlow) {
        // SAFETY: the caller's guarantee.
        unsafe {
            (*out).src = self.src.to_drop_flow();
            (*out).dst = self.dst.to_drop_flow();
            (*out).sport = self.sport;
            (*out).dport = self.dport;
            (*out).proto = self.proto;
            (*out).pad = [0; 3];
        }
    }
}

impl EventFlow for DropFlow {
    unsafe fn write_to(&self, out: *mut DropFlow) {
        // SAFETY: the caller's guarantee.
        unsafe { *out = *self };
    }
}

/// Counts a dropped packet or refused connection under its reason, and sends it to
/// `proxyctl monitor`. With nobody reading, the ring fills and the event is lost; the count
/// is not. Not inlined: the tc programs call it from many places, and near the stack limit.
#[inline(never)]
pub fn count_drop<F: EventFlow>(dropped: Dropped<F>) {
    if let Some(n) = DROPS.get_ptr_mut(dropped.reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *n += 1 };
    }
    // Written in place in the ring, not built on the stack first.
    let Some(mut entry) = EVENTS.reserve(0) else {
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the reserved entry is ours until submitted; every field is written.
    unsafe {
        // Precise, unlike `now_ns`: events are read as a timeline.
        (*event).time_ns = bpf_ktime_get_ns();
        (*event).reason = dropped.reason as u32;
        (*event).service_id = dropped.service_id;
        dropped.flow.write_to(&raw mut (*event).flow);
        (*event).hook = dropped.hook;
        (*event).pad = [0; 3];
        (*event).pid = dropped.pid;
        (*event).pad2 = 0;
    }
    entry.submit(0);
}

/// Adds to the counters of a service port and of one of its backends.
#[inline(always)]
pub fn count(service_id: u32, backend_id: u32, delta: Counters) {
    add(&SERVICE_STATS, service_id, &delta);
    add(&BACKEND_STATS, backend_id, &delta);
}
