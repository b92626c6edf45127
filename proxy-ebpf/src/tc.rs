//! Packet-level service NAT on the interfaces the agent serves (external traffic to
//! NodePorts, external and load-balancer IPs; pods outside the hooked cgroup): ingress
//! translates new and tracked flows, egress reverse-translates the replies that leave.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{DropReason, HOOK_TC, XDP_META_NOTHING_FOR_US, XdpMeta};

use crate::{
    family::Family,
    icmp,
    lb::{self, Dropped, EventFlow},
    maps::{NEW_FLOW4, NEW_FLOW6, TC_TO_ROUTE6},
    nat::{self, Action, Side, Translation, Verdict},
    packet::{
        self, ErrorTranslationOf, Flow, Flow6, FlowOf, FragmentOf, Frame, ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED, ICMP_PORT_UNREACH, ICMP_TIME_EXCEEDED, ICMPV6_DEST_UNREACH,
        ICMPV6_PACKET_TOO_BIG, ICMPV6_PORT_UNREACH, ICMPV6_TIME_EXCEEDED, IP_DF, IP_FLAGS_OFF,
        IPPROTO_ICMP, IPPROTO_ICMPV6, IcmpErrorOf, Packet, TCP_HDR_MIN_LEN, UDP_HDR_LEN,
    },
    route::{self, NextHop, Unroutable},
};

