//! The datapath's maps; names and sizes come from `proxy_common::maps`.
use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use proxy_common::{
    AffinityKey, AffinityValue, AgentStatus, Backend, Backend6, Counters, CtEntry, CtEntry6, CtKey,
    CtKey6, CtStats, DROP_SLOTS, DropEvent, EVENTS_BYTES, FragKey, FragKey6, FragPorts, NodeConfig,
    NodeConfig6, ServiceInfo, ServiceKey, ServiceKey6, ServiceValue, SlotKey, SockRevKey,
    SockRevKey6, SockRevValue, SockRevValue6, SourceRange, SourceRange6, UnusedEndpoint,
    UnusedEndpoint6, UnusedKey,
    maps::{
        MAX_AFFINITY, MAX_BACKEND_SLOTS, MAX_BACKENDS, MAX_CONNTRACK, MAX_CONNTRACK6,
        MAX_FRAGMENTS, MAX_NODE_ADDRS, MAX_SERVICES, MAX_SOCK_REV_NAT, MAX_SOURCE_RANGES,
        MAX_UNUSED_ENDPOINTS,
    },
};

// The agent owns these; they hold only what it wrote, so they need no preallocation.
pub const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map(name = "services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "services6")]
pub static SERVICES6: HashMap<ServiceKey6, ServiceValue, { MAX_SERVICES as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "backend_slots")]
pub static BACKEND_SLOTS: HashMap<SlotKey, u32, { MAX_BACKEND_SLOTS as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "backends")]
pub static BACKENDS: HashMap<u32, Backend, { MAX_BACKENDS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map(name = "backends6")]
pub static BACKENDS6: HashMap<u32, Backend6, { MAX_BACKENDS as usize }, NO_PREALLOC> =
    HashMap::new();

/// Read by `proxyctl` and `bpftool` only; declared here so that it carries BTF and is pinned
/// beside the others.
#[btf_map(name = "service_names")]
pub static SERVICE_NAMES: HashMap<u32, ServiceInfo, { MAX_SERVICES as usize }, NO_PREALLOC> =
    HashMap::new();

/// Informational, like `service_names`: the agent's list for `proxyctl`.
#[btf_map(name = "unused_endpoints")]
pub static UNUSED_ENDPOINTS: HashMap<
    UnusedKey,
    UnusedEndpoint,
    { MAX_UNUSED_ENDPOINTS as usize },
    NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "unused_endpoints6")]
pub static UNUSED_ENDPOINTS6: HashMap<
    UnusedKey,
    UnusedEndpoint6,
    { MAX_UNUSED_ENDPOINTS as usize },
    NO_PREALLOC,
> = HashMap::new();

// Counters shared by all CPUs, added to atomically: a per-CPU array would cost entries ×
// 24 bytes × possible CPUs (1 GiB on a 128-CPU node at the default sizes); this costs
// entries × 24 bytes whatever the node.
#[btf_map(name = "service_stats")]
pub static SERVICE_STATS: Array<Counters, { MAX_SERVICES as usize }> = Array::new();

#[btf_map(name = "backend_stats")]
pub static BACKEND_STATS: Array<Counters, { MAX_BACKENDS as usize }> = Array::new();

// Plain hash maps, preallocated: an LRU map's lists cost a new flow 20-30% more, and
// evict answered flows for new ones; a full map here drops a flow never answered instead,
// or refuses the new one (`ct::early_drop`), as Linux's conntrack does.
#[btf_map(name = "ct_flows")]
pub static CONNTRACK: HashMap<CtKey, CtEntry, { MAX_CONNTRACK as usize }> = HashMap::new();

#[btf_map(name = "ct_flows6")]
pub static CONNTRACK6: HashMap<CtKey6, CtEntry6, { MAX_CONNTRACK6 as usize }> = HashMap::new();

/// The flows each CPU recorded lately (`ct::RecentFlows`); not pinned.
#[btf_map(name = "recent_flows")]
pub static RECENT_FLOWS: PerCpuArray<crate::ct::RecentFlows<[u8; 4]>, 1> = PerCpuArray::new();

#[btf_map(name = "recent_flows6")]
pub static RECENT_FLOWS6: PerCpuArray<crate::ct::RecentFlows<[u8; 16]>, 1> = PerCpuArray::new();

/// Where the next masquerade port search starts in the range (`nat::PORT_ATTEMPTS`); not
/// pinned: a new datapath starts it afresh.
#[btf_map(name = "snat_cursor")]
pub static SNAT_CURSOR: Array<u32, 1> = Array::new();

