//! Forwarding a rewritten packet ourselves: a FIB lookup for its new addresses gives the
//! egress interface and next-hop MAC, and the packet is redirected there. Used for
//! masqueraded flows, whose packets the kernel's own forwarding would drop as martians.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        TC_ACT_SHOT, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use proxy_common::{CtKeyOf, DropReason, HOOK_TC};

use crate::{
    family::Family,
    lb::{self, Dropped, EventFlow},
    packet::Frame,
};

/// Where a packet goes next.
#[derive(Clone, Copy)]
pub enum NextHop {
    /// Out of `ifindex`, with these MAC addresses.
    Resolved { ifindex: u32, macs: [u8; 12] },
    /// Out of `ifindex`; the neighbour is not resolved yet.
    Unresolved { ifindex: u32 },
}

/// Why a packet cannot be routed.
#[derive(Clone, Copy)]
pub enum Unroutable {
    NoRoute,
    /// It is larger than the MTU (`mtu`) of the interface it would leave by.
    TooBig {
        mtu: u16,
    },
}

/// The route of a packet from `src` to `dst` that arrived on `ifindex`, and whether a
/// packet of IP length `ip_len` fits the MTU on the way (0: none is too big). XDP's lookup
/// checks the MTU against that length alone; a socket buffer's, given 0, checks the packet
/// itself (`lookup_tc`).
#[inline(always)]
pub fn lookup<A: Family>(
    ctx: *mut core::ffi::c_void,
    ifindex: u32,
    proto: u8,
    (src, dst): (A, A),
    ip_len: u16,
) -> Result<NextHop, Unroutable> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = A::AF;
    params.l4_protocol = proto;
    params.ifindex = ifindex;
    params.__bindgen_anon_1.tot_len = ip_len;
    A::fib_addresses(&mut params, src, dst);
    // SAFETY: params is a valid, initialised request of the size passed.
    let ret = unsafe {
        fib_lookup(
            ctx,
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    match ret {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&params.dmac);
            macs[6..].copy_from_slice(&params.smac);
            Ok(NextHop::Resolved {
                ifindex: params.ifindex,
                macs,
            })
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok(NextHop::Unresolved {
            ifindex: params.ifindex,
        }),
        // SAFETY: the lookup wrote the MTU over the length it was given.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Unroutable::TooBig {
            mtu: unsafe { params.__bindgen_anon_1.mtu_result },
        }),
        _ => Err(Unroutable::NoRoute),
    }
}

/// Readies a packet for its next hop as the kernel's forwarding would: TTL (hop limit)
/// decremented (`None`, untouched, when it has run out) and, when known, the next hop's
/// MACs.
#[inline(always)]
pub fn to_next_hop<A: Family, F: Frame>(ctx: &F, macs: Option<[u8; 12]>) -> Option<()> {
    if A::HEADER_CHECKSUM {
        // TTL and protocol share a 16-bit word of the header checksum.
        let word: u16 = ctx.read(A::TTL_OFF)?;
        if u16::from_be(word) >> 8 <= 1 {
            return None;
        }
        let decremented = (u16::from_be(word) - 0x0100).to_be();
        ctx.update_ip_csum16(word, decremented)?;
        ctx.write(A::TTL_OFF, &decremented)?;
    } else {
        let hop_limit: u8 = ctx.read(A::TTL_OFF)?;
        if hop_limit <= 1 {
            return None;
        }
        ctx.write(A::TTL_OFF, &(hop_limit - 1))?;
    }
    match macs {
        Some(macs) => ctx.write(0, &macs),
        None => Some(()),
    }
}

/// What a packet this program routed carries in its `tc_index` to the tc egress program of
/// the interface it leaves by, which then has nothing to do with it (a masqueraded flow's
/// packet is translated in full on arrival). XDP's redirects skip tc egress altogether; this
/// spares tc's the same lookup (140 ns a packet on the node-port benchmark's node). A value
/// rather than a bit, and cleared there: the field is otherwise unused on today's kernels
/// (the qdiscs that read it are gone), and it is not ours.
pub const ROUTED_TC_INDEX: u32 = 0x7072;