#[classifier]
pub fn proxy_ingress(ctx: TcContext) -> i32 {
    ingress(&ctx)
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> i32 {
    if xdp_found_nothing(ctx) {
        return TC_ACT_OK;
    }
    run(ctx, Side::Ingress)
}

/// Whether the agent attaches XDP programs (`--xdp`): set by it at load time, a constant to
/// the verifier. Without them, tc ingress does not look for their marks: the socket
/// buffer's metadata length is read from its shared info, a cache line the packet's own
/// path may not touch otherwise (about 3 ns a run on the node-port benchmark's nodes).
#[unsafe(no_mangle)]
static XDP_ATTACHED: u8 = 0;

/// Whether the XDP program of this interface passed the packet as having nothing of ours
/// (`XdpMeta`); without XDP there is no metadata.
#[inline(always)]
fn xdp_found_nothing(ctx: &TcContext) -> bool {
    // SAFETY: a constant of the object, read as the loader set it.
    if unsafe { core::ptr::read_volatile(&XDP_ATTACHED) } == 0 {
        return false;
    }
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

/// The benchmark's first packets in repeat mode (`first_packet_repeat`): each repetition
/// runs on the packet the one before translated, which keeps its client's address and
/// port, so a client of its own (the next source port) makes it a new flow's first packet.
#[classifier]
pub fn proxy_bench_next_client(ctx: TcContext) -> i32 {
    if next_client(&ctx).is_none() {
        return TC_ACT_SHOT;
    }
    ingress(&ctx)
}

/// `proxy_bench_next_client`'s baseline: the source port stepped, nothing else.
#[classifier]
pub fn proxy_bench_next_client_baseline(ctx: TcContext) -> i32 {
    match next_client(&ctx) {
        Some(()) => TC_ACT_OK,
        None => TC_ACT_SHOT,
    }
}

/// Steps the TCP source port of the benchmark's frames (no IPv4 options, no IPv6 extension
/// headers) and the checksum with it. A call of its own: its frame is gone before the
/// ingress program's deepest calls.
#[inline(never)]
fn next_client(ctx: &TcContext) -> Option<()> {
    let l4 = match packet::is_ipv6(ctx)? {
        true => packet::ETH_HDR_LEN + packet::IP6_HDR_LEN,
        false => packet::ETH_HDR_LEN + 20,
    };
    let sport: u16 = ctx.load(l4).ok()?;
    let next = u16::from_be(sport).wrapping_add(1).to_be();
    ctx.l4_csum_replace(l4 + 16, u64::from(sport), u64::from(next), 2)
        .ok()?;
    ctx.store(l4, &next, 0).ok()
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
    let first = match side {
        Side::Ingress => tracked6(ctx),
        Side::Egress => leaving6(ctx),
    };
    let action = match first {
        NEW_FLOW => match choose::<[u8; 16]>(ctx) {
            CHOSEN => record::<[u8; 16]>(ctx),
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
        TO_ROUTE => match next_hop6(ctx) {
            SEND => send6(ctx),
            too_big if (TOO_BIG..TOO_BIG + 0x10000).contains(&too_big) => {
                packet_too_big6(ctx, (too_big - TOO_BIG) as u32)
            }
            action => action,
        },
        routed if routed >= ROUTE => routed6(ctx, routed),
        action => action,
    }
}

/// `tracked4`'s and `tracked6`'s answer for a packet that `choose` and `record` must see: a
/// new flow.
const NEW_FLOW: i32 = i32::MIN;
/// `tracked6`'s answer for a packet that is no TCP or UDP flow's: `fragment6`'s or
/// `error6`'s, maybe.
const NOT_A_FLOW: i32 = i32::MIN + 1;
/// `fragment6`'s answer for a packet that is not a later fragment.
const NOT_A_FRAGMENT: i32 = i32::MIN + 2;
/// `choose`'s answer for a new flow that `record` must record.
const CHOSEN: i32 = i32::MIN + 3;
/// An IPv6 subprogram's answer for a packet to route whose hop limit ran out here, left
/// untouched: `expired6` answers it.
const HOP_LIMIT_EXPIRED: i32 = i32::MIN + 4;
/// An IPv6 subprogram's answer for a masqueraded packet it left untouched, handing its flow
/// and translation on in `ToRoute6`: `next_hop6` looks its route up.
const TO_ROUTE: i32 = i32::MIN + 5;
/// `next_hop6`'s answer for a packet with a next hop (in `ToRoute6`): `send6` sends it.
const SEND: i32 = i32::MIN + 6;
/// `next_hop6`'s answer for a packet too large for its next hop: this plus the next hop's
/// MTU (16 bits), for `packet_too_big6`. Each of these answers distinct, none a tc action.
const TOO_BIG: i32 = i32::MIN + 0x10000;

/// A new flow as `tracked4` or `tracked6` hands it to `choose` and `choose` to `record`
/// (per CPU: the program runs on one CPU from start to end), so that neither parses the
/// packet, reads the clock or looks the service port and backend up again.
pub struct NewFlow<A> {
    flow: FlowOf<A>,
    picked: nat::Picked<A>,
}

/// A masqueraded IPv6 packet as the subprogram that translated its flow hands it on, still
/// untouched (per CPU, as `NewFlow6`): `next_hop6` looks its route up first, so that one
/// too large for the next hop can be answered quoting it as the client sent it.
pub struct ToRoute6 {
    flow: Flow6,
    translation: Translation<[u8; 16]>,
    /// `next_hop6`'s finding, for `send6`.
    hop: NextHop,
}

/// Where a family's new flow is handed on (`NewFlow`).
trait NewFlows: Sized + 'static {
    /// This CPU's `NewFlow`.
    fn new_flow() -> Option<&'static mut NewFlow<Self>>;
}

impl NewFlows for [u8; 4] {
    #[inline(always)]
    fn new_flow() -> Option<&'static mut NewFlow<Self>> {
        // SAFETY: a per-CPU value, this program's alone for its run.
        NEW_FLOW4.get_ptr_mut(0).map(|p| unsafe { &mut *p })
    }
}

impl NewFlows for [u8; 16] {
    #[inline(always)]
    fn new_flow() -> Option<&'static mut NewFlow<Self>> {
        // SAFETY: as for IPv4's.
        NEW_FLOW6.get_ptr_mut(0).map(|p| unsafe { &mut *p })
    }
}

/// An IPv6 packet of a tracked flow, arriving.
#[inline(never)]
fn tracked6(ctx: &TcContext) -> i32 {
    let Some(flow) = packet::parse6(ctx) else {
        return NOT_A_FLOW;
    };
    let Some(verdict) = nat::tracked_ingress(&flow, ctx.len() as u64) else {
        return untracked(&flow);
    };
    apply(ctx, &flow, verdict).unwrap_or(TC_ACT_SHOT)
}

/// An IPv6 packet leaving: a subprogram of its own, as its frame and `tracked6`'s would
/// not fit one.
#[inline(never)]
fn leaving6(ctx: &TcContext) -> i32 {
    let Some(flow) = packet::parse6(ctx) else {
        return NOT_A_FLOW;
    };
    let verdict = nat::egress(&flow, ctx.len() as u64);
    apply(ctx, &flow, verdict).unwrap_or(TC_ACT_SHOT)
}

