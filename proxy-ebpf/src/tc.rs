//! Packet-level service NAT for traffic that did not go through the socket hooks (e.g. from
//! a pod outside the hooked cgroup): ingress DNATs client → service to client → backend and
//! records the flow in our conntrack; egress reverse-NATs the backend's replies.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    AFFINITY_CLIENT_IP, CT_FORWARD, CT_REPLY, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW,
    Counters, CtEntry, CtKey, ServiceKey,
};

use crate::{
    lb::{self, Sticky},
    maps::CONNTRACK,
    packet::{self, Endpoint, Flow, TCP_FIN, TCP_RST, TCP_SYN},
};

#[classifier]
pub fn proxy_ingress(ctx: TcContext) -> i32 {
    match packet::parse(&ctx) {
        Some(flow) => ingress(&ctx, &flow).unwrap_or(TC_ACT_SHOT),
        None => TC_ACT_OK,
    }
}

#[classifier]
pub fn proxy_egress(ctx: TcContext) -> i32 {
    match packet::parse(&ctx) {
        Some(flow) => egress(&ctx, &flow).unwrap_or(TC_ACT_SHOT),
        None => TC_ACT_OK,
    }
}

/// Does nothing: the baseline the benchmark compares the NAT programs' per-packet cost with.
#[classifier]
pub fn proxy_bench_baseline(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

/// Advances an entry's TCP state with a packet's flags and marks it as seen now.
#[inline(always)]
fn track(entry: &mut CtEntry, flow: &Flow, now: u64) {
    entry.last_seen_ns = now;
    if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        entry.state = CT_STATE_CLOSING;
    } else if entry.state == CT_STATE_NEW && (!flow.is_tcp() || flow.tcp_flags & TCP_SYN == 0) {
        entry.state = CT_STATE_ESTABLISHED;
    }
}

#[inline(always)]
fn traffic(ctx: &TcContext, conns: u64) -> Counters {
    Counters {
        conns,
        packets: 1,
        bytes: ctx.len() as u64,
    }
}

#[inline(always)]
fn ingress(ctx: &TcContext, flow: &Flow) -> Result<i32, i64> {
    let now = lb::now_ns();
    if let Some(entry) = CONNTRACK.get_ptr_mut(flow.key) {
        // SAFETY: LRU values stay valid during the program's run; racing updates of the
        // state and timestamp from another CPU are benign.
        let entry = unsafe { &mut *entry };
        // A new SYN on a closed flow's tuple is a new connection: balance it again.
        let reused = flow.is_syn() && entry.state == CT_STATE_CLOSING;
        if entry.direction == CT_FORWARD && !reused {
            track(entry, flow, now);
            lb::count(entry.rev_nat_id, entry.backend_id, traffic(ctx, 0));
            packet::rewrite(
                ctx,
                flow,
                Endpoint::Destination,
                entry.nat_addr,
                entry.nat_port,
            )?;
            return Ok(TC_ACT_OK);
        }
    }
    let service = ServiceKey {
        addr: flow.key.dst,
        port: flow.key.dport,
        proto: flow.key.proto,
        pad: 0,
    };
    let Some(svc) = lb::service(&service) else {
        return Ok(TC_ACT_OK);
    };
    let client = u32::from_ne_bytes(flow.key.src) as u64;
    let affinity = Sticky::client_affinity(&svc, client, AFFINITY_CLIENT_IP);
    let Some(chosen) = lb::select_backend(&svc, affinity.as_ref(), now) else {
        packet::into_port_unreachable(ctx, flow)?;
        // SAFETY: valid context; sends the answer back out of the interface it came from.
        return Ok(unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) } as i32);
    };
    let mut forward = CtEntry {
        nat_addr: chosen.backend.addr,
        nat_port: chosen.backend.port,
        direction: CT_FORWARD,
        state: CT_STATE_NEW,
        rev_nat_id: svc.id,
        backend_id: chosen.backend_id,
        last_seen_ns: now,
    };
    track(&mut forward, flow, now);
    let reply = CtEntry {
        nat_addr: service.addr,
        nat_port: service.port,
        direction: CT_REPLY,
        ..forward
    };
    let reply_key: CtKey = flow.key.peer(&forward);
    // LRU inserts evict instead of failing when full.
    CONNTRACK.insert(flow.key, forward, 0)?;
    CONNTRACK.insert(reply_key, reply, 0)?;
    lb::count(svc.id, chosen.backend_id, traffic(ctx, 1));
    packet::rewrite(
        ctx,
        flow,
        Endpoint::Destination,
        chosen.backend.addr,
        chosen.backend.port,
    )?;
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn egress(ctx: &TcContext, flow: &Flow) -> Result<i32, i64> {
    let Some(entry) = CONNTRACK.get_ptr_mut(flow.key) else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: as in `ingress`.
    let entry = unsafe { &mut *entry };
    if entry.direction != CT_REPLY {
        return Ok(TC_ACT_OK);
    }
    track(entry, flow, lb::now_ns());
    lb::count(entry.rev_nat_id, entry.backend_id, traffic(ctx, 0));
    packet::rewrite(ctx, flow, Endpoint::Source, entry.nat_addr, entry.nat_port)?;
    Ok(TC_ACT_OK)
}
