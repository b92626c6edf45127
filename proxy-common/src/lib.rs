//! Map keys and values shared by the eBPF datapath and the userspace agent.
//!
//! Conventions, chosen so that `bpftool map dump` output is readable:
//! - IPv4 addresses are `[u8; 4]` and IPv6 ones `[u8; 16]`, in network order (the bytes as on
//!   the wire), so they dump as `[10,96,0,10]` and copy straight into packet headers. Each
//!   family has its own maps (`services` and `services6`, …), so that neither costs the
//!   other anything per packet; structs that hold an address are generic over it (`…Of<A>`),
//!   with an alias per family, and the agent uses them with `core::net::IpAddr` (`Addressed`);
//! - ports are `u16` in host order, so they dump as `80`;
//! - every struct is `#[repr(C)]` with explicit padding fields, so layout and BTF agree;
//!   one that holds an address and no wider field is also `align(4)` (its layout unchanged:
//!   sizes are multiples of 4): the verifier refuses misaligned stack accesses, so for a
//!   byte-aligned key LLVM copies a 16-byte address one byte at a time.
#![no_std]

pub mod maps;

use core::net::IpAddr;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A struct that holds one address, generic over its form: `[u8; 4]`, `[u8; 16]` or (in the
/// agent) `IpAddr`.
pub trait Addressed {
    type Addr: Copy;
    /// The same struct holding `addr` instead.
    type Of<B: Copy>: Addressed<Addr = B>;
    fn addr(&self) -> Self::Addr;
    fn with_addr<B: Copy>(&self, addr: B) -> Self::Of<B>;
}

/// Implements `Addressed` for a struct generic over its `addr` field.
macro_rules! addressed {
    ($name:ident { $($field:ident),* }) => {
        impl<A: Copy> Addressed for $name<A> {
            type Addr = A;
            type Of<B: Copy> = $name<B>;
            fn addr(&self) -> A {
                self.addr
            }
            fn with_addr<B: Copy>(&self, addr: B) -> $name<B> {
                $name { addr, $($field: self.$field),* }
            }
        }
    };
}

/// The two forms the maps hold an `Addressed` struct in, one per address family.
pub enum ByFamily<T: Addressed> {
    V4(T::Of<[u8; 4]>),
    V6(T::Of<[u8; 16]>),
}

impl<T: Addressed<Addr = IpAddr>> ByFamily<T> {
    /// `value` as its family's maps hold it. An IPv4-mapped IPv6 address is IPv6 here: the
    /// agent never makes one (sources parse addresses into their own family).
    pub fn of(value: &T) -> Self {
        match value.addr() {
            IpAddr::V4(a) => ByFamily::V4(value.with_addr(a.octets())),
            IpAddr::V6(a) => ByFamily::V6(value.with_addr(a.octets())),
        }
    }
}

/// A map's form of `T` as the agent holds it (with an `IpAddr`).
pub fn from_map<T: Addressed>(value: &T) -> T::Of<IpAddr>
where
    T::Addr: Into<IpAddr>,
{
    value.with_addr(value.addr().into())
}

/// A service port as clients address it: (virtual IP, port, protocol), and which clients
/// (`SCOPE_*`).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKeyOf<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}
addressed!(ServiceKeyOf { port, proto, scope });

pub type ServiceKey = ServiceKeyOf<[u8; 4]>;
pub type ServiceKey6 = ServiceKeyOf<[u8; 16]>;

impl<A> ServiceKeyOf<A> {
    /// The frontend at `addr:port/proto` as every client reaches it.
    pub const fn new(addr: A, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            scope: SCOPE_ALL,
        }
    }
}

/// `ServiceKey::scope`: the frontend as every client reaches it.
pub const SCOPE_ALL: u8 = 0;
/// `ServiceKey::scope`: the frontend as clients inside the cluster reach it (pods and
/// nodes, through the socket hooks), where that differs (`SVC_FLAG_INTERNAL_SCOPE`): an
/// externalTrafficPolicy: Local frontend serves them from all the service's endpoints, as
/// kube-proxy sends pod and node traffic to the cluster-wide endpoints.
pub const SCOPE_INTERNAL: u8 = 1;

