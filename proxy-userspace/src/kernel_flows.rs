//! UDP flows the kernel's NAT translates when the agent starts (kube-proxy's, during a
//! migration): UDP has no SYN to tell a new flow from one in the middle, so without this the
//! tc program would balance their next datagram anew, possibly to another backend. Each
//! such flow gets a pass entry in our conntrack (`CT_FLAG_PASS`), under the client's key:
//! its packets are left to the kernel, which keeps sending them to the backend kube-proxy
//! chose, until the flow has been idle for our UDP timeout. TCP needs none of this: a segment
//! other than a SYN without an entry of ours is left alone anyway. IPv4 and IPv6 alike
//! (ip6tables' DNAT, in a dual-stack cluster), each in its family's conntrack map.
use std::net::IpAddr;

use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use proxy_common::{
    CT_FLAG_PASS, CT_FLAG_SHARED, CT_FORWARD, CT_STATE_ESTABLISHED, CtEntryOf, CtKeyOf,
};

use crate::{
    conntrack::Conntracks,
    maps::{BPF_EXIST, BPF_NOEXIST},
};

const IPPROTO_UDP: u8 = 17;
/// The kernel's connection table of this network namespace (`/proc/self/net/...`).
const NF_CONNTRACK: &str = "/proc/net/nf_conntrack";

/// One side of a kernel conntrack entry.
#[derive(Debug, PartialEq)]
struct Tuple {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
}

/// The UDP flows of `/proc/net/nf_conntrack` text whose destination the kernel translated:
/// (original tuple, reply tuple).
fn translated_udp(text: &str) -> Vec<(Tuple, Tuple)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let family = fields.first()?;
            if (*family != "ipv4" && *family != "ipv6") || fields.get(2) != Some(&"udp") {
                return None;
            }
            let value =
                |key: &str, nth: usize| fields.iter().filter_map(|f| f.strip_prefix(key)).nth(nth);
            let tuple = |nth: usize| -> Option<Tuple> {
                Some(Tuple {
                    src: value("src=", nth)?.parse().ok()?,
                    dst: value("dst=", nth)?.parse().ok()?,
                    sport: value("sport=", nth)?.parse().ok()?,
                    dport: value("dport=", nth)?.parse().ok()?,
                })
            };
            let (original, reply) = (tuple(0)?, tuple(1)?);
            // DNAT: the answer comes from somewhere else than where the client sent.
            (reply.src != original.dst || reply.sport != original.dport)
                .then_some((original, reply))
        })
        .collect()
}

/// Adds a pass entry for every UDP flow the kernel translates now, in its family's map;
/// returns how many. An entry of ours under the same tuple is kept. Without a readable
/// `nf_conntrack` (kernels built without its procfs file) nothing is added and `Err` says
/// so.
pub fn pass_translated_udp(conntrack: &mut Conntracks, now_ns: u64) -> std::io::Result<usize> {
    let text = std::fs::read_to_string(NF_CONNTRACK)?;
    let mut added = 0;
    for (original, reply) in translated_udp(&text) {
        let flow = (&original, &reply, now_ns);
        let inserted = match (original.src, original.dst, reply.src) {
            (IpAddr::V4(src), IpAddr::V4(dst), IpAddr::V4(backend)) => pass(
                &mut conntrack.v4,
                [src, dst, backend].map(|a| a.octets()),
                flow,
            ),
            (IpAddr::V6(src), IpAddr::V6(dst), IpAddr::V6(backend)) => pass(
                &mut conntrack.v6,
                [src, dst, backend].map(|a| a.octets()),
                flow,
            ),
            // NAT46/64 is none of kube-proxy's.
            _ => false,
        };
        added += usize::from(inserted);
    }
    Ok(added)
}

/// Inserts the pass entry of a flow the kernel translates (`original`, `reply`, seen at
/// `now_ns`) into its family's `conntrack`, under the client's key: the backend the kernel
/// chose. `[client, service, backend]` are the tuples' addresses in the family's form.
/// Where the client key holds another flow of the same client port (one socket to several
/// services), under its 5-tuple, with the client key marked shared. Whether it was
/// inserted (not when an entry of ours holds the flow).
fn pass<A: Copy + Default + PartialEq>(
    conntrack: &mut HashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>,
    [client, service, backend]: [A; 3],
    (original, reply, now_ns): (&Tuple, &Tuple, u64),
) -> bool
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    let entry = CtEntryOf {
        nat_addr: backend,
        nat_port: reply.sport,
        direction: CT_FORWARD,
        state: CT_STATE_ESTABLISHED,
        reply_state: CT_STATE_ESTABLISHED,
        peer_addr: service,
        peer_port: original.dport,
        src_addr: client,
        src_port: original.sport,
        flags: CT_FLAG_PASS,
        last_seen_ns: now_ns,
        ..CtEntryOf::default()
    };
    let client_key = CtKeyOf::client(client, original.sport, IPPROTO_UDP);
    if conntrack.insert(client_key, entry, BPF_NOEXIST).is_ok() {
        return true;
    }
    let Ok(mut held) = conntrack.get(&client_key, 0) else {
        return false;
    };
    if ({ held.peer_addr }, held.peer_port) == (service, original.dport) {
        return false;
    }
    let key = CtKeyOf::tuple(client, service, original.sport, original.dport, IPPROTO_UDP);
    if conntrack.insert(key, entry, BPF_NOEXIST).is_err() {
        return false;
    }
    held.flags |= CT_FLAG_SHARED;
    // Lost to a race with the datapath, the mark is restored by the next GC pass.
    let _ = conntrack.insert(client_key, held, BPF_EXIST);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_udp_flows_whose_destination_was_translated() {
        let text = "\
ipv4     2 udp      17 113 src=10.244.4.2 dst=10.96.0.10 sport=41234 dport=53 src=10.244.1.2 dst=10.244.4.2 sport=8080 dport=41234 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 20 src=10.244.4.2 dst=10.244.1.2 sport=5000 dport=8080 src=10.244.1.2 dst=10.244.4.2 sport=8080 dport=5000 mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=10.244.4.2 dst=10.96.0.10 sport=40000 dport=80 src=10.244.2.2 dst=10.244.4.2 sport=8080 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv6     10 udp      17 20 src=fd00::2 dst=fd00::10 sport=1 dport=53 src=fd00::3 dst=fd00::2 sport=8080 dport=1 mark=0 zone=0 use=2
";
        let flows = translated_udp(text);
        assert_eq!(flows.len(), 2);
        let (original, reply) = &flows[0];
        assert_eq!(
            (original.dst, original.dport, original.sport),
            ("10.96.0.10".parse().unwrap(), 53, 41234)
        );
        assert_eq!(
            (reply.src, reply.sport),
            ("10.244.1.2".parse().unwrap(), 8080)
        );
        let (original, reply) = &flows[1];
        assert_eq!(
            (original.dst, original.dport, reply.src, reply.sport),
            (
                "fd00::10".parse().unwrap(),
                53,
                "fd00::3".parse().unwrap(),
                8080
            )
        );
    }
}
