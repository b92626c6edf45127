//! What differs between IPv4 and IPv6 for the service lookup, the socket hooks and the
//! packet path: which maps hold the family's frontends, backends, node addresses, socket
//! translations and flows, and how a packet's address is rewritten. Everything else (slots,
//! ids, counters, affinity) is shared.
use aya_ebpf::{
    bindings::bpf_fib_lookup,
    btf_maps::{HashMap, LpmTrie, LruHashMap},
};
use proxy_common::{
    BackendOf, CtEntryOf, CtKeyOf, FragKey, FragKey6, FragPorts, NODE_PORT_ADDR, NODE_PORT_ADDR6,
    ServiceKeyOf, ServiceValue, SockRevKey, SockRevKey6, SockRevValueOf, SourceRangeOf,
    maps::{
        MAX_BACKENDS, MAX_FRAGMENTS, MAX_NODE_ADDRS, MAX_SERVICES, MAX_SOCK_REV_NAT,
        MAX_SOURCE_RANGES,
    },
    v4_mapped,
};

use crate::{
    ct::RecentFlows,
    frame::words_diff,
    maps::{
        BACKENDS, BACKENDS6, CONNTRACK, CONNTRACK6, FRAGMENTS, FRAGMENTS6, KEY_ROOM, KEY_ROOM6,
        NEW_ENTRIES, NEW_ENTRIES6, NO_PREALLOC, NODE_ADDRS, NODE_ADDRS6, NODE_CONFIG, NODE_CONFIG6,
        RECENT_FLOWS, RECENT_FLOWS6, SERVICES, SERVICES6, SOCK_REV_NAT, SOCK_REV_NAT6,
        SOURCE_RANGES, SOURCE_RANGES6,
    },
    nat::{KeyRoom, NewEntries},
    packet::{ETH_HDR_LEN, Frame, IP_DST_OFF, IP_SRC_OFF, IP6_HDR_LEN, RewriteOf},
};

/// An address family, as its address: `[u8; 4]` or `[u8; 16]`.
pub trait Family: Copy + Default + Sized + PartialEq + AsRef<[u8]> + 'static {
    /// The all-zero address; also the frontend address of a NodePort.
    const ZERO: Self;
    /// Offsets of the IP header's source and destination address in a frame.
    const SRC_OFF: usize;
    const DST_OFF: usize;
    /// Offset of the TTL (hop limit) in a frame.
    const TTL_OFF: usize;
    /// Whether the IP header has a checksum (IPv4's).
    const HEADER_CHECKSUM: bool;
    /// Offset of the IP header's length field in a frame, and what that length leaves out
    /// (IPv6's: its 40-byte header).
    const IP_LEN_OFF: usize;
    const IP_LEN_BASE: u16;
    /// The address family of a FIB lookup (`AF_INET`, `AF_INET6`).
    const AF: u8;
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

    // Conntrack (the maps differ in size, so they are reached through these).
    fn ct_get_ptr_mut(key: &CtKeyOf<Self>) -> Option<*mut CtEntryOf<Self>>;
    /// `Err`: the helper's error (negative errno).
    fn ct_insert(key: &CtKeyOf<Self>, entry: &CtEntryOf<Self>, flags: u64) -> Result<(), i32>;
    fn ct_remove(key: &CtKeyOf<Self>) -> bool;
    /// The last flows this CPU recorded (`ct::early_drop`'s candidates). `None` if the map
    /// cannot be read.
    fn recent_flows() -> Option<&'static mut RecentFlows<Self>>;

    /// A client address as session affinity remembers it.
    fn affinity_client(addr: Self) -> u64;
    /// The `loadBalancerSourceRanges` of the family's load-balancer frontends.
    fn source_ranges() -> &'static LpmTrie<SourceRangeOf<Self>, u8, { MAX_SOURCE_RANGES as usize }>;
    /// The address masqueraded flows leave with, if any.
    fn snat_addr() -> Option<Self>;
    /// Sets the source and destination of a FIB lookup.
    fn fib_addresses(params: &mut bpf_fib_lookup, src: Self, dst: Self);
    /// A key of the family's fragmented datagrams, and the map of their ports.
    type FragKey;
    fn fragment_key(src: Self, dst: Self, proto: u8, id: u32) -> Self::FragKey;
    fn fragments() -> &'static LruHashMap<Self::FragKey, FragPorts, { MAX_FRAGMENTS as usize }>;
    /// Room for a new flow's entries, in a per-CPU map: the packet path has no stack left
    /// for them (IPv6's take 152 bytes). `None` if the map cannot be read.
    fn new_entries() -> Option<&'static mut NewEntries<Self>>;
    /// This CPU's room for `nat::partner`'s keys.
    fn key_room() -> Option<&'static mut KeyRoom<Self>>;
    /// The packet's IP length, header included, as its header gives it.
    #[inline(always)]
    fn ip_len<F: Frame>(ctx: &F) -> Option<u16> {
        Some(u16::from_be(ctx.read(Self::IP_LEN_OFF)?).saturating_add(Self::IP_LEN_BASE))
    }
    /// Updates the checksums for the IP header's addresses changing by `addrs` and, if
    /// any, fields of the TCP or UDP segment (ports) by `fields` (`words_diff`s): the IPv4
    /// header's, and the TCP or UDP (ICMPv6) checksum at `csum_off`, whose pseudo-header
    /// holds the addresses.
    #[inline(always)]
    fn update_checksums<F: Frame>(
        ctx: &F,
        csum_off: usize,
        addrs: u32,
        fields: Option<u32>,
        udp: bool,
    ) -> Option<()> {
        ctx.update_l4_csum(csum_off, addrs, fields, udp, !Self::HEADER_CHECKSUM)?;
        if Self::HEADER_CHECKSUM {
            ctx.update_ip_csum_diff(addrs)?;
        }
        Some(())
    }
    /// Rewrites the address at `addr_off` from `old` to `new`, with the checksums
    /// (`update_checksums`). By reference: a copy of an address (align 1) is made a byte
    /// at a time, where the aligned originals are read in words.
    #[inline(always)]
    fn rewrite_address<F: Frame>(
        ctx: &F,
        addr_off: usize,
        old: &Self,
        new: &RewriteOf<Self>,
        csum_off: usize,
        udp: bool,
    ) -> Option<()> {
        Self::update_checksums(
            ctx,
            csum_off,
            words_diff(old.as_ref(), new.addr.as_ref()),
            None,
            udp,
        )?;
        new.write_address(ctx, addr_off)
    }
    /// Rewrites the address at `addr_off` of the IP header alone, with the header checksum
    /// (IPv4): a later fragment has no L4 header (its first fragment's L4 checksum covers the
    /// pseudo-header).
    #[inline(always)]
    fn rewrite_l3_address<F: Frame>(
        ctx: &F,
        addr_off: usize,
        old: &Self,
        new: &RewriteOf<Self>,
    ) -> Option<()> {
        if Self::HEADER_CHECKSUM {
            ctx.update_ip_csum_diff(words_diff(old.as_ref(), new.addr.as_ref()))?;
        }
        new.write_address(ctx, addr_off)
    }
    /// Rewrites the address at `addr_off` of an ICMP (ICMPv6) error's own header from `old`
    /// to `new`: the IPv4 header checksum follows, or the ICMPv6 checksum at
    /// `icmp_csum_off`, whose pseudo-header holds the address.
    fn rewrite_error_address<F: Frame>(
        ctx: &F,
        addr_off: usize,
        old: Self,
        new: &RewriteOf<Self>,
        icmp_csum_off: usize,
    ) -> Option<()>;
}