/// `ServiceKey::addr` of a NodePort: the port is served on every address in `NODE_ADDRS`.
pub const NODE_PORT_ADDR: [u8; 4] = [0; 4];
/// `ServiceKey6::addr` of a NodePort: the port is served on every address in `NODE_ADDRS6`.
pub const NODE_PORT_ADDR6: [u8; 16] = [0; 16];

/// `ServiceValue::flags`: the service has `sessionAffinity: ClientIP`.
pub const SVC_FLAG_AFFINITY: u8 = 1;
/// `ServiceValue::flags`: an external frontend with `externalTrafficPolicy: Cluster`: a
/// connection to a backend on another node is masqueraded (SNAT to the node IP), so that
/// the reply comes back through this node.
pub const SVC_FLAG_MASQUERADE: u8 = 2;
/// `ServiceValue::flags`: without backends, drop instead of rejecting (a `Local` traffic
/// policy while the service has endpoints on other nodes, as kube-proxy does).
pub const SVC_FLAG_DROP_IF_EMPTY: u8 = 4;
/// `ServiceValue::flags`: clients inside the cluster use this frontend's `SCOPE_INTERNAL`
/// entry.
pub const SVC_FLAG_INTERNAL_SCOPE: u8 = 8;
/// `ServiceValue::flags`: a load-balancer frontend with `loadBalancerSourceRanges`: new
/// connections only from the client ranges in `SOURCE_RANGES` under its id.
pub const SVC_FLAG_SOURCE_RANGES: u8 = 16;

/// The data of a `SOURCE_RANGES` (`SOURCE_RANGES6`) key (an LPM trie key: its prefix
/// length is 32 + the range's): a frontend's service id, then a client address range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRangeOf<A> {
    pub service_id: u32,
    pub addr: A,
}

pub type SourceRange = SourceRangeOf<[u8; 4]>;
pub type SourceRange6 = SourceRangeOf<[u8; 16]>;

/// What the datapath needs to pick a backend for a service port.
///
/// Backends live in `BACKEND_SLOTS` under `(id, generation, 1..=count)`. The agent writes a
/// new generation's slots first and then replaces this value, so a reader never sees a
/// half-written backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Service-port id, also the index of its counters and its rev-NAT id in conntrack.
    pub id: u32,
    /// Number of usable backends; 0 means new connections are rejected.
    pub count: u16,
    pub generation: u8,
    pub flags: u8,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds` when `SVC_FLAG_AFFINITY` is set.
    pub affinity_timeout_secs: u32,
}

/// One backend slot of one generation of a service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub service_id: u32,
    pub generation: u8,
    pub pad: u8,
    /// 1-based slot index.
    pub slot: u16,
}

/// A backend endpoint (`BACKENDS` / `BACKENDS6` value, keyed by backend id; ids are shared
/// by the two families).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendOf<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_FLAG_*`; informational, the datapath does not read it.
    pub flags: u8,
}
addressed!(BackendOf { port, proto, flags });

pub type Backend = BackendOf<[u8; 4]>;
pub type Backend6 = BackendOf<[u8; 16]>;

/// `Backend::flags`: the endpoint runs on this node (such a backend is never masqueraded).
pub const BACKEND_FLAG_LOCAL: u8 = 1;

/// This node's addressing, for NodePorts and masquerading (`NODE_CONFIG`, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Source address of masqueraded connections; all zero: masquerading is off.
    pub snat_addr: [u8; 4],
    /// Source ports of masqueraded connections, inclusive; outside the kernel's ephemeral
    /// range so that they never meet the node's own connections.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}

/// The node's IPv6 addressing for masquerading (`NODE_CONFIG6`, one entry): a map of its
/// own, as `NodeConfig`'s layout is fixed by the pinned map an older agent may have made.
/// The source ports are `NodeConfig`'s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig6 {
    /// Source address of masqueraded IPv6 connections; all zero: no IPv6 masquerading.
    pub snat_addr: [u8; 16],
}

/// Default `NodeConfig` SNAT ports: above Linux's default ephemeral range (32768-60999).
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

/// Connection and traffic counters, per CPU, indexed by service or backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// New connections (TCP connects, new UDP flows) assigned.
    pub conns: u64,
    /// Packets translated by the tc datapath plus datagrams sent through `sendmsg4`.
    pub packets: u64,
    /// Bytes of the packets counted in `packets` (tc datapath only).
    pub bytes: u64,
}

