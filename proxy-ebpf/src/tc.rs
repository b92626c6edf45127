//! Packet-level service NAT on the interfaces the agent serves (external traffic to
//! NodePorts, external and load-balancer IPs; pods outside the hooked cgroup): ingress
//! translates new and tracked flows, egress reverse-translates the replies that leave.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{DropReason, HOOK_TC, ServiceValue, XDP_META_NOTHING_FOR_US, XdpMeta};

use crate::{
    family::Family,
    icmp,
    lb::{self, Dropped, EventFlow},
    maps::NEW_FLOW6,
    nat::{self, Action, Side, Translation, Verdict},
    packet::{
        self, ErrorTranslationOf, Flow, Flow6, FlowOf, FragmentOf, Frame, ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH, ICMP_TIME_EXCEEDED, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH,
        ICMPV6_TIME_EXCEEDED, IPPROTO_ICMP, IPPROTO_ICMPV6, IcmpErrorOf, Packet,
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
    // SAFETY: the bound is checked against the frame's start, as the verifier wants. Read
    // in place, field by field: a copy would give this program a stack frame of its own,
    // on top of each family's.
    let mark = meta as *const XdpMeta;
    unsafe { (*mark).magic == XDP_META_NOTHING_FOR_US && (*mark).ifindex == ifindex }
}

#[classifier]
pub fn proxy_egress(ctx: TcContext) -> i32 {
    if route::routed_here(&ctx) {
        return TC_ACT_OK;
    }
    run(&ctx, Side::Egress)
}

/// Does nothing: the baseline the benchmark compares the NAT programs' per-packet cost with.
#[classifier]
pub fn proxy_bench_baseline(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Each family's path is a call of its own (`run4`, `run6`'s subprograms), with stack frames
/// of its own. IPv6 was once a program of its own, tail-called here, when one program's
/// million verified instructions did not cover both families; they take ~190,000 together
/// now, and the tail call cost an IPv6 packet 7 ns (repeat mode, 159 to 152 ns).
#[inline(always)]
fn run(ctx: &TcContext, side: Side) -> i32 {
    match packet::is_ipv6(ctx) {
        Some(true) => run6(ctx, side),
        Some(false) => run4(ctx, side),
        None => TC_ACT_OK,
    }
}

/// IPv4 and IPv6 have functions of their own (BPF subprograms, each with its own stack
/// frame): together, they would not fit the 512-byte stack. IPv6's tracked flows, new
/// flows, later fragments and ICMPv6 errors are calls one after the other, for the same reason: one calling
/// the other would add their frames up. A packet a function began to change and could not
/// finish is dropped: half-rewritten, it would carry a wrong checksum or address.
#[inline(always)]
fn run6(ctx: &TcContext, side: Side) -> i32 {
    let action = match tracked6(ctx, side) {
        NEW_FLOW => match choose6(ctx) {
            CHOSEN => record6(ctx),
            action => action,
        },
        NOT_A_FLOW => match fragment6(ctx, side) {
            NOT_A_FRAGMENT => error6(ctx, side),
            action => action,
        },
        action => action,
    };
    match action {
        HOP_LIMIT_EXPIRED => expired6(ctx),
        routed if routed >= ROUTE => routed6(ctx, routed),
        action => action,
    }
}

/// `tracked6`'s answer for a packet that `choose6` and `record6` must see: a new flow.
const NEW_FLOW: i32 = i32::MIN;
/// `tracked6`'s answer for a packet that is no TCP or UDP flow's: `fragment6`'s or
/// `error6`'s, maybe.
const NOT_A_FLOW: i32 = i32::MIN + 1;
/// `fragment6`'s answer for a packet that is not a later fragment.
const NOT_A_FRAGMENT: i32 = i32::MIN + 2;
/// `choose6`'s answer for a new flow that `record6` must record.
const CHOSEN: i32 = i32::MIN + 3;
/// An IPv6 subprogram's answer for a packet to route whose hop limit ran out here, left
/// untouched: `expired6` answers it. Each of these answers distinct, none a tc action.
const HOP_LIMIT_EXPIRED: i32 = i32::MIN + 4;

/// A new IPv6 flow as `tracked6` hands it to `choose6` and `choose6` to `record6` (per CPU:
/// the program runs on one CPU from start to end), so that neither parses the packet,
/// reads the clock or looks the service port and backend up again.
pub struct NewFlow6 {
    flow: Flow6,
    now: u64,
    svc: ServiceValue,
    chosen: lb::Chosen<[u8; 16]>,
}

/// This CPU's `NewFlow6`.
#[inline(always)]
fn new_flow6() -> Option<&'static mut NewFlow6> {
    // SAFETY: a per-CPU value, this program's alone for its run.
    NEW_FLOW6.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// An IPv6 packet of a tracked flow (ingress), or any leaving one (egress).
#[inline(never)]
fn tracked6(ctx: &TcContext, side: Side) -> i32 {
    let Some(flow) = packet::parse6(ctx) else {
        return NOT_A_FLOW;
    };
    let len = ctx.len() as u64;
    let verdict = match side {
        Side::Ingress => {
            let now = lb::now_ns();
            match nat::tracked_ingress(&flow, len, now) {
                Some(verdict) => verdict,
                None => {
                    let Some(new) = new_flow6() else {
                        return TC_ACT_OK;
                    };
                    new.flow = flow;
                    new.now = now;
                    return NEW_FLOW;
                }
            }
        }
        Side::Egress => nat::egress(&flow, len),
    };
    apply(ctx, &flow, verdict).unwrap_or(TC_ACT_SHOT)
}

/// The first IPv6 packet of a flow, arriving: `nat::new_flow` in two halves (a frame of its
/// own is what each is for), handing on through `NewFlow6`. The first chooses the service
/// port and backend (`CHOSEN`), or, with nothing to record, answers the packet's tc action.
#[inline(never)]
fn choose6(ctx: &TcContext) -> i32 {
    let Some(new) = new_flow6() else {
        return TC_ACT_OK;
    };
    let Some(flow) = new.flow.bounded() else {
        return TC_ACT_OK;
    };
    match nat::choose(&flow, new.now) {
        nat::Choice::Chosen(svc, chosen) => {
            new.svc = svc;
            new.chosen = chosen;
            CHOSEN
        }
        nat::Choice::Done(verdict) => apply(ctx, &flow, verdict).unwrap_or(TC_ACT_SHOT),
    }
}

/// The second half: the flow recorded with the backend `choose6` picked.
#[inline(never)]
fn record6(ctx: &TcContext) -> i32 {
    let Some(new) = new_flow6() else {
        return TC_ACT_OK;
    };
    let Some(flow) = new.flow.bounded() else {
        return TC_ACT_OK;
    };
    let verdict = nat::record(&flow, ctx.len() as u64, new.now, &new.svc, &new.chosen);
    apply(ctx, &flow, verdict).unwrap_or(TC_ACT_SHOT)
}

/// A later fragment of an IPv6 datagram, translated as its first fragment's flow.
#[inline(never)]
fn fragment6(ctx: &TcContext, side: Side) -> i32 {
    let Some(frag) = packet::parse_fragment6(ctx) else {
        return NOT_A_FRAGMENT;
    };
    match nat::fragment(&frag, ctx.len() as u64, side) {
        Some(t) => translate_fragment(ctx, &frag, t).unwrap_or(TC_ACT_SHOT),
        None => TC_ACT_OK,
    }
}

/// An ICMPv6 error about a translated flow (packet too big above all: IPv6 routers do not
/// fragment), translated as `run4` translates ICMP's.
#[inline(never)]
fn error6(ctx: &TcContext, side: Side) -> i32 {
    let Some(error) = packet::parse_icmp6_error(ctx) else {
        return TC_ACT_OK;
    };
    match nat::icmp_error(&error.quoted, error.src, side) {
        Some(t) => translate_error(ctx, &error, &t, IPPROTO_ICMPV6).unwrap_or(TC_ACT_SHOT),
        None => TC_ACT_OK,
    }
}

#[inline(never)]
fn run4(ctx: &TcContext, side: Side) -> i32 {
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
            Some(t) => translate_error(ctx, &error, &t, IPPROTO_ICMP),
            None => Some(TC_ACT_OK),
        },
        None => Some(TC_ACT_OK),
    }
    .unwrap_or(TC_ACT_SHOT)
}