/// Whether a packet leaving carries `ROUTED_TC_INDEX`, which is cleared: it was routed by
/// the tc ingress program and needs nothing more.
#[inline(always)]
pub fn routed_here(ctx: &TcContext) -> bool {
    // SAFETY: valid context; `tc_index` is readable and writable from tc.
    unsafe {
        let skb = ctx.skb.skb;
        if (*skb).tc_index != ROUTED_TC_INDEX {
            return false;
        }
        (*skb).tc_index = 0;
    }
    true
}

/// Counts a packet we route that cannot go on (no route, its TTL run out, too large for the
/// next hop without fragmenting), as translated (`src`, `dst`) and without ports: the route
/// is for the packet as it leaves.
#[inline(always)]
pub fn no_route<A: Family>(src: A, dst: A, proto: u8, service_id: u32) -> i32
where
    CtKeyOf<A>: EventFlow,
{
    let flow = CtKeyOf {
        src,
        dst,
        sport: 0,
        dport: 0,
        proto,
        kind: proxy_common::CT_KEY_TUPLE,
        pad: 0,
    };
    lb::count_drop(Dropped::packet(
        DropReason::NoRoute,
        service_id,
        flow,
        HOOK_TC,
    ));
    TC_ACT_SHOT
}

/// The route of a packet that arrived on this context's interface, from `src` to `dst`.
/// `segment_len`: for a GSO packet, the IP length of the packets it leaves as, which the MTU
/// is checked against (the socket buffer's lookup counts a GSO packet as fitting any MTU,
/// where the kernel's forwarding checks its segments); 0 for any other.
#[inline(always)]
pub fn lookup_tc<A: Family>(
    ctx: &TcContext,
    proto: u8,
    ends: (A, A),
    segment_len: u16,
) -> Result<NextHop, Unroutable> {
    // SAFETY: valid context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    lookup(ctx.skb.skb.cast(), ifindex, proto, ends, segment_len)
}

/// Sends a rewritten packet on towards its new destination, as the kernel's forwarding
/// would: a later fragment, an ICMP error, an IPv6 packet (whose path has no stack left to
/// look the route up before the rewrite). One too large for the next hop is dropped
/// (`no_route`).
#[inline(always)]
pub fn forward<A: Family>(ctx: &TcContext, proto: u8, service_id: u32) -> Option<i32>
where
    CtKeyOf<A>: EventFlow,
{
    let src: A = ctx.read(A::SRC_OFF)?;
    let dst: A = ctx.read(A::DST_OFF)?;
    Some(match lookup_tc(ctx, proto, (src, dst), 0) {
        Ok(hop) => send::<A>(ctx, hop, proto, service_id),
        Err(_) => no_route(src, dst, proto, service_id),
    })
}

/// Sends a rewritten packet to `hop`, its TTL (hop limit) decremented; drops it
/// (`no_route`) if that has run out.
#[inline(always)]
pub fn send<A: Family>(ctx: &TcContext, hop: NextHop, proto: u8, service_id: u32) -> i32
where
    CtKeyOf<A>: EventFlow,
{
    let macs = match hop {
        NextHop::Resolved { macs, .. } => Some(macs),
        NextHop::Unresolved { .. } => None,
    };
    if to_next_hop::<A, _>(ctx, macs).is_none() {
        let src: A = ctx.read(A::SRC_OFF).unwrap_or(A::ZERO);
        let dst: A = ctx.read(A::DST_OFF).unwrap_or(A::ZERO);
        return no_route(src, dst, proto, service_id);
    }
    // SAFETY: valid context; then an interface index from the FIB.
    unsafe { (*ctx.skb.skb).tc_index = ROUTED_TC_INDEX };
    match hop {
        NextHop::Resolved { ifindex, .. } => unsafe { bpf_redirect(ifindex, 0) as i32 },
        NextHop::Unresolved { ifindex } => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
    }
}
