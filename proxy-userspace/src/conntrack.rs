//! Garbage collection of our conntrack maps (one per address family): a flow's entries
//! expire together once all have been idle longer than the flow's timeout (by protocol and
//! TCP state), and the client keys that flows under 5-tuples need stay marked (anchors). A full map also has the datapath drop flows never answered to make room:
//! each collection counts those (`ct_account`, shared by the two maps) and removes what is
//! left of a flow that lost one entry.
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};

use crate::ct_account::{CtAccount, evicted};
use proxy_common::{
    CT_ANCHOR, CT_FLAG_CLIENT_KEYED, CT_FLAG_PASS, CT_FLAG_SHARED, CT_FLAG_SNAT, CT_FORWARD,
    CT_KEY_CLIENT, CT_KEY_TUPLE, CT_REPLY, CT_STATE_CLOSING, CtEntry, CtEntry6, CtEntryOf, CtKey,
    CtKey6, CtKeyOf, ct_flow_timeout_secs, maps,
};

/// The conntrack maps, IPv4 and IPv6.
pub struct Conntracks {
    pub v4: BpfHashMap<MapData, CtKey, CtEntry>,
    pub v6: BpfHashMap<MapData, CtKey6, CtEntry6>,
}

impl Conntracks {
    pub fn open(bpffs: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            v4: crate::maps::open(bpffs, maps::CONNTRACK)?,
            v6: crate::maps::open(bpffs, maps::CONNTRACK6)?,
        })
    }

    /// Each map's capacity (the pinned map's own: one created by an earlier agent keeps its
    /// size), IPv4's then IPv6's.
    pub fn capacities(&self) -> anyhow::Result<[u32; 2]> {
        use aya::maps::IterableMap as _;
        Ok([
            self.v4.map().info()?.max_entries(),
            self.v6.map().info()?.max_entries(),
        ])
    }
}

const NS_PER_SEC: u64 = 1_000_000_000;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries left in each map, IPv4's then IPv6's.
    pub entries: [usize; 2],
    /// Entries of flows idle past their timeout, and the remaining entries of live flows
    /// that lost their other entry (a flow cannot work on one; a UDP flow then starts
    /// afresh with its next datagram): both removed.
    pub expired: usize,
    /// Entries the datapath dropped from a full map to make room since it was created, at
    /// least (`ct_account`).
    pub evicted: u64,
}

/// What one collection removes from (and repairs in) a map read at `read_at_ns`.
#[derive(Debug, PartialEq, Eq)]
pub struct Garbage<A: Copy> {
    /// Entries of flows idle past their timeout, and anchors no flow needs any more.
    pub expired: Vec<CtKeyOf<A>>,
    /// The remaining entry of each live flow that lost the other.
    pub orphaned: Vec<CtKeyOf<A>>,
    /// Client keys that live flows under 5-tuples need marked shared, with what to write
    /// there: an anchor where nothing (or a flow that ended) is, or the flow there marked.
    pub repairs: Vec<(CtKeyOf<A>, CtEntryOf<A>)>,
}

/// An anchor: a client key's entry that holds no flow, only `CT_FLAG_SHARED`.
pub fn anchor<A: Copy + Default>(now_ns: u64) -> CtEntryOf<A> {
    CtEntryOf {
        direction: CT_ANCHOR,
        flags: CT_FLAG_SHARED,
        last_seen_ns: now_ns,
        ..CtEntryOf::default()
    }
}

/// Ends a flow's entry under `key` as the datapath does: removes it, or, under a client
/// key that other flows need (`shared`), leaves an anchor there. Whether it removed one
/// (gone already is fine).
pub fn retire<A>(
    map: &mut BpfHashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>,
    key: &CtKeyOf<A>,
    shared: bool,
) -> bool
where
    A: Copy + Default,
    CtKeyOf<A>: aya::Pod,
    CtEntryOf<A>: aya::Pod,
{
    if shared && key.kind == CT_KEY_CLIENT {
        let _ = map.insert(
            key,
            anchor(crate::clock::flow_clock_ns()),
            crate::maps::BPF_EXIST,
        );
        return false;
    }
    map.remove(key).is_ok()
}