/// An arriving packet of no tracked flow: passed here if it may not start one (not handed
/// on to `choose`, which would pass it too), else handed on as a new flow (`NEW_FLOW`).
#[inline(always)]
fn untracked<A: NewFlows + Copy>(flow: &FlowOf<A>) -> i32 {
    if !nat::may_start_flow(flow) {
        return TC_ACT_OK;
    }
    let Some(new) = A::new_flow() else {
        return TC_ACT_OK;
    };
    new.flow = *flow;
    NEW_FLOW
}

/// The first packet of a flow, arriving: `nat::choose` and `nat::record` apart (a frame
/// of its own is what each is for; and the verifier checks what follows each once per way
/// it can end, not once per way through all of it), handing on through `NewFlow`. The first
/// chooses the service port and backend (`CHOSEN`), or, with nothing to record, answers the
/// packet's tc action.
#[inline(never)]
fn choose<A: Routing + NewFlows>(ctx: &TcContext) -> i32
where
    FlowOf<A>: Answer,
    proxy_common::CtKeyOf<A>: EventFlow + Copy,
{
    let Some(new) = A::new_flow() else {
        return TC_ACT_OK;
    };
    let Some(flow) = new.flow.bounded() else {
        return TC_ACT_OK;
    };
    match nat::choose(&flow) {
        nat::Choice::Chosen(picked) => {
            new.picked = picked;
            CHOSEN
        }
        nat::Choice::Done(verdict) => apply(ctx, &flow, verdict).unwrap_or(TC_ACT_SHOT),
    }
}

