//! Names and capacities of the datapath's maps.
//!
//! The name is both the map's symbol in the eBPF object and its pin file under the agent's
//! bpffs directory (e.g. `/sys/fs/bpf/proxy/services`), so it is a stable interface for
//! `proxyctl` and `bpftool`.

/// (ServiceKey → ServiceValue)
pub const SERVICES: &str = "services";
/// (ServiceKey6 → ServiceValue): IPv6 frontends; ids shared with `services`
pub const SERVICES6: &str = "services6";
/// (SlotKey → backend id)
pub const BACKEND_SLOTS: &str = "backend_slots";
/// (backend id → Backend)
pub const BACKENDS: &str = "backends";
/// (backend id → Backend6): IPv6 backends; ids shared with `backends`
pub const BACKENDS6: &str = "backends6";
/// (service id → ServiceInfo)
pub const SERVICE_NAMES: &str = "service_names";
/// (UnusedKey → UnusedEndpoint): endpoints a cluster IP does not use, and why
pub const UNUSED_ENDPOINTS: &str = "unused_endpoints";
/// (UnusedKey → UnusedEndpoint6): the same for IPv6 cluster IPs
pub const UNUSED_ENDPOINTS6: &str = "unused_endpoints6";
/// array of one AgentStatus
pub const AGENT_STATUS: &str = "agent_status";
/// per-CPU array (service id → Counters)
pub const SERVICE_STATS: &str = "service_stats";
/// per-CPU array (backend id → Counters)
pub const BACKEND_STATS: &str = "backend_stats";
/// hash, preallocated (CtKey → CtEntry): flows, one entry each under the client's key
pub const CONNTRACK: &str = "ct_flows";
/// hash, preallocated (CtKey6 → CtEntry6): IPv6 flows
pub const CONNTRACK6: &str = "ct_flows6";
/// The conntrack maps of earlier agents (two entries per flow, which `ct_upgrade` converts),
/// by the map that replaces each: a new name, so that an earlier agent (a rollback) never
/// reads entries it cannot. `--map-size` still takes the earlier names.
pub const FORMER_CONNTRACK: [(&str, &str); 2] =
    [(CONNTRACK, "conntrack"), (CONNTRACK6, "conntrack6")];
/// LRU (AffinityKey → AffinityValue)
pub const AFFINITY: &str = "affinity";
/// LRU (SockRevKey → SockRevValue)
pub const SOCK_REV_NAT: &str = "sock_rev_nat";
/// LRU (SockRevKey6 → SockRevValue6)
pub const SOCK_REV_NAT6: &str = "sock_rev_nat6";
/// array of one CtStats, memory-mappable: conntrack entries created and deleted
pub const CT_STATS: &str = "ct_stats";
/// LRU (FragKey → FragPorts): the ports of fragmented datagrams, for their later fragments
pub const FRAGMENTS: &str = "fragments";
/// LRU (FragKey6 → FragPorts): the same for IPv6
pub const FRAGMENTS6: &str = "fragments6";

/// (node IPv4 address → 1): the addresses NodePorts answer on.
pub const NODE_ADDRS: &str = "node_addrs";
/// (node IPv6 address → 1)
pub const NODE_ADDRS6: &str = "node_addrs6";
/// array of one NodeConfig
pub const NODE_CONFIG: &str = "node_config";
/// array of one NodeConfig6
pub const NODE_CONFIG6: &str = "node_config6";
/// LPM trie ((service id, client range) → 1): the `loadBalancerSourceRanges` of
/// load-balancer frontends
pub const SOURCE_RANGES: &str = "source_ranges";
/// LPM trie ((service id, IPv6 client range) → 1): the same for IPv6 frontends
pub const SOURCE_RANGES6: &str = "source_ranges6";
/// per-CPU array (`DROP_*` reason → packets dropped)
pub const DROPS: &str = "drops";
/// ring buffer of `DropEvent`s, read by `proxyctl monitor`
pub const EVENTS: &str = "events";

