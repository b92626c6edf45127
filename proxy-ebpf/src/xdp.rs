//! The XDP fast path on external interfaces: packets of masqueraded flows (a NodePort,
//! external or load-balancer IP balanced to another node's backend, and the replies) are
//! rewritten and sent back out from the driver, before any socket buffer exists. Everything
//! else passes to the stack and the tc programs, which share the conntrack. IPv6 in a
//! program of its own (`proxy_xdp6`), for established flows.
//!
//! The rewrite is tc's (`packet::rewrite` over `Frame`); checksums are updated in the frame
//! (RFC 1624), which is right for frames from a wire; a locally generated frame on a
//! virtual device may carry a deferred (partial) checksum, which XDP cannot see.
use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::{bpf_redirect, bpf_xdp_adjust_meta},
    macros::xdp,
    programs::XdpContext,
};

use proxy_common::{Counters, HOOK_XDP, XDP_META_NOTHING_FOR_US, XdpMeta};

use crate::{
    family::Family,
    lb::{self, Dropped},
    maps::XDP_FORWARD6,
    nat::{self, Action, Translation},
    packet::{self, Flow, Flow6, FlowOf, Frame, IP_TTL_OFF, Packet},
    route::{self, NextHop},
};

/// Each family's path is a call of its own, with stack frames of its own, as on tc.
#[xdp]
pub fn proxy_xdp(ctx: XdpContext) -> u32 {
    match packet::is_ipv6(&ctx) {
        Some(true) => xdp6(&ctx),
        _ => xdp4(&ctx),
    }
}

#[inline(never)]
fn xdp4(ctx: &XdpContext) -> u32 {
    // ICMP errors are translated by tc.
    let Some(Packet::Transport(flow)) = packet::parse(ctx) else {
        return XDP_PASS;
    };
    let verdict = match nat::tracked_ingress(&flow, (ctx.data_end() - ctx.data()) as u64) {
        Some(verdict) => verdict,
        None => match nat::choose(&flow) {
            // A new flow is recorded by tc (as IPv6's): recording it here too would take
            // this program past its stack and the verifier's limit. What it would drop or
            // pass is decided here.
            nat::Choice::Chosen(_) => return XDP_PASS,
            nat::Choice::Done(verdict) => verdict,
        },
    };
    match verdict.action {
        Action::Translate => {
            let t = &verdict.translation;
            if !t.route {
                return pass_to_tc(t);
            }
            match next_hop(ctx, &flow, t) {
                Some(hop) => send(ctx, &flow, t, hop),
                // tc answers the packet, or sends it while the neighbour is unresolved.
                None => XDP_PASS,
            }
        }
        Action::Drop => {
            lb::count_drop(Dropped::packet(
                verdict.reason,
                verdict.service_id(),
                flow.key,
                HOOK_XDP,
            ));
            XDP_DROP
        }
        Action::Pass => nothing_for_us(ctx),
        Action::Reject => XDP_PASS,
    }
}

/// `proxy_xdp` for IPv6. Established flows only: a masqueraded one's packets are forwarded
/// from here; a new flow (a masquerade port claimed, its entries recorded, in subprograms
/// on tc) and anything else goes to tc, and its later packets take this path. Three
/// subprograms one after the other, handing on through a per-CPU map (`XDP_FORWARD6`):
/// the flow's translation, its next hop, the rewrite — in one, the frames passed 512 bytes.
#[inline(always)]
fn xdp6(ctx: &XdpContext) -> u32 {
    match tracked6(ctx) {
        FORWARD => match next_hop6(ctx) {
            FORWARD => send6(ctx),
            action => action,
        },
        action => action,
    }
}

/// `tracked6`'s and `next_hop6`'s answer when the packet goes on to the next step.
const FORWARD: u32 = u32::MAX;

/// A masqueraded IPv6 flow's packet as `proxy_xdp6`'s steps see it.
pub struct Forward6 {
    pub flow: Flow6,
    pub translation: Translation<[u8; 16]>,
    /// The packet's new source and destination.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub hop: Option<(u32, [u8; 12])>,
}

/// The per-CPU `Forward6`: the program runs on one CPU from start to end.
#[inline(always)]
fn forward6() -> Option<&'static mut Forward6> {
    // SAFETY: a per-CPU value, this program's alone for its run.
    XDP_FORWARD6.get_ptr_mut(0).map(|f| unsafe { &mut *f })
}

/// The first step: the flow's translation, if it is a tracked, masqueraded one.
#[inline(never)]
fn tracked6(ctx: &XdpContext) -> u32 {
    let Some(flow) = packet::parse6(ctx) else {
        return XDP_PASS;
    };
    let Some(verdict) = nat::tracked_ingress(&flow, (ctx.data_end() - ctx.data()) as u64) else {
        return XDP_PASS;
    };
    let t = verdict.translation;
    match verdict.action {
        Action::Translate if t.route => match forward6() {
            Some(f) => {
                (f.src, f.dst) = t.ends(&flow.key);
                f.flow = flow;
                f.translation = t;
                FORWARD
            }
            None => pass_to_tc(&t),
        },
        Action::Translate => pass_to_tc(&t),
        Action::Pass => nothing_for_us(ctx),
        Action::Drop | Action::Reject => XDP_PASS,
    }
}