/// A conntrack key: the 5-tuple of a packet as seen by the tc programs (`CT_KEY_TUPLE`), or
/// a client's address, port and protocol alone (`CT_KEY_CLIENT`: `dst` and `dport` zero),
/// under which a flow's one entry is found from both directions.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKeyOf<A> {
    pub src: A,
    pub dst: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `CT_KEY_*`: the two kinds never meet, whatever a packet carries.
    pub kind: u8,
    // Padding as a field, not part of a `[u8; 3]`: a store each.
    pub pad: u16,
}

/// `CtKey::kind` of a packet's 5-tuple.
pub const CT_KEY_TUPLE: u8 = 0;
/// `CtKey::kind` of a client's address and port: the key of a flow's one entry.
pub const CT_KEY_CLIENT: u8 = 1;

impl<A: Copy + Default> CtKeyOf<A> {
    /// The client key of `addr`, `port` and `proto`.
    pub fn client(addr: A, port: u16, proto: u8) -> Self {
        let mut key = CtKeyOf::default();
        key.set_client(addr, port, proto);
        key
    }

    /// Makes this the client key of `addr`, `port` and `proto`, field by field (the
    /// datapath keeps keys off its stack).
    #[inline(always)]
    pub fn set_client(&mut self, addr: A, port: u16, proto: u8) {
        self.src = addr;
        self.dst = A::default();
        self.sport = port;
        self.dport = 0;
        self.proto = proto;
        self.kind = CT_KEY_CLIENT;
        self.pad = 0;
    }

    /// The 5-tuple key of a packet from `src`:`sport` to `dst`:`dport`.
    pub fn tuple(src: A, dst: A, sport: u16, dport: u16, proto: u8) -> Self {
        CtKeyOf {
            src,
            dst,
            sport,
            dport,
            proto,
            kind: CT_KEY_TUPLE,
            pad: 0,
        }
    }
}

pub type CtKey = CtKeyOf<[u8; 4]>;
/// `CONNTRACK6` key.
pub type CtKey6 = CtKeyOf<[u8; 16]>;

/// `CtEntry::direction` of the entry that DNATs client → service to client → backend: a
/// flow's one entry under its client key (`CT_KEY_CLIENT`), or, for a flow whose client
/// key another flow holds, its forward entry under its 5-tuple.
pub const CT_FORWARD: u8 = 0;
/// `CtEntry::direction` of the entry under a reply 5-tuple (backend → client, or backend
/// → masquerade address and port), for a flow whose reply its client key cannot find: a
/// masqueraded one's, or one whose client key another flow holds.
pub const CT_REPLY: u8 = 1;
/// `CtEntry::direction` of an entry under a client key that holds no flow (an anchor): it
/// is there for its `CT_FLAG_SHARED`, which sends lookups on to 5-tuple keys.
pub const CT_ANCHOR: u8 = 2;

/// TCP handshake not complete (or a new UDP flow).
pub const CT_STATE_NEW: u8 = 0;
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// FIN or RST seen: kept briefly for the closing packets.
pub const CT_STATE_CLOSING: u8 = 2;

/// Idle timeouts, in seconds, after which the agent's GC deletes an entry.
pub const CT_TIMEOUT_TCP_NEW_SECS: u64 = 60;
pub const CT_TIMEOUT_TCP_ESTABLISHED_SECS: u64 = 6 * 3600;
pub const CT_TIMEOUT_TCP_CLOSING_SECS: u64 = 60;
pub const CT_TIMEOUT_UDP_SECS: u64 = 60;

/// `CtEntry::flags`: the flow is masqueraded; its packets are routed by the datapath
/// itself (the kernel would drop a packet whose source is one of its own addresses).
pub const CT_FLAG_SNAT: u8 = 1;
/// `CtEntry::flags`: a flow the kernel's NAT translates (kube-proxy's, during a migration):
/// its packets are left alone, so that they keep the backend kube-proxy chose. Only a
/// forward entry; `nat_addr`/`nat_port` say that backend.
pub const CT_FLAG_PASS: u8 = 2;
/// `CtEntry::flags` of an entry under a client key: other flows of this client address and
/// port are under 5-tuple keys (one client port to several frontends, or a flow moved to
/// this port), so a packet its flow does not match is looked up by its 5-tuple too.
pub const CT_FLAG_SHARED: u8 = 4;
/// `CtEntry::flags` of a reply entry whose flow is under its client key (`peer`), not under
/// a forward 5-tuple.
pub const CT_FLAG_CLIENT_KEYED: u8 = 8;