/// The second half: the flow recorded with the backend `choose` picked.
#[inline(never)]
fn record<A: Routing + NewFlows>(ctx: &TcContext) -> i32
where
    FlowOf<A>: Answer,
    proxy_common::CtKeyOf<A>: EventFlow + Copy,
{
    let Some(new) = A::new_flow() else {
        return TC_ACT_OK;
    };
    let Some(flow) = new.flow.bounded() else {
        return TC_ACT_OK;
    };
    let verdict = nat::record(&flow, ctx.len() as u64, &new.picked);
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

/// IPv4: the packet's flow, then, for a new one, `choose` and `record`, as IPv6's.
#[inline(always)]
fn run4(ctx: &TcContext, side: Side) -> i32 {
    match tracked4(ctx, side) {
        NEW_FLOW => match choose::<[u8; 4]>(ctx) {
            CHOSEN => record::<[u8; 4]>(ctx),
            action => action,
        },
        action => action,
    }
}

/// An IPv4 packet of a tracked flow, or a later fragment or an ICMP error about one
/// (arriving); or any leaving.
#[inline(never)]
fn tracked4(ctx: &TcContext, side: Side) -> i32 {
    match packet::parse(ctx) {
        Some(Packet::Transport(flow)) => {
            let len = ctx.len() as u64;
            let verdict = match side {
                Side::Ingress => match nat::tracked_ingress(&flow, len) {
                    Some(verdict) => verdict,
                    None => return untracked(&flow),
                },
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
            let hop = match t.route {
                true => match A::next_hop(ctx, flow, &t) {
                    Ok(hop) => Some(hop),
                    Err(answer) => return Some(answer),
                },
                false => None,
            };
            lb::count(t.service_id, t.backend_id, t.counters);
            packet::rewrite(ctx, flow, &t.src, &t.dst)?;
            Some(match hop {
                Some(hop) => A::send(ctx, hop, flow.key.proto, t.service_id),
                None => TC_ACT_OK,
            })
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
        icmp::into_icmp_error(ctx, self, kind, code, 0).ok()?;
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
        icmp::into_icmp6_error(ctx, self, kind, code, 0).ok()?;
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

/// How a family's masqueraded packets are routed, and answered when they cannot go on.
trait Routing: Family {
    /// What `send` needs of the route, found before the rewrite.
    type Hop;
    /// Before the rewrite: the packet's next hop, or, when it cannot go on as translated,
    /// the answer a router gives, quoting it as the client sent it — time exceeded when its
    /// TTL (hop limit) runs out here (traceroute through a masqueraded node port),
    /// fragmentation needed when it is larger than the next hop's MTU and may not be
    /// fragmented (path MTU discovery) — or the drop of one without a route. A flow the
    /// packet has just opened is forgotten then (`nat::forget_new`).
    fn next_hop(
        ctx: &TcContext,
        flow: &FlowOf<Self>,
        t: &Translation<Self>,
    ) -> Result<Self::Hop, i32>;
    /// After the rewrite: the packet sent to `hop`.
    fn send(ctx: &TcContext, hop: Self::Hop, proto: u8, service_id: u32) -> i32;
    /// A rewritten packet (a later fragment, an ICMP error) routed as it now is.
    fn route(ctx: &TcContext, proto: u8, service_id: u32) -> i32;
}

/// In place: `run4` has the stack for the FIB request and the ICMP answer.
impl Routing for [u8; 4] {
    type Hop = NextHop;
    #[inline(always)]
    fn next_hop(ctx: &TcContext, flow: &Flow, t: &Translation) -> Result<NextHop, i32> {
        let hop = next_hop4(ctx, flow, t);
        if hop.is_err() {
            nat::forget_new(t);
        }
        hop
    }
    #[inline(always)]
    fn send(ctx: &TcContext, hop: NextHop, proto: u8, service_id: u32) -> i32 {
        route::send::<Self>(ctx, hop, proto, service_id)
    }
    #[inline(always)]
    fn route(ctx: &TcContext, proto: u8, service_id: u32) -> i32 {
        route::forward::<Self>(ctx, proto, service_id).unwrap_or(TC_ACT_SHOT)
    }
}

/// `Routing::next_hop` of an IPv4 packet.
#[inline(always)]
fn next_hop4(ctx: &TcContext, flow: &Flow, t: &Translation) -> Result<NextHop, i32> {
    let ttl = ctx.read::<u8>(<[u8; 4]>::TTL_OFF).ok_or(TC_ACT_SHOT)?;
    if ttl <= 1 {
        return Err(flow
            .answer(ctx, ICMP_TIME_EXCEEDED, 0)
            .unwrap_or(TC_ACT_SHOT));
    }
    let (src, dst) = t.ends(&flow.key);
    let proto = flow.key.proto;
    match route::lookup_tc(ctx, proto, (src, dst), segment_len(ctx, flow)) {
        Ok(hop) => Ok(hop),
        Err(Unroutable::TooBig { mtu }) if dont_fragment(ctx) => Err(frag_needed(ctx, flow, mtu)),
        Err(_) => Err(route::no_route(src, dst, proto, t.service_id)),
    }
}

/// For a GSO packet (a TCP or UDP stream's aggregate), the IP length of each packet it
/// leaves as: headers plus the segment size. 0 for any other packet.
#[inline(always)]
fn segment_len<A>(ctx: &TcContext, flow: &FlowOf<A>) -> u16 {
    // SAFETY: valid context.
    let segment = unsafe { (*ctx.skb.skb).gso_size } as usize;
    if segment == 0 {
        return 0;
    }
    let l4_hdr_len = match flow.is_tcp() {
        // The data offset, in 32-bit words.
        true => ctx
            .read::<u8>(flow.l4_off + 12)
            .map_or(TCP_HDR_MIN_LEN, |b| usize::from(b >> 4) * 4),
        false => UDP_HDR_LEN,
    };
    (flow.ip_hdr_len + l4_hdr_len + segment).min(usize::from(u16::MAX)) as u16
}

/// Whether the IPv4 packet's "don't fragment" flag is set.
#[inline(always)]
fn dont_fragment(ctx: &TcContext) -> bool {
    ctx.read::<u8>(IP_FLAGS_OFF)
        .is_some_and(|flags| flags & IP_DF != 0)
}

/// ICMP fragmentation needed, with the next hop's MTU, back to the sender.
#[inline(always)]
fn frag_needed(ctx: &TcContext, flow: &Flow, mtu: u16) -> i32 {
    match icmp::into_icmp_error(ctx, flow, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu) {
        Ok(()) => back_out(ctx),
        Err(_) => TC_ACT_SHOT,
    }
}

/// By `run6`, after the subprogram that translated the flow has returned (`expired6`,
/// `next_hop6` and `send6`, `routed6`): in it, the FIB request's frame or the ICMPv6 answer's
/// would take the chain of frames past 512 bytes. So `next_hop` hands the packet on and is
/// never `Ok`.
impl Routing for [u8; 16] {
    type Hop = core::convert::Infallible;
    #[inline(always)]
    fn next_hop(ctx: &TcContext, flow: &Flow6, t: &Translation<Self>) -> Result<Self::Hop, i32> {
        match ctx.read::<u8>(Self::TTL_OFF) {
            Some(hop_limit) if hop_limit > 1 => {}
            Some(_) => {
                nat::forget_new(t);
                return Err(HOP_LIMIT_EXPIRED);
            }
            None => return Err(TC_ACT_SHOT),
        }
        let Some(routed) = to_route6() else {
            return Err(TC_ACT_SHOT);
        };
        routed.flow = *flow;
        routed.translation = *t;
        Err(TO_ROUTE)
    }
    #[inline(always)]
    fn send(_: &TcContext, hop: Self::Hop, _: u8, _: u32) -> i32 {
        match hop {}
    }
    #[inline(always)]
    fn route(_: &TcContext, proto: u8, service_id: u32) -> i32 {
        ROUTE | i32::from(proto) << ROUTE_PROTO_SHIFT | (service_id & ROUTE_SERVICE_MASK) as i32
    }
}

/// This CPU's `ToRoute6`.
#[inline(always)]
fn to_route6() -> Option<&'static mut ToRoute6> {
    // SAFETY: a per-CPU value, this program's alone for its run.
    TC_TO_ROUTE6.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// This CPU's `ToRoute6` as a later step reads it, with its flow bounded for the verifier.
#[inline(always)]
fn handed_on6() -> Option<(&'static mut ToRoute6, Flow6)> {
    let routed = to_route6()?;
    let flow = routed.flow.bounded()?;
    Some((routed, flow))
}

/// The first step of routing a masqueraded IPv6 packet that its flow's subprogram left
/// untouched (`ToRoute6`): the route for its translated addresses, kept for `send6`
/// (`SEND`); a packet too large for the next hop is left for `packet_too_big6` (`TOO_BIG`:
/// IPv6 routers do not fragment), one without a route dropped. Steps of their own, as on
/// XDP: in one, the frames passed 512 bytes.
#[inline(never)]
fn next_hop6(ctx: &TcContext) -> i32 {
    let Some((routed, flow)) = handed_on6() else {
        return TC_ACT_SHOT;
    };
    let t = &routed.translation;
    let (src, dst) = t.ends(&flow.key);
    let proto = flow.key.proto;
    match route::lookup_tc(ctx, proto, (src, dst), segment_len(ctx, &flow)) {
        Ok(hop) => {
            routed.hop = hop;
            SEND
        }
        Err(unroutable) => {
            nat::forget_new(t);
            match unroutable {
                Unroutable::TooBig { mtu } => TOO_BIG + i32::from(mtu),
                Unroutable::NoRoute => route::no_route(src, dst, proto, t.service_id),
            }
        }
    }
}

/// The last step: the packet translated, counted and sent to the next hop `next_hop6`
/// found.
#[inline(never)]
fn send6(ctx: &TcContext) -> i32 {
    let Some((routed, flow)) = handed_on6() else {
        return TC_ACT_SHOT;
    };
    let t = &routed.translation;
    lb::count(t.service_id, t.backend_id, t.counters);
    match packet::rewrite(ctx, &flow, &t.src, &t.dst) {
        Some(()) => route::send::<[u8; 16]>(ctx, routed.hop, flow.key.proto, t.service_id),
        None => TC_ACT_SHOT,
    }
}

/// Answers an IPv6 packet too large for its next hop (`mtu`) as a router does (ICMPv6
/// packet too big), quoting it as the client sent it: `next_hop6` left it untouched. A subprogram of its own, for the answer's frame.
#[inline(never)]
fn packet_too_big6(ctx: &TcContext, mtu: u32) -> i32 {
    let Some((_, flow)) = handed_on6() else {
        return TC_ACT_SHOT;
    };
    match icmp::into_icmp6_error(ctx, &flow, ICMPV6_PACKET_TOO_BIG, 0, mtu) {
        Ok(()) => back_out(ctx),
        Err(_) => TC_ACT_SHOT,
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
