//! What to do with a packet that did not go through the socket hooks, shared by the tc and
//! XDP programs: follow its conntrack entry, or balance a new flow to a service backend
//! (masquerading it when the reply would otherwise bypass this node) and record it.
use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::{
    AFFINITY_CLIENT_IP, BACKEND_FLAG_LOCAL, CT_FLAG_PASS, CT_FLAG_SNAT, CT_FORWARD, CT_REPLY,
    CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, Counters, CtEntry, CtKey,
    DROP_CONNTRACK_INSERT, DROP_NO_LOCAL_ENDPOINT, DROP_NO_MASQUERADE_ADDRESS,
    DROP_NO_MASQUERADE_PORT, SVC_FLAG_DROP_IF_EMPTY, SVC_FLAG_MASQUERADE, ServiceKey,
};

use crate::{
    lb::{self, Chosen, Sticky},
    maps::{CONNTRACK, NODE_CONFIG},
    packet::{Flow, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Random source ports tried for a masqueraded flow before giving up on it: with a third
/// of the range in use, all of them are taken once in 50 million.
const SNAT_ATTEMPTS: u32 = 16;
/// Quiet time after which an ended masqueraded TCP flow gives up its source port: just over
/// TCP's minimum retransmission timeout (200 ms), so that a lost last ACK shows up as a
/// retransmitted FIN, which keeps the flow, before the port can go to another. Short, as
/// the time a port sits unusable bounds the connection rate to one backend (ports / grace).
const SNAT_REUSE_AFTER_NS: u64 = 250_000_000;

pub enum Verdict {
    /// Not a service flow: leave it alone.
    Pass,
    /// Drop, counted under this `DROP_*` reason.
    Drop(u32),
    /// A service without backends: answer ICMP port unreachable, as kube-proxy's REJECT.
    Reject,
    Translate(Translation),
}

/// A new address and port for one end of a packet, if `set`. Not an `Option`: the verifier
/// rejects the uninitialised payload of a `None` when the compiler spills it.
#[derive(Clone, Copy)]
pub struct Rewrite {
    pub set: bool,
    pub addr: [u8; 4],
    pub port: u16,
}

impl Rewrite {
    pub const NONE: Rewrite = Rewrite {
        set: false,
        addr: [0; 4],
        port: 0,
    };

    #[inline(always)]
    fn to(addr: [u8; 4], port: u16) -> Self {
        Rewrite {
            set: true,
            addr,
            port,
        }
    }
}

/// The rewrites of one packet, and what to count once it is sent on.
pub struct Translation {
    pub src: Rewrite,
    pub dst: Rewrite,
    /// A masqueraded flow's packet: route it ourselves, as the kernel drops packets that
    /// arrive with one of its own addresses as source.
    pub route: bool,
    pub service_id: u32,
    pub backend_id: u32,
    pub counters: Counters,
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
fn traffic(len: u64, conns: u64) -> Counters {
    Counters {
        conns,
        packets: 1,
        bytes: len,
    }
}

/// A packet arriving on an interface: the forward direction of a tracked flow, the reply of
/// a masqueraded one, or the first packet of a new service flow. The caller counts the
/// translation once it has sent the packet on.
#[inline(always)]
pub fn ingress(flow: &Flow, len: u64) -> Verdict {
    let now = lb::now_ns();
    if let Some(entry) = CONNTRACK.get_ptr_mut(flow.key) {
        // SAFETY: LRU values stay valid during the program's run; racing updates of the
        // state and timestamp from another CPU are benign.
        let entry = unsafe { &mut *entry };
        if entry.flags & CT_FLAG_PASS != 0 {
            entry.last_seen_ns = now;
            return Verdict::Pass;
        }
        // A new SYN on a closed flow's tuple is a new connection: balance it again.
        let reused = flow.is_syn() && entry.state == CT_STATE_CLOSING;
        let snat = entry.flags & CT_FLAG_SNAT != 0;
        if !reused && (entry.direction == CT_FORWARD || snat) {
            track(entry, flow, now);
            let nat = Rewrite::to(entry.nat_addr, entry.nat_port);
            let peer = if snat {
                Rewrite::to(entry.peer_addr, entry.peer_port)
            } else {
                Rewrite::NONE
            };
            let (src, dst) = if entry.direction == CT_FORWARD {
                (peer, nat)
            } else {
                (nat, peer)
            };
            return Verdict::Translate(Translation {
                src,
                dst,
                route: snat,
                service_id: entry.rev_nat_id,
                backend_id: entry.backend_id,
                counters: traffic(len, 0),
            });
        }
        // An unmasqueraded reply is reverse-translated on its way out (`egress`).
    }
    let service = ServiceKey::new(flow.key.dst, flow.key.dport, flow.key.proto);
    let Some(svc) = lb::service_for(&service) else {
        return Verdict::Pass;
    };
    // A TCP segment other than a SYN with no entry of ours belongs to a connection made
    // before the flow was ours: kube-proxy's kernel NAT carries it during a migration (tc
    // runs before netfilter). Balancing it anew would send it mid-stream to a backend that
    // knows nothing of it; left alone, the kernel's conntrack keeps translating it.
    if flow.is_tcp() && !flow.is_syn() {
        return Verdict::Pass;
    }
    let client = u32::from_ne_bytes(flow.key.src) as u64;
    let affinity = Sticky::client_affinity(&svc, client, AFFINITY_CLIENT_IP);
    let Some(chosen) = lb::select_backend(&svc, affinity.as_ref(), now) else {
        return if svc.flags & SVC_FLAG_DROP_IF_EMPTY != 0 {
            Verdict::Drop(DROP_NO_LOCAL_ENDPOINT)
        } else {
            Verdict::Reject
        };
    };
    // A remote backend of an externalTrafficPolicy: Cluster frontend would answer the client
    // directly; a pod sent to itself (hairpin) would see its own address as source.
    let masquerade = (svc.flags & SVC_FLAG_MASQUERADE != 0
        && chosen.backend.flags & BACKEND_FLAG_LOCAL == 0)
        || chosen.backend.addr == flow.key.src;
    let mut forward = CtEntry {
        nat_addr: chosen.backend.addr,
        nat_port: chosen.backend.port,
        direction: CT_FORWARD,
        state: CT_STATE_NEW,
        rev_nat_id: svc.id,
        backend_id: chosen.backend_id,
        peer_addr: flow.key.src,
        peer_port: flow.key.sport,
        flags: 0,
        pad: 0,
        last_seen_ns: now,
    };
    track(&mut forward, flow, now);
    let reply = CtEntry {
        nat_addr: flow.key.dst,
        nat_port: flow.key.dport,
        direction: CT_REPLY,
        ..forward
    };
    let src = if masquerade {
        match reserve_snat(flow, &chosen, &mut forward, reply, now) {
            Ok((addr, port)) => Rewrite::to(addr, port),
            Err(reason) => return Verdict::Drop(reason),
        }
    } else {
        // LRU inserts evict instead of failing when full.
        if CONNTRACK.insert(flow.key.peer(&forward), reply, 0).is_err() {
            return Verdict::Drop(DROP_CONNTRACK_INSERT);
        }
        Rewrite::NONE
    };
    if CONNTRACK.insert(flow.key, forward, 0).is_err() {
        return Verdict::Drop(DROP_CONNTRACK_INSERT);
    }
    Verdict::Translate(Translation {
        src,
        dst: Rewrite::to(chosen.backend.addr, chosen.backend.port),
        route: masquerade,
        service_id: svc.id,
        backend_id: chosen.backend_id,
        counters: traffic(len, 1),
    })
}

/// Picks a source port for a masqueraded flow whose reply tuple (backend → SNAT address and
/// port) no live flow uses, and records the reply entry under it; the insert with
/// `BPF_NOEXIST` makes the check and the claim one atomic step.
#[inline(always)]
fn reserve_snat(
    flow: &Flow,
    chosen: &Chosen,
    forward: &mut CtEntry,
    reply: CtEntry,
    now: u64,
) -> Result<([u8; 4], u16), u32> {
    let config = NODE_CONFIG.get(0).ok_or(DROP_NO_MASQUERADE_ADDRESS)?;
    if config.snat_addr == [0; 4] || config.snat_port_max < config.snat_port_min {
        return Err(DROP_NO_MASQUERADE_ADDRESS);
    }
    let range = (config.snat_port_max - config.snat_port_min) as u32 + 1;
    let mut reply = reply;
    reply.flags = CT_FLAG_SNAT;
    forward.flags = CT_FLAG_SNAT;
    forward.peer_addr = config.snat_addr;
    for _ in 0..SNAT_ATTEMPTS {
        // Independent tries: consecutive ones would keep hitting the same run of busy ports.
        let port = config.snat_port_min + (lb::random() % range) as u16;
        let key = CtKey {
            src: chosen.backend.addr,
            dst: config.snat_addr,
            sport: chosen.backend.port,
            dport: port,
            proto: flow.key.proto,
            pad: [0; 3],
        };
        if CONNTRACK.insert(key, reply, BPF_NOEXIST as u64).is_ok()
            || (free_if_ended(&key, now)
                && CONNTRACK.insert(key, reply, BPF_NOEXIST as u64).is_ok())
        {
            forward.peer_port = port;
            return Ok((config.snat_addr, port));
        }
    }
    Err(DROP_NO_MASQUERADE_PORT)
}

/// Frees the masquerade reply tuple `key` if its TCP flow has ended: both sides sent a FIN
/// or RST and it has been quiet for `SNAT_REUSE_AFTER_NS`. As the kernel's NAT reuses
/// TIME_WAIT tuples, this keeps short connections from exhausting the port range while
/// their entries wait out the closing timeout.
#[inline(always)]
fn free_if_ended(key: &CtKey, now: u64) -> bool {
    let ended = |entry: &CtEntry| {
        entry.state == CT_STATE_CLOSING
            && now.saturating_sub(entry.last_seen_ns) >= SNAT_REUSE_AFTER_NS
    };
    // SAFETY: LRU values stay valid during the program's run; the entry is copied.
    let Some(reply) = (unsafe { CONNTRACK.get(key) }).copied() else {
        return false;
    };
    if reply.flags & CT_FLAG_SNAT == 0 || !ended(&reply) {
        return false;
    }
    let forward_key = key.peer(&reply);
    // SAFETY: as above.
    if let Some(forward) = unsafe { CONNTRACK.get(forward_key) } {
        // The client's tuple may already carry a new flow, masqueraded to another port:
        // that entry is not this flow's and stays.
        if forward.peer_addr == key.dst && forward.peer_port == key.dport {
            if !ended(forward) {
                return false;
            }
            let _ = CONNTRACK.remove(forward_key);
        }
    }
    // Another CPU may have freed and re-claimed the tuple since the read above: remove it
    // only if it is still the entry that was read.
    // SAFETY: as above.
    match unsafe { CONNTRACK.get(key) } {
        Some(now_there) if now_there.last_seen_ns == reply.last_seen_ns => {
            CONNTRACK.remove(key).is_ok()
        }
        _ => false,
    }
}

/// A packet leaving through an interface: the reply of an unmasqueraded flow gets its
/// service address back as source.
#[inline(always)]
pub fn egress(flow: &Flow, len: u64) -> Verdict {
    let Some(entry) = CONNTRACK.get_ptr_mut(flow.key) else {
        return Verdict::Pass;
    };
    // SAFETY: as in `ingress`.
    let entry = unsafe { &mut *entry };
    if entry.direction != CT_REPLY || entry.flags & CT_FLAG_SNAT != 0 {
        return Verdict::Pass;
    }
    track(entry, flow, lb::now_ns());
    Verdict::Translate(Translation {
        src: Rewrite::to(entry.nat_addr, entry.nat_port),
        dst: Rewrite::NONE,
        route: false,
        service_id: entry.rev_nat_id,
        backend_id: entry.backend_id,
        counters: traffic(len, 0),
    })
}