/// A conntrack entry. A flow has one, `CT_FORWARD` under its client key, found by the
/// packets from the client by their source and by the replies by their destination. A
/// masqueraded flow's replies are addressed to the node, so it also has a `CT_REPLY` entry
/// under their 5-tuple; and so do both directions of a flow whose client key is another
/// flow's (`CT_FLAG_SHARED`), which then has two entries under 5-tuples.
///
/// `last_seen_ns` comes first and the struct is packed to 4 bytes, so that neither family
/// needs padding of its own: three addresses of 4 bytes are not a multiple of 8.
#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntryOf<A> {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) of the last packet, to
    /// 20 ms (the datapath's `LAST_SEEN_GRANULARITY_NS`). 8-byte aligned in the map.
    pub last_seen_ns: u64,
    /// FORWARD: the backend to DNAT to. REPLY: the service address to restore as source.
    pub nat_addr: A,
    pub nat_port: u16,
    pub direction: u8,
    /// The TCP state the client's packets have brought (a REPLY entry's: the backend's).
    pub state: u8,
    /// Service-port id; the rev-NAT id of the flow.
    pub rev_nat_id: u32,
    pub backend_id: u32,
    /// FORWARD: the frontend the client addressed (the service address and port). REPLY:
    /// the client, the destination to restore.
    pub peer_addr: A,
    pub peer_port: u16,
    pub flags: u8,
    /// FORWARD under a client key, unmasqueraded: the TCP state the backend's packets have
    /// brought (a flow with a REPLY entry keeps it there).
    pub reply_state: u8,
    /// FORWARD: the source the backend sees: the client's own, or the masquerade address
    /// and port, or the client moved to another port.
    pub src_addr: A,
    pub src_port: u16,
    pub pad: u16,
}

pub type CtEntry = CtEntryOf<[u8; 4]>;
/// `CONNTRACK6` value.
pub type CtEntry6 = CtEntryOf<[u8; 16]>;

impl<A: Copy + Default> CtKeyOf<A> {
    /// The key of the other entry of the same flow, given this key's entry: `None` for a
    /// flow that has one entry (unmasqueraded, under its client key) and for an anchor.
    pub fn peer(&self, entry: &CtEntryOf<A>) -> Option<CtKeyOf<A>> {
        let mut peer = CtKeyOf::default();
        self.write_peer(entry, &mut peer).then_some(peer)
    }

    /// `peer`, written into `out` (the datapath keeps keys off its stack); `false` for none.
    /// Field by field, so that no key is built on the stack first; a call of its own (a BPF
    /// subprogram), whose copies of addresses take no room in its callers' frames.
    #[inline(never)]
    pub fn write_peer(&self, entry: &CtEntryOf<A>, out: &mut CtKeyOf<A>) -> bool {
        out.proto = self.proto;
        out.pad = 0;
        match entry.direction {
            // client → service; the reply comes from the backend (nat) to the source the
            // backend sees (src).
            CT_FORWARD if self.kind == CT_KEY_TUPLE || entry.flags & CT_FLAG_SNAT != 0 => {
                out.src = entry.nat_addr;
                out.dst = entry.src_addr;
                out.sport = entry.nat_port;
                out.dport = entry.src_port;
                out.kind = CT_KEY_TUPLE;
            }
            // backend → client; its flow is under the client's key (peer)...
            CT_REPLY if entry.flags & CT_FLAG_CLIENT_KEYED != 0 => {
                out.src = entry.peer_addr;
                out.dst = A::default();
                out.sport = entry.peer_port;
                out.dport = 0;
                out.kind = CT_KEY_CLIENT;
            }
            // ...or under the 5-tuple from the client (peer) to the service (nat).
            CT_REPLY => {
                out.src = entry.peer_addr;
                out.dst = entry.nat_addr;
                out.sport = entry.peer_port;
                out.dport = entry.nat_port;
                out.kind = CT_KEY_TUPLE;
            }
            _ => return false,
        }
        true
    }
}

