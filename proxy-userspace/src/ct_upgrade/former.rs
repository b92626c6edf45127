//! The conntrack entries of earlier agents and their conversion. Their datapaths recorded
//! two entries per flow, each under a 5-tuple (the forward entry's `peer` the source the
//! backend saw); today's records one, under the client's key, where it can (`nat.rs`).
use std::{collections::HashMap, hash::Hash};

use proxy_common::{
    CT_FLAG_CLIENT_KEYED, CT_FLAG_PASS, CT_FLAG_SHARED, CT_FLAG_SNAT, CT_FORWARD, CT_REPLY,
    CT_STATE_ESTABLISHED, CT_STATE_NEW, CtEntryOf, CtKeyOf,
};

/// A conntrack entry as earlier agents' datapaths recorded it (32 bytes for IPv4, 56 for
/// IPv6). Their keys are today's 5-tuple keys, byte for byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FormerEntryOf<A> {
    /// FORWARD: the backend. REPLY: the service address.
    pub nat_addr: A,
    pub nat_port: u16,
    pub direction: u8,
    pub state: u8,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    /// FORWARD: the source the backend sees. REPLY: the client.
    pub peer_addr: A,
    pub peer_port: u16,
    pub flags: u8,
    pub pad: u8,
    pub last_seen_ns: u64,
}

// SAFETY: `repr(C)`, padding as fields, every bit pattern valid.
unsafe impl aya::Pod for FormerEntryOf<[u8; 4]> {}
unsafe impl aya::Pod for FormerEntryOf<[u8; 16]> {}

/// Today's entries for the flows of `former`, an earlier agent's map. A flow whose client
/// address and port carry no other flow, and that was not moved to another port, gets one
/// entry under its client key (and, masqueraded, its reply entry, marked as found from
/// there). The others keep two entries under their 5-tuples, and the client keys that find
/// them are marked shared (an anchor where no flow is). A reply entry without its forward
/// entry is left out: its flow cannot work on it.
pub fn convert<A: Copy + Default + Eq + Hash>(
    former: &HashMap<CtKeyOf<A>, FormerEntryOf<A>>,
) -> HashMap<CtKeyOf<A>, CtEntryOf<A>> {
    let mut by_client: HashMap<CtKeyOf<A>, Vec<&CtKeyOf<A>>> = HashMap::new();
    for (key, entry) in former {
        if entry.direction == CT_FORWARD {
            let client = CtKeyOf::client(key.src, key.sport, key.proto);
            by_client.entry(client).or_default().push(key);
        }
    }
    let mut today = HashMap::new();
    let mut shared = Vec::new();
    for (client, keys) in &by_client {
        let alone = keys.len() == 1;
        for key in keys {
            let f = &former[*key];
            let reply_key =
                CtKeyOf::tuple(f.nat_addr, f.peer_addr, f.nat_port, f.peer_port, key.proto);
            let reply = former.get(&reply_key).filter(|r| r.direction == CT_REPLY);
            let (snat, pass) = (f.flags & CT_FLAG_SNAT != 0, f.flags & CT_FLAG_PASS != 0);
            let moved = !snat && !pass && (f.peer_addr, f.peer_port) != (key.src, key.sport);
            let mut forward = CtEntryOf {
                last_seen_ns: f.last_seen_ns,
                nat_addr: f.nat_addr,
                nat_port: f.nat_port,
                direction: CT_FORWARD,
                state: f.state,
                rev_nat_id: f.rev_nat_id,
                backend_id: f.backend_id,
                peer_addr: key.dst,
                peer_port: key.dport,
                flags: f.flags,
                reply_state: if pass {
                    CT_STATE_ESTABLISHED
                } else {
                    CT_STATE_NEW
                },
                src_addr: f.peer_addr,
                src_port: f.peer_port,
                pad: 0,
            };
            if alone && !moved {
                if snat {
                    if let Some(r) = reply {
                        today.insert(reply_key, converted_reply(r, CT_FLAG_CLIENT_KEYED));
                    }
                } else if let Some(r) = reply {
                    // One entry keeps both directions.
                    forward.reply_state = r.state;
                    forward.last_seen_ns = f.last_seen_ns.max(r.last_seen_ns);
                }
                today.insert(*client, forward);
                continue;
            }
            today.insert(**key, forward);
            if let Some(r) = reply {
                today.insert(reply_key, converted_reply(r, 0));
            }
            shared.push(*client);
            if moved {
                shared.push(CtKeyOf::client(f.peer_addr, f.peer_port, key.proto));
            }
        }
    }
    for client in shared {
        today
            .entry(client)
            .and_modify(|e| e.flags |= CT_FLAG_SHARED)
            .or_insert_with(|| crate::conntrack::anchor(0));
    }
    today
}

