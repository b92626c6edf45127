//! What to do with a packet that did not go through the socket hooks, shared by the tc and
//! XDP programs: follow its conntrack entry, or balance a new flow to a service backend
//! (masquerading it when the reply would otherwise bypass this node) and record it.
//!
//! The flow logic is generic over the address family (`Family`): IPv4 and IPv6 flows are
//! tracked alike, each in its family's conntrack map, and so are the ICMP errors about
//! them, and fragments.
//!
//! A flow has one entry, under its client key (`CtKeyOf::client`), which both directions
//! find (`find`); a masqueraded flow also has a reply entry under its replies' 5-tuple, and
//! a flow whose client key another flow holds has two entries under 5-tuples, found through
//! that key's `CT_FLAG_SHARED` (the agent's GC keeps the mark while they live).
use proxy_common::{
    AFFINITY_CLIENT_IP, BACKEND_FLAG_LOCAL, CT_ANCHOR, CT_FLAG_CLIENT_KEYED, CT_FLAG_PASS,
    CT_FLAG_SHARED, CT_FLAG_SNAT, CT_FORWARD, CT_KEY_CLIENT, CT_REPLY, CT_STATE_CLOSING,
    CT_STATE_ESTABLISHED, CT_STATE_NEW, Counters, CtEntryOf, CtKeyOf, DropReason, FragPorts,
    SVC_FLAG_DROP_IF_EMPTY, SVC_FLAG_MASQUERADE, SVC_FLAG_SOURCE_RANGES, ServiceKeyOf,
    ServiceValue,
};

use core::num::NonZeroU32;

use aya_ebpf::{cty::c_void, helpers::bpf_loop};