/// Room for a new flow's conntrack entries (`Family::new_entries`); not pinned.
#[btf_map(name = "new_entries")]
pub static NEW_ENTRIES: PerCpuArray<crate::nat::NewEntries<[u8; 4]>, 1> = PerCpuArray::new();

#[btf_map(name = "new_entries6")]
pub static NEW_ENTRIES6: PerCpuArray<crate::nat::NewEntries<[u8; 16]>, 1> = PerCpuArray::new();

/// Room for the keys of a flow's other entry (`Family::key_room`); not pinned.
#[btf_map(name = "key_room")]
pub static KEY_ROOM: PerCpuArray<crate::nat::KeyRoom<[u8; 4]>, 1> = PerCpuArray::new();

#[btf_map(name = "key_room6")]
pub static KEY_ROOM6: PerCpuArray<crate::nat::KeyRoom<[u8; 16]>, 1> = PerCpuArray::new();

#[btf_map(name = "affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

#[btf_map(name = "sock_rev_nat")]
pub static SOCK_REV_NAT: LruHashMap<SockRevKey, SockRevValue, { MAX_SOCK_REV_NAT as usize }> =
    LruHashMap::new();

#[btf_map(name = "sock_rev_nat6")]
pub static SOCK_REV_NAT6: LruHashMap<SockRevKey6, SockRevValue6, { MAX_SOCK_REV_NAT as usize }> =
    LruHashMap::new();

/// Conntrack entries created and deleted, by the datapath and the agent alike (it maps
/// this array to add atomically).
#[btf_map(name = "ct_stats")]
pub static CT_STATS: Array<CtStats, 1, { BPF_F_MMAPABLE as usize }> = Array::new();

#[btf_map(name = "fragments")]
pub static FRAGMENTS: LruHashMap<FragKey, FragPorts, { MAX_FRAGMENTS as usize }> =
    LruHashMap::new();

#[btf_map(name = "fragments6")]
pub static FRAGMENTS6: LruHashMap<FragKey6, FragPorts, { MAX_FRAGMENTS as usize }> =
    LruHashMap::new();

/// A new flow as the tc programs' steps hand it on (`tc::NewFlow`); not pinned.
#[btf_map(name = "new_flow")]
pub static NEW_FLOW4: PerCpuArray<crate::tc::NewFlow<[u8; 4]>, 1> = PerCpuArray::new();

#[btf_map(name = "new_flow6")]
pub static NEW_FLOW6: PerCpuArray<crate::tc::NewFlow<[u8; 16]>, 1> = PerCpuArray::new();

/// A masqueraded IPv6 packet as tc's translating step hands it, untouched, to the step that
/// routes it (`tc::ToRoute6`); not pinned.
#[btf_map(name = "tc_to_route6")]
pub static TC_TO_ROUTE6: PerCpuArray<crate::tc::ToRoute6, 1> = PerCpuArray::new();

/// What `proxy_xdp6`'s steps hand on to each other (`xdp::Forward6`); not pinned.
#[btf_map(name = "xdp_forward6")]
pub static XDP_FORWARD6: PerCpuArray<crate::xdp::Forward6, 1> = PerCpuArray::new();

/// Written by the agent for `proxyctl status`; declared here to carry BTF and be pinned.
#[btf_map(name = "agent_status")]
pub static AGENT_STATUS: Array<AgentStatus, 1> = Array::new();

#[btf_map(name = "node_addrs")]
pub static NODE_ADDRS: HashMap<[u8; 4], u32, { MAX_NODE_ADDRS as usize }> = HashMap::new();

#[btf_map(name = "node_addrs6")]
pub static NODE_ADDRS6: HashMap<[u8; 16], u32, { MAX_NODE_ADDRS as usize }> = HashMap::new();

#[btf_map(name = "node_config")]
pub static NODE_CONFIG: Array<NodeConfig, 1> = Array::new();

#[btf_map(name = "node_config6")]
pub static NODE_CONFIG6: Array<NodeConfig6, 1> = Array::new();

#[btf_map(name = "source_ranges")]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u8, { MAX_SOURCE_RANGES as usize }> = LpmTrie::new();

#[btf_map(name = "source_ranges6")]
pub static SOURCE_RANGES6: LpmTrie<SourceRange6, u8, { MAX_SOURCE_RANGES as usize }> =
    LpmTrie::new();

#[btf_map(name = "drops")]
pub static DROPS: PerCpuArray<u64, { DROP_SLOTS as usize }> = PerCpuArray::new();

#[btf_map(name = "events")]
pub static EVENTS: RingBuf<DropEvent, { EVENTS_BYTES as usize }> = RingBuf::new();