/// The account of conntrack entries (`CT_STATS`, one value): created and deleted, by
/// the datapath and the agent. Entries created, less deleted, less those in the map were
/// dropped by the datapath to make room in a full map (its early drop, which leaves them
/// out of the account).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtStats {
    pub created: u64,
    pub deleted: u64,
}

/// An IPv4 datagram's fragments (`FRAGMENTS` key): they share source, destination,
/// protocol and IP id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub id: u16,
    pub proto: u8,
    pub pad: u8,
}

/// An IPv6 datagram's fragments (`FRAGMENTS6` key): as `FragKey`, with the fragment
/// header's 32-bit identification.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub pad: u8,
    pub pad2: u16,
}

/// The ports of a fragmented datagram, from its first fragment: later fragments carry
/// none, and are translated as the flow they name.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

/// Idle timeout of a flow, from the states of its two entries: a FIN or RST on either side
/// makes it closing; otherwise it is established once either side is.
pub fn ct_flow_timeout_secs(proto: u8, a: u8, b: u8) -> u64 {
    if proto != IPPROTO_TCP {
        return CT_TIMEOUT_UDP_SECS;
    }
    if a == CT_STATE_CLOSING || b == CT_STATE_CLOSING {
        CT_TIMEOUT_TCP_CLOSING_SECS
    } else if a == CT_STATE_ESTABLISHED || b == CT_STATE_ESTABLISHED {
        CT_TIMEOUT_TCP_ESTABLISHED_SECS
    } else {
        CT_TIMEOUT_TCP_NEW_SECS
    }
}

/// Why the datapath dropped a packet: its index in the `drops` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A `Local` traffic policy leaves no endpoint on this node, while other nodes have some.
    NoLocalEndpoint = 0,
    /// Every source port tried for a masqueraded connection was taken.
    NoMasqueradePort = 1,
    /// A connection needs masquerading but the node has no address to masquerade with.
    NoMasqueradeAddress = 2,
    /// A new flow could not be recorded in the conntrack map.
    ConntrackInsert = 3,
    /// A packet the datapath routes itself had no route, its TTL ran out, or it was larger
    /// than the next hop's MTU and may be fragmented (IPv4 without DF), which the datapath
    /// does not do.
    NoRoute = 4,
    /// A new flow's reply tuple was held by another live flow and every other source port
    /// tried for it was taken too.
    ConntrackClash = 5,
    /// A new connection to a service without usable endpoints, refused as kube-proxy's
    /// REJECT does: ECONNREFUSED from the socket hooks, ICMP port unreachable from tc.
    NoEndpoints = 6,
    /// A new connection to a load-balancer IP from outside its `loadBalancerSourceRanges`.
    SourceRange = 7,
}

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [DropReason; 8] = [
        DropReason::NoLocalEndpoint,
        DropReason::NoMasqueradePort,
        DropReason::NoMasqueradeAddress,
        DropReason::ConntrackInsert,
        DropReason::NoRoute,
        DropReason::ConntrackClash,
        DropReason::NoEndpoints,
        DropReason::SourceRange,
    ];

    /// As metrics and `proxyctl status` name it.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NoLocalEndpoint => "no_local_endpoint",
            DropReason::NoMasqueradePort => "no_masquerade_port",
            DropReason::NoMasqueradeAddress => "no_masquerade_address",
            DropReason::ConntrackInsert => "conntrack_insert_failed",
            DropReason::NoRoute => "no_route",
            DropReason::ConntrackClash => "conntrack_clash",
            DropReason::NoEndpoints => "no_endpoints",
            DropReason::SourceRange => "source_range",
        }
    }
}

/// A packet dropped or a connection refused, as `proxyctl monitor` shows it (`EVENTS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub time_ns: u64,
    /// `DropReason`.
    pub reason: u32,
    /// The service frontend's id (`service_names`); 0 when not known.
    pub service_id: u32,
    /// The packet's flow as it arrived; for a refused connect()/sendmsg(), the service
    /// address it was for (the source is not known yet: 0).
    pub flow: DropFlow,
    /// `HOOK_*`: where it happened.
    pub hook: u8,
    pub pad: [u8; 3],
    /// The process whose connect()/sendmsg() was refused; 0 for packets.
    pub pid: u32,
    pub pad2: u32,
}