impl Family for [u8; 4] {
    const ZERO: Self = NODE_PORT_ADDR;
    const SRC_OFF: usize = IP_SRC_OFF;
    const DST_OFF: usize = IP_DST_OFF;
    const TTL_OFF: usize = ETH_HDR_LEN + 8;
    const HEADER_CHECKSUM: bool = true;
    const IP_LEN_OFF: usize = ETH_HDR_LEN + 2;
    const IP_LEN_BASE: u16 = 0;
    const AF: u8 = 2;
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

    #[inline(always)]
    fn ct_get_ptr_mut(key: &CtKeyOf<Self>) -> Option<*mut CtEntryOf<Self>> {
        CONNTRACK.get_ptr_mut(key)
    }
    #[inline(always)]
    fn ct_insert(key: &CtKeyOf<Self>, entry: &CtEntryOf<Self>, flags: u64) -> Result<(), i32> {
        CONNTRACK.insert(key, entry, flags)
    }
    #[inline(always)]
    fn ct_remove(key: &CtKeyOf<Self>) -> bool {
        CONNTRACK.remove(key).is_ok()
    }
    #[inline(always)]
    fn recent_flows() -> Option<&'static mut RecentFlows<Self>> {
        // SAFETY: a per-CPU value, this program's alone for its run.
        RECENT_FLOWS.get_ptr_mut(0).map(|r| unsafe { &mut *r })
    }

    #[inline(always)]
    fn affinity_client(addr: Self) -> u64 {
        u32::from_ne_bytes(addr) as u64
    }
    fn source_ranges() -> &'static LpmTrie<SourceRangeOf<Self>, u8, { MAX_SOURCE_RANGES as usize }>
    {
        &SOURCE_RANGES
    }
    #[inline(always)]
    fn snat_addr() -> Option<Self> {
        let addr = NODE_CONFIG.get(0)?.snat_addr;
        (addr != Self::ZERO).then_some(addr)
    }
    #[inline(always)]
    fn fib_addresses(params: &mut bpf_fib_lookup, src: Self, dst: Self) {
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    }
    type FragKey = FragKey;
    #[inline(always)]
    fn fragment_key(src: Self, dst: Self, proto: u8, id: u32) -> FragKey {
        FragKey {
            src,
            dst,
            id: id as u16,
            proto,
            pad: 0,
        }
    }
    fn fragments() -> &'static LruHashMap<FragKey, FragPorts, { MAX_FRAGMENTS as usize }> {
        &FRAGMENTS
    }
    #[inline(always)]
    fn new_entries() -> Option<&'static mut NewEntries<Self>> {
        // SAFETY: a per-CPU value, this program's alone for its run.
        NEW_ENTRIES.get_ptr_mut(0).map(|e| unsafe { &mut *e })
    }
    #[inline(always)]
    fn key_room() -> Option<&'static mut KeyRoom<Self>> {
        // SAFETY: a per-CPU value, this program's alone for its run.
        KEY_ROOM.get_ptr_mut(0).map(|r| unsafe { &mut *r })
    }

    #[inline(always)]
    fn rewrite_error_address<F: Frame>(
        ctx: &F,
        addr_off: usize,
        old: Self,
        new: &RewriteOf<Self>,
        _: usize,
    ) -> Option<()> {
        Self::rewrite_l3_address(ctx, addr_off, &old, new)
    }
}