#[inline(always)]
fn apply<A: Routing>(ctx: &TcContext, flow: &FlowOf<A>, verdict: Verdict<A>) -> Option<i32>
where
    FlowOf<A>: Answer,
    proxy_common::CtKeyOf<A>: EventFlow + Copy,
{
    match verdict.action {
        Action::Pass => Some(TC_ACT_OK),
        Action::Drop => {
            lb::count_drop(Dropped::packet(
                verdict.reason,
                verdict.service_id(),
                flow.key,
                HOOK_TC,
            ));
            Some(TC_ACT_SHOT)
        }
        Action::Reject => {
            lb::count_drop(Dropped::packet(
                DropReason::NoEndpoints,
                verdict.service_id(),
                flow.key,
                HOOK_TC,
            ));
            flow.answer(ctx, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH)
        }
        Action::Translate => {
            let t = verdict.translation;
            // A packet we would route ourselves whose TTL runs out here gets the answer a
            // router gives (traceroute through a masqueraded node port), quoting it as the
            // client sent it.
            let route = t.route;
            if route && ctx.read::<u8>(A::TTL_OFF)? <= 1 {
                return Some(A::expired(ctx, flow));
            }
            lb::count(t.service_id, t.backend_id, t.counters);
            packet::rewrite(ctx, flow, &t.src, &t.dst)?;
            sent_on::<A>(ctx, route, flow.key.proto, t.service_id)
        }
    }
}