/// Sorts `entries`, read whole starting at `read_at_ns`, into garbage: flows idle past their
/// timeout at `now_ns`, and live flows that lost an entry. A flow is counted as having
/// lost one only if its remaining entry was last used before the read began (a flow made
/// during the read may show one entry only), is not a pass entry (those come alone) and is
/// not closing (a closing flow's entries are removed one at a time by the datapath).
///
/// It also keeps the invariant the datapath relies on: every live flow under 5-tuples is
/// found from a client key marked shared (its client's, and for an unmasqueraded reply
/// the port it is addressed to). An expired flow entry such a flow needs becomes an anchor;
/// a missing anchor (a race between the datapath's removal and its mark) is recreated; an
/// anchor that nothing needs, and that was not touched during the read, goes.
pub fn garbage<A: Copy + Default + Eq + Hash>(
    entries: &HashMap<CtKeyOf<A>, CtEntryOf<A>>,
    read_at_ns: u64,
    now_ns: u64,
) -> Garbage<A> {
    let mut found = Garbage {
        expired: Vec::new(),
        orphaned: Vec::new(),
        repairs: Vec::new(),
    };
    let idle = |key: &CtKeyOf<A>, entry: &CtEntryOf<A>| {
        let peer = key.peer(entry).and_then(|peer| entries.get(&peer));
        let last_seen = peer.map_or(entry.last_seen_ns, |p| {
            p.last_seen_ns.max(entry.last_seen_ns)
        });
        // A flow with one entry keeps both directions' states in it.
        let other_state = match (key.peer(entry), peer) {
            (None, _) => entry.reply_state,
            (Some(_), Some(p)) => p.state,
            (Some(_), None) => entry.state,
        };
        let timeout = ct_flow_timeout_secs(key.proto, entry.state, other_state);
        now_ns.saturating_sub(last_seen) > timeout * NS_PER_SEC
    };
    let needed: HashSet<CtKeyOf<A>> = entries
        .iter()
        .filter(|(key, entry)| key.kind == CT_KEY_TUPLE && !idle(key, entry))
        .filter_map(|(key, entry)| shared_client_key(key, entry))
        .collect();
    for (key, entry) in entries {
        let needs_anchor = needed.contains(key);
        if entry.direction == CT_ANCHOR {
            if !needs_anchor && entry.last_seen_ns < read_at_ns {
                found.expired.push(*key);
            }
            continue;
        }
        let lost_peer = key
            .peer(entry)
            .is_some_and(|peer| !entries.contains_key(&peer))
            && entry.flags & CT_FLAG_PASS == 0
            && entry.state != CT_STATE_CLOSING
            && entry.last_seen_ns < read_at_ns;
        let expired = idle(key, entry);
        if (expired || lost_peer) && needs_anchor {
            found.repairs.push((*key, anchor(now_ns)));
        } else if expired {
            found.expired.push(*key);
        } else if lost_peer {
            found.orphaned.push(*key);
        } else if needs_anchor && entry.flags & CT_FLAG_SHARED == 0 {
            let mut marked = *entry;
            marked.flags |= CT_FLAG_SHARED;
            found.repairs.push((*key, marked));
        }
    }
    for key in needed {
        if !entries.contains_key(&key) {
            found.repairs.push((key, anchor(now_ns)));
        }
    }
    found
}