impl Family for [u8; 16] {
    const ZERO: Self = NODE_PORT_ADDR6;
    const SRC_OFF: usize = ETH_HDR_LEN + 8;
    const DST_OFF: usize = ETH_HDR_LEN + 24;
    const TTL_OFF: usize = ETH_HDR_LEN + 7;
    const IP_LEN_OFF: usize = ETH_HDR_LEN + 4;
    const IP_LEN_BASE: u16 = IP6_HDR_LEN as u16;
    const HEADER_CHECKSUM: bool = false;
    const AF: u8 = 10;
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

    #[inline(always)]
    fn ct_get_ptr_mut(key: &CtKeyOf<Self>) -> Option<*mut CtEntryOf<Self>> {
        CONNTRACK6.get_ptr_mut(key)
    }
    #[inline(always)]
    fn ct_insert(key: &CtKeyOf<Self>, entry: &CtEntryOf<Self>, flags: u64) -> Result<(), i32> {
        CONNTRACK6.insert(key, entry, flags)
    }
    #[inline(always)]
    fn ct_remove(key: &CtKeyOf<Self>) -> bool {
        CONNTRACK6.remove(key).is_ok()
    }
    #[inline(always)]
    fn recent_flows() -> Option<&'static mut RecentFlows<Self>> {
        // SAFETY: a per-CPU value, this program's alone for its run.
        RECENT_FLOWS6.get_ptr_mut(0).map(|r| unsafe { &mut *r })
    }

    /// The address folded to 64 bits: two clients that fold alike share their stickiness,
    /// which affinity allows (it is a preference, not an isolation).
    #[inline(always)]
    fn affinity_client(addr: Self) -> u64 {
        let [a, b]: [[u8; 8]; 2] = [
            [
                addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
            ],
            [
                addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
            ],
        ];
        u64::from_ne_bytes(a) ^ u64::from_ne_bytes(b)
    }
    fn source_ranges() -> &'static LpmTrie<SourceRangeOf<Self>, u8, { MAX_SOURCE_RANGES as usize }>
    {
        &SOURCE_RANGES6
    }
    #[inline(always)]
    fn snat_addr() -> Option<Self> {
        let addr = NODE_CONFIG6.get(0)?.snat_addr;
        (addr != Self::ZERO).then_some(addr)
    }
    #[inline(always)]
    fn fib_addresses(params: &mut bpf_fib_lookup, src: Self, dst: Self) {
        let words = |a: Self| {
            core::array::from_fn(|i| {
                u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
            })
        };
        params.__bindgen_anon_3.ipv6_src = words(src);
        params.__bindgen_anon_4.ipv6_dst = words(dst);
    }
    type FragKey = FragKey6;
    #[inline(always)]
    fn fragment_key(src: Self, dst: Self, proto: u8, id: u32) -> FragKey6 {
        FragKey6 {
            src,
            dst,
            id,
            proto,
            pad: 0,
            pad2: 0,
        }
    }
    fn fragments() -> &'static LruHashMap<FragKey6, FragPorts, { MAX_FRAGMENTS as usize }> {
        &FRAGMENTS6
    }
    #[inline(always)]
    fn new_entries() -> Option<&'static mut NewEntries<Self>> {
        // SAFETY: a per-CPU value, this program's alone for its run.
        NEW_ENTRIES6.get_ptr_mut(0).map(|e| unsafe { &mut *e })
    }
    #[inline(always)]
    fn key_room() -> Option<&'static mut KeyRoom<Self>> {
        // SAFETY: a per-CPU value, this program's alone for its run.
        KEY_ROOM6.get_ptr_mut(0).map(|r| unsafe { &mut *r })
    }

    #[inline(always)]
    fn rewrite_error_address<F: Frame>(
        ctx: &F,
        addr_off: usize,
        old: Self,
        new: &RewriteOf<Self>,
        icmp_csum_off: usize,
    ) -> Option<()> {
        Self::rewrite_address(ctx, addr_off, &old, new, icmp_csum_off, false)
    }
}