/// The ICMP error a flow's packet is turned into, back to its sender.
trait Answer {
    fn answer(&self, ctx: &TcContext, kind: u8, code: u8) -> Option<i32>;
}

/// Turns the packet into an ICMP error back to its sender, out of the interface it came in on.
impl Answer for Flow {
    #[inline(always)]
    fn answer(&self, ctx: &TcContext, kind: u8, code: u8) -> Option<i32> {
        icmp::into_icmp_error(ctx, self, kind, code).ok()?;
        Some(back_out(ctx))
    }
}

/// Sends the packet back out of the interface it came in on.
#[inline(always)]
fn back_out(ctx: &TcContext) -> i32 {
    // SAFETY: valid context.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}

/// The ICMPv6 error of the same meaning: destination unreachable / port unreachable, or
/// time exceeded in transit (hop limit).
impl Answer for packet::Flow6 {
    #[inline(always)]
    fn answer(&self, ctx: &TcContext, kind: u8, code: u8) -> Option<i32> {
        let (kind, code) = match (kind, code) {
            (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH) => (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH),
            (ICMP_TIME_EXCEEDED, 0) => (ICMPV6_TIME_EXCEEDED, 0),
            _ => return Some(TC_ACT_SHOT),
        };
        icmp::into_icmp6_error(ctx, self, kind, code).ok()?;
        Some(back_out(ctx))
    }
}

#[inline(always)]
fn translate_fragment<A: Routing>(
    ctx: &TcContext,
    frag: &FragmentOf<A>,
    t: Translation<A>,
) -> Option<i32> {
    lb::count(t.service_id, t.backend_id, t.counters);
    if t.dst.set {
        A::rewrite_l3_address(ctx, A::DST_OFF, &frag.dst, &t.dst)?;
    }
    if t.src.set {
        A::rewrite_l3_address(ctx, A::SRC_OFF, &frag.src, &t.src)?;
    }
    sent_on::<A>(ctx, t.route, frag.proto, t.service_id)
}

#[inline(always)]
fn translate_error<A: Routing + icmp::QuotedRewrite>(
    ctx: &TcContext,
    error: &IcmpErrorOf<A>,
    t: &ErrorTranslationOf<A>,
    proto: u8,
) -> Option<i32> {
    icmp::rewrite_icmp_error(ctx, error, t).ok()?;
    sent_on::<A>(ctx, t.route, proto, 0)
}

/// A translated packet goes on: routed by us (masqueraded), or left to the kernel.
#[inline(always)]
fn sent_on<A: Routing>(ctx: &TcContext, route: bool, proto: u8, service_id: u32) -> Option<i32> {
    if route {
        Some(A::route(ctx, proto, service_id))
    } else {
        Some(TC_ACT_OK)
    }
}

/// How a family's masqueraded packets are routed, and answered when their TTL (hop limit)
/// runs out here.
trait Routing: Family {
    fn route(ctx: &TcContext, proto: u8, service_id: u32) -> i32;
    /// Time exceeded back to the sender, quoting the packet as it came (untranslated).
    fn expired(ctx: &TcContext, flow: &FlowOf<Self>) -> i32;
}

/// In place: `run4` has the stack for the FIB request and the ICMP answer.
impl Routing for [u8; 4] {
    #[inline(always)]
    fn route(ctx: &TcContext, proto: u8, service_id: u32) -> i32 {
        route::forward::<Self>(ctx, proto, service_id).unwrap_or(TC_ACT_SHOT)
    }
    #[inline(always)]
    fn expired(ctx: &TcContext, flow: &Flow) -> i32 {
        flow.answer(ctx, ICMP_TIME_EXCEEDED, 0)
            .unwrap_or(TC_ACT_SHOT)
    }
}

/// By `run6`, after the subprogram that translated the packet has returned (`routed6`,
/// `expired6`): in it, the FIB request's frame or the ICMPv6 answer's would take the chain
/// of frames past 512 bytes.
impl Routing for [u8; 16] {
    #[inline(always)]
    fn route(_: &TcContext, proto: u8, service_id: u32) -> i32 {
        ROUTE | i32::from(proto) << ROUTE_PROTO_SHIFT | (service_id & ROUTE_SERVICE_MASK) as i32
    }
    #[inline(always)]
    fn expired(_: &TcContext, _: &packet::Flow6) -> i32 {
        HOP_LIMIT_EXPIRED
    }
}

/// Answers an IPv6 packet whose hop limit ran out as a router does (ICMPv6 time exceeded).
#[inline(never)]
fn expired6(ctx: &TcContext) -> i32 {
    packet::parse6(ctx)
        .and_then(|flow| flow.answer(ctx, ICMP_TIME_EXCEEDED, 0))
        .unwrap_or(TC_ACT_SHOT)
}

/// An IPv6 subprogram's answer for a packet that `routed6` must route: this bit, the
/// packet's protocol and its service id (for a `no_route` drop's event; an id past the
/// mask, beyond any map size the agent allows, would be reported by its low bits).
const ROUTE: i32 = 1 << 30;
const ROUTE_PROTO_SHIFT: u32 = 22;
const ROUTE_SERVICE_MASK: u32 = (1 << ROUTE_PROTO_SHIFT) - 1;

/// Routes a masqueraded IPv6 packet as `Routing::route`'s answer says.
#[inline(never)]
fn routed6(ctx: &TcContext, answer: i32) -> i32 {
    let proto = (answer >> ROUTE_PROTO_SHIFT) as u8;
    let service_id = answer as u32 & ROUTE_SERVICE_MASK;
    route::forward::<[u8; 16]>(ctx, proto, service_id).unwrap_or(TC_ACT_SHOT)
}
