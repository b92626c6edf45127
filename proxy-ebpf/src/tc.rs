//! Packet-level service NAT on the interfaces the agent serves (external traffic to
//! NodePorts, external and load-balancer IPs; pods outside the hooked cgroup): ingress
//! translates new and tracked flows, egress reverse-translates the replies that leave.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{DropReason, FragKey, HOOK_TC, XDP_META_NOTHING_FOR_US, XdpMeta};

use crate::{
    icmp,
    lb::{self, Dropped},
    nat::{self, Side, Translation, Verdict},
    packet::{
        self, Endpoint, ErrorTranslation, Flow, Frame, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH,
        ICMP_TIME_EXCEEDED, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, IPPROTO_ICMP, IcmpError, Packet,
    },
    route,
};

#[classifier]
pub fn proxy_ingress(ctx: TcContext) -> i32 {
    if xdp_found_nothing(&ctx) {
        return TC_ACT_OK;
    }
    run(&ctx, Side::Ingress)
}

/// Whether the XDP program of this interface passed the packet as having nothing of ours
/// (`XdpMeta`); without XDP there is no metadata.
#[inline(always)]
fn xdp_found_nothing(ctx: &TcContext) -> bool {
    // SAFETY: valid context.
    let (meta, data, ifindex) = unsafe {
        let skb = ctx.skb.skb;
        (
            (*skb).data_meta as usize,
            ctx.data(),
            (*skb).ingress_ifindex,
        )
    };
    if meta + size_of::<XdpMeta>() > data {
        return false;
    }
    // SAFETY: the bound is checked against the frame's start, as the verifier wants.
    let mark = unsafe { *(meta as *const XdpMeta) };
    mark.magic == XDP_META_NOTHING_FOR_US && mark.ifindex == ifindex
}

#[classifier]
pub fn proxy_egress(ctx: TcContext) -> i32 {
    run(&ctx, Side::Egress)
}

/// Does nothing: the baseline the benchmark compares the NAT programs' per-packet cost with.
#[classifier]
pub fn proxy_bench_baseline(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// A packet the program began to change and could not finish is dropped: half-rewritten,
/// it would carry a wrong checksum or address.
#[inline(always)]
fn run(ctx: &TcContext, side: Side) -> i32 {
    match packet::parse(ctx) {
        Some(Packet::Transport(flow)) => {
            let len = ctx.len() as u64;
            let verdict = match side {
                Side::Ingress => nat::ingress(&flow, len),
                Side::Egress => nat::egress(&flow, len),
            };
            apply(ctx, &flow, verdict)
        }
        Some(Packet::Fragment(frag)) => match nat::fragment(&frag, ctx.len() as u64, side) {
            Some(t) => translate_fragment(ctx, &frag, t),
            None => Some(TC_ACT_OK),
        },
        Some(Packet::IcmpError(error)) => match nat::icmp_error(&error.quoted, error.src, side) {
            Some(t) => translate_error(ctx, &error, &t),
            None => Some(TC_ACT_OK),
        },
        None => Some(TC_ACT_OK),
    }
    .unwrap_or(TC_ACT_SHOT)
}

#[inline(always)]
fn apply(ctx: &TcContext, flow: &Flow, verdict: Verdict) -> Option<i32> {
    match verdict {
        Verdict::Pass => Some(TC_ACT_OK),
        Verdict::Drop(reason, service_id) => {
            lb::count_drop(Dropped::packet(reason, service_id, flow.key, HOOK_TC));
            Some(TC_ACT_SHOT)
        }
        Verdict::Reject(service_id) => {
            lb::count_drop(Dropped::packet(
                DropReason::NoEndpoints,
                service_id,
                flow.key,
                HOOK_TC,
            ));
            answer(ctx, flow, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH)
        }
        Verdict::Translate(t) => {
            // A packet we would route ourselves whose TTL runs out here gets the answer a
            // router gives (traceroute through a masqueraded node port), quoting it as the
            // client sent it.
            if t.route && ctx.read::<u8>(IP_TTL_OFF)? <= 1 {
                return answer(ctx, flow, ICMP_TIME_EXCEEDED, 0);
            }
            lb::count(t.service_id, t.backend_id, t.counters);
            packet::rewrite(ctx, flow, Endpoint::Destination, t.dst)?;
            packet::rewrite(ctx, flow, Endpoint::Source, t.src)?;
            sent_on(ctx, t.route, flow.key.proto, t.service_id)
        }
    }
}

/// Turns the packet into an ICMP error back to its sender, out of the interface it came in on.
#[inline(always)]
fn answer(ctx: &TcContext, flow: &Flow, kind: u8, code: u8) -> Option<i32> {
    icmp::into_icmp_error(ctx, flow, kind, code).ok()?;
    // SAFETY: valid context.
    Some(unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) } as i32)
}

#[inline(always)]
fn translate_fragment(ctx: &TcContext, frag: &FragKey, t: Translation) -> Option<i32> {
    lb::count(t.service_id, t.backend_id, t.counters);
    if t.dst.set {
        packet::rewrite_address(ctx, IP_DST_OFF, frag.dst, t.dst.addr)?;
    }
    if t.src.set {
        packet::rewrite_address(ctx, IP_SRC_OFF, frag.src, t.src.addr)?;
    }
    sent_on(ctx, t.route, frag.proto, t.service_id)
}

#[inline(always)]
fn translate_error(ctx: &TcContext, error: &IcmpError, t: &ErrorTranslation) -> Option<i32> {
    icmp::rewrite_icmp_error(ctx, error, t).ok()?;
    sent_on(ctx, t.route, IPPROTO_ICMP, 0)
}

/// A translated packet goes on: routed by us (masqueraded), or left to the kernel.
#[inline(always)]
fn sent_on(ctx: &TcContext, route: bool, proto: u8, service_id: u32) -> Option<i32> {
    if route {
        route::forward(ctx, proto, service_id)
    } else {
        Some(TC_ACT_OK)
    }
}
