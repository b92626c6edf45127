//! Garbage collection of our conntrack map: a flow's two entries expire together once
//! both have been idle longer than the flow's timeout (by protocol and TCP state). The LRU
//! map also evicts the least recently used entries when it is full: each collection counts
//! those (`ct_account`) and removes what is left of a flow that lost one entry so.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use aya::maps::MapData;

use crate::ct_account::{CtAccount, evicted};
use proxy_common::{CT_FLAG_PASS, CT_STATE_CLOSING, CtEntry, CtKey, ct_flow_timeout_secs};

const NS_PER_SEC: u64 = 1_000_000_000;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries left in the map.
    pub entries: usize,
    /// Entries of flows idle past their timeout, and the remaining entries of live flows
    /// whose other entry was evicted (a flow cannot work on one; a UDP flow then starts
    /// afresh with its next datagram): both removed.
    pub expired: usize,
    /// Entries the LRU map evicted since it was created, at least (`ct_account`).
    pub evicted: u64,
}

/// What one collection removes from a map read at `read_at_ns`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Garbage {
    /// Entries of flows idle past their timeout.
    pub expired: Vec<CtKey>,
    /// The remaining entry of each live flow that lost the other.
    pub orphaned: Vec<CtKey>,
}

/// Sorts `entries`, read whole starting at `read_at_ns`, into garbage: flows idle past their
/// timeout at `now_ns`, and live flows that lost an entry. A flow is counted as having
/// lost one only if its remaining entry was last used before the read began (a flow made
/// during the read may show one entry only), is not a pass entry (those come alone) and is
/// not closing (a closing flow's entries are removed one at a time by the datapath).
pub fn garbage(entries: &HashMap<CtKey, CtEntry>, read_at_ns: u64, now_ns: u64) -> Garbage {
    let mut found = Garbage::default();
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

/// One collection; `None` if the map could not be read this pass (it is read at the next):
/// an unread map would look empty, and every entry in it evicted.
pub fn collect_garbage(
    conntrack: &mut aya::maps::HashMap<MapData, CtKey, CtEntry>,
    account: &CtAccount,
) -> Option<GcReport> {
    let before = account.read();
    let read_at = crate::clock::monotonic_ns();
    let entries: HashMap<CtKey, CtEntry> = crate::map_batch::read_all(conntrack)
        .ok()?
        .into_iter()
        .collect();
    let evicted = evicted(before, account.read(), entries.len() as u64);
    let found = garbage(&entries, read_at, crate::clock::monotonic_ns());
    let mut removed = 0;
    for key in found.expired.iter().chain(&found.orphaned) {
        // The datapath may have refreshed or evicted it meanwhile; either way is fine.
        removed += u64::from(conntrack.remove(key).is_ok());
    }
    account.add_deleted(removed);
    let garbage = found.expired.len() + found.orphaned.len();
    Some(GcReport {
        entries: entries.len() - garbage,
        expired: garbage,
        evicted,
    })
}

/// Collects garbage every `interval` on a background thread, so that scanning the map
/// never delays programming; `report` gets the outcome of every pass. The receiver hears
/// only if the thread ends (it panicked).
pub fn collect_garbage_every(
    mut conntrack: aya::maps::HashMap<MapData, CtKey, CtEntry>,
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

/// Warnings about entries evicted from a full conntrack map, at most one per `every`:
/// each says how many since the last one.
pub struct EvictionWarnings {
    every: Duration,
    last: Option<Instant>,
    unreported: usize,
}

impl EvictionWarnings {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            unreported: 0,
        }
    }

    /// Notes `evicted` more entries evicted at `now`; the warning to log, if one is due.
    pub fn note(
        &mut self,
        evicted: usize,
        entries: usize,
        capacity: u32,
        now: Instant,
    ) -> Option<String> {
        self.unreported += evicted;
        if self.unreported == 0 || self.last.is_some_and(|t| now < t + self.every) {
            return None;
        }
        self.last = Some(now);
        let lost = std::mem::take(&mut self.unreported);
        Some(format!(
            "conntrack map full: {lost} entries of live flows evicted to make room, each \
             breaking its flow ({entries} of {capacity} entries in use); raise --map-size {}={}",
            proxy_common::maps::CONNTRACK,
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
            pad: [0; 3],
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
        // Used before the read began: its partner was evicted.
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
    fn eviction_warnings_are_rate_limited_and_count_what_they_held_back() {
        let mut warnings = EvictionWarnings::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(warnings.note(0, 10, 64, t0), None);
        let first = warnings.note(3, 64, 64, t0).unwrap();
        assert!(
            first.contains("3 entries") && first.contains("conntrack=128"),
            "{first}"
        );
        assert_eq!(warnings.note(5, 64, 64, t0 + Duration::from_secs(30)), None);
        let next = warnings
            .note(1, 64, 64, t0 + Duration::from_secs(61))
            .unwrap();
        assert!(next.contains("6 entries"), "{next}");
    }
}
