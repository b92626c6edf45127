//! Garbage collection of our conntrack maps (one per address family): a flow's two entries
//! expire together once both have been idle longer than the flow's timeout (by protocol and
//! TCP state). A full map also has the datapath drop flows never answered to make room:
//! each collection counts those (`ct_account`, shared by the two maps) and removes what is
//! left of a flow that lost one entry.
use std::{
    collections::HashMap,
    hash::Hash,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};

use crate::ct_account::{CtAccount, evicted};
use proxy_common::{
    CT_FLAG_PASS, CT_STATE_CLOSING, CtEntry, CtEntry6, CtEntryOf, CtKey, CtKey6, CtKeyOf,
    ct_flow_timeout_secs, maps,
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

/// What one collection removes from a map read at `read_at_ns`.
#[derive(Debug, PartialEq, Eq)]
pub struct Garbage<A> {
    /// Entries of flows idle past their timeout.
    pub expired: Vec<CtKeyOf<A>>,
    /// The remaining entry of each live flow that lost the other.
    pub orphaned: Vec<CtKeyOf<A>>,
}

/// Sorts `entries`, read whole starting at `read_at_ns`, into garbage: flows idle past their
/// timeout at `now_ns`, and live flows that lost an entry. A flow is counted as having
/// lost one only if its remaining entry was last used before the read began (a flow made
/// during the read may show one entry only), is not a pass entry (those come alone) and is
/// not closing (a closing flow's entries are removed one at a time by the datapath).
pub fn garbage<A: Copy + Eq + Hash>(
    entries: &HashMap<CtKeyOf<A>, CtEntryOf<A>>,
    read_at_ns: u64,
    now_ns: u64,
) -> Garbage<A> {
    let mut found = Garbage {
        expired: Vec::new(),
        orphaned: Vec::new(),
    };
    for (key, entry) in entries {
        let peer = entries.get(&key.peer(entry));
        let last_seen = peer.map_or(entry.last_seen_ns, |p| {
            p.last_seen_ns.max(entry.last_seen_ns)
        });
        let timeout = ct_flow_timeout_secs(
            key.proto,
            entry.state,
            peer.map_or(entry.state, |p| p.state),
        );
        if now_ns.saturating_sub(last_seen) > timeout * NS_PER_SEC {
            found.expired.push(*key);
        } else if peer.is_none()
            && entry.flags & CT_FLAG_PASS == 0
            && entry.state != CT_STATE_CLOSING
            && entry.last_seen_ns < read_at_ns
        {
            found.orphaned.push(*key);
        }
    }
    found
}

/// One map's entries, read whole.
fn read<A>(
    map: &BpfHashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>,
) -> Option<HashMap<CtKeyOf<A>, CtEntryOf<A>>>
where
    A: Copy + Eq + Hash,
    CtKeyOf<A>: aya::Pod,
    CtEntryOf<A>: aya::Pod,
{
    Some(crate::map_batch::read_all(map).ok()?.into_iter().collect())
}

/// Removes `entries`' garbage from `map`: how many entries it removed, and how many were
/// garbage.
fn sweep<A>(
    map: &mut BpfHashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>,
    entries: &HashMap<CtKeyOf<A>, CtEntryOf<A>>,
    read_at: u64,
) -> (u64, usize)
where
    A: Copy + Eq + Hash,
    CtKeyOf<A>: aya::Pod,
    CtEntryOf<A>: aya::Pod,
{
    let found = garbage(entries, read_at, crate::clock::flow_clock_ns());
    let mut removed = 0;
    for key in found.expired.iter().chain(&found.orphaned) {
        // The datapath may have refreshed or evicted it meanwhile; either way is fine.
        removed += u64::from(map.remove(key).is_ok());
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
    use proxy_common::{
        CT_FORWARD, CT_REPLY, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, IPPROTO_TCP,
        IPPROTO_UDP,
    };

    use super::*;

    fn expired(entries: &HashMap<CtKey, CtEntry>, now_ns: u64) -> Vec<CtKey> {
        garbage(entries, now_ns, now_ns).expired
    }

    fn flow(
        proto: u8,
        forward_state: u8,
        forward_seen_s: u64,
        reply_state: u8,
        reply_seen_s: u64,
    ) -> HashMap<CtKey, CtEntry> {
        let key = CtKey {
            src: [10, 0, 0, 1],
            dst: [10, 96, 0, 10],
            sport: 40000,
            dport: 80,
            proto,
            pad: 0,
            pad2: 0,
        };
        let forward = CtEntry {
            nat_addr: [10, 244, 0, 2],
            nat_port: 8080,
            direction: CT_FORWARD,
            state: forward_state,
            rev_nat_id: 1,
            backend_id: 1,
            peer_addr: key.src,
            peer_port: key.sport,
            flags: 0,
            pad: 0,
            last_seen_ns: forward_seen_s * NS_PER_SEC,
        };
        let reply = CtEntry {
            nat_addr: key.dst,
            nat_port: key.dport,
            direction: CT_REPLY,
            state: reply_state,
            last_seen_ns: reply_seen_s * NS_PER_SEC,
            ..forward
        };
        HashMap::from([(key, forward), (key.peer(&forward), reply)])
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
        let (key, entry) = whole.iter().next().map(|(k, e)| (*k, *e)).unwrap();
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
        // A whole flow, a closing one and a pass entry are not orphans.
        assert!(
            garbage(&whole, 120 * NS_PER_SEC, 120 * NS_PER_SEC)
                .orphaned
                .is_empty()
        );
        let closing = CtEntry {
            state: CT_STATE_CLOSING,
            ..entry
        };
        let pass = CtEntry {
            flags: CT_FLAG_PASS,
            ..entry
        };
        for alone in [closing, pass] {
            let map = HashMap::from([(key, alone)]);
            assert!(
                garbage(&map, 120 * NS_PER_SEC, 120 * NS_PER_SEC)
                    .orphaned
                    .is_empty()
            );
        }
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
                && first.contains("conntrack=128"),
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
                && next.contains("conntrack6=64"),
            "{next}"
        );
    }
}
