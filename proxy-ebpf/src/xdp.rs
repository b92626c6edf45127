//! The XDP fast path on external interfaces: packets of masqueraded flows (a NodePort,
//! external or load-balancer IP balanced to another node's backend, and the replies) are
//! rewritten and sent back out from the driver, before any socket buffer exists. Everything
//! else passes to the stack and the tc programs, which share the conntrack.
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
    lb::{self, Dropped},
    nat::{self, Action, Translation},
    packet::{self, Endpoint, Flow, Frame, IP_TTL_OFF, Packet},
    route::{self, NextHop},
};

#[xdp]
pub fn proxy_xdp(ctx: XdpContext) -> u32 {
    // ICMP errors are translated by tc.
    let Some(Packet::Transport(flow)) = packet::parse(&ctx) else {
        return XDP_PASS;
    };
    let verdict = nat::ingress(&flow, (ctx.data_end() - ctx.data()) as u64);
    match verdict.action {
        Action::Translate => {
            let t = &verdict.translation;
            match t.route {
                true => forward(&ctx, &flow, t),
                false => None,
            }
            .unwrap_or_else(|| pass_to_tc(t))
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
        Action::Pass => nothing_for_us(&ctx),
        Action::Reject => XDP_PASS,
    }
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
fn pass_to_tc(t: &Translation) -> u32 {
    let conns = Counters {
        conns: t.counters.conns,
        packets: 0,
        bytes: 0,
    };
    lb::count(t.service_id, t.backend_id, conns);
    XDP_PASS
}

/// Rewrites a masqueraded flow's packet and sends it towards its next hop, or `None` to
/// leave it (untouched) to the stack and tc: while the neighbour is unresolved, or when its
/// TTL has run out (tc answers that).
#[inline(always)]
fn forward(ctx: &XdpContext, flow: &Flow, t: &Translation) -> Option<u32> {
    let src = if t.src.set { t.src.addr } else { flow.key.src };
    let dst = if t.dst.set { t.dst.addr } else { flow.key.dst };
    let ifindex = ctx.ingress_ifindex() as u32;
    let NextHop::Resolved { ifindex: out, macs } =
        route::lookup(ctx.ctx.cast(), ifindex, flow.key.proto, src, dst)?
    else {
        return None;
    };
    if ctx.read::<u8>(IP_TTL_OFF)? <= 1 {
        return None;
    }
    // The frame changes from here on: one that cannot be finished is dropped, not passed on
    // half-rewritten.
    let rewritten = packet::rewrite(ctx, flow, Endpoint::Destination, t.dst)
        .and_then(|()| packet::rewrite(ctx, flow, Endpoint::Source, t.src))
        .and_then(|()| route::to_next_hop::<[u8; 4], _>(ctx, Some(macs)));
    if rewritten.is_none() {
        return Some(XDP_DROP);
    }
    lb::count(t.service_id, t.backend_id, t.counters);
    Some(if out == ifindex {
        XDP_TX
    } else {
        // SAFETY: an interface index from the FIB.
        unsafe { bpf_redirect(out, 0) as u32 }
    })
}