/// Every map the agent pins.
pub const ALL: [&str; 27] = [
    SERVICES,
    SERVICES6,
    BACKEND_SLOTS,
    BACKENDS,
    BACKENDS6,
    SERVICE_NAMES,
    UNUSED_ENDPOINTS,
    UNUSED_ENDPOINTS6,
    SERVICE_STATS,
    BACKEND_STATS,
    CONNTRACK,
    CONNTRACK6,
    AFFINITY,
    SOCK_REV_NAT,
    SOCK_REV_NAT6,
    CT_STATS,
    FRAGMENTS,
    FRAGMENTS6,
    AGENT_STATUS,
    NODE_ADDRS,
    NODE_ADDRS6,
    NODE_CONFIG,
    NODE_CONFIG6,
    SOURCE_RANGES,
    SOURCE_RANGES6,
    DROPS,
    EVENTS,
];

/// Maps an earlier version pinned and this one does not use: removed at start and by
/// cleanup. The program arrays through which the packet programs tail-called their IPv6
/// half (each pin kept the programs in it loaded).
pub const RETIRED: [&str; 2] = ["tc_ipv6", "xdp_ipv6"];

/// Maps whose capacity the agent may change (`--map-size`). Ids index the counter arrays
/// and `service_names`, so those follow the map that owns the ids: see `COMPANIONS`.
pub const RESIZABLE: [&str; 7] = [
    SERVICES,
    BACKEND_SLOTS,
    BACKENDS,
    CONNTRACK,
    CONNTRACK6,
    AFFINITY,
    SOCK_REV_NAT,
];

/// Maps sized with another: a service id and a backend id can be as many as the entries of
/// `services` and `backends`; the IPv6 maps of frontends, backends and sockets take their
/// IPv4 map's size (ids are shared by the two families).
pub const COMPANIONS: [(&str, &[&str]); 3] = [
    (SERVICES, &[SERVICE_NAMES, SERVICE_STATS, SERVICES6]),
    (BACKENDS, &[BACKEND_STATS, BACKENDS6]),
    (SOCK_REV_NAT, &[SOCK_REV_NAT6]),
];

/// Service frontends (each cluster IP, node port, external and load-balancer IP of a
/// service port); ids run from 1 to `MAX_SERVICES - 1` and index `SERVICE_STATS`.
pub const MAX_SERVICES: u32 = 131_072;
/// Distinct backends; ids run from 1 to `MAX_BACKENDS - 1` and index `BACKEND_STATS`.
pub const MAX_BACKENDS: u32 = 524_288;
/// Backend slots of all services, for two generations during an update.
pub const MAX_BACKEND_SLOTS: u32 = 1_048_576;
/// Two entries per flow: 262,144 flows, as Linux's `nf_conntrack_max` on a large node, so that
/// a busy node rarely fills it (a full map refuses new flows once none never answered is
/// left to drop).
pub const MAX_CONNTRACK: u32 = 524_288;
/// IPv6 flows are kept apart (an IPv4 lookup never pays for IPv6 keys) in a smaller map by
/// default, 65,536 flows (18 MiB preallocated): a dual-stack node's pods reach most IPv6
/// services through the socket hooks, without conntrack (`--map-size ct_flows6=` raises it).
pub const MAX_CONNTRACK6: u32 = 131_072;
pub const MAX_AFFINITY: u32 = 65_536;
/// Endpoints listed as unused by cluster IPs (not ready, terminating, other node or zone);
/// past this, the rest go unlisted (the agent says so once).
pub const MAX_UNUSED_ENDPOINTS: u32 = 131_072;
/// Client ranges of all load-balancer frontends with `loadBalancerSourceRanges`.
pub const MAX_SOURCE_RANGES: u32 = 16_384;
pub const MAX_SOCK_REV_NAT: u32 = 131_072;
pub const MAX_NODE_ADDRS: u32 = 256;
/// Datagrams in flight in fragments at once (Cilium's default too); a fragment's entry
/// is needed only until the datagram's last fragment has passed.
pub const MAX_FRAGMENTS: u32 = 8_192;
