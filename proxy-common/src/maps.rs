//! Names and capacities of the datapath's maps.
//!
//! The name is both the map's symbol in the eBPF object and its pin file under the agent's
//! bpffs directory (e.g. `/sys/fs/bpf/proxy/services`), so it is a stable interface for
//! `proxyctl` and `bpftool`.

/// (ServiceKey → ServiceValue)
pub const SERVICES: &str = "services";
/// (SlotKey → backend id)
pub const BACKEND_SLOTS: &str = "backend_slots";
/// (backend id → Backend)
pub const BACKENDS: &str = "backends";
/// (service id → ServiceInfo)
pub const SERVICE_NAMES: &str = "service_names";
/// array of one AgentStatus
pub const AGENT_STATUS: &str = "agent_status";
/// per-CPU array (service id → Counters)
pub const SERVICE_STATS: &str = "service_stats";
/// per-CPU array (backend id → Counters)
pub const BACKEND_STATS: &str = "backend_stats";
/// LRU (CtKey → CtEntry)
pub const CONNTRACK: &str = "conntrack";
/// LRU (AffinityKey → AffinityValue)
pub const AFFINITY: &str = "affinity";
/// LRU (SockRevKey → SockRevValue)
pub const SOCK_REV_NAT: &str = "sock_rev_nat";

/// (node IPv4 address → 1): the addresses NodePorts answer on.
pub const NODE_ADDRS: &str = "node_addrs";
/// array of one NodeConfig
pub const NODE_CONFIG: &str = "node_config";
/// per-CPU array (`DROP_*` reason → packets dropped)
pub const DROPS: &str = "drops";

/// Every map the agent pins.
pub const ALL: [&str; 13] = [
    SERVICES,
    BACKEND_SLOTS,
    BACKENDS,
    SERVICE_NAMES,
    SERVICE_STATS,
    BACKEND_STATS,
    CONNTRACK,
    AFFINITY,
    SOCK_REV_NAT,
    AGENT_STATUS,
    NODE_ADDRS,
    NODE_CONFIG,
    DROPS,
];

/// Maps whose capacity the agent may change (`--map-size`): not the per-CPU arrays, whose
/// size bounds the ids.
pub const RESIZABLE: [&str; 7] = [
    SERVICES,
    BACKEND_SLOTS,
    BACKENDS,
    SERVICE_NAMES,
    CONNTRACK,
    AFFINITY,
    SOCK_REV_NAT,
];

/// Service ports; ids run from 1 to `MAX_SERVICES - 1` (they index `SERVICE_STATS`).
pub const MAX_SERVICES: u32 = 65_536;
/// Distinct backends; ids run from 1 to `MAX_BACKENDS - 1` (they index `BACKEND_STATS`).
pub const MAX_BACKENDS: u32 = 262_144;
/// Backend slots of all services, for two generations during an update.
pub const MAX_BACKEND_SLOTS: u32 = 524_288;
pub const MAX_CONNTRACK: u32 = 262_144;
pub const MAX_AFFINITY: u32 = 65_536;
pub const MAX_SOCK_REV_NAT: u32 = 131_072;
pub const MAX_NODE_ADDRS: u32 = 256;