/// The second step: the next hop of the translated packet.
#[inline(never)]
fn next_hop6(ctx: &XdpContext) -> u32 {
    let Some(f) = forward6() else {
        return XDP_PASS;
    };
    let ifindex = ctx.ingress_ifindex() as u32;
    // Its length too: one larger than the next hop's MTU goes to tc, which answers it.
    let len = <[u8; 16]>::ip_len(ctx).unwrap_or(u16::MAX);
    let hop = route::lookup(
        ctx.ctx.cast(),
        ifindex,
        f.flow.key.proto,
        (f.src, f.dst),
        len,
    );
    f.hop = match hop {
        Ok(NextHop::Resolved { ifindex, macs }) => Some((ifindex, macs)),
        _ => None,
    };
    match f.hop.is_some()
        && ctx
            .read::<u8>(<[u8; 16]>::TTL_OFF)
            .is_some_and(|hop| hop > 1)
    {
        true => FORWARD,
        false => pass_to_tc(&f.translation),
    }
}

/// The last step: the packet rewritten and sent to its next hop.
#[inline(never)]
fn send6(ctx: &XdpContext) -> u32 {
    let Some(Forward6 {
        flow,
        translation,
        hop: Some(hop),
        ..
    }) = forward6()
    else {
        return XDP_PASS;
    };
    let Some(flow) = flow.bounded() else {
        return XDP_PASS;
    };
    send(ctx, &flow, translation, *hop)
}

/// Passes a packet that has nothing of ours, saying so to tc ingress (XDP metadata), which
/// would look it up in the same maps again: on a node with XDP, the traffic it does not
/// translate (e.g. to its own pods) would pay for both programs.
#[inline(always)]
fn nothing_for_us(ctx: &XdpContext) -> u32 {
    let len = size_of::<XdpMeta>();
    // SAFETY: valid context; on success the metadata area before the frame is `len` long.
    if unsafe { bpf_xdp_adjust_meta(ctx.as_ptr().cast(), -(len as i32)) } == 0 {
        let meta = ctx.metadata();
        // The verifier wants the bound checked against the frame's start.
        if meta + len <= ctx.data() {
            // SAFETY: checked just above.
            unsafe {
                *(meta as *mut XdpMeta) = XdpMeta {
                    magic: XDP_META_NOTHING_FOR_US,
                    ifindex: ctx.ingress_ifindex() as u32,
                }
            };
        }
    }
    XDP_PASS
}

/// Passes everything: the far end of a test "wire" (the test world's `testbed/wire.rs`),
/// whose veth must run an XDP program for frames sent to it from XDP to be received.
#[xdp]
pub fn proxy_wire_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// Leaves a translated packet to the tc program, which finds its conntrack entry (made by
/// this run if the flow is new) and counts the packet; a new connection is counted here,
/// as tc sees an already tracked flow.
#[inline(always)]
fn pass_to_tc<A>(t: &Translation<A>) -> u32 {
    let conns = Counters {
        conns: t.counters.conns,
        packets: 0,
        bytes: 0,
    };
    lb::count(t.service_id, t.backend_id, conns);
    XDP_PASS
}

/// The next hop (interface, MACs) of a masqueraded flow's packet once translated, or
/// `None` to leave it (untouched) to the stack and tc: while the neighbour is unresolved,
/// when its TTL has run out or it is too large for the next hop (tc answers those).
#[inline(always)]
fn next_hop(ctx: &XdpContext, flow: &Flow, t: &Translation) -> Option<(u32, [u8; 12])> {
    let (src, dst) = t.ends(&flow.key);
    let ifindex = ctx.ingress_ifindex() as u32;
    // Its length too: one larger than the next hop's MTU goes to tc, which answers it.
    let len = <[u8; 4]>::ip_len(ctx)?;
    let Ok(NextHop::Resolved { ifindex: out, macs }) =
        route::lookup(ctx.ctx.cast(), ifindex, flow.key.proto, (src, dst), len)
    else {
        return None;
    };
    (ctx.read::<u8>(IP_TTL_OFF)? > 1).then_some((out, macs))
}

/// Rewrites a masqueraded flow's packet and sends it to its next hop `(out, macs)`.
#[inline(always)]
fn send<A: Family>(
    ctx: &XdpContext,
    flow: &FlowOf<A>,
    t: &Translation<A>,
    (out, macs): (u32, [u8; 12]),
) -> u32 {
    // The frame changes from here on: one that cannot be finished is dropped, not passed on
    // half-rewritten.
    let rewritten = packet::rewrite(ctx, flow, &t.src, &t.dst)
        .and_then(|()| route::to_next_hop::<A, _>(ctx, Some(macs)));
    if rewritten.is_none() {
        return XDP_DROP;
    }
    lb::count(t.service_id, t.backend_id, t.counters);
    if out == ctx.ingress_ifindex() as u32 {
        XDP_TX
    } else {
        // SAFETY: an interface index from the FIB.
        unsafe { bpf_redirect(out, 0) as u32 }
    }
}