/// The client key that the flow entry `entry` under the 5-tuple `key` must be found from,
/// marked shared: a forward entry's client (the packet's source), an unmasqueraded reply's
/// client port (its destination). A masqueraded reply is found by its destination alone,
/// and a reply whose flow is under its client key by that key.
fn shared_client_key<A: Copy + Default>(
    key: &CtKeyOf<A>,
    entry: &CtEntryOf<A>,
) -> Option<CtKeyOf<A>> {
    match entry.direction {
        CT_FORWARD => Some(CtKeyOf::client(key.src, key.sport, key.proto)),
        CT_REPLY if entry.flags & (CT_FLAG_SNAT | CT_FLAG_CLIENT_KEYED) == 0 => {
            Some(CtKeyOf::client(key.dst, key.dport, key.proto))
        }
        _ => None,
    }
}

/// One map's entries, read whole.
fn read<A>(
    map: &BpfHashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>,
) -> Option<HashMap<CtKeyOf<A>, CtEntryOf<A>>>
where
    A: Copy + Default + Eq + Hash,
    CtKeyOf<A>: aya::Pod,
    CtEntryOf<A>: aya::Pod,
{
    Some(crate::map_batch::read_all(map).ok()?.into_iter().collect())
}

/// Removes `entries`' garbage from `map` and makes its repairs: how many entries it
/// removed, and how many were garbage.
fn sweep<A>(
    map: &mut BpfHashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>,
    entries: &HashMap<CtKeyOf<A>, CtEntryOf<A>>,
    read_at: u64,
) -> (u64, usize)
where
    A: Copy + Default + Eq + Hash,
    CtKeyOf<A>: aya::Pod,
    CtEntryOf<A>: aya::Pod,
{
    let found = garbage(entries, read_at, crate::clock::flow_clock_ns());
    let mut removed = 0;
    for key in found.expired.iter().chain(&found.orphaned) {
        // The datapath may have refreshed or evicted it meanwhile; either way is fine.
        removed += u64::from(map.remove(key).is_ok());
    }
    for (key, entry) in &found.repairs {
        // A full map keeps the repair for the next pass.
        let _ = map.insert(key, entry, 0);
    }
    (removed, found.expired.len() + found.orphaned.len())
}

/// One collection; `None` if a map could not be read this pass (it is read at the next):
/// an unread map would look empty, and every entry in it evicted.
pub fn collect_garbage(conntrack: &mut Conntracks, account: &CtAccount) -> Option<GcReport> {
    let before = account.read();
    let read_at = crate::clock::flow_clock_ns();
    let v4 = read(&conntrack.v4)?;
    let v6 = read(&conntrack.v6)?;
    let evicted = evicted(before, account.read(), (v4.len() + v6.len()) as u64);
    let (removed4, garbage4) = sweep(&mut conntrack.v4, &v4, read_at);
    let (removed6, garbage6) = sweep(&mut conntrack.v6, &v6, read_at);
    account.add_deleted(removed4 + removed6);
    Some(GcReport {
        entries: [v4.len() - garbage4, v6.len() - garbage6],
        expired: garbage4 + garbage6,
        evicted,
    })
}

/// Collects garbage every `interval` on a background thread, so that scanning the maps
/// never delays programming; `report` gets the outcome of every pass. The receiver hears
/// only if the thread ends (it panicked).
pub fn collect_garbage_every(
    mut conntrack: Conntracks,
    account: CtAccount,
    interval: std::time::Duration,
    mut report: impl FnMut(GcReport) + Send + 'static,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    crate::background::spawn("conntrack-gc", move || {
        loop {
            std::thread::sleep(interval);
            if let Some(done) = collect_garbage(&mut conntrack, &account) {
                report(done);
            }
        }
    })
}

/// Warnings about a full conntrack map, at most one per `every`: each says how many
/// entries the datapath dropped to make room and how many new flows it refused since the
/// last one.
pub struct FullMapWarnings {
    every: Duration,
    last: Option<Instant>,
    dropped: u64,
    refused: u64,
}