/// A dropped packet's flow, either family: IPv4 addresses IPv4-mapped (`::ffff:a.b.c.d`).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropFlow {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `addr` IPv4-mapped.
pub const fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}

/// `DropEvent::hook`: the tc programs.
pub const HOOK_TC: u8 = 0;
/// `DropEvent::hook`: the XDP program.
pub const HOOK_XDP: u8 = 1;

/// XDP metadata (before the frame) saying that the XDP program of an interface found
/// nothing for us in this packet: tc ingress on that interface then lets it through without
/// the same lookups again. The interface is named, so that a packet the kernel moves to
/// another one (decapsulated, forwarded) is looked at there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpMeta {
    /// `XDP_META_NOTHING_FOR_US`.
    pub magic: u32,
    pub ifindex: u32,
}

pub const XDP_META_NOTHING_FOR_US: u32 = 0x7870_6e6f;
/// `DropEvent::hook`: the socket hook of connect().
pub const HOOK_CONNECT: u8 = 2;
/// `DropEvent::hook`: the socket hook of sendmsg() (unconnected UDP).
pub const HOOK_SENDMSG: u8 = 3;

/// Bytes of the `EVENTS` ring buffer: about 5,000 events between two reads of
/// `proxyctl monitor`.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Entries of the `drops` map: room for reasons added later, as a pinned map keeps the
/// size it was created with across agent upgrades.
pub const DROP_SLOTS: u32 = 32;

/// Which kind of client an affinity entry remembers.
pub const AFFINITY_CLIENT_IP: u8 = 0;
/// A socket-LB client: the network namespace cookie stands for the pod's IP, which is not
/// known yet at connect() time.
pub const AFFINITY_CLIENT_NETNS: u8 = 1;
/// Stickiness of an unconnected UDP socket to the backend of its first datagram, as a
/// conntrack entry keeps a UDP flow on one backend under kube-proxy.
pub const AFFINITY_CLIENT_SOCKET: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Client IPv4 address (in the first 4 bytes) or a netns or socket cookie.
    pub client: u64,
    pub service_id: u32,
    pub kind: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub pad: u32,
    pub last_used_ns: u64,
}

/// Reverse translation for a socket whose destination the socket hooks rewrote:
/// (socket cookie, backend) → the service address the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: [u8; 4],
    pub port: u16,
    pub pad: u16,
}

/// `SockRevKey` of an IPv6 socket (`SOCK_REV_NAT6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey6 {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub pad: u16,
    pub pad2: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValueOf<A> {
    pub addr: A,
    pub port: u16,
    pub pad: u16,
    pub service_id: u32,
}
addressed!(SockRevValueOf {
    port,
    pad,
    service_id
});

pub type SockRevValue = SockRevValueOf<[u8; 4]>;
pub type SockRevValue6 = SockRevValueOf<[u8; 16]>;

/// Length of `ServiceInfo::name`.
pub const SERVICE_NAME_LEN: usize = 120;

/// What operators need to know about a service port, written by the agent for `proxyctl`
/// and `bpftool`; never read by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `namespace/name:port`, NUL-padded.
    pub name: [u8; SERVICE_NAME_LEN],
    /// 1 when no endpoint is ready and the backends are serving-but-terminating ones.
    pub terminating: u8,
    /// 1 for `internalTrafficPolicy: Local`.
    pub internal_local: u8,
    /// `FRONTEND_*`: which of the service's addresses this entry serves.
    pub frontend: u8,
    /// `SERVICE_TYPE_*`.
    pub service_type: u8,
    /// 1 for `externalTrafficPolicy: Local`.
    pub external_local: u8,
    pub pad: [u8; 3],
}

/// `ServiceInfo::frontend`: the cluster IP.
pub const FRONTEND_CLUSTER_IP: u8 = 0;
/// `ServiceInfo::frontend`: the node port on every node address.
pub const FRONTEND_NODE_PORT: u8 = 1;
/// `ServiceInfo::frontend`: one of `spec.externalIPs`.
pub const FRONTEND_EXTERNAL_IP: u8 = 2;
/// `ServiceInfo::frontend`: a `status.loadBalancer.ingress[].ip`.
pub const FRONTEND_LOAD_BALANCER: u8 = 3;