/// A former reply entry as today's, with `flags` added.
fn converted_reply<A: Copy + Default>(r: &FormerEntryOf<A>, flags: u8) -> CtEntryOf<A> {
    CtEntryOf {
        last_seen_ns: r.last_seen_ns,
        nat_addr: r.nat_addr,
        nat_port: r.nat_port,
        direction: CT_REPLY,
        state: r.state,
        rev_nat_id: r.rev_nat_id,
        backend_id: r.backend_id,
        peer_addr: r.peer_addr,
        peer_port: r.peer_port,
        flags: r.flags | flags,
        ..CtEntryOf::default()
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::{CT_ANCHOR, CT_KEY_TUPLE, CtEntry, CtKey, IPPROTO_UDP};

    use super::*;

    type Former = FormerEntryOf<[u8; 4]>;

    const CLIENT: [u8; 4] = [10, 0, 0, 1];
    const BACKEND: [u8; 4] = [10, 244, 0, 2];
    const NODE: [u8; 4] = [192, 168, 0, 1];

    /// A former flow from `CLIENT`:40000 to `vip`:53, seen by the backend from `src`: its
    /// forward and reply entries.
    fn flow(vip: [u8; 4], src: ([u8; 4], u16), flags: u8) -> [(CtKey, Former); 2] {
        let key = CtKey::tuple(CLIENT, vip, 40000, 53, IPPROTO_UDP);
        let forward = Former {
            nat_addr: BACKEND,
            nat_port: 5353,
            direction: CT_FORWARD,
            state: CT_STATE_ESTABLISHED,
            rev_nat_id: 1,
            backend_id: 2,
            peer_addr: src.0,
            peer_port: src.1,
            flags,
            last_seen_ns: 100,
            ..Former::default()
        };
        let reply = Former {
            nat_addr: vip,
            nat_port: 53,
            direction: CT_REPLY,
            state: CT_STATE_ESTABLISHED,
            peer_addr: CLIENT,
            peer_port: 40000,
            last_seen_ns: 200,
            ..forward
        };
        [
            (key, forward),
            (
                CtKey::tuple(BACKEND, src.0, 5353, src.1, IPPROTO_UDP),
                reply,
            ),
        ]
    }

    fn client(port: u16) -> CtKey {
        CtKey::client(CLIENT, port, IPPROTO_UDP)
    }

    #[test]
    fn a_flow_alone_on_its_client_port_gets_one_entry_and_a_masqueraded_one_its_reply_entry() {
        let vip = [10, 96, 0, 10];
        let today = convert(&HashMap::from(flow(vip, (CLIENT, 40000), 0)));
        let expected = CtEntry {
            last_seen_ns: 200,
            nat_addr: BACKEND,
            nat_port: 5353,
            direction: CT_FORWARD,
            state: CT_STATE_ESTABLISHED,
            reply_state: CT_STATE_ESTABLISHED,
            rev_nat_id: 1,
            backend_id: 2,
            peer_addr: vip,
            peer_port: 53,
            src_addr: CLIENT,
            src_port: 40000,
            ..CtEntry::default()
        };
        assert_eq!(today, HashMap::from([(client(40000), expected)]));

        let [(_, forward), (reply_key, _)] = flow(vip, (NODE, 61000), CT_FLAG_SNAT);
        let today = convert(&HashMap::from(flow(vip, (NODE, 61000), CT_FLAG_SNAT)));
        assert_eq!(today.len(), 2);
        let entry = today[&client(40000)];
        let seen = ({ entry.src_addr }, { entry.src_port }, entry.reply_state);
        assert_eq!(seen, (NODE, 61000, CT_STATE_NEW));
        assert_eq!({ entry.last_seen_ns }, forward.last_seen_ns);
        let reply = today[&reply_key];
        assert_eq!(reply.flags, CT_FLAG_SNAT | CT_FLAG_CLIENT_KEYED);
        assert_eq!(client(40000).peer(&entry), Some(reply_key));
        assert_eq!(reply_key.peer(&reply), Some(client(40000)));
    }

    #[test]
    fn flows_sharing_a_client_port_or_moved_keep_two_entries_found_from_marked_client_keys() {
        let (first, second) = ([10, 96, 0, 10], [10, 96, 0, 11]);
        let mut former = HashMap::from(flow(first, (CLIENT, 40000), 0));
        former.extend(flow(second, (CLIENT, 61000), 0));
        let today = convert(&former);
        // Four entries under 5-tuples, the client key an anchor, the port moved to as well.
        assert_eq!(today.len(), 6, "{today:#?}");
        for (key, entry) in &today {
            if key.kind == CT_KEY_TUPLE {
                assert_ne!(entry.direction, CT_ANCHOR);
            } else {
                assert_eq!((entry.direction, entry.flags), (CT_ANCHOR, CT_FLAG_SHARED));
            }
        }
        assert!(today.contains_key(&client(40000)) && today.contains_key(&client(61000)));
        // A reply without its forward entry is left out.
        let [_, (reply_key, reply)] = flow(first, (CLIENT, 40000), 0);
        assert!(convert(&HashMap::from([(reply_key, reply)])).is_empty());
    }
}