impl FullMapWarnings {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            dropped: 0,
            refused: 0,
        }
    }

    /// Notes `dropped` more entries dropped to make room and `refused` more new flows
    /// refused at `now`, with each map's (IPv4's, IPv6's) entries and capacity; the warning
    /// to log, if one is due. It names the fuller map: only a full map drops or refuses.
    pub fn note(
        &mut self,
        dropped: u64,
        refused: u64,
        entries: [usize; 2],
        capacities: [u32; 2],
        now: Instant,
    ) -> Option<String> {
        self.dropped += dropped;
        self.refused += refused;
        if self.dropped + self.refused == 0 || self.last.is_some_and(|t| now < t + self.every) {
            return None;
        }
        self.last = Some(now);
        let (dropped, refused) = (
            std::mem::take(&mut self.dropped),
            std::mem::take(&mut self.refused),
        );
        let fill = |i: usize| entries[i] as f64 / f64::from(capacities[i].max(1));
        let i = usize::from(fill(1) > fill(0));
        let (entries, capacity) = (entries[i], capacities[i]);
        let map = [maps::CONNTRACK, maps::CONNTRACK6][i];
        Some(format!(
            "conntrack map {map} full: {dropped} entries of flows never answered dropped to \
             make room, {refused} new flows refused ({entries} of {capacity} entries in use); \
             raise --map-size {map}={}",
            u64::from(capacity) * 2
        ))
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::{CT_STATE_ESTABLISHED, CT_STATE_NEW, IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    fn expired(entries: &HashMap<CtKey, CtEntry>, now_ns: u64) -> Vec<CtKey> {
        garbage(entries, now_ns, now_ns).expired
    }

    const CLIENT: [u8; 4] = [10, 0, 0, 1];
    const NODE: [u8; 4] = [192, 168, 0, 1];

    /// A masqueraded flow: its entry under the client key, and its reply entry.
    fn flow(
        proto: u8,
        forward_state: u8,
        forward_seen_s: u64,
        reply_state: u8,
        reply_seen_s: u64,
    ) -> HashMap<CtKey, CtEntry> {
        let key = CtKey::client(CLIENT, 40000, proto);
        let forward = CtEntry {
            nat_addr: [10, 244, 0, 2],
            nat_port: 8080,
            direction: CT_FORWARD,
            state: forward_state,
            rev_nat_id: 1,
            backend_id: 1,
            peer_addr: [10, 96, 0, 10],
            peer_port: 80,
            flags: CT_FLAG_SNAT,
            src_addr: NODE,
            src_port: 61000,
            last_seen_ns: forward_seen_s * NS_PER_SEC,
            ..CtEntry::default()
        };
        let reply = CtEntry {
            nat_addr: forward.peer_addr,
            nat_port: forward.peer_port,
            direction: CT_REPLY,
            state: reply_state,
            peer_addr: CLIENT,
            peer_port: 40000,
            flags: CT_FLAG_SNAT | CT_FLAG_CLIENT_KEYED,
            last_seen_ns: reply_seen_s * NS_PER_SEC,
            ..forward
        };
        HashMap::from([(key, forward), (key.peer(&forward).unwrap(), reply)])
    }

    /// An unmasqueraded flow: one entry, under the client key, with both states.
    fn one_entry(proto: u8, state: u8, reply_state: u8, seen_s: u64) -> (CtKey, CtEntry) {
        let (key, mut entry) = flow(proto, state, seen_s, reply_state, seen_s)
            .into_iter()
            .find(|(k, _)| k.kind == CT_KEY_CLIENT)
            .unwrap();
        entry.flags = 0;
        entry.reply_state = reply_state;
        entry.src_addr = CLIENT;
        entry.src_port = 40000;
        (key, entry)
    }

    #[test]
    fn established_tcp_flow_lives_while_either_side_is_active() {
        // The reply side never left NEW (server silent), the client keeps it established.
        let entries = flow(IPPROTO_TCP, CT_STATE_ESTABLISHED, 1000, CT_STATE_NEW, 10);
        assert!(expired(&entries, 1500 * NS_PER_SEC).is_empty());
        assert_eq!(
            expired(&entries, (1000 + 6 * 3600 + 1) * NS_PER_SEC).len(),
            2
        );
        // The same with one entry: the backend's state established, the client's new.
        let one = HashMap::from([one_entry(
            IPPROTO_TCP,
            CT_STATE_NEW,
            CT_STATE_ESTABLISHED,
            1000,
        )]);
        assert!(expired(&one, 1500 * NS_PER_SEC).is_empty());
        assert_eq!(expired(&one, (1000 + 6 * 3600 + 1) * NS_PER_SEC).len(), 1);
        let half_open = HashMap::from([one_entry(IPPROTO_TCP, CT_STATE_NEW, CT_STATE_NEW, 1000)]);
        assert_eq!(expired(&half_open, 1061 * NS_PER_SEC).len(), 1);
    }

    #[test]
    fn closing_and_udp_flows_expire_soon() {
        let closing = flow(
            IPPROTO_TCP,
            CT_STATE_CLOSING,
            100,
            CT_STATE_ESTABLISHED,
            100,
        );
        assert_eq!(expired(&closing, 161 * NS_PER_SEC).len(), 2);
        let udp = flow(
            IPPROTO_UDP,
            CT_STATE_ESTABLISHED,
            100,
            CT_STATE_ESTABLISHED,
            150,
        );
        assert!(expired(&udp, 200 * NS_PER_SEC).is_empty());
        assert_eq!(expired(&udp, 211 * NS_PER_SEC).len(), 2);
    }

    #[test]
    fn a_live_flow_that_lost_an_entry_is_orphaned_unless_it_may_be_mid_insert_or_closing() {
        let whole = flow(
            IPPROTO_UDP,
            CT_STATE_ESTABLISHED,
            100,
            CT_STATE_ESTABLISHED,
            100,
        );
        for (key, entry) in whole.iter().map(|(k, e)| (*k, *e)) {
            let lone = HashMap::from([(key, entry)]);
            // Used before the read began: its partner was dropped.
            let found = garbage(&lone, 120 * NS_PER_SEC, 120 * NS_PER_SEC);
            assert_eq!((found.orphaned, found.expired), (vec![key], vec![]));
            // Used during the read: its partner may be inserted in a part already read.
            assert!(
                garbage(&lone, 100 * NS_PER_SEC, 101 * NS_PER_SEC)
                    .orphaned
                    .is_empty()
            );
            // Idle past its timeout: expired, not lost.
            let found = garbage(&lone, 500 * NS_PER_SEC, 500 * NS_PER_SEC);
            assert_eq!((found.orphaned, found.expired), (vec![], vec![key]));
            let closing = CtEntry {
                state: CT_STATE_CLOSING,
                ..entry
            };
            let map = HashMap::from([(key, closing)]);
            assert!(
                garbage(&map, 120 * NS_PER_SEC, 120 * NS_PER_SEC)
                    .orphaned
                    .is_empty()
            );
        }
        // A whole flow, a flow with one entry and a pass entry are not orphans.
        let (key, entry) = one_entry(IPPROTO_UDP, CT_STATE_ESTABLISHED, CT_STATE_NEW, 100);
        let pass = CtEntry {
            flags: CT_FLAG_PASS,
            ..entry
        };
        for map in [
            whole,
            HashMap::from([(key, entry)]),
            HashMap::from([(key, pass)]),
        ] {
            assert!(
                garbage(&map, 120 * NS_PER_SEC, 120 * NS_PER_SEC)
                    .orphaned
                    .is_empty()
            );
        }
    }

    /// Two flows from one client port: the first under the client key, the second under
    /// 5-tuples, moved to another port; and the keys the second needs marked.
    fn shared_port(first_seen_s: u64, second_seen_s: u64) -> HashMap<CtKey, CtEntry> {
        let (client, mut first) = one_entry(
            IPPROTO_UDP,
            CT_STATE_ESTABLISHED,
            CT_STATE_NEW,
            first_seen_s,
        );
        first.flags = CT_FLAG_SHARED;
        let forward_key = CtKey::tuple(CLIENT, [10, 96, 0, 11], 40000, 53, IPPROTO_UDP);
        let second = CtEntry {
            peer_addr: forward_key.dst,
            peer_port: 53,
            src_port: 61000,
            flags: 0,
            last_seen_ns: second_seen_s * NS_PER_SEC,
            ..first
        };
        let reply_key = forward_key.peer(&second).unwrap();
        let reply = CtEntry {
            nat_addr: forward_key.dst,
            nat_port: 53,
            direction: CT_REPLY,
            peer_addr: CLIENT,
            peer_port: 40000,
            ..second
        };
        let moved_to = CtKey::client(CLIENT, 61000, IPPROTO_UDP);
        HashMap::from([
            (client, first),
            (forward_key, second),
            (reply_key, reply),
            (moved_to, anchor(second_seen_s * NS_PER_SEC)),
        ])
    }

    #[test]
    fn client_keys_that_flows_under_5_tuples_need_stay_marked_and_anchors_no_flow_needs_go() {
        let client = CtKey::client(CLIENT, 40000, IPPROTO_UDP);
        let moved_to = CtKey::client(CLIENT, 61000, IPPROTO_UDP);
        // Both flows live: nothing to do.
        let both = shared_port(100, 100);
        assert_eq!(
            garbage(&both, 120 * NS_PER_SEC, 120 * NS_PER_SEC),
            Garbage {
                expired: vec![],
                orphaned: vec![],
                repairs: vec![]
            }
        );
        // The first flow expired while the second lives: its entry becomes an anchor.
        let first_over = shared_port(100, 150);
        let found = garbage(&first_over, 200 * NS_PER_SEC, 200 * NS_PER_SEC);
        assert_eq!(found.repairs, vec![(client, anchor(200 * NS_PER_SEC))]);
        assert!(found.expired.is_empty());
        // A missing anchor, or a missing mark, is restored.
        let mut lost = shared_port(100, 100);
        lost.remove(&moved_to);
        lost.get_mut(&client).unwrap().flags = 0;
        let mut repairs = garbage(&lost, 120 * NS_PER_SEC, 120 * NS_PER_SEC).repairs;
        repairs.sort_by_key(|(k, _)| k.sport);
        let marked = CtEntry {
            flags: CT_FLAG_SHARED,
            ..both[&client]
        };
        assert_eq!(
            repairs,
            vec![(client, marked), (moved_to, anchor(120 * NS_PER_SEC))]
        );
        // Both expired: everything goes, the anchor too once untouched during the read.
        let mut gone = garbage(&both, 500 * NS_PER_SEC, 500 * NS_PER_SEC).expired;
        gone.sort_by_key(|k| (k.kind, k.sport, k.dport));
        assert_eq!(gone.len(), 4, "{gone:?}");
        let anchors_read_after = garbage(&both, 50 * NS_PER_SEC, 500 * NS_PER_SEC).expired;
        assert!(!anchors_read_after.contains(&moved_to));
    }

    #[test]
    fn full_map_warnings_are_rate_limited_count_what_they_held_back_and_name_the_full_map() {
        let mut warnings = FullMapWarnings::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let caps = [64, 32];
        assert_eq!(warnings.note(0, 0, [10, 0], caps, t0), None);
        let first = warnings.note(4, 1, [64, 1], caps, t0).unwrap();
        assert!(
            first.contains("4 entries")
                && first.contains("1 new flows")
                && first.contains("ct_flows=128"),
            "{first}"
        );
        assert_eq!(
            warnings.note(2, 3, [64, 1], caps, t0 + Duration::from_secs(30)),
            None
        );
        let next = warnings
            .note(0, 2, [10, 32], caps, t0 + Duration::from_secs(61))
            .unwrap();
        assert!(
            next.contains("2 entries")
                && next.contains("5 new flows")
                && next.contains("ct_flows6=64"),
            "{next}"
        );
    }
}
