//! What differs between IPv4 and IPv6 for the service lookup and the socket hooks: which
//! maps hold the family's frontends, backends, node addresses and socket translations.
//! Everything else (slots, ids, counters, affinity) is shared.
use aya_ebpf::btf_maps::{HashMap, LruHashMap};
use proxy_common::{
    BackendOf, NODE_PORT_ADDR, NODE_PORT_ADDR6, ServiceKeyOf, ServiceValue, SockRevKey,
    SockRevKey6, SockRevValueOf,
    maps::{MAX_BACKENDS, MAX_NODE_ADDRS, MAX_SERVICES, MAX_SOCK_REV_NAT},
    v4_mapped,
};

use crate::maps::{
    BACKENDS, BACKENDS6, NO_PREALLOC, NODE_ADDRS, NODE_ADDRS6, SERVICES, SERVICES6, SOCK_REV_NAT,
    SOCK_REV_NAT6,
};

/// An address family, as its address: `[u8; 4]` or `[u8; 16]`.
pub trait Family: Copy + Sized + 'static {
    /// The frontend address of a NodePort.
    const NODE_PORT: Self;
    /// A key of the family's socket translations (cookie, backend address and port).
    type SockRev: Copy;

    fn services()
    -> &'static HashMap<ServiceKeyOf<Self>, ServiceValue, { MAX_SERVICES as usize }, NO_PREALLOC>;
    fn backends() -> &'static HashMap<u32, BackendOf<Self>, { MAX_BACKENDS as usize }, NO_PREALLOC>;
    fn node_addrs() -> &'static HashMap<Self, u32, { MAX_NODE_ADDRS as usize }>;
    fn sock_rev_nat()
    -> &'static LruHashMap<Self::SockRev, SockRevValueOf<Self>, { MAX_SOCK_REV_NAT as usize }>;
    fn sock_rev_key(cookie: u64, addr: Self, port: u16) -> Self::SockRev;
    /// As a `DropFlow` holds it.
    fn to_drop_flow(self) -> [u8; 16];
}

impl Family for [u8; 4] {
    const NODE_PORT: Self = NODE_PORT_ADDR;
    type SockRev = SockRevKey;

    fn services()
    -> &'static HashMap<ServiceKeyOf<Self>, ServiceValue, { MAX_SERVICES as usize }, NO_PREALLOC>
    {
        &SERVICES
    }
    fn backends() -> &'static HashMap<u32, BackendOf<Self>, { MAX_BACKENDS as usize }, NO_PREALLOC>
    {
        &BACKENDS
    }
    fn node_addrs() -> &'static HashMap<Self, u32, { MAX_NODE_ADDRS as usize }> {
        &NODE_ADDRS
    }
    fn sock_rev_nat()
    -> &'static LruHashMap<Self::SockRev, SockRevValueOf<Self>, { MAX_SOCK_REV_NAT as usize }> {
        &SOCK_REV_NAT
    }
    fn sock_rev_key(cookie: u64, addr: Self, port: u16) -> SockRevKey {
        SockRevKey {
            cookie,
            addr,
            port,
            pad: 0,
        }
    }
    fn to_drop_flow(self) -> [u8; 16] {
        v4_mapped(self)
    }
}

impl Family for [u8; 16] {
    const NODE_PORT: Self = NODE_PORT_ADDR6;
    type SockRev = SockRevKey6;

    fn services()
    -> &'static HashMap<ServiceKeyOf<Self>, ServiceValue, { MAX_SERVICES as usize }, NO_PREALLOC>
    {
        &SERVICES6
    }
    fn backends() -> &'static HashMap<u32, BackendOf<Self>, { MAX_BACKENDS as usize }, NO_PREALLOC>
    {
        &BACKENDS6
    }
    fn node_addrs() -> &'static HashMap<Self, u32, { MAX_NODE_ADDRS as usize }> {
        &NODE_ADDRS6
    }
    fn sock_rev_nat()
    -> &'static LruHashMap<Self::SockRev, SockRevValueOf<Self>, { MAX_SOCK_REV_NAT as usize }> {
        &SOCK_REV_NAT6
    }
    fn sock_rev_key(cookie: u64, addr: Self, port: u16) -> SockRevKey6 {
        SockRevKey6 {
            cookie,
            addr,
            port,
            pad: 0,
            pad2: 0,
        }
    }
    fn to_drop_flow(self) -> [u8; 16] {
        self
    }
}