use crate::{
    ct::{self, Refused},
    family::Family,
    lb::{self, Chosen, Sticky},
    maps::{NODE_CONFIG, SNAT_CURSOR},
    packet::{ErrorTranslationOf, FlowOf, FragmentOf, RewriteOf, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Source ports tried for a masqueraded (or clashing) flow, each taken if free or if its
/// flow has ended. They are tried in turn from where the last search stopped
/// (`SNAT_CURSOR`), so the first is the port handed out longest ago: a port comes back
/// only after all the others were used, and short connections to one backend find the
/// first one free up to (range / `SNAT_REUSE_AFTER_NS`) a second. Random ports, tried
/// before, met recently used ones: at 16,000 connections a second (88% of the default
/// range waiting out their grace) one SYN in 3,000 found none in 64 tries and waited a
/// second for its retransmission, and a search took eight tries on average.
const PORT_ATTEMPTS: u32 = 64;
/// Quiet time after which an ended masqueraded TCP flow gives up its source port: just over
/// TCP's minimum retransmission timeout (200 ms), so that a lost last ACK shows up as a
/// retransmitted FIN, which keeps the flow, before the port can go to another. Short, as
/// the time a port sits unusable bounds the connection rate to one backend (ports / grace).
const SNAT_REUSE_AFTER_NS: u64 = 250_000_000;

/// What a verdict says to do with a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Not a service flow: leave it alone.
    Pass,
    /// Drop, counted under `Verdict::reason`.
    Drop,
    /// A service without backends: answer ICMP port unreachable, as kube-proxy's REJECT.
    Reject,
    /// Rewrite the packet as `Verdict::translation` says.
    Translate,
}

/// What to do with a packet. A struct whose every field is set on every path rather than
/// an enum with data: LLVM leaves the data of the variants not taken undefined, and where
/// two paths' verdicts merge it may copy such a register, which the verifier refuses
/// ("R5 !read_ok").
pub struct Verdict<A = [u8; 4]> {
    pub action: Action,
    /// `Drop`'s reason.
    pub reason: DropReason,
    /// `Translate`'s rewrites; for every action, `service_id` is the service port the packet
    /// is for (0: none).
    pub translation: Translation<A>,
}

impl<A: Family> Verdict<A> {
    #[inline(always)]
    fn new(action: Action, reason: DropReason, translation: Translation<A>) -> Self {
        Verdict {
            action,
            reason,
            translation,
        }
    }

    #[inline(always)]
    pub fn pass() -> Self {
        Self::new(Action::Pass, DropReason::NoEndpoints, Translation::none(0))
    }

    #[inline(always)]
    pub fn drop_for(reason: DropReason, service_id: u32) -> Self {
        Self::new(Action::Drop, reason, Translation::none(service_id))
    }

    #[inline(always)]
    pub fn reject(service_id: u32) -> Self {
        Self::new(
            Action::Reject,
            DropReason::NoEndpoints,
            Translation::none(service_id),
        )
    }

    #[inline(always)]
    pub fn translate(translation: Translation<A>) -> Self {
        Self::new(Action::Translate, DropReason::NoEndpoints, translation)
    }

    #[inline(always)]
    pub fn service_id(&self) -> u32 {
        self.translation.service_id
    }
}

/// The rewrites of one packet, and what to count once it is sent on.
#[derive(Clone, Copy)]
pub struct Translation<A = [u8; 4]> {
    pub src: RewriteOf<A>,
    pub dst: RewriteOf<A>,
    /// A masqueraded flow's packet: route it ourselves, as the kernel drops packets that
    /// arrive with one of its own addresses as source.
    pub route: bool,
    pub service_id: u32,
    pub backend_id: u32,
    pub counters: Counters,
}

impl<A: Family> Translation<A> {
    /// The source and destination of a packet of flow `key` once translated: what its route
    /// is looked up for.
    #[inline(always)]
    pub fn ends(&self, key: &CtKeyOf<A>) -> (A, A) {
        let src = if self.src.set { self.src.addr } else { key.src };
        let dst = if self.dst.set { self.dst.addr } else { key.dst };
        (src, dst)
    }

    /// The rewrites `src` and `dst` of a packet (`len` bytes) of the tracked flow `entry`:
    /// routed by us if masqueraded, no new connection.
    #[inline(always)]
    fn following(entry: &CtEntryOf<A>, src: RewriteOf<A>, dst: RewriteOf<A>, len: u64) -> Self {
        Translation {
            src,
            dst,
            route: entry.flags & CT_FLAG_SNAT != 0,
            service_id: entry.rev_nat_id,
            backend_id: entry.backend_id,
            counters: traffic(len, 0),
        }
    }

    /// No rewrite, nothing to count; for `service_id`.
    #[inline(always)]
    fn none(service_id: u32) -> Self {
        Translation {
            src: RewriteOf::NONE,
            dst: RewriteOf::NONE,
            route: false,
            service_id,
            backend_id: 0,
            counters: Counters::default(),
        }
    }
}

/// How stale an entry's `last_seen_ns` may be: far finer than what reads it (the 250 ms
/// before an ended flow's masquerade port is reused, the GC's timeouts of a minute and
/// more), coarse enough that a busy flow's entry is not written, and its cache line taken
/// from the other CPUs, on every packet.
const LAST_SEEN_GRANULARITY_NS: u64 = 20_000_000;

/// The other entry of the flow whose entry under `key` is `entry`, if it has one and the map
/// still holds it: its key may carry a newer flow already, whose entry is not this flow's.
/// The key is built in per-CPU memory (`KeyRoom`), valid until the next call.
#[inline(always)]
fn partner<A: Family>(
    key: &CtKeyOf<A>,
    entry: &CtEntryOf<A>,
) -> Option<(&'static CtKeyOf<A>, *mut CtEntryOf<A>)> {
    let room = A::key_room()?;
    if !key.write_peer(entry, &mut room.other) {
        return None;
    }
    let ptr = A::ct_get_ptr_mut(&room.other)?;
    // SAFETY: map values stay valid during the program's run; only compared here.
    let back = room.other.write_peer(unsafe { &*ptr }, &mut room.back);
    (back && room.back == *key).then_some((&room.other, ptr))
}

/// Where `partner` builds keys: the IPv6 path has no stack left for them.
pub struct KeyRoom<A> {
    /// The partner's key.
    pub other: CtKeyOf<A>,
    /// The partner's own partner's key, which must be the key it was found from.
    pub back: CtKeyOf<A>,
}

/// Ends the flow whose entry is `entry` under `key`: removes the entry, or, under a client
/// key that other flows of the client's port need (`CT_FLAG_SHARED`), leaves it there as
/// an anchor holding no flow.
#[inline(always)]
fn retire<A: Family>(key: &CtKeyOf<A>, entry: &mut CtEntryOf<A>) {
    if key.kind == CT_KEY_CLIENT && entry.flags & CT_FLAG_SHARED != 0 {
        entry.direction = CT_ANCHOR;
    } else {
        ct::remove(key);
    }
}

/// Retires the flow that the packet translated by `t` has just recorded (its first: `t`
/// counts a new connection), when the packet cannot go on (no route, its TTL run out, too
/// large for the next hop), as Linux frees the unconfirmed entry of a packet it drops: no
/// state for it, and its masquerade port free at once rather than held by the GC's timeout
/// (a traceroute, or a route gone, would claim one per packet). The flow is the last this
/// CPU recorded (`RecentFlows`).
#[inline(always)]
pub fn forget_new<A: Family>(t: &Translation<A>) {
    if t.counters.conns == 0 {
        return;
    }
    let Some(recent) = A::recent_flows() else {
        return;
    };
    let Some(key) = recent.last() else {
        return;
    };
    let Some(entry) = A::ct_get_ptr_mut(key) else {
        return;
    };
    // SAFETY: map values stay valid during the program's run.
    let entry = unsafe { &mut *entry };
    if let Some((reply, _)) = partner(key, entry) {
        ct::remove(reply);
    }
    retire(key, entry);
}

/// Marks an entry as seen now, to `LAST_SEEN_GRANULARITY_NS`.
#[inline(always)]
fn touch<A>(entry: &mut CtEntryOf<A>, now: u64) {
    if now.wrapping_sub(entry.last_seen_ns) >= LAST_SEEN_GRANULARITY_NS {
        entry.last_seen_ns = now;
    }
}

/// Advances an entry's TCP state with a packet's flags and marks it as seen now; writes
/// only what changed. A flow's one entry keeps the state of each direction: the client's
/// packets (`Side::Ingress`) advance `state`, the backend's `reply_state`. A RST ends the
/// connection both ways, so the flow's other direction, and its other entry if it has one
/// (found under `key`), are closing too (else a flow reset from one side would hold its
/// masquerade port until the GC, instead of giving it up once quiet).
#[inline(always)]
fn track<A: Family>(
    entry: &mut CtEntryOf<A>,
    key: &CtKeyOf<A>,
    flow: &FlowOf<A>,
    now: u64,
    side: Side,
) {
    touch(entry, now);
    if flow.tcp_flags & TCP_RST != 0 {
        if let Some((_, peer)) = partner(key, entry) {
            // SAFETY: as in `tracked_ingress`; only the state byte is written.
            let peer = unsafe { &mut *peer };
            if peer.state != CT_STATE_CLOSING {
                peer.state = CT_STATE_CLOSING;
            }
        }
        entry.state = CT_STATE_CLOSING;
        entry.reply_state = CT_STATE_CLOSING;
        return;
    }
    let state = if side == Side::Egress && entry.direction == CT_FORWARD {
        &mut entry.reply_state
    } else {
        &mut entry.state
    };
    let next = if flow.tcp_flags & TCP_FIN != 0 {
        CT_STATE_CLOSING
    } else if *state == CT_STATE_NEW && (!flow.is_tcp() || flow.tcp_flags & TCP_SYN == 0) {
        CT_STATE_ESTABLISHED
    } else {
        *state
    };
    if next != *state {
        *state = next;
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

/// A packet arriving on an interface, of a tracked flow: its forward direction, or the
/// reply of a masqueraded one. `None` for one that `choose` and `record` must see (no
/// entry, or a new connection on a closed flow's tuple). The caller counts the translation
/// once it has sent the packet on.
#[inline(always)]
pub fn tracked_ingress<A: Family>(flow: &FlowOf<A>, len: u64) -> Option<Verdict<A>> {
    remember_fragment(flow);
    let (entry, found) = find(&flow.key, Side::Ingress)?;
    // The clock is read only for packets that use it (a helper call costs as much as a map
    // lookup): most packets that pass have no entry and are no new flow's.
    let now = lb::now_ns();
    // SAFETY: map values stay valid during the program's run; racing updates of the state
    // and timestamp from another CPU are benign.
    let entry = unsafe { &mut *entry };
    if entry.flags & CT_FLAG_PASS != 0 {
        touch(entry, now);
        return Some(Verdict::pass());
    }
    // A new SYN on a closed flow's tuple is a new connection: balance it again. The old flow
    // is over: its reply tuple (a masquerade port) is given up at once, rather than held
    // until the GC while the client reuses its ports faster than that.
    if flow.is_syn() && entry.state == CT_STATE_CLOSING {
        if let Some((reply, _)) = partner(found, entry) {
            ct::remove(reply);
        }
        return None;
    }
    let (src, dst) = rewrites(entry, found, &flow.key, Side::Ingress)?;
    track(entry, found, flow, now, Side::Ingress);
    Some(Verdict::translate(Translation::following(
        entry, src, dst, len,
    )))
}

/// A new flow's service port, its backend, and when they were chosen.
pub struct Picked<A> {
    pub svc: ServiceValue,
    pub chosen: Chosen<A>,
    pub now: u64,
}

/// What `choose` found for a new flow: its verdict already, or the service port and the
/// backend to record it with (`record`), and the time it was chosen.
pub enum Choice<A> {
    Done(Verdict<A>),
    Chosen(Picked<A>),
}

/// Whether a packet without an entry of ours may start a flow. A TCP segment other than a
/// SYN may not: it belongs to a connection made before the flow was ours, which
/// kube-proxy's kernel NAT carries during a migration (tc runs before netfilter). Balancing
/// it anew would send it mid-stream to a backend that knows nothing of it; left alone, the
/// kernel's conntrack keeps translating it. Asked before anything else about a new flow:
/// most packets that pass are such segments of flows that are no service's, and the service
/// lookups would not change their verdict.
#[inline(always)]
pub fn may_start_flow<A>(flow: &FlowOf<A>) -> bool {
    !flow.is_tcp() || flow.is_syn()
}

/// The first half of a new flow's handling: the service port the flow is for, and its
/// backend.
#[inline(always)]
pub fn choose<A: Family>(flow: &FlowOf<A>) -> Choice<A> {
    if !may_start_flow(flow) {
        return Choice::Done(Verdict::pass());
    }
    let service = ServiceKeyOf::new(flow.key.dst, flow.key.dport, flow.key.proto);
    let Some(svc) = lb::service_for(&service) else {
        return Choice::Done(Verdict::pass());
    };
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 && !lb::source_allowed(svc.id, flow.key.src) {
        return Choice::Done(Verdict::drop_for(DropReason::SourceRange, svc.id));
    }
    let client = A::affinity_client(flow.key.src);
    let affinity = Sticky::client_affinity(&svc, client, AFFINITY_CLIENT_IP);
    let now = lb::now_ns();
    let Some(chosen) = lb::select_backend::<A>(&svc, affinity.as_ref(), now) else {
        return Choice::Done(if svc.flags & SVC_FLAG_DROP_IF_EMPTY != 0 {
            Verdict::drop_for(DropReason::NoLocalEndpoint, svc.id)
        } else {
            Verdict::reject(svc.id)
        });
    };
    Choice::Chosen(Picked { svc, chosen, now })
}

/// The second half: the flow recorded with `chosen`, a backend of `svc`,
/// masqueraded if it must be.
#[inline(always)]
pub fn record<A: Family>(flow: &FlowOf<A>, len: u64, picked: &Picked<A>) -> Verdict<A> {
    let (svc, chosen, now) = (&picked.svc, &picked.chosen, picked.now);
    // A remote backend of an externalTrafficPolicy: Cluster frontend would answer the client
    // directly; a pod sent to itself (hairpin) would see its own address as source.
    let masquerade = (svc.flags & SVC_FLAG_MASQUERADE != 0
        && chosen.backend.flags & BACKEND_FLAG_LOCAL == 0)
        || chosen.backend.addr == flow.key.src;
    let Some(e) = A::new_entries() else {
        return Verdict::drop_for(DropReason::ConntrackInsert, svc.id);
    };
    e.client
        .set_client(flow.key.src, flow.key.sport, flow.key.proto);
    e.forward = CtEntryOf {
        last_seen_ns: now,
        nat_addr: chosen.backend.addr,
        nat_port: chosen.backend.port,
        direction: CT_FORWARD,
        state: CT_STATE_NEW,
        rev_nat_id: svc.id,
        backend_id: chosen.backend_id,
        peer_addr: flow.key.dst,
        peer_port: flow.key.dport,
        flags: 0,
        reply_state: CT_STATE_NEW,
        src_addr: flow.key.src,
        src_port: flow.key.sport,
        pad: 0,
    };
    // A new flow has no other entry yet, whose state a RST would close.
    track(&mut e.forward, &e.client, flow, now, Side::Ingress);
    // The reply entry, if the flow needs one, has seen no packet yet: `NEW` until the first
    // reply (UDP's too, whose forward entry is established at once), which tells
    // `ct::early_drop` a flow never answered.
    e.reply = CtEntryOf {
        nat_addr: flow.key.dst,
        nat_port: flow.key.dport,
        direction: CT_REPLY,
        state: CT_STATE_NEW,
        peer_addr: flow.key.src,
        peer_port: flow.key.sport,
        ..e.forward
    };
    let holder = client_key_holder(flow, chosen, masquerade, e, now);
    let src = match claim_reply_tuple(flow, chosen, masquerade, &holder, e, now) {
        Ok(src) => src,
        Err(reason) => return Verdict::drop_for(reason, svc.id),
    };
    if !ct::put(&e.client, &e.forward) {
        if e.client.write_peer(&e.forward, &mut e.key) {
            ct::remove(&e.key);
        }
        return Verdict::drop_for(DropReason::ConntrackInsert, svc.id);
    }
    if let Some(recent) = A::recent_flows() {
        recent.note(&e.client);
    }
    Verdict::translate(Translation {
        src,
        dst: RewriteOf::to(chosen.backend.addr, chosen.backend.port),
        route: masquerade,
        service_id: svc.id,
        backend_id: chosen.backend_id,
        counters: traffic(len, 1),
    })
}

/// A new flow's entries, and keys, as `record` builds them (`Family::new_entries`).
pub struct NewEntries<A> {
    pub forward: CtEntryOf<A>,
    pub reply: CtEntryOf<A>,
    /// A reply 5-tuple.
    pub key: CtKeyOf<A>,
    /// A client key.
    pub client: CtKeyOf<A>,
    /// Where `find` leaves the key it found an entry under.
    pub found: CtKeyOf<A>,
}

/// Whether a new flow takes its client key (`own`), and what of the entry there it keeps.
/// The key it goes under is in `NewEntries::client` either way (per-CPU memory: a pointer
/// sometimes to the stack and sometimes to a map would double every path after it for the
/// verifier).
struct ClientKey {
    /// The flow goes under its client key, with one entry if unmasqueraded. Else the key is
    /// another live flow's, and the new flow goes under its 5-tuples (two entries).
    own: bool,
    /// The other flow's replies have the reply tuple the new flow would have (one client
    /// port to two frontends that share a backend): the new flow must move to another port.
    clash: bool,
}

/// Who holds the client key of a new flow: nobody; or an anchor, or this client tuple's
/// previous flow (a closed connection's tuple used again, or another CPU recording the same
/// new flow), or a flow that has ended, which the new flow replaces (keeping the key's
/// `CT_FLAG_SHARED`); or another live flow, whose entry is marked shared so that packets it
/// does not match are looked up by their 5-tuples.
#[inline(always)]
fn client_key_holder<A: Family>(
    flow: &FlowOf<A>,
    chosen: &Chosen<A>,
    masquerade: bool,
    e: &mut NewEntries<A>,
    now: u64,
) -> ClientKey {
    let Some(held) = A::ct_get_ptr_mut(&e.client) else {
        return ClientKey {
            own: true,
            clash: false,
        };
    };
    // SAFETY: map values stay valid during the program's run.
    let held = unsafe { &mut *held };
    let shared = held.flags & CT_FLAG_SHARED;
    let previous = held.direction == CT_ANCHOR
        || ({ held.peer_addr } == flow.key.dst && held.peer_port == flow.key.dport);
    if !previous && !ended(held, now) {
        if shared == 0 {
            held.flags |= CT_FLAG_SHARED;
        }
        let clash = held.flags & CT_FLAG_SNAT == 0
            && { held.nat_addr } == chosen.backend.addr
            && held.nat_port == chosen.backend.port;
        e.client = flow.key;
        return ClientKey { own: false, clash };
    }
    if !previous && let Some((reply, _)) = partner(&e.client, held) {
        ct::remove(reply);
    }
    e.forward.flags = shared;
    // A shared port's flows under 5-tuples may hold the reply tuple this flow would have:
    // the one entry found by its client key would take their replies. (Rare enough not to
    // tell an ended flow's tuple from a live one's here.)
    if shared != 0 && !masquerade {
        e.key = reply_tuple(flow, chosen);
        // Taken by a flow under 5-tuples, live or not: this flow joins them, moved.
        if A::ct_get_ptr_mut(&e.key).is_some() {
            e.forward.flags = 0;
            e.client = flow.key;
            return ClientKey {
                own: false,
                clash: true,
            };
        }
    }
    ClientKey {
        own: true,
        clash: false,
    }
}

/// Marks the client key `e.found` shared, recording an anchor there if it holds nothing.
#[inline(always)]
fn share<A: Family>(e: &mut NewEntries<A>, now: u64) {
    if let Some(held) = A::ct_get_ptr_mut(&e.found) {
        // SAFETY: map values stay valid during the program's run; only the flags are written.
        let held = unsafe { &mut *held };
        if held.flags & CT_FLAG_SHARED == 0 {
            held.flags |= CT_FLAG_SHARED;
        }
        return;
    }
    // The reply entry, recorded already, is the room the anchor is built in.
    e.reply = CtEntryOf {
        last_seen_ns: now,
        direction: CT_ANCHOR,
        flags: CT_FLAG_SHARED,
        ..CtEntryOf::default()
    };
    // Without making room in a full map: the GC restores a missing anchor.
    let _ = ct::create_in_room(&e.found, &e.reply);
}

/// A new connection of the node's own to a service port that drops new connections (a
/// `Local` traffic policy with endpoints on other nodes only): the socket hooks leave it
/// addressed to the service, as kube-proxy drops it, and it is dropped here on its way out
/// rather than sent after the default route. A pod's is dropped on its veth's ingress.
/// Costs one lookup, for SYNs and UDP only.
#[inline(always)]
fn unserved_from_node<A: Family>(flow: &FlowOf<A>) -> Verdict<A> {
    if !may_start_flow(flow) {
        return Verdict::pass();
    }
    let key = ServiceKeyOf::new(flow.key.dst, flow.key.dport, flow.key.proto);
    match lb::service(&key) {
        Some(svc) if svc.count == 0 && svc.flags & SVC_FLAG_DROP_IF_EMPTY != 0 => {
            Verdict::drop_for(DropReason::NoLocalEndpoint, svc.id)
        }
        _ => Verdict::pass(),
    }
}

/// The 5-tuple of the backend's replies to the client as it is (unmasqueraded).
#[inline(always)]
fn reply_tuple<A: Family>(flow: &FlowOf<A>, chosen: &Chosen<A>) -> CtKeyOf<A> {
    CtKeyOf::tuple(
        chosen.backend.addr,
        flow.key.src,
        chosen.backend.port,
        flow.key.sport,
        flow.key.proto,
    )
}

/// Records a new flow's reply entry, if it needs one, under a reply tuple (backend →
/// client) that no other live flow holds, and returns the rewrite of the packet's source
/// that the tuple needs. An unmasqueraded flow under its client key needs none: its replies
/// find it there. Else: the client's own address and port when free, or held by an ended
/// flow or by this client tuple's previous flow; a masqueraded flow gets the node's address
/// and a free port; an unmasqueraded flow whose tuple a live flow holds (one client port to
/// two frontends that share a backend) keeps its address and moves to a free port, as
/// Linux's NAT does. Each claim is an insert with `BPF_NOEXIST`, so checking and taking a
/// tuple is one step.
#[inline(always)]
fn claim_reply_tuple<A: Family>(
    flow: &FlowOf<A>,
    chosen: &Chosen<A>,
    masquerade: bool,
    holder: &ClientKey,
    e: &mut NewEntries<A>,
    now: u64,
) -> Result<RewriteOf<A>, DropReason> {
    if !masquerade && holder.own {
        return Ok(RewriteOf::NONE);
    }
    if !masquerade && !holder.clash {
        e.key = reply_tuple(flow, chosen);
        let (key, reply) = (&e.key, &e.reply);
        match ct::create(key, reply) {
            Ok(()) => return Ok(RewriteOf::NONE),
            Err(Refused::Full) => return Err(DropReason::ConntrackInsert),
            Err(Refused::Taken) if replaceable(key, flow, now) && ct::put(key, reply) => {
                return Ok(RewriteOf::NONE);
            }
            Err(Refused::Taken) => {}
        }
    }
    let config = NODE_CONFIG.get(0).ok_or(DropReason::NoMasqueradeAddress)?;
    let (addr, exhausted) = if masquerade {
        let Some(snat_addr) = A::snat_addr() else {
            return Err(DropReason::NoMasqueradeAddress);
        };
        e.reply.flags = if holder.own {
            CT_FLAG_SNAT | CT_FLAG_CLIENT_KEYED
        } else {
            CT_FLAG_SNAT
        };
        e.forward.flags |= CT_FLAG_SNAT;
        (snat_addr, DropReason::NoMasqueradePort)
    } else {
        (flow.key.src, DropReason::ConntrackClash)
    };
    if config.snat_port_max < config.snat_port_min {
        return Err(exhausted);
    }
    // Never zero, by type: the callback's `%` then has no division-by-zero panic path (a
    // subprogram the verifier refuses).
    let range =
        NonZeroU32::MIN.saturating_add((config.snat_port_max - config.snat_port_min).into());
    e.forward.src_addr = addr;
    e.key = CtKeyOf::tuple(
        chosen.backend.addr,
        addr,
        chosen.backend.port,
        0,
        flow.key.proto,
    );
    // Shared by every CPU without a lock: two searches starting from the same place meet
    // at the atomic insert, and the one that loses tries the next port.
    let cursor = SNAT_CURSOR.get_ptr_mut(0);
    let mut search = PortSearch {
        entries: e,
        port_min: config.snat_port_min,
        range,
        now,
        // SAFETY: a valid array slot, read and written whole.
        start: cursor.map_or(0, |c| unsafe { *c }),
        found: false,
        full: false,
    };
    // SAFETY: `try_port::<A>` takes the `PortSearch<A>` it is given, which outlives the
    // loop. A function item cast to a pointer directly, never through an integer, so that
    // it stays the callback relocation the verifier needs.
    let search_ports = |search: &mut PortSearch<A>| unsafe {
        bpf_loop(
            PORT_ATTEMPTS,
            try_port::<A> as *mut c_void,
            (search as *mut PortSearch<A>).cast(),
            0,
        )
    };
    let mut tries = search_ports(&mut search);
    // A full map: room made, the search runs once more.
    if search.full && ct::early_drop::<A>() {
        search.full = false;
        tries = search_ports(&mut search);
    }
    if let Some(cursor) = cursor {
        // SAFETY: as above. Past the port taken (the callback's index + 1), or past every
        // port tried.
        unsafe { *cursor = search.start.wrapping_add(tries.max(0) as u32) };
    }
    if search.full {
        return Err(DropReason::ConntrackInsert);
    }
    if !search.found {
        return Err(exhausted);
    }
    e.forward.src_port = e.key.dport;
    // A flow moved to another port of its client: its replies, addressed to that port, are
    // looked up under its 5-tuple once that port's client key says so.
    if !masquerade {
        e.found.set_client(addr, e.key.dport, flow.key.proto);
        share(e, now);
    }
    Ok(RewriteOf::to(addr, e.key.dport))
}

/// The source port search of `claim_reply_tuple`: `bpf_loop`'s context.
struct PortSearch<A> {
    /// The new flow's entries; `key` is the reply tuple, its `dport` the port tried.
    entries: *mut NewEntries<A>,
    port_min: u16,
    range: NonZeroU32,
    now: u64,
    /// Where in the range the search starts (`SNAT_CURSOR`).
    start: u32,
    found: bool,
    /// The map is full: no port would do.
    full: bool,
}

/// Try `index` of the source port search (`bpf_loop`'s callback: the verifier checks it
/// once, not once per try, as it did each try of a loop unrolled in the program, ~9,000
/// instructions each): the port `index` places past the start, taken if free or if its
/// flow has ended; 1 ends the search, with the reply entry recorded under the port or the
/// map full.
extern "C" fn try_port<A: Family>(index: u64, search: *mut c_void) -> i64 {
    // SAFETY: the `PortSearch<A>` of `claim_reply_tuple`, and its per-CPU entries.
    let search = unsafe { &mut *search.cast::<PortSearch<A>>() };
    let e = unsafe { &mut *search.entries };
    let step = search.start.wrapping_add(index as u32);
    e.key.dport = search.port_min + (step % search.range) as u16;
    let created = match ct::create_in_room(&e.key, &e.reply) {
        Err(Refused::Taken) if free_if_ended(&e.key, search.now) => {
            ct::create_in_room(&e.key, &e.reply)
        }
        created => created,
    };
    search.found = created.is_ok();
    search.full = created == Err(Refused::Full);
    i64::from(search.found || search.full)
}

/// The reply tuple `key` that a new flow of `flow`'s client tuple wants may be taken over:
/// it holds the previous flow of the same client tuple (a closed connection's tuple used
/// again, or another CPU recording the same new flow), or a flow that has ended (freed).
#[inline(always)]
fn replaceable<A: Family>(key: &CtKeyOf<A>, flow: &FlowOf<A>, now: u64) -> bool {
    let Some(held) = A::ct_get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: map values stay valid during the program's run; only read here.
    key.peer(unsafe { &*held }) == Some(flow.key) || free_if_ended(key, now)
}

/// Whether `entry`'s TCP flow has ended: a FIN or RST was seen and it has been quiet for
/// `SNAT_REUSE_AFTER_NS`.
#[inline(always)]
fn ended<A>(entry: &CtEntryOf<A>, now: u64) -> bool {
    entry.state == CT_STATE_CLOSING && now.saturating_sub(entry.last_seen_ns) >= SNAT_REUSE_AFTER_NS
}

/// Frees the reply tuple `key` if its TCP flow has ended (`ended`). As the kernel's NAT
/// reuses TIME_WAIT tuples, this keeps short connections from exhausting the port range
/// while their entries wait out the closing timeout.
#[inline(always)]
fn free_if_ended<A: Family>(key: &CtKeyOf<A>, now: u64) -> bool {
    let Some(reply) = ct::get(key) else {
        return false;
    };
    if reply.direction != CT_REPLY || !ended(&reply, now) {
        return false;
    }
    // The client's tuple may already carry a new flow, masqueraded to another port: that
    // entry is not this flow's and stays.
    if let Some((forward_key, forward)) = partner(key, &reply) {
        // SAFETY: as above.
        let forward = unsafe { &mut *forward };
        if !ended(forward, now) {
            return false;
        }
        retire(forward_key, forward);
    }
    // Another CPU may have freed and re-claimed the tuple since the read above: remove it
    // only if it is still the entry that was read.
    match ct::get(key) {
        Some(now_there) if now_there.last_seen_ns == reply.last_seen_ns => ct::remove(key),
        _ => false,
    }
}

/// A packet leaving through an interface: the reply of an unmasqueraded flow gets its
/// service address back as source.
#[inline(always)]
pub fn egress<A: Family>(flow: &FlowOf<A>, len: u64) -> Verdict<A> {
    remember_fragment(flow);
    let Some((entry, found)) = find(&flow.key, Side::Egress) else {
        return unserved_from_node(flow);
    };
    // SAFETY: as in `tracked_ingress`.
    let entry = unsafe { &mut *entry };
    let Some((src, dst)) = rewrites(entry, found, &flow.key, Side::Egress) else {
        return Verdict::pass();
    };
    // A SYN from the backend once the handshake is over answers a new connection the
    // client made to the backend directly from the same port (the backend would not accept
    // one on a tuple it still has a connection on): the tuple is no longer this flow's.
    let answered = if entry.direction == CT_FORWARD {
        entry.reply_state
    } else {
        entry.state
    };
    if answered != CT_STATE_NEW && flow.tcp_flags & TCP_SYN != 0 {
        retire(found, entry);
        return Verdict::pass();
    }
    track(entry, found, flow, lb::now_ns(), Side::Egress);
    // Never routed by us: the flows translated leaving are the unmasqueraded ones.
    Verdict::translate(Translation {
        src,
        dst,
        route: false,
        service_id: entry.rev_nat_id,
        backend_id: entry.backend_id,
        counters: traffic(len, 0),
    })
}

/// Keeps a first fragment's ports for the later fragments of its datagram.
#[inline(always)]
fn remember_fragment<A: Family>(flow: &FlowOf<A>) {
    if flow.first_fragment {
        let ports = FragPorts {
            sport: flow.key.sport,
            dport: flow.key.dport,
        };
        let key = A::fragment_key(flow.key.src, flow.key.dst, flow.key.proto, flow.ip_id);
        let _ = A::fragments().insert(&key, &ports, 0);
    }
}

/// A later fragment is translated as its datagram's flow (the ports its first fragment
/// carried), addresses only. Without a first fragment seen (lost, or out of order) it is
/// left alone, as the datagram could not be reassembled anyway.
#[inline(always)]
pub fn fragment<A: Family>(frag: &FragmentOf<A>, len: u64, side: Side) -> Option<Translation<A>> {
    let key = A::fragment_key(frag.src, frag.dst, frag.proto, frag.id);
    // SAFETY: map values stay valid during the program's run; the value is copied.
    let ports = (unsafe { A::fragments().get(&key) }).copied()?;
    let key = CtKeyOf::tuple(frag.src, frag.dst, ports.sport, ports.dport, frag.proto);
    let (entry, src, dst) = tracked(&key, side)?;
    Some(Translation::following(&entry, src, dst, len))
}

/// Where a packet is seen: arriving on an interface, or leaving through one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Ingress,
    Egress,
}

/// The entry that tracks a packet with the 5-tuple `key` seen on `side`, and the key it is
/// under. A flow's entry is under the client key of the packet's client end: its source
/// arriving, its destination leaving; it is the packet's if it names the packet's other
/// end (its frontend, or its backend). A masqueraded reply (to the node's masquerade
/// address and a port of the range) is under its 5-tuple, and so is the flow of a packet
/// whose client key is shared and not its own. Either way one lookup, when the first finds
/// the packet's flow or finds nothing.
///
/// The key found under is always returned in the same per-CPU room (`NewEntries::found`):
/// the IPv6 path has no stack left for a key, and a pointer that is sometimes to the stack
/// and sometimes to a map would double every path after it for the verifier.
#[inline(always)]
fn find<A: Family>(
    key: &CtKeyOf<A>,
    side: Side,
) -> Option<(*mut CtEntryOf<A>, &'static CtKeyOf<A>)> {
    let found = &mut A::new_entries()?.found;
    if side == Side::Ingress && masquerade_reply(key) {
        *found = *key;
        if let Some(entry) = A::ct_get_ptr_mut(found) {
            return Some((entry, found));
        }
    }
    match side {
        Side::Ingress => found.set_client(key.src, key.sport, key.proto),
        Side::Egress => found.set_client(key.dst, key.dport, key.proto),
    }
    let entry = A::ct_get_ptr_mut(found)?;
    // SAFETY: map values stay valid during the program's run; only read here.
    let held = unsafe { &*entry };
    let ours = held.direction == CT_FORWARD
        && match side {
            Side::Ingress => ({ held.peer_addr } == key.dst && held.peer_port == key.dport),
            Side::Egress => ({ held.nat_addr } == key.src && held.nat_port == key.sport),
        };
    if ours {
        return Some((entry, found));
    }
    if held.flags & CT_FLAG_SHARED == 0 {
        return None;
    }
    *found = *key;
    Some((A::ct_get_ptr_mut(found)?, found))
}

/// Whether a packet with the 5-tuple `key` is addressed to the node's masquerade address
/// and a port of the masquerade range: a masqueraded flow's reply, if any flow's. The
/// range is kept apart from NodePorts and the node's own ephemeral ports.
#[inline(always)]
fn masquerade_reply<A: Family>(key: &CtKeyOf<A>) -> bool {
    let Some(config) = NODE_CONFIG.get(0) else {
        return false;
    };
    key.dport >= config.snat_port_min
        && key.dport <= config.snat_port_max
        && A::snat_addr() == Some(key.dst)
}

/// The entry that tracks `key` and the rewrites of a packet under it on `side`, if tracked
/// and translated there: for packets that only follow a flow (fragments, ICMP errors),
/// whose entry they do not update.
#[inline(always)]
fn tracked<A: Family>(
    key: &CtKeyOf<A>,
    side: Side,
) -> Option<(CtEntryOf<A>, RewriteOf<A>, RewriteOf<A>)> {
    let (entry, found) = find(key, side)?;
    // SAFETY: map values stay valid during the program's run; the entry is copied at once.
    let entry = unsafe { *entry };
    let (src, dst) = rewrites(&entry, found, key, side)?;
    Some((entry, src, dst))
}

/// The rewrites (source, destination) of a packet with the 5-tuple `key`, tracked by
/// `entry` under `found`, on `side`: ingress translates forward entries and masqueraded
/// replies, egress the replies of unmasqueraded flows (they leave towards the client).
/// `None`: not translated there.
#[inline(always)]
fn rewrites<A: Family>(
    entry: &CtEntryOf<A>,
    found: &CtKeyOf<A>,
    key: &CtKeyOf<A>,
    side: Side,
) -> Option<(RewriteOf<A>, RewriteOf<A>)> {
    if entry.flags & CT_FLAG_PASS != 0 {
        return None;
    }
    let snat = entry.flags & CT_FLAG_SNAT != 0;
    let nat = RewriteOf::to(entry.nat_addr, entry.nat_port);
    let peer = RewriteOf::to(entry.peer_addr, entry.peer_port);
    match (side, entry.direction) {
        // The client's source stays unless the flow was masqueraded or moved to another
        // source port.
        (Side::Ingress, CT_FORWARD) => {
            let src = RewriteOf::to(entry.src_addr, entry.src_port);
            Some((src.when(snat || entry.src_port != key.sport), nat))
        }
        (Side::Ingress, CT_REPLY) if snat => Some((nat, peer)),
        // A reply found by its client key gets its frontend back as source.
        (Side::Egress, CT_FORWARD) if !snat && found.kind == CT_KEY_CLIENT => {
            Some((peer, RewriteOf::NONE))
        }
        // A flow moved to another source port gets its client's port back.
        (Side::Egress, CT_REPLY) if !snat => Some((nat, peer.when(entry.peer_port != key.dport))),
        _ => None,
    }
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) quotes a
/// packet as it was sent, after our translation; it travels back the way a reply to that
/// packet would, so it is translated as that reply would be: the reply's new destination is
/// the quoted packet's new source and the error's new destination, the reply's new source
/// is the quoted packet's new destination (and the error's source when the quoted packet's
/// destination sent it). Linux's NAT and Cilium do the same; without it path-MTU discovery,
/// traceroute and port-unreachable answers break through a service.
#[inline(always)]
pub fn icmp_error<A: Family>(
    quoted: &CtKeyOf<A>,
    sender: A,
    side: Side,
) -> Option<ErrorTranslationOf<A>> {
    let reply = CtKeyOf::tuple(
        quoted.dst,
        quoted.src,
        quoted.dport,
        quoted.sport,
        quoted.proto,
    );
    let (entry, src, dst) = tracked(&reply, side)?;
    let outer_src = if src.set && sender == quoted.dst {
        RewriteOf::to(src.addr, 0)
    } else {
        RewriteOf::NONE
    };
    let outer_dst = if dst.set && dst.addr != quoted.src {
        RewriteOf::to(dst.addr, 0)
    } else {
        RewriteOf::NONE
    };
    Some(ErrorTranslationOf {
        inner_src: dst,
        inner_dst: src,
        outer_src,
        outer_dst,
        route: entry.flags & CT_FLAG_SNAT != 0,
    })
}
