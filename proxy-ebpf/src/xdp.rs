//! The XDP fast path on external interfaces: packets of masqueraded flows (a NodePort,
//! external or load-balancer IP balanced to another node's backend, and the replies) are
//! rewritten and sent back out from the driver, before any socket buffer exists. Everything
//! else passes to the stack and the tc programs, which share the conntrack.
//!
//! Checksums are updated in the packet (RFC 1624), which is right for frames from a wire;
//! a locally generated frame on a virtual device may carry a deferred (partial) checksum,
//! which XDP cannot see.
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::{bpf_redirect, bpf_xdp_store_bytes},
    macros::xdp,
    programs::XdpContext,
};

use proxy_common::Counters;

use crate::{
    lb,
    nat::{self, Translation, Verdict},
    packet::{
        self, Endpoint, Flow, Frame, IP_CSUM_OFF, IP_TTL_OFF, Packet, Rewrite, replace16, replace32,
    },
    route::{self, NextHop},
};

#[xdp]
pub fn proxy_xdp(ctx: XdpContext) -> u32 {
    // ICMP errors are translated by tc.
    let Some(Packet::Transport(flow)) = packet::parse(&ctx) else {
        return XDP_PASS;
    };
    match nat::ingress(&flow, (ctx.data_end() - ctx.data()) as u64) {
        Verdict::Translate(t) => match t.route {
            true => forward(&ctx, &flow, &t),
            false => None,
        }
        .unwrap_or_else(|| pass_to_tc(&t)),
        Verdict::Drop(reason) => {
            lb::count_drop(reason);
            XDP_DROP
        }
        Verdict::Pass | Verdict::Reject => XDP_PASS,
    }
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

/// Writes `value` at `offset` of the frame.
#[inline(always)]
fn store<T>(ctx: &XdpContext, offset: usize, value: &T) -> Option<()> {
    // SAFETY: the helper reads size_of::<T>() bytes from `value` and bounds-checks the frame.
    let ret = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx.cast(),
            offset as u32,
            (value as *const T).cast_mut().cast(),
            core::mem::size_of::<T>() as u32,
        )
    };
    (ret == 0).then_some(())
}

/// Rewrites one end of the packet, with the IP and L4 checksums. Both checksums are read
/// before anything is written, so a failure leaves the frame as it was.
#[inline(always)]
fn rewrite(ctx: &XdpContext, flow: &Flow, which: Endpoint, to: Rewrite) -> Option<()> {
    if !to.set {
        return Some(());
    }
    let (addr_off, port_off, old_addr, old_port) = flow.endpoint(which);
    let ip_csum: u16 = ctx.read(IP_CSUM_OFF)?;
    let l4_csum: u16 = ctx.read(flow.l4_csum_off())?;
    store(ctx, IP_CSUM_OFF, &replace32(ip_csum, old_addr, to.addr))?;
    // A zero UDP checksum means "none" and stays so.
    if flow.is_tcp() || l4_csum != 0 {
        let mut csum = replace32(l4_csum, old_addr, to.addr);
        csum = replace16(csum, old_port.to_be(), to.port.to_be());
        // A UDP checksum that computes to zero is sent as all ones.
        if !flow.is_tcp() && csum == 0 {
            csum = 0xffff;
        }
        store(ctx, flow.l4_csum_off(), &csum)?;
    }
    store(ctx, addr_off, &to.addr)?;
    store(ctx, port_off, &to.port.to_be())
}

/// Rewrites a masqueraded flow's packet and sends it towards its next hop, or `None` to
/// leave it (untouched) to the stack and tc, e.g. while the neighbour is unresolved.
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
    // TTL and protocol share a 16-bit word of the header checksum.
    let word: u16 = ctx.read(IP_TTL_OFF)?;
    if u16::from_be(word) >> 8 <= 1 {
        return None;
    }
    rewrite(ctx, flow, Endpoint::Destination, t.dst)?;
    rewrite(ctx, flow, Endpoint::Source, t.src)?;
    let decremented = (u16::from_be(word) - 0x0100).to_be();
    let ip_csum: u16 = ctx.read(IP_CSUM_OFF)?;
    store(ctx, IP_CSUM_OFF, &replace16(ip_csum, word, decremented))?;
    store(ctx, IP_TTL_OFF, &decremented)?;
    store(ctx, 0, &macs)?;
    lb::count(t.service_id, t.backend_id, t.counters);
    Some(if out == ifindex {
        XDP_TX
    } else {
        // SAFETY: an interface index from the FIB.
        unsafe { bpf_redirect(out, 0) as u32 }
    })
}
