//! Garbage collection of our conntrack map: a flow's two entries expire together once
//! both have been idle longer than the flow's timeout (by protocol and TCP state). The LRU
//! map also evicts the least recently used entries when it is full.
use std::collections::HashMap;

use aya::maps::MapData;
use proxy_common::{CtEntry, CtKey, ct_flow_timeout_secs};

const NS_PER_SEC: u64 = 1_000_000_000;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries left in the map.
    pub entries: usize,
    pub expired: usize,
}

/// The keys of `entries` whose flow has been idle past its timeout at `now_ns`.
pub fn expired_keys(entries: &HashMap<CtKey, CtEntry>, now_ns: u64) -> Vec<CtKey> {
    entries
        .iter()
        .filter(|(key, entry)| {
            let peer = entries.get(&key.peer(entry));
            let last_seen = peer.map_or(entry.last_seen_ns, |p| {
                p.last_seen_ns.max(entry.last_seen_ns)
            });
            let timeout = ct_flow_timeout_secs(
                key.proto,
                entry.state,
                peer.map_or(entry.state, |p| p.state),
            );
            now_ns.saturating_sub(last_seen) > timeout * NS_PER_SEC
        })
        .map(|(key, _)| *key)
        .collect()
}

pub fn collect_garbage(conntrack: &mut aya::maps::HashMap<MapData, CtKey, CtEntry>) -> GcReport {
    // A map that cannot be read this pass is read at the next.
    let entries: HashMap<CtKey, CtEntry> = crate::map_batch::read_all(conntrack)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let expired = expired_keys(&entries, crate::clock::monotonic_ns());
    for key in &expired {
        // The datapath may have refreshed or evicted it meanwhile; either way is fine.
        let _ = conntrack.remove(key);
    }
    GcReport {
        entries: entries.len() - expired.len(),
        expired: expired.len(),
    }
}

/// Collects garbage every `interval` on a background thread, so that scanning the map
/// never delays programming; `report` gets the outcome of every pass. The receiver hears
/// only if the thread ends (it panicked).
pub fn collect_garbage_every(
    mut conntrack: aya::maps::HashMap<MapData, CtKey, CtEntry>,
    interval: std::time::Duration,
    report: impl Fn(GcReport) + Send + 'static,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    crate::background::spawn("conntrack-gc", move || {
        loop {
            std::thread::sleep(interval);
            report(collect_garbage(&mut conntrack));
        }
    })
}

#[cfg(test)]
mod tests {
    use proxy_common::{
        CT_FORWARD, CT_REPLY, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, IPPROTO_TCP,
        IPPROTO_UDP,
    };

    use super::*;

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
        assert!(expired_keys(&entries, 1500 * NS_PER_SEC).is_empty());
        assert_eq!(
            expired_keys(&entries, (1000 + 6 * 3600 + 1) * NS_PER_SEC).len(),
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
        assert_eq!(expired_keys(&closing, 161 * NS_PER_SEC).len(), 2);
        let udp = flow(
            IPPROTO_UDP,
            CT_STATE_ESTABLISHED,
            100,
            CT_STATE_ESTABLISHED,
            150,
        );
        assert!(expired_keys(&udp, 200 * NS_PER_SEC).is_empty());
        assert_eq!(expired_keys(&udp, 211 * NS_PER_SEC).len(), 2);
    }
}