pub const SERVICE_TYPE_CLUSTER_IP: u8 = 0;
pub const SERVICE_TYPE_NODE_PORT: u8 = 1;
pub const SERVICE_TYPE_LOAD_BALANCER: u8 = 2;

impl Default for ServiceInfo {
    fn default() -> Self {
        Self {
            name: [0; SERVICE_NAME_LEN],
            terminating: 0,
            internal_local: 0,
            frontend: FRONTEND_CLUSTER_IP,
            service_type: SERVICE_TYPE_CLUSTER_IP,
            external_local: 0,
            pad: [0; 3],
        }
    }
}

/// An endpoint of a service port that its cluster IP does not balance to (`UNUSED_ENDPOINTS`
/// key): the cluster IP entry's service id and an index from 1. Written by the agent for
/// `proxyctl`; never read by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnusedKey {
    pub service_id: u32,
    pub index: u16,
    pub pad: u16,
}

/// `UNUSED_ENDPOINTS` / `UNUSED_ENDPOINTS6` value, the family of the cluster IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnusedEndpointOf<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    /// `UNUSED_*`: why it is not used.
    pub reason: u8,
}
addressed!(UnusedEndpointOf {
    port,
    proto,
    reason
});

pub type UnusedEndpoint = UnusedEndpointOf<[u8; 4]>;
pub type UnusedEndpoint6 = UnusedEndpointOf<[u8; 16]>;

/// `UnusedEndpoint::reason`: not ready, and not a serving terminating endpoint.
pub const UNUSED_NOT_READY: u8 = 1;
/// Serving but terminating: used only when no endpoint is ready.
pub const UNUSED_TERMINATING: u8 = 2;
/// On another node, for an `internalTrafficPolicy: Local` service.
pub const UNUSED_NOT_LOCAL: u8 = 3;
/// Its topology hints are for other zones than this node's.
pub const UNUSED_OTHER_ZONE: u8 = 4;
/// Its node hints (`trafficDistribution: PreferSameNode`) are for other nodes.
pub const UNUSED_OTHER_NODE: u8 = 5;

/// The agent's own state, for `proxyctl status` (single entry at index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentStatus {
    pub pid: u32,
    /// Service ports programmed.
    pub service_ports: u32,
    /// Unix times, in seconds.
    pub started: u64,
    pub heartbeat: u64,
    pub last_sync: u64,
    /// Seconds between heartbeats: the agent is alive if its heartbeat is recent.
    pub heartbeat_interval: u32,
    /// Service ports that failed to program in the last sync.
    pub failed: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: all of these are #[repr(C)] with explicit padding and only integer fields.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for CtKey6 {}
    unsafe impl aya::Pod for CtEntry6 {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for SockRevKey6 {}
    unsafe impl aya::Pod for SockRevValue6 {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for AgentStatus {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for NodeConfig6 {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragKey6 {}
    unsafe impl aya::Pod for CtStats {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for DropEvent {}
    unsafe impl aya::Pod for DropFlow {}
    unsafe impl aya::Pod for SourceRange {}
    unsafe impl aya::Pod for SourceRange6 {}
    unsafe impl aya::Pod for UnusedKey {}
    unsafe impl aya::Pod for UnusedEndpoint {}
    unsafe impl aya::Pod for UnusedEndpoint6 {}
}

/// The BTF id written, in the object, into the datapath's calls of the kernel function
/// `bpf_cast_to_kern_ctx` (an eBPF `call` with source register 2: a kfunc), which the agent
/// replaces with the running kernel's id before loading: aya 0.14 does not relocate kfunc
/// calls. No kernel's BTF has this many types.
pub const KFUNC_ID_PLACEHOLDER: u32 = 0x4b46_4e43;

/// The eBPF instruction of such a call, as its eight bytes (little-endian): opcode
/// `BPF_JMP | BPF_CALL`, source register `BPF_PSEUDO_KFUNC_CALL` (2), offset 0 (vmlinux's
/// BTF), then the function's BTF id.
pub const fn kfunc_call(btf_id: u32) -> [u8; 8] {
    let id = btf_id.to_le_bytes();
    [0x85, 0x20, 0, 0, id[0], id[1], id[2], id[3]]
}
