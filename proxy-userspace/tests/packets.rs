//! Crafted packets through the real tc and XDP programs with `BPF_PROG_TEST_RUN`: output
//! bytes, checksums, verdicts and the conntrack entries each packet leaves, with no
//! namespace world (but for one test's network namespace of its own, whose routes the
//! masqueraded flows' FIB lookups use). Two ClusterIPs share one backend, so that one
//! client port can reach both.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

use aya::{
    TestRunResult,
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions},
};
use proxy::{
    csum_state::CsumState,
    datapath::{Datapath, XdpAttach},
    desired::{DesiredService, DesiredState, Frontend},
    family::{Backend, ServiceKey},
    maps::Maps,
    node::NodeAddressing,
    reconcile::Reconciler,
};
use proxy_common::{
    CtEntry, CtEntry6, CtKey, CtKey6, IPPROTO_TCP, IPPROTO_UDP, SNAT_PORT_MAX, SNAT_PORT_MIN, maps,
};

const VIP1: [u8; 4] = [10, 96, 0, 1];
const VIP2: [u8; 4] = [10, 96, 0, 2];
const VIP3: [u8; 4] = [10, 96, 0, 3];
const BACKEND: [u8; 4] = [10, 244, 0, 2];
const BACKEND3: [u8; 4] = [10, 244, 0, 3];
const BACKEND_PORT: u16 = 8080;
const CLIENT: [u8; 4] = [10, 244, 0, 9];
const VIP6: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const VIP6B: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const VIP6C: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
const BACKEND6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const BACKEND6C: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
const CLIENT6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
/// The node's addresses, and a client outside the cluster.
const NODE: [u8; 4] = [192, 168, 1, 1];
const NODE6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const NODE_PORT: u16 = 30080;
const EXTERNAL: [u8; 4] = [198, 51, 100, 7];
const EXTERNAL6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const TC_ACT_OK: u32 = 0;
const XDP_PASS: u32 = 2;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

static FIXTURES: AtomicUsize = AtomicUsize::new(0);

/// The datapath loaded with its maps pinned in a directory of its own (removed on drop),
/// serving TCP port 80 and UDP port 53 of `VIP1` and `VIP2`, both to `BACKEND`, and of
/// `VIP3` to `BACKEND3` (IPv6: `VIP6` and `VIP6B` to `BACKEND6`, `VIP6C` to `BACKEND6C`), and
/// `NODE_PORT` (TCP and UDP) of the node's addresses `NODE` and `NODE6`, masqueraded to
/// `BACKEND` and `BACKEND6`.
struct Fixture {
    pins: PathBuf,
    datapath: Datapath,
}

impl Fixture {
    fn new() -> Fixture {
        Self::with_csum_state(CsumState::from_kernel().ok())
    }

    /// The datapath as loaded on a kernel whose socket buffers' checksum state tc cannot
    /// read: it updates TCP and UDP checksums through its helper.
    fn with_csum_state(csum_state: Option<CsumState>) -> Fixture {
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/proxy-test-packets-{}-{}",
            std::process::id(),
            FIXTURES.fetch_add(1, Ordering::Relaxed)
        ));
        // Small, so that checking it is empty is quick.
        let sizes = [
            (maps::CONNTRACK.to_owned(), 4096),
            (maps::CONNTRACK6.to_owned(), 4096),
        ];
        let datapath = Datapath::load_with_csum_state(&pins, &sizes, XdpAttach::Off, csum_state)
            .expect("loading the datapath");
        let fixture = Fixture { pins, datapath };
        let mut desired = DesiredState::new();
        let frontends = [
            (IpAddr::from(VIP1), IpAddr::from(BACKEND), "one"),
            (VIP2.into(), BACKEND.into(), "two"),
            (VIP3.into(), BACKEND3.into(), "three"),
            (VIP6.into(), BACKEND6.into(), "six"),
            (VIP6B.into(), BACKEND6.into(), "six-b"),
            (VIP6C.into(), BACKEND6C.into(), "six-c"),
        ];
        for (vip, backend, name) in frontends {
            for (port, proto) in [(80, IPPROTO_TCP), (53, IPPROTO_UDP)] {
                let backend = Backend {
                    addr: backend,
                    port: BACKEND_PORT,
                    proto,
                    flags: 0,
                };
                let service = DesiredService {
                    name: format!("test/{name}:{port}"),
                    backends: vec![backend],
                    ..DesiredService::default()
                };
                desired.insert(ServiceKey::new(vip, port, proto), service);
            }
        }
        let node_ports = [
            (IpAddr::from(Ipv4Addr::UNSPECIFIED), IpAddr::from(BACKEND)),
            (Ipv6Addr::UNSPECIFIED.into(), BACKEND6.into()),
        ];
        for (any, backend) in node_ports {
            for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                let service = DesiredService {
                    name: format!("test/node-port:{proto}"),
                    frontend: Frontend::NodePort,
                    masquerade: true,
                    backends: vec![Backend {
                        addr: backend,
                        port: BACKEND_PORT,
                        proto,
                        flags: 0,
                    }],
                    ..DesiredService::default()
                };
                desired.insert(ServiceKey::new(any, NODE_PORT, proto), service);
            }
        }
        let maps = Maps::open(&fixture.pins).expect("opening the maps");
        let report = Reconciler::adopt(maps).unwrap().apply(&desired);
        assert!(report.errors.is_empty(), "programming the services");
        NodeAddressing::new(
            proxy::node::NodeIps {
                v4: Some(NODE.into()),
                v6: Some(NODE6.into()),
            },
            &[],
            SNAT_PORT_MIN..=SNAT_PORT_MAX,
            &proxy::nodeport_addresses::NodePortAddresses::Primary,
        )
        .program(&fixture.pins)
        .expect("programming the node's addresses");
        fixture
    }

    /// Runs tc program `name` on `frame`: its verdict and the frame it left.
    fn run(&mut self, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        test_run(self.datapath.load_classifier(name).unwrap(), frame)
    }

    fn ingress(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run("proxy_ingress", frame)
    }

    fn egress(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run("proxy_egress", frame)
    }

    /// Runs the XDP program on `frame`: its verdict and the frame it left, from where its
    /// metadata starts.
    fn xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        test_run(self.datapath.load_xdp().unwrap(), frame)
    }

    fn conntrack_map(&self) -> HashMap<MapData, CtKey, CtEntry> {
        proxy::maps::open(&self.pins, maps::CONNTRACK).unwrap()
    }

    fn conntrack(&self) -> Vec<(CtKey, CtEntry)> {
        self.conntrack_map().iter().map(Result::unwrap).collect()
    }

    fn conntrack6_map(&self) -> HashMap<MapData, CtKey6, CtEntry6> {
        proxy::maps::open(&self.pins, maps::CONNTRACK6).unwrap()
    }

    /// Entries in both conntrack maps.
    fn conntrack_entries(&self) -> usize {
        self.conntrack_map().keys().count() + self.conntrack6_map().keys().count()
    }

    /// Empties both conntrack maps.
    fn clear_conntrack(&self) {
        clear(self.conntrack_map());
        clear(self.conntrack6_map());
    }
}

fn clear<K: aya::Pod, V: aya::Pod>(mut map: HashMap<MapData, K, V>) {
    let keys: Vec<K> = map.keys().map(Result::unwrap).collect();
    for key in keys {
        let _ = map.remove(&key);
    }
}

/// Runs `program` on `frame` (`BPF_PROG_TEST_RUN`): its verdict and the frame it left.
fn test_run<P>(program: &P, frame: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let result = program
        .test_run(opts)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {frame:02x?}: {e}"));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// One's-complement sum of `bytes` as big-endian words.
fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// An Ethernet + IPv4 frame around the L4 segment `l4` (whose checksum is filled in).
fn frame(proto: u8, src: [u8; 4], dst: [u8; 4], mut l4: Vec<u8>) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let csum = !fold(sum(&ip));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let (csum_off, pseudo) = match proto {
        IPPROTO_TCP => (16, pseudo_sum(proto, src, dst, l4.len())),
        IPPROTO_UDP => (6, pseudo_sum(proto, src, dst, l4.len())),
        // ICMP: no pseudo-header.
        _ => (2, 0),
    };
    let mut csum = !fold(pseudo + sum(&l4));
    if proto == IPPROTO_UDP && csum == 0 {
        csum = 0xffff;
    }
    l4[csum_off..csum_off + 2].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

fn pseudo_sum(proto: u8, src: [u8; 4], dst: [u8; 4], len: usize) -> u32 {
    sum(&src) + sum(&dst) + u32::from(proto) + len as u32
}

const IPPROTO_ICMP: u8 = 1;

/// An ICMP error of `kind`/`code` from `src` to `dst` quoting `quoted` (a frame: its IP
/// packet, whole, is quoted).
fn icmp_error(kind: u8, code: u8, src: [u8; 4], dst: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut message = vec![kind, code, 0, 0, 0, 0, 0x05, 0xdc];
    message.extend_from_slice(&quoted[14..]);
    frame(IPPROTO_ICMP, src, dst, message)
}

/// The packet an ICMP error quotes, as a frame again (a copy of its bytes behind an
/// Ethernet header).
fn quoted(error: &[u8]) -> Vec<u8> {
    let mut f = error[..14].to_vec();
    f.extend_from_slice(&error[14 + 20 + 8..]);
    f
}

fn tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&src.1.to_be_bytes());
    t[2..4].copy_from_slice(&dst.1.to_be_bytes());
    t[4..8].copy_from_slice(&1000u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    frame(IPPROTO_TCP, src.0, dst.0, t)
}

fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&src.1.to_be_bytes());
    u[2..4].copy_from_slice(&dst.1.to_be_bytes());
    u[4..6].copy_from_slice(&13u16.to_be_bytes());
    u.extend_from_slice(b"hello");
    frame(IPPROTO_UDP, src.0, dst.0, u)
}

/// The addresses and ports of a frame: ((src, sport), (dst, dport)).
fn ends(f: &[u8]) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let l4 = 14 + ihl;
    let port = |o: usize| u16::from_be_bytes([f[l4 + o], f[l4 + o + 1]]);
    (
        (f[26..30].try_into().unwrap(), port(0)),
        (f[30..34].try_into().unwrap(), port(2)),
    )
}

/// What the kernel would accept as an IPv4 TCP or UDP packet, checked independently of
/// the datapath's parser; a later fragment or an ICMP message starts no flow.
fn well_formed(f: &[u8]) -> Judged {
    let ip_ok = f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[14] >> 4 == 4;
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    if !ip_ok || ihl < 20 || total < ihl || 14 + total > f.len() {
        return Judged::Malformed;
    }
    if fold(sum(&f[14..14 + ihl])) != 0xffff {
        return Judged::Malformed;
    }
    if u16::from_be_bytes([f[20], f[21]]) & 0x1fff != 0 || f[23] == IPPROTO_ICMP {
        return Judged::NoFlow;
    }
    upper_layer(f[23], &f[14 + ihl..14 + total], f[20] & 0x20 != 0)
}

/// Gives an IPv4 frame's header a valid checksum again.
fn seal(f: &mut [u8]) {
    let ihl = (usize::from(f[14] & 0x0f) * 4).clamp(20, f.len() - 14);
    f[24..26].fill(0);
    let csum = !fold(sum(&f[14..14 + ihl]));
    f[24..26].copy_from_slice(&csum.to_be_bytes());
}

/// The judge of a packet's upper layer `l4` of protocol `proto`, to the packet's end: a TCP
/// header with a data offset of 5 to its length, or a UDP header whose length is at least
/// 8 and, unless the packet is a first fragment (more follow), at most its length.
fn upper_layer(proto: u8, l4: &[u8], first_fragment: bool) -> Judged {
    let ok = match proto {
        IPPROTO_TCP => l4
            .get(12)
            .is_some_and(|b| (20..=l4.len()).contains(&(usize::from(b >> 4) * 4))),
        IPPROTO_UDP => {
            l4.len() >= 8 && {
                let len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
                len >= 8 && (first_fragment || len <= l4.len())
            }
        }
        _ => false,
    };
    if ok {
        Judged::Packet
    } else {
        Judged::Malformed
    }
}

/// Every checksum of an IPv4 frame holds (`ip_checksums_hold`).
fn checksums_hold(f: &[u8]) -> bool {
    ip_checksums_hold(&f[14..])
}

/// Every checksum of the IPv4 packet `ip` (from its header on) holds, as far as the packet
/// is whole here (an ICMP error quotes the start of one): its header's and, but for a
/// fragment, its TCP or UDP checksum (a UDP checksum may be absent) or its ICMP message's,
/// with the checksums of the packet an ICMP error quotes.
fn ip_checksums_hold(ip: &[u8]) -> bool {
    let ihl = usize::from(ip.first().map_or(0, |b| b & 0x0f)) * 4;
    if ihl < 20 || ip.len() < ihl {
        return true;
    }
    if fold(sum(&ip[..ihl])) != 0xffff {
        return false;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    if total < ihl || total > ip.len() || fragment {
        return true;
    }
    let (proto, l4) = (ip[9], &ip[ihl..total]);
    let (src, dst) = (
        ip[12..16].try_into().unwrap(),
        ip[16..20].try_into().unwrap(),
    );
    match proto {
        IPPROTO_ICMP => fold(sum(l4)) == 0xffff && l4.get(8..).is_none_or(ip_checksums_hold),
        IPPROTO_UDP if l4.get(6..8) == Some(&[0, 0]) => true,
        IPPROTO_TCP | IPPROTO_UDP => {
            fold(pseudo_sum(proto, src, dst, l4.len()) + sum(l4)) == 0xffff
        }
        _ => true,
    }
}

#[test]
fn malformed_packets_leave_no_state_and_pass_untouched() {
    let mut fx = Fixture::new();
    let syn = tcp((CLIENT, 40000), (VIP1, 80), SYN);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut bad_ip_csum = syn.clone();
    bad_ip_csum[24] ^= 0x40;
    cases.push(("bad IP header checksum", bad_ip_csum));
    let mut short_offset = syn.clone();
    short_offset[14 + 20 + 12] = 4 << 4;
    cases.push(("TCP data offset 4", short_offset));
    cases.push(("TCP header cut short", syn[..14 + 20 + 12].to_vec()));
    let mut long_total = syn.clone();
    long_total[16..18].copy_from_slice(&60u16.to_be_bytes());
    let csum = !fold(sum(&long_total[14..24]) + sum(&long_total[26..34]));
    long_total[24..26].copy_from_slice(&csum.to_be_bytes());
    cases.push(("IP total length beyond the frame", long_total));
    cases.push(("SYN+FIN", tcp((CLIENT, 40001), (VIP1, 80), SYN | FIN)));
    cases.push(("SYN+RST", tcp((CLIENT, 40002), (VIP1, 80), SYN | RST)));
    let mut short_udp = udp((CLIENT, 40003), (VIP1, 53));
    short_udp[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
    cases.push(("UDP length 4", short_udp));
    let mut long_udp = udp((CLIENT, 40004), (VIP1, 53));
    long_udp[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
    cases.push(("UDP length beyond the packet", long_udp));
    for (what, input) in &cases {
        let (verdict, out) = fx.ingress(input);
        assert_eq!(verdict, TC_ACT_OK, "{what}: left to the kernel");
        assert_eq!(&out, input, "{what}: not modified");
        assert!(fx.conntrack().is_empty(), "{what}: no conntrack entry");
    }
    // The well-formed SYN itself is translated and recorded.
    let (verdict, out) = fx.ingress(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(ends(&out).1, (BACKEND, BACKEND_PORT));
    assert!(checksums_hold(&out));
    assert_eq!(fx.conntrack().len(), 1, "one entry, under the client key");
}

#[test]
fn malformed_ipv6_packets_leave_no_state_and_pass_untouched() {
    let mut fx = Fixture::new();
    let options = [(IPPROTO_DSTOPTS, 1)];
    let syn = tcp6(&options, (CLIENT6, 40000), (VIP6, 80), SYN);
    let l4 = 54 + 8;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let hop_by_hop_second = [(IPPROTO_DSTOPTS, 1), (IPPROTO_HOPOPTS, 1)];
    let second = tcp6(&hop_by_hop_second, (CLIENT6, 40000), (VIP6, 80), SYN);
    cases.push(("hop-by-hop options not first", second));
    let mut long_ext = syn.clone();
    long_ext[55] = 200;
    cases.push(("extension header beyond the payload", long_ext));
    let mut jumbo = syn.clone();
    jumbo[18..20].fill(0);
    cases.push(("payload length 0 (a jumbogram)", jumbo));
    let mut long_payload = syn.clone();
    long_payload[18..20].copy_from_slice(&200u16.to_be_bytes());
    cases.push(("payload length beyond the frame", long_payload));
    let mut short_offset = syn.clone();
    short_offset[l4 + 12] = 4 << 4;
    cases.push(("TCP data offset 4", short_offset));
    cases.push(("TCP header cut short", syn[..l4 + 12].to_vec()));
    let mut short_udp = udp6(&[], (CLIENT6, 40001), (VIP6, 53));
    short_udp[54 + 4..54 + 6].copy_from_slice(&4u16.to_be_bytes());
    cases.push(("UDP length 4", short_udp));
    let mut long_udp = udp6(&[], (CLIENT6, 40002), (VIP6, 53));
    long_udp[54 + 4..54 + 6].copy_from_slice(&200u16.to_be_bytes());
    cases.push(("UDP length beyond the packet", long_udp));
    for (what, input) in &cases {
        assert!(
            matches!(well_formed6(input), Judged::Malformed),
            "{what}: the fuzz's judge agrees"
        );
        let (verdict, out) = fx.ingress(input);
        assert_eq!(verdict, TC_ACT_OK, "{what}: left to the kernel");
        assert_eq!(&out, input, "{what}: not modified");
        assert_eq!(fx.conntrack_entries(), 0, "{what}: no conntrack entry");
    }
    // The well-formed SYN itself is translated and recorded.
    let (verdict, out) = fx.ingress(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(ends6(&out, l4).1, (BACKEND6, BACKEND_PORT));
    assert_eq!(fx.conntrack_entries(), 1, "one entry, under the client key");
}

/// A small xorshift generator: reproducible mutations without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A frame the fuzz mutates, and the offsets of its header fields, which its mutations aim
/// at besides any byte: lengths, fragment fields, and the protocol (next header) fields,
/// which they also set to the protocols the datapath parses.
struct Seed {
    frame: SeedFrame,
    /// The packet that opens the flow a reply is of, run through tc ingress before it.
    opened_by: Option<Vec<u8>>,
    fields: Vec<usize>,
    protocols: Vec<usize>,
}

/// A seed's frame: as it is, or made from what the packet that opens its flow came out as
/// (a masqueraded flow's source port is chosen at run time): a reply to it, an ICMP error
/// quoting it.
enum SeedFrame {
    Fixed(Vec<u8>),
    Answering(FromSent),
}

/// Makes a frame from another as it was sent on.
type FromSent = fn(&[u8]) -> Vec<u8>;

/// A node port seed of the second kind: the packet that opens the flow, and how its answer
/// is made of what that came out as.
struct Answer {
    opened_by: Vec<u8>,
    make: FromSent,
    /// An ICMP error (mutated in an error's fields), not a packet of the flow.
    error: bool,
}

/// Which packets of their flows the seeds are.
#[derive(Clone, Copy)]
enum Direction {
    /// Arriving (for tc ingress and XDP): the clients' first packets to the services, and an
    /// ICMP error from the client's side about a reply.
    Requests,
    /// Leaving (tc egress): the backend's replies, and its ICMP error about a request.
    Replies,
}

/// A frame of a seed, and the packet that opens its flow before it, if any.
type Framed = (Vec<u8>, Option<Vec<u8>>);

impl Direction {
    /// The seed of this direction: `arriving`'s or `leaving`'s.
    fn seed(
        self,
        arriving: Framed,
        leaving: Framed,
        fields: Vec<usize>,
        protocols: Vec<usize>,
    ) -> Seed {
        let (frame, opened_by) = match self {
            Direction::Requests => arriving,
            Direction::Replies => leaving,
        };
        Seed {
            frame: SeedFrame::Fixed(frame),
            opened_by,
            fields,
            protocols,
        }
    }
}

/// What a frame is, judged independently of the datapath's parser.
enum Judged {
    /// Not a TCP or UDP packet the kernel would accept.
    Malformed,
    /// A packet that starts no flow: a later fragment, which carries no ports (translated as
    /// its first fragment's flow, if one was seen), or an ICMP message (translated if it is
    /// an error about a tracked flow).
    NoFlow,
    /// A TCP or UDP packet, whole or a first fragment.
    Packet,
}

/// One IP family's frames, as the fuzz makes and judges them.
struct Fuzzed {
    seeds: Vec<Seed>,
    judge: fn(&[u8]) -> Judged,
    checksums_hold: fn(&[u8]) -> bool,
    /// Gives the frame a valid IP header checksum again (IPv4's): most mutated frames get
    /// one, so that the mutation reaches further.
    seal: Option<fn(&mut [u8])>,
}

impl Fuzzed {
    fn ipv4(direction: Direction) -> Fuzzed {
        let fields = vec![14, 16, 17, 20, 14 + 20 + 12, 14 + 20 + 4, 14 + 20 + 5];
        // A SYN to port 80 or a datagram to port 53 of `vip`, or the backend's reply.
        let seed = |proto: u8, vip: [u8; 4]| {
            let (client, backend) = ((CLIENT, 40000), (BACKEND, BACKEND_PORT));
            let (request, reply) = match proto {
                IPPROTO_TCP => (tcp(client, (vip, 80), SYN), tcp(backend, client, SYN | ACK)),
                _ => (udp(client, (vip, 53)), udp(backend, client)),
            };
            let leaving = (reply, Some(request.clone()));
            direction.seed((request, None), leaving, fields.clone(), vec![23])
        };
        // Fragmentation needed about the reply, port unreachable about the request, in the
        // flow the request opens; their fields: the outer header's, the ICMP type and code,
        // and the quoted header's.
        let (client, backend) = ((CLIENT, 40000), (BACKEND, BACKEND_PORT));
        let request = Some(udp(client, (VIP1, 53)));
        let error = direction.seed(
            (
                icmp_error(3, 4, CLIENT, VIP1, &udp((VIP1, 53), client)),
                request.clone(),
            ),
            (
                icmp_error(3, 3, BACKEND, CLIENT, &udp(client, backend)),
                request,
            ),
            vec![14, 16, 17, 20, 34, 35, 42, 44, 45, 48],
            vec![23, 51],
        );
        Fuzzed {
            seeds: vec![
                seed(IPPROTO_TCP, VIP1),
                seed(IPPROTO_TCP, VIP2),
                seed(IPPROTO_UDP, VIP1),
                seed(IPPROTO_UDP, VIP2),
                error,
            ],
            judge: well_formed,
            checksums_hold,
            seal: Some(seal),
        }
    }

    /// A client outside the cluster's packets to the node port, `frames` (each after the
    /// packet that opens its flow, if any), and the `answers` that arrive for it from the
    /// backend's side: masqueraded, and routed by the datapath itself (`routed_namespace`).
    /// Judged as `family`'s, mutated as its first packets (its first seed's fields) and, for
    /// ICMP errors, as its error (its last seed's).
    fn node_port(family: Fuzzed, frames: [Framed; 4], answers: [Answer; 3]) -> Fuzzed {
        let fields_of = |seed: &Seed| (seed.fields.clone(), seed.protocols.clone());
        let packet = fields_of(&family.seeds[0]);
        let error = fields_of(family.seeds.last().expect("the family's error seed"));
        let packets = frames.map(|(frame, opened_by)| Seed {
            frame: SeedFrame::Fixed(frame),
            opened_by,
            fields: packet.0.clone(),
            protocols: packet.1.clone(),
        });
        let answers = answers.map(|answer| {
            let (fields, protocols) = if answer.error { &error } else { &packet }.clone();
            Seed {
                frame: SeedFrame::Answering(answer.make),
                opened_by: Some(answer.opened_by),
                fields,
                protocols,
            }
        });
        Fuzzed {
            seeds: packets.into_iter().chain(answers).collect(),
            ..family
        }
    }

    fn ipv6(direction: Direction) -> Fuzzed {
        // A SYN to port 80 or a datagram to port 53 of `vip` behind extension headers `ext`,
        // or the backend's reply behind the same. Its fields: the payload length, each
        // extension header's length (and a fragment header's offset and flags), the TCP
        // data offset or UDP length; its protocol fields: the IPv6 header's next header and
        // each extension header's.
        let seed = |ext: &[(u8, usize)], proto: u8, vip: [u8; 16]| {
            let (mut fields, mut protocols, mut at) = (vec![18, 19], vec![20], 54);
            for &(kind, units) in ext {
                protocols.push(at);
                fields.push(at + 1);
                if kind == IPPROTO_FRAGMENT {
                    fields.extend([at + 2, at + 3]);
                }
                at += units * 8;
            }
            let (client, backend) = ((CLIENT6, 40000), (BACKEND6, BACKEND_PORT));
            let (request, reply, length) = match proto {
                IPPROTO_TCP => (
                    tcp6(ext, client, (vip, 80), SYN),
                    tcp6(ext, backend, client, SYN | ACK),
                    at + 12,
                ),
                _ => (
                    udp6(ext, client, (vip, 53)),
                    udp6(ext, backend, client),
                    at + 4,
                ),
            };
            fields.extend([length, length + 1]);
            let leaving = (reply, Some(request.clone()));
            direction.seed((request, None), leaving, fields, protocols)
        };
        let options = [(IPPROTO_HOPOPTS, 1), (IPPROTO_DSTOPTS, 1)];
        let fragment = [(IPPROTO_FRAGMENT, 1)];
        // Packet too big about the reply, port unreachable about the request, as IPv4's.
        let (client, backend) = ((CLIENT6, 40000), (BACKEND6, BACKEND_PORT));
        let request = Some(udp6(&[], client, (VIP6, 53)));
        let error = direction.seed(
            (
                icmp6_error(2, 0, CLIENT6, VIP6, &udp6(&[], (VIP6, 53), client)),
                request.clone(),
            ),
            (
                icmp6_error(1, 4, BACKEND6, CLIENT6, &udp6(&[], client, backend)),
                request,
            ),
            vec![18, 19, 54, 55, 66, 67],
            vec![20, 68],
        );
        Fuzzed {
            seeds: vec![
                seed(&[], IPPROTO_TCP, VIP6),
                seed(&options, IPPROTO_TCP, VIP6B),
                seed(&[], IPPROTO_UDP, VIP6),
                seed(&fragment, IPPROTO_UDP, VIP6B),
                error,
            ],
            judge: well_formed6,
            checksums_hold: checksums_hold6,
            seal: None,
        }
    }

    /// The protocol numbers a mutation sets a protocol field to: TCP, UDP, ICMP, ICMPv6 and
    /// IPv6's extension headers.
    const PROTOCOLS: [u8; 9] = [
        IPPROTO_TCP,
        IPPROTO_UDP,
        IPPROTO_ICMP,
        IPPROTO_ICMPV6,
        IPPROTO_HOPOPTS,
        IPPROTO_ROUTING,
        IPPROTO_FRAGMENT,
        IPPROTO_DSTOPTS,
        59, // No next header.
    ];

    /// `seed`'s `frame` with one to three mutations: a byte anywhere after the Ethernet
    /// header, a header field, a protocol field, the frame cut short (not below its IP
    /// header: `BPF_PROG_TEST_RUN` refuses those); mostly sealed.
    fn mutated(&self, rng: &mut Rng, seed: &Seed, frame: &[u8]) -> Vec<u8> {
        let mut f = frame.to_vec();
        let ip_end = if f[12..14] == [0x86, 0xdd] { 54 } else { 34 };
        for _ in 0..1 + rng.below(3) {
            match rng.below(4) {
                0 => {
                    let at = 14 + rng.below(f.len() - 14);
                    f[at] = rng.next() as u8;
                }
                1 => {
                    let at = seed.fields[rng.below(seed.fields.len())];
                    if let Some(byte) = f.get_mut(at) {
                        *byte = rng.next() as u8;
                    }
                }
                2 => {
                    let at = seed.protocols[rng.below(seed.protocols.len())];
                    if let Some(byte) = f.get_mut(at) {
                        *byte = Self::PROTOCOLS[rng.below(Self::PROTOCOLS.len())];
                    }
                }
                _ => f.truncate(ip_end + rng.below(f.len() - ip_end + 1)),
            }
        }
        if let Some(seal) = self.seal
            && rng.below(4) != 0
        {
            seal(&mut f);
        }
        f
    }
}

/// The programs the fuzz runs frames through.
#[derive(Clone, Copy, Debug)]
enum Hook {
    TcIngress,
    TcEgress,
    Xdp,
}

/// Runs `runs` mutated frames of `family`'s seeds, in turn, through `hook`: a malformed
/// frame is left to the kernel untouched, no frame but a TCP or UDP packet adds a conntrack
/// entry, and a translated frame whose checksums held still holds them. Returns how many
/// frames were malformed, and how many of each seed's were translated.
fn fuzz(fx: &mut Fixture, hook: Hook, family: &Fuzzed, runs: usize) -> (usize, Vec<usize>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut malformed, mut translated) = (0, vec![0; family.seeds.len()]);
    for i in 0..runs {
        let seed = &family.seeds[i % family.seeds.len()];
        let opened = seed.opened_by.as_ref().map(|request| fx.ingress(request).1);
        let frame = match &seed.frame {
            SeedFrame::Fixed(frame) => frame.clone(),
            SeedFrame::Answering(answer) => answer(opened.as_deref().expect("an opened flow")),
        };
        let before = fx.conntrack_entries();
        let f = family.mutated(&mut rng, seed, &frame);
        let (verdict, out) = match hook {
            Hook::TcIngress => fx.ingress(&f),
            Hook::TcEgress => fx.egress(&f),
            Hook::Xdp => {
                let (verdict, out) = fx.xdp(&f);
                // Less the mark of a frame with nothing of ours, if it has one.
                let marked = out.len() == f.len() + 8
                    && out[..4] == proxy_common::XDP_META_NOTHING_FOR_US.to_ne_bytes();
                (verdict, out[if marked { 8 } else { 0 }..].to_vec())
            }
        };
        let left = fx.conntrack_entries();
        match (family.judge)(&f) {
            Judged::Malformed => {
                malformed += 1;
                let passed = match hook {
                    Hook::TcIngress | Hook::TcEgress => TC_ACT_OK,
                    Hook::Xdp => XDP_PASS,
                };
                assert_eq!(
                    verdict, passed,
                    "{hook:?}: malformed input {i} {f:02x?} passed"
                );
                assert_eq!(
                    out, f,
                    "{hook:?}: malformed input {i} {f:02x?} not modified"
                );
                assert_eq!(
                    left, before,
                    "{hook:?}: malformed input {i} {f:02x?} left state"
                );
            }
            judged => {
                if let Judged::NoFlow = judged {
                    assert_eq!(left, before, "{hook:?}: input {i} {f:02x?} started a flow");
                }
                if out != f {
                    translated[i % family.seeds.len()] += 1;
                    assert!(
                        !(family.checksums_hold)(&f) || (family.checksums_hold)(&out),
                        "{hook:?}: input {i} {f:02x?} came out with a broken checksum: {out:02x?}"
                    );
                }
            }
        }
        fx.clear_conntrack();
    }
    (malformed, translated)
}

/// Through tc ingress, the clients' first packets, and tc egress, the backend's replies;
/// with the checksums updated in the frame as the socket buffer's state allows (the test
/// run's are `CHECKSUM_NONE`), and through the helper, as where that state cannot be read.
fn fuzz_tc(family: fn(Direction) -> Fuzzed) {
    let hooks = [
        (Hook::TcIngress, Direction::Requests),
        (Hook::TcEgress, Direction::Replies),
    ];
    for (mut fx, checksums) in [
        (Fixture::new(), "in the frame"),
        (Fixture::with_csum_state(None), "by the helper"),
    ] {
        for (hook, direction) in hooks {
            let (malformed, translated) = fuzz(&mut fx, hook, &family(direction), 12_000);
            let translated: usize = translated.iter().sum();
            assert!(
                malformed > 5_000,
                "{hook:?}, checksums {checksums}: {malformed} of the inputs were malformed"
            );
            assert!(
                translated > 500,
                "{hook:?}, checksums {checksums}: {translated} inputs were translated"
            );
        }
    }
}

#[test]
fn mutated_packets_never_leave_a_broken_checksum_or_state_from_garbage() {
    fuzz_tc(Fuzzed::ipv4);
}

#[test]
fn mutated_ipv6_packets_never_leave_a_broken_checksum_or_state_from_garbage() {
    fuzz_tc(Fuzzed::ipv6);
}

/// Makes this thread's network namespace one of its own (it goes with the thread), in
/// which the FIB lookups of masqueraded flows find a route: the node's address
/// on one end of a veth pair, forwarding on, the backend and the client behind a neighbour
/// there.
/// Nothing is sent: `BPF_PROG_TEST_RUN` returns a redirect without making it.
fn routed_namespace() {
    // SAFETY: unsharing the network namespace affects this thread alone.
    let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(unshared, 0, "unshare: {}", std::io::Error::last_os_error());
    // Per namespace: this thread's, as it writes.
    for family in ["ipv4", "ipv6"] {
        std::fs::write(format!("/proc/sys/net/{family}/conf/all/forwarding"), "1").unwrap();
    }
    let (node, node6) = (Ipv4Addr::from(NODE), Ipv6Addr::from(NODE6));
    let (backend, backend6) = (Ipv4Addr::from(BACKEND), Ipv6Addr::from(BACKEND6));
    let (external, external6) = (Ipv4Addr::from(EXTERNAL), Ipv6Addr::from(EXTERNAL6));
    let commands = [
        "link add node0 type veth peer name node1".to_owned(),
        format!("addr add {node}/24 dev node0"),
        format!("-6 addr add {node6}/64 dev node0 nodad"),
        "link set node0 up".to_owned(),
        "link set node1 up".to_owned(),
        "neigh add 192.168.1.2 lladdr 02:00:00:00:00:02 dev node0".to_owned(),
        "-6 neigh add fd00:1::2 lladdr 02:00:00:00:00:02 dev node0".to_owned(),
        format!("route add {backend}/32 via 192.168.1.2"),
        format!("-6 route add {backend6}/128 via fd00:1::2"),
        // The way back to the client, for the replies.
        format!("route add {external}/32 via 192.168.1.2"),
        format!("-6 route add {external6}/128 via fd00:1::2"),
    ];
    for command in commands {
        ip(&command);
    }
}

/// Runs `ip` with `command`'s words, in this thread's network namespace (a child inherits
/// the thread's).
fn ip(command: &str) {
    let out = std::process::Command::new("ip")
        .args(command.split(' '))
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {command}: {out:?}");
}

/// Runs `test` with a fixture on a thread of its own whose network namespace is its own
/// (`routed_namespace`), and goes with it.
fn in_routed_namespace(test: impl FnOnce(&mut Fixture) + Send + 'static) {
    let run = std::thread::spawn(|| {
        routed_namespace();
        test(&mut Fixture::new());
    });
    run.join().expect("the test's thread");
}

/// Masqueraded flows, which the datapath translates and routes itself (tc ingress, and
/// XDP on its own).
#[test]
fn mutated_node_port_packets_never_leave_a_broken_checksum_or_state_from_garbage() {
    in_routed_namespace(|fx| {
        // A family's seeds: first packets, and later ones of a flow the first opened (XDP
        // forwards IPv6's tracked flows only); then the backend's answers, made from the
        // segment and the datagram as sent on (`make`): a reply to each, and an ICMP error
        // about the datagram (left to tc by XDP).
        let seeds = |family, syn: Vec<u8>, ack, datagram: Vec<u8>, make: [FromSent; 3]| {
            let [segment_reply, datagram_reply, error] = make;
            let answer = |opened_by, make, error| Answer {
                opened_by,
                make,
                error,
            };
            Fuzzed::node_port(
                family,
                [
                    (syn.clone(), None),
                    (datagram.clone(), None),
                    (ack, Some(syn.clone())),
                    (datagram.clone(), Some(datagram.clone())),
                ],
                [
                    answer(syn, segment_reply, false),
                    answer(datagram.clone(), datagram_reply, false),
                    answer(datagram, error, true),
                ],
            )
        };
        let (client, client6) = ((EXTERNAL, 40000), (EXTERNAL6, 40000));
        let (node_port, node_port6) = ((NODE, NODE_PORT), (NODE6, NODE_PORT));
        for hook in [Hook::TcIngress, Hook::Xdp] {
            let families = [
                seeds(
                    Fuzzed::ipv4(Direction::Requests),
                    tcp(client, node_port, SYN),
                    tcp(client, node_port, ACK),
                    udp(client, node_port),
                    [
                        |sent| {
                            let (src, dst) = ends(sent);
                            tcp(dst, src, SYN | ACK)
                        },
                        |sent| {
                            let (src, dst) = ends(sent);
                            udp(dst, src)
                        },
                        // Fragmentation needed, from the backend.
                        |sent| icmp_error(3, 4, BACKEND, NODE, sent),
                    ],
                ),
                seeds(
                    Fuzzed::ipv6(Direction::Requests),
                    tcp6(&[], client6, node_port6, SYN),
                    tcp6(&[], client6, node_port6, ACK),
                    udp6(&[], client6, node_port6),
                    [
                        |sent| {
                            let (src, dst, _) = ends6(sent, 54);
                            tcp6(&[], dst, src, SYN | ACK)
                        },
                        |sent| {
                            let (src, dst, _) = ends6(sent, 54);
                            udp6(&[], dst, src)
                        },
                        // Packet too big, from the backend.
                        |sent| icmp6_error(2, 0, BACKEND6, NODE6, sent),
                    ],
                ),
            ];
            for family in families {
                let (malformed, translated) = fuzz(fx, hook, &family, 6_000);
                assert!(
                    malformed > 2_500,
                    "{hook:?}: {malformed} of the inputs were malformed"
                );
                assert!(
                    translated.iter().sum::<usize>() > 150,
                    "{hook:?}: {translated:?} inputs of each seed were translated"
                );
                // The answers (the last seeds): the replies translated, and the ICMP error
                // too, but by XDP, which leaves it to tc.
                let &[.., segment_reply, datagram_reply, error] = translated.as_slice() else {
                    panic!("the answers' seeds")
                };
                assert!(
                    segment_reply > 30 && datagram_reply > 30,
                    "{hook:?}: {translated:?} inputs of each seed were translated"
                );
                match hook {
                    Hook::Xdp => assert_eq!(error, 0, "XDP leaves ICMP errors to tc"),
                    _ => assert!(error > 30, "{hook:?}: {error} errors translated"),
                }
            }
        }
    });
}

/// A masqueraded flow's first packet that cannot go on — its TTL (hop limit) run out here,
/// or no route to the backend — is answered or dropped by tc and left to tc by XDP, and
/// leaves no entry (nor a masquerade port held).
#[test]
fn a_first_packet_that_cannot_go_on_leaves_no_state() {
    const TC_ACT_SHOT: u32 = 2;
    const TC_ACT_REDIRECT: u32 = 7;
    in_routed_namespace(|fx| {
        let syn = tcp((EXTERNAL, 40000), (NODE, NODE_PORT), SYN);
        let syn6 = tcp6(&[], (EXTERNAL6, 40000), (NODE6, NODE_PORT), SYN);
        let (mut expiring, mut expiring6) = (syn.clone(), syn6.clone());
        expiring[22] = 1;
        seal(&mut expiring);
        expiring6[21] = 1;
        let check = |fx: &mut Fixture, frame: &[u8], verdict: u32, what: &str| {
            assert_eq!(fx.ingress(frame).0, verdict, "tc: {what}");
            assert_eq!(fx.conntrack_entries(), 0, "tc: {what}: no entry");
            assert_eq!(fx.xdp(frame), (XDP_PASS, frame.to_vec()), "XDP: {what}");
            assert_eq!(fx.conntrack_entries(), 0, "XDP: {what}: no entry");
        };
        for frame in [&expiring, &expiring6] {
            check(
                fx,
                frame,
                TC_ACT_REDIRECT,
                "time exceeded back to the client",
            );
        }
        // With a route, the flow is recorded.
        assert_eq!(fx.ingress(&syn).0, TC_ACT_REDIRECT, "sent to the backend");
        assert_eq!(
            fx.conntrack_entries(),
            2,
            "the flow's entry and its masqueraded reply's"
        );
        fx.clear_conntrack();
        ip(&format!("route del {}/32", Ipv4Addr::from(BACKEND)));
        ip(&format!("-6 route del {}/128", Ipv6Addr::from(BACKEND6)));
        for frame in [&syn, &syn6] {
            check(fx, frame, TC_ACT_SHOT, "no route to the backend");
        }
    });
}

/// XDP leaves the ClusterIPs' flows to tc (it finishes only masqueraded flows, which it
/// routes itself: the node port fuzz): what it must never do is touch garbage or record
/// state for it.
#[test]
fn xdp_leaves_mutated_garbage_untouched_and_without_state() {
    let mut fx = Fixture::new();
    for family in [Fuzzed::ipv4, Fuzzed::ipv6] {
        let family = family(Direction::Requests);
        let (malformed, _) = fuzz(&mut fx, Hook::Xdp, &family, 6_000);
        assert!(
            malformed > 2_500,
            "{malformed} of the inputs were malformed"
        );
    }
}

#[test]
fn one_client_port_to_two_cluster_ips_sharing_a_backend_gets_two_reply_tuples() {
    for (proto, port) in [(IPPROTO_TCP, 80), (IPPROTO_UDP, 53)] {
        let mut fx = Fixture::new();
        let packet = |src, dst| match proto {
            IPPROTO_TCP => tcp(src, dst, SYN),
            _ => udp(src, dst),
        };
        let reply = |src, dst| match proto {
            IPPROTO_TCP => tcp(src, dst, SYN | ACK),
            _ => udp(src, dst),
        };
        let (_, first) = fx.ingress(&packet((CLIENT, 40000), (VIP1, port)));
        assert_eq!(
            ends(&first),
            ((CLIENT, 40000), (BACKEND, BACKEND_PORT)),
            "{proto}: the first flow keeps its port"
        );
        let (_, second) = fx.ingress(&packet((CLIENT, 40000), (VIP2, port)));
        let ((src, moved), dst) = ends(&second);
        assert_eq!((src, dst), (CLIENT, (BACKEND, BACKEND_PORT)));
        assert!(
            (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&moved),
            "{proto}: the second flow moves to a free port, not {moved}"
        );
        assert!(checksums_hold(&first) && checksums_hold(&second));
        // Each reply goes back as from its own ClusterIP, to the client's own port.
        for (to_port, vip) in [(40000, VIP1), (moved, VIP2)] {
            let (verdict, out) = fx.egress(&reply((BACKEND, BACKEND_PORT), (CLIENT, to_port)));
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(ends(&out), ((vip, port), (CLIENT, 40000)), "{proto}");
            assert!(checksums_hold(&out));
        }
        // Later packets of both flows keep their translation.
        let (_, again) = fx.ingress(&packet((CLIENT, 40000), (VIP2, port)));
        assert_eq!(ends(&again).0, (CLIENT, moved));
        let (_, again) = fx.ingress(&packet((CLIENT, 40000), (VIP1, port)));
        assert_eq!(ends(&again).0, (CLIENT, 40000));
    }
}

/// An address and port.
type End<A> = (A, u16);
/// A frame's source and destination.
type Ends<A> = (End<A>, End<A>);

/// One address family's TCP and UDP frames, for the tests that run alike in both.
struct Frames<A> {
    tcp: fn(End<A>, End<A>, u8) -> Vec<u8>,
    udp: fn(End<A>, End<A>) -> Vec<u8>,
    /// A frame's source and destination, if its checksums hold.
    ends: fn(&[u8]) -> Option<Ends<A>>,
}

const FRAMES: Frames<[u8; 4]> = Frames {
    tcp,
    udp,
    ends: |f| checksums_hold(f).then(|| ends(f)),
};

const FRAMES6: Frames<[u8; 16]> = Frames {
    tcp: |src, dst, flags| tcp6(&[], src, dst, flags),
    udp: |src, dst| udp6(&[], src, dst),
    ends: |f| {
        let (src, dst, holds) = ends6(f, 54);
        holds.then_some((src, dst))
    },
};

/// Linux reuses a source port for different destinations, and an unconnected UDP socket
/// sends to many from one port: both flows keep the client's port, each reply comes back
/// from its own ClusterIP, and the end of one (a reset, then a new connection on its tuple)
/// leaves the other translated. `flows`: two ClusterIPs and their backends.
fn one_client_port_to_two_cluster_ips<A: Copy + PartialEq + std::fmt::Debug>(
    frames: &Frames<A>,
    client: A,
    flows: [(A, A); 2],
) {
    for (proto, port) in [(IPPROTO_TCP, 80), (IPPROTO_UDP, 53)] {
        let mut fx = Fixture::new();
        let client = (client, 40000);
        let flows = flows.map(|(vip, backend)| ((vip, port), (backend, BACKEND_PORT)));
        let packet = |dst, flags| match proto {
            IPPROTO_TCP => (frames.tcp)(client, dst, flags),
            _ => (frames.udp)(client, dst),
        };
        let reply = |src, flags| match proto {
            IPPROTO_TCP => (frames.tcp)(src, client, flags),
            _ => (frames.udp)(src, client),
        };
        let both_translated = |fx: &mut Fixture, flags: u8, what: &str| {
            for (vip, backend) in flows {
                let (verdict, out) = fx.ingress(&packet(vip, flags));
                assert_eq!(verdict, TC_ACT_OK);
                assert_eq!(
                    (frames.ends)(&out),
                    Some((client, backend)),
                    "{proto}, {what}: to {vip:?}"
                );
                let (verdict, out) = fx.egress(&reply(backend, flags | ACK));
                assert_eq!(verdict, TC_ACT_OK);
                assert_eq!(
                    (frames.ends)(&out),
                    Some((vip, client)),
                    "{proto}, {what}: from {backend:?}"
                );
            }
        };
        both_translated(&mut fx, SYN, "first packets");
        both_translated(&mut fx, ACK, "later packets");
        if proto == IPPROTO_TCP {
            let [(vip, backend), other] = flows;
            fx.ingress(&packet(vip, RST));
            let (_, out) = fx.ingress(&packet(other.0, ACK));
            assert_eq!(
                (frames.ends)(&out),
                Some((client, other.1)),
                "the other flow outlives a reset"
            );
            let (_, out) = fx.ingress(&packet(vip, SYN));
            assert_eq!(
                (frames.ends)(&out),
                Some((client, backend)),
                "a new connection on the reset tuple"
            );
            both_translated(&mut fx, ACK, "after the new connection");
        }
    }
}

#[test]
fn one_client_port_to_two_cluster_ips_with_their_own_backends_keeps_both_flows() {
    one_client_port_to_two_cluster_ips(&FRAMES, CLIENT, [(VIP1, BACKEND), (VIP3, BACKEND3)]);
}

#[test]
fn one_client_port_to_two_ipv6_cluster_ips_with_their_own_backends_keeps_both_flows() {
    one_client_port_to_two_cluster_ips(&FRAMES6, CLIENT6, [(VIP6, BACKEND6), (VIP6C, BACKEND6C)]);
}

#[test]
fn moved_flows_take_source_ports_in_turn() {
    // The port search starts where the last one stopped: the ports flows move to follow
    // one another through the range, so a port comes back only after all the others.
    let mut fx = Fixture::new();
    let moved: Vec<u16> = (40000..40003)
        .map(|port| {
            fx.ingress(&tcp((CLIENT, port), (VIP1, 80), SYN));
            let (_, second) = fx.ingress(&tcp((CLIENT, port), (VIP2, 80), SYN));
            ends(&second).0.1
        })
        .collect();
    let first = moved[0];
    assert!(
        (SNAT_PORT_MIN..=SNAT_PORT_MAX - 2).contains(&first),
        "{moved:?}"
    );
    assert_eq!(moved, [first, first + 1, first + 2]);
}

#[test]
fn a_direct_connection_on_a_closed_service_flows_tuple_is_not_rewritten() {
    let mut fx = Fixture::new();
    let client = (CLIENT, 40000);
    let backend = (BACKEND, BACKEND_PORT);
    // A service connection, opened and closed.
    fx.ingress(&tcp(client, (VIP1, 80), SYN));
    let (_, synack) = fx.egress(&tcp(backend, client, SYN | ACK));
    assert_eq!(ends(&synack).0, (VIP1, 80));
    fx.ingress(&tcp(client, (VIP1, 80), ACK));
    fx.ingress(&tcp(client, (VIP1, 80), FIN | ACK));
    let (_, fin) = fx.egress(&tcp(backend, client, FIN | ACK));
    assert_eq!(
        ends(&fin).0,
        (VIP1, 80),
        "closing packets are still translated"
    );
    // The client connects to the backend itself from the same port.
    let direct = tcp(client, backend, SYN);
    assert_eq!(fx.ingress(&direct), (TC_ACT_OK, direct.clone()));
    let answer = tcp(backend, client, SYN | ACK);
    assert_eq!(
        fx.egress(&answer),
        (TC_ACT_OK, answer.clone()),
        "the backend's answer keeps its own address"
    );
    let ack = tcp(backend, client, ACK);
    assert_eq!(fx.egress(&ack), (TC_ACT_OK, ack.clone()));
}

#[test]
fn icmp_errors_about_translated_flows_are_translated_outer_and_inner() {
    let mut fx = Fixture::new();
    let client = (CLIENT, 40000);
    let backend = (BACKEND, BACKEND_PORT);
    // Two UDP flows from one client port; the second moved to another port.
    let (_, first) = fx.ingress(&udp(client, (VIP1, 53)));
    let (_, second) = fx.ingress(&udp(client, (VIP2, 53)));
    let moved = ends(&second).0;
    const DEST_UNREACH: u8 = 3;
    const TIME_EXCEEDED: u8 = 11;
    // The backend's port unreachable about each (leaving towards the client): from the
    // ClusterIP, quoting the datagram as the client sent it.
    for (sent, vip) in [(&first, VIP1), (&second, VIP2)] {
        let error = icmp_error(DEST_UNREACH, 3, BACKEND, CLIENT, sent);
        let (verdict, out) = fx.egress(&error);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(ends(&out).0.0, vip, "the error comes from the ClusterIP");
        assert_eq!(
            ends(&quoted(&out)),
            (client, (vip, 53)),
            "the quote as sent"
        );
        assert!(checksums_hold(&out), "{out:02x?}");
    }
    // A router on the way (the node itself: time exceeded) keeps its own address.
    let error = icmp_error(TIME_EXCEEDED, 0, NODE, CLIENT, &first);
    let (_, out) = fx.egress(&error);
    assert_eq!(ends(&out).0.0, NODE);
    assert_eq!(ends(&quoted(&out)), (client, (VIP1, 53)));
    assert!(checksums_hold(&out));
    // Fragmentation needed from the client's side about a reply (arriving): to the
    // backend, quoting the reply as the backend sent it.
    let (_, reply) = fx.egress(&udp(backend, moved));
    assert_eq!(ends(&reply), ((VIP2, 53), client));
    let error = icmp_error(DEST_UNREACH, 4, CLIENT, VIP2, &reply);
    let (verdict, out) = fx.ingress(&error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(ends(&out).1.0, BACKEND, "to the backend");
    assert_eq!(ends(&quoted(&out)), (backend, moved));
    assert!(checksums_hold(&out));
    // An error about a flow we do not track passes untouched; so does one quoting too
    // little to name the flow.
    let stranger = udp((CLIENT, 41000), (BACKEND, 9999));
    let error = icmp_error(DEST_UNREACH, 3, BACKEND, CLIENT, &stranger);
    assert_eq!(fx.egress(&error), (TC_ACT_OK, error.clone()));
    let short = icmp_error(DEST_UNREACH, 3, BACKEND, CLIENT, &first[..14 + 20 + 4]);
    assert_eq!(fx.egress(&short), (TC_ACT_OK, short.clone()));
}

/// A fragment of an IPv4 datagram: `payload` at `offset` (in 8-byte units) of the
/// datagram's L4 bytes; `more` fragments follow.
fn fragment(src: [u8; 4], dst: [u8; 4], offset: u16, more: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
    ip[6..8].copy_from_slice(&(offset | if more { 0x2000 } else { 0 }).to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let csum = !fold(sum(&ip));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(payload);
    f
}

/// A UDP datagram with a 40-byte payload, in two fragments (24 and 24 bytes).
fn fragmented_udp(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> [Vec<u8>; 2] {
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&src.1.to_be_bytes());
    udp[2..4].copy_from_slice(&dst.1.to_be_bytes());
    udp[4..6].copy_from_slice(&48u16.to_be_bytes());
    udp.extend((0..40).map(|i| i as u8));
    let csum = !fold(pseudo_sum(IPPROTO_UDP, src.0, dst.0, udp.len()) + sum(&udp));
    udp[6..8].copy_from_slice(&csum.to_be_bytes());
    [
        fragment(src.0, dst.0, 0, true, &udp[..24]),
        fragment(src.0, dst.0, 3, false, &udp[24..]),
    ]
}

/// The datagram the fragments make, checked: each IP header's checksum holds, they agree
/// on addresses, and the reassembled UDP checksum holds. Returns its ends.
fn reassembled(fragments: &[Vec<u8>]) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let mut udp = Vec::new();
    for f in fragments {
        assert_eq!(fold(sum(&f[14..34])), 0xffff, "IP checksum of {f:02x?}");
        assert_eq!(f[26..34], fragments[0][26..34], "one datagram's addresses");
        udp.extend_from_slice(&f[34..]);
    }
    let (src, dst) = (&fragments[0][26..30], &fragments[0][30..34]);
    let pseudo = pseudo_sum(
        IPPROTO_UDP,
        src.try_into().unwrap(),
        dst.try_into().unwrap(),
        udp.len(),
    );
    assert_eq!(
        fold(pseudo + sum(&udp)),
        0xffff,
        "UDP checksum of the datagram"
    );
    ends(&fragments[0])
}

#[test]
fn every_fragment_of_a_datagram_follows_its_flow() {
    let mut fx = Fixture::new();
    let client = (CLIENT, 40000);
    let backend = (BACKEND, BACKEND_PORT);
    // A later fragment before any first one: its flow is unknown, it passes untouched.
    let [_, early] = fragmented_udp(client, (VIP1, 53));
    assert_eq!(fx.ingress(&early), (TC_ACT_OK, early.clone()));
    // Request: both fragments to the backend; the datagram is whole and valid there.
    let out: Vec<Vec<u8>> = fragmented_udp(client, (VIP1, 53))
        .iter()
        .map(|f| fx.ingress(f).1)
        .collect();
    assert_eq!(reassembled(&out), (client, backend));
    // Reply: both fragments from the ClusterIP.
    let out: Vec<Vec<u8>> = fragmented_udp(backend, client)
        .iter()
        .map(|f| fx.egress(f).1)
        .collect();
    assert_eq!(reassembled(&out), ((VIP1, 53), client));
}

#[test]
fn a_reset_closes_both_directions_and_a_new_syn_on_the_tuple_starts_afresh() {
    let mut fx = Fixture::new();
    let client = (CLIENT, 40000);
    let backend = (BACKEND, BACKEND_PORT);
    fx.ingress(&tcp(client, (VIP1, 80), SYN));
    fx.egress(&tcp(backend, client, SYN | ACK));
    fx.ingress(&tcp(client, (VIP1, 80), ACK));
    let key = CtKey::client(CLIENT, 40000, IPPROTO_TCP);
    // The flow's one entry, and each direction's state in it.
    let state = |fx: &Fixture| {
        let entries = fx.conntrack();
        let entry = entries.iter().find(|(k, _)| *k == key);
        (entries.len(), entry.map(|(_, e)| (e.state, e.reply_state)))
    };
    const NEW: u8 = proxy_common::CT_STATE_NEW;
    const ESTABLISHED: u8 = proxy_common::CT_STATE_ESTABLISHED;
    const CLOSING: u8 = proxy_common::CT_STATE_CLOSING;
    assert_eq!(state(&fx), (1, Some((ESTABLISHED, NEW))));
    // The client's RST ends the connection both ways: the backend's side is closing too
    // (a masqueraded flow's port is then free to reuse once quiet).
    fx.ingress(&tcp(client, (VIP1, 80), RST | ACK));
    assert_eq!(state(&fx), (1, Some((CLOSING, CLOSING))));
    // The same client tuple opens a new connection: a new flow.
    let (_, out) = fx.ingress(&tcp(client, (VIP1, 80), SYN));
    assert_eq!(ends(&out), (client, backend));
    assert_eq!(state(&fx), (1, Some((NEW, NEW))));
}

#[test]
fn xdp_tells_tc_what_has_nothing_of_ours_and_only_that() {
    let mut fx = Fixture::new();
    // To a pod, not a service: passed, with the mark tc ingress skips its lookups on.
    let other = udp((CLIENT, 40000), (BACKEND, BACKEND_PORT));
    let (verdict, out) = fx.xdp(&other);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out.len(), other.len() + 8, "{out:02x?}");
    let word = |at: usize| u32::from_ne_bytes(out[at..at + 4].try_into().unwrap());
    assert_eq!(word(0), proxy_common::XDP_META_NOTHING_FOR_US);
    // The interface it came in on (the test run's: loopback).
    assert_eq!(word(4), 1);
    assert_eq!(out[8..], other[..]);
    // To a service, translated but not routed by us: passed for tc to finish, unmarked.
    let service = udp((CLIENT, 40001), (VIP1, 53));
    let (verdict, out) = fx.xdp(&service);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, service, "unmarked and untouched, for tc");
}

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;

/// An Ethernet + IPv6 frame with extension headers `ext` (each: its type and length in
/// 8-byte units, filled with Pad1 options) before the L4 segment `l4` of `proto` (whose
/// checksum is filled in).
fn frame6(
    ext: &[(u8, usize)],
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
    mut l4: Vec<u8>,
) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];
    let mut headers = Vec::new();
    for (i, (_, units)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(proto, |(kind, _)| *kind);
        let mut h = vec![0u8; units * 8];
        h[0] = next;
        h[1] = (units - 1) as u8;
        headers.extend(h);
    }
    let csum_off = match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => 2, // ICMPv6
    };
    let pseudo = sum(&src) + sum(&dst) + l4.len() as u32 + u32::from(proto);
    let csum = !fold(pseudo + sum(&l4));
    l4[csum_off..csum_off + 2].copy_from_slice(&csum.to_be_bytes());
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&((headers.len() + l4.len()) as u16).to_be_bytes());
    ip[6] = ext.first().map_or(proto, |(kind, _)| *kind);
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&dst);
    f.extend_from_slice(&ip);
    f.extend(headers);
    f.extend(l4);
    f
}

fn tcp6(ext: &[(u8, usize)], src: End6, dst: End6, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&src.1.to_be_bytes());
    t[2..4].copy_from_slice(&dst.1.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    frame6(ext, IPPROTO_TCP, src.0, dst.0, t)
}

/// An IPv6 address and port.
type End6 = ([u8; 16], u16);

/// The addresses and ports of an IPv6 TCP (UDP, if it has no extension headers) frame
/// whose L4 header is at `l4`, and whether its checksum holds.
fn ends6(f: &[u8], l4: usize) -> (End6, End6, bool) {
    let addr = |at: usize| -> [u8; 16] { f[at..at + 16].try_into().unwrap() };
    let port = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
    let (src, dst) = (addr(22), addr(38));
    let segment = &f[l4..];
    let proto = if f[20] == IPPROTO_UDP {
        IPPROTO_UDP
    } else {
        IPPROTO_TCP
    };
    let pseudo = sum(&src) + sum(&dst) + segment.len() as u32 + u32::from(proto);
    let holds = fold(pseudo + sum(segment)) == 0xffff;
    ((src, port(l4)), (dst, port(l4 + 2)), holds)
}

fn udp6(ext: &[(u8, usize)], src: End6, dst: End6) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&src.1.to_be_bytes());
    u[2..4].copy_from_slice(&dst.1.to_be_bytes());
    u[4..6].copy_from_slice(&13u16.to_be_bytes());
    u.extend_from_slice(b"hello");
    frame6(ext, IPPROTO_UDP, src.0, dst.0, u)
}

const IPPROTO_ROUTING: u8 = 43;

/// Where an IPv6 frame's upper layer starts and ends, and its protocol, as the kernel
/// would find them: a payload length within the frame, a hop-by-hop options header only
/// first, every extension header within the payload; `None` for a frame that is not such
/// a packet, `Some(None)` for a later fragment (no upper-layer header).
fn upper_layer6(f: &[u8]) -> Option<Option<(usize, usize, u8, bool)>> {
    (f.len() >= 54 && f[12..14] == [0x86, 0xdd] && f[14] >> 4 == 6).then_some(())?;
    let payload = usize::from(u16::from_be_bytes([f[18], f[19]]));
    (payload > 0 && 54 + payload <= f.len()).then_some(())?;
    let end = 54 + payload;
    let (mut next, mut at, mut more) = (f[20], 54, false);
    loop {
        match next {
            IPPROTO_HOPOPTS if at == 54 => {}
            IPPROTO_ROUTING | IPPROTO_DSTOPTS => {}
            IPPROTO_FRAGMENT => {
                (at + 8 <= end).then_some(())?;
                let offset_flags = u16::from_be_bytes([f[at + 2], f[at + 3]]);
                if offset_flags >> 3 != 0 {
                    return Some(None);
                }
                more = offset_flags & 1 != 0;
                (next, at) = (f[at], at + 8);
                continue;
            }
            _ => break,
        }
        (at + 2 <= end).then_some(())?;
        (next, at) = (f[at], at + (usize::from(f[at + 1]) + 1) * 8);
        (at <= end).then_some(())?;
    }
    Some(Some((at, end, next, more)))
}

/// What the kernel would accept as an IPv6 TCP or UDP packet (`upper_layer6`), checked
/// independently of the datapath's parser; a later fragment or an ICMPv6 message starts no
/// flow.
fn well_formed6(f: &[u8]) -> Judged {
    let Some(upper) = upper_layer6(f) else {
        return Judged::Malformed;
    };
    match upper {
        Some((_, _, IPPROTO_ICMPV6, _)) | None => Judged::NoFlow,
        Some((at, end, proto, more)) => upper_layer(proto, &f[at..end], more),
    }
}

/// The checksum of an IPv6 frame's upper layer holds, as far as the packet is whole here (an
/// ICMPv6 error quotes the start of one): but for a fragment, its TCP or UDP checksum or
/// its ICMPv6 message's, with the checksum of the packet an ICMPv6 error quotes.
fn checksums_hold6(f: &[u8]) -> bool {
    let Some(Some((at, end, proto, false))) = upper_layer6(f) else {
        return true;
    };
    let segment = &f[at..end];
    let pseudo = sum(&f[22..54]) + segment.len() as u32 + u32::from(proto);
    let holds = fold(pseudo + sum(segment)) == 0xffff;
    match proto {
        IPPROTO_ICMPV6 => {
            holds
                && segment
                    .get(8..)
                    .is_none_or(|quote| checksums_hold6(&[&f[..14], quote].concat()))
        }
        IPPROTO_TCP | IPPROTO_UDP => holds,
        _ => true,
    }
}

#[test]
fn one_client_port_to_two_ipv6_cluster_ips_sharing_a_backend_gets_two_reply_tuples() {
    // As IPv4's: the second flow's reply tuple would be the first's, so it moves to a free
    // source port, and each reply goes back from its own ClusterIP to the client's port.
    for (proto, port) in [(IPPROTO_TCP, 80), (IPPROTO_UDP, 53)] {
        let mut fx = Fixture::new();
        let packet = |src, dst| match proto {
            IPPROTO_TCP => tcp6(&[], src, dst, SYN),
            _ => udp6(&[], src, dst),
        };
        let reply = |src, dst| match proto {
            IPPROTO_TCP => tcp6(&[], src, dst, SYN | ACK),
            _ => udp6(&[], src, dst),
        };
        let client = (CLIENT6, 40000);
        let backend = (BACKEND6, BACKEND_PORT);
        let (_, first) = fx.ingress(&packet(client, (VIP6, port)));
        assert_eq!(ends6(&first, 54), (client, backend, true), "{proto}");
        let (_, second) = fx.ingress(&packet(client, (VIP6B, port)));
        let ((src, moved), dst, holds) = ends6(&second, 54);
        assert_eq!((src, dst, holds), (CLIENT6, backend, true), "{proto}");
        assert!(
            (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&moved),
            "{proto}: the second flow moves to a free port, not {moved}"
        );
        for (to_port, vip) in [(40000, VIP6), (moved, VIP6B)] {
            let (verdict, out) = fx.egress(&reply(backend, (CLIENT6, to_port)));
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(ends6(&out, 54), ((vip, port), client, true), "{proto}");
        }
        let (_, again) = fx.ingress(&packet(client, (VIP6B, port)));
        assert_eq!(ends6(&again, 54).0, (CLIENT6, moved));
    }
}

#[test]
fn ipv6_packets_are_translated_past_their_extension_headers() {
    let mut fx = Fixture::new();
    // Hop-by-hop and destination options before TCP: the SYN reaches the backend, the
    // checksum (over the IPv6 pseudo-header) still holds, and the flow is tracked.
    let ext = [(IPPROTO_HOPOPTS, 1), (IPPROTO_DSTOPTS, 2)];
    let l4 = 14 + 40 + 8 + 16;
    let syn = tcp6(&ext, (CLIENT6, 40000), (VIP6, 80), SYN);
    let (verdict, out) = fx.ingress(&syn);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst, holds) = ends6(&out, l4);
    assert_eq!((src, dst), ((CLIENT6, 40000), (BACKEND6, BACKEND_PORT)));
    assert!(holds, "checksum after DNAT");
    let conntrack6: HashMap<MapData, proxy_common::CtKey6, proxy_common::CtEntry6> =
        proxy::maps::open(&fx.pins, maps::CONNTRACK6).unwrap();
    assert_eq!(
        conntrack6.keys().count(),
        1,
        "one entry, under the client key"
    );
    // The backend's reply leaves with the service address as source.
    let reply = tcp6(&[], (BACKEND6, BACKEND_PORT), (CLIENT6, 40000), SYN | ACK);
    let (verdict, out) = fx.egress(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst, holds) = ends6(&out, 14 + 40);
    assert_eq!((src, dst), ((VIP6, 80), (CLIENT6, 40000)));
    assert!(holds, "checksum after reverse NAT");
}

/// An IPv6 fragment of a UDP datagram: `payload` at `offset` (in 8-byte units) of the
/// datagram's L4 bytes, behind a fragment header with identification 0x4242; `more`
/// fragments follow.
fn fragment6(src: [u8; 16], dst: [u8; 16], offset: u16, more: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    ip[6] = IPPROTO_FRAGMENT;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&dst);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[IPPROTO_UDP, 0]);
    f.extend_from_slice(&(offset << 3 | u16::from(more)).to_be_bytes());
    f.extend_from_slice(&0x4242u32.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A UDP datagram with a 40-byte payload, in two IPv6 fragments (24 and 24 bytes).
fn fragmented_udp6(src: End6, dst: End6) -> [Vec<u8>; 2] {
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&src.1.to_be_bytes());
    udp[2..4].copy_from_slice(&dst.1.to_be_bytes());
    udp[4..6].copy_from_slice(&48u16.to_be_bytes());
    udp.extend((0..40).map(|i| i as u8));
    let pseudo = sum(&src.0) + sum(&dst.0) + udp.len() as u32 + u32::from(IPPROTO_UDP);
    let csum = !fold(pseudo + sum(&udp));
    udp[6..8].copy_from_slice(&csum.to_be_bytes());
    [
        fragment6(src.0, dst.0, 0, true, &udp[..24]),
        fragment6(src.0, dst.0, 3, false, &udp[24..]),
    ]
}

/// The IPv6 datagram the fragments make, checked: they agree on addresses and the
/// reassembled UDP checksum holds. Returns its ends.
fn reassembled6(fragments: &[Vec<u8>]) -> (End6, End6) {
    let header = 14 + 40 + 8;
    let mut udp = Vec::new();
    for f in fragments {
        assert_eq!(f[22..54], fragments[0][22..54], "one datagram's addresses");
        udp.extend_from_slice(&f[header..]);
    }
    let first = &fragments[0];
    let pseudo =
        sum(&first[22..38]) + sum(&first[38..54]) + udp.len() as u32 + u32::from(IPPROTO_UDP);
    assert_eq!(
        fold(pseudo + sum(&udp)),
        0xffff,
        "UDP checksum of the datagram"
    );
    let addr = |at: usize| -> [u8; 16] { first[at..at + 16].try_into().unwrap() };
    let port = |at: usize| u16::from_be_bytes([first[header + at], first[header + at + 1]]);
    ((addr(22), port(0)), (addr(38), port(2)))
}

#[test]
fn every_fragment_of_an_ipv6_datagram_follows_its_flow() {
    let mut fx = Fixture::new();
    let client = (CLIENT6, 40000);
    let backend = (BACKEND6, BACKEND_PORT);
    // A later fragment before any first one: its flow is unknown, it passes untouched.
    let [_, early] = fragmented_udp6(client, (VIP6, 53));
    assert_eq!(fx.ingress(&early), (TC_ACT_OK, early.clone()));
    // Request: both fragments to the backend; the datagram is whole and valid there.
    let out: Vec<Vec<u8>> = fragmented_udp6(client, (VIP6, 53))
        .iter()
        .map(|f| fx.ingress(f).1)
        .collect();
    assert_eq!(reassembled6(&out), (client, backend));
    // Reply: both fragments from the ClusterIP.
    let out: Vec<Vec<u8>> = fragmented_udp6(backend, client)
        .iter()
        .map(|f| fx.egress(f).1)
        .collect();
    assert_eq!(reassembled6(&out), ((VIP6, 53), client));
}

const IPPROTO_ICMPV6: u8 = 58;

/// An ICMPv6 error of `kind`/`code` from `src` to `dst` quoting `quoted` (an IPv6 frame:
/// its IP packet, whole, is quoted).
fn icmp6_error(kind: u8, code: u8, src: [u8; 16], dst: [u8; 16], quoted: &[u8]) -> Vec<u8> {
    let mut message = vec![kind, code, 0, 0, 0, 0, 0x05, 0x00];
    message.extend_from_slice(&quoted[14..]);
    frame6(&[], IPPROTO_ICMPV6, src, dst, message)
}

/// An ICMPv6 error frame's source, the ends of the TCP segment it quotes (at `l4` in the
/// quoted packet as a frame: past its extension headers), and whether both checksums hold:
/// the ICMPv6 message's (over its pseudo-header) and the quoted segment's.
fn icmp6_quoting(f: &[u8], l4: usize) -> ([u8; 16], End6, End6, bool) {
    let (src, dst): ([u8; 16], [u8; 16]) =
        (f[22..38].try_into().unwrap(), f[38..54].try_into().unwrap());
    let message = &f[54..];
    let pseudo = sum(&src) + sum(&dst) + message.len() as u32 + u32::from(IPPROTO_ICMPV6);
    let mut quoted = f[..14].to_vec();
    quoted.extend_from_slice(&message[8..]);
    let (qsrc, qdst, quote_holds) = ends6(&quoted, l4);
    let holds = fold(pseudo + sum(message)) == 0xffff && quote_holds;
    (src, qsrc, qdst, holds)
}

#[test]
fn icmpv6_errors_about_translated_flows_are_translated_outer_and_inner() {
    let mut fx = Fixture::new();
    const DEST_UNREACH: u8 = 1;
    const PACKET_TOO_BIG: u8 = 2;
    let client = (CLIENT6, 40000);
    let backend = (BACKEND6, BACKEND_PORT);
    let (_, sent) = fx.ingress(&tcp6(&[], client, (VIP6, 80), SYN));
    // A router on the way to the backend (the node) finds the segment too big: the error
    // keeps the router's address and quotes the segment as the client sent it.
    let router = [0xfd, 0, 2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let error = icmp6_error(PACKET_TOO_BIG, 0, router, CLIENT6, &sent);
    let (verdict, out) = fx.egress(&error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        icmp6_quoting(&out, 14 + 40),
        (router, client, (VIP6, 80), true),
        "{out:02x?}"
    );
    // The backend's own port unreachable comes from the ClusterIP.
    let error = icmp6_error(DEST_UNREACH, 4, BACKEND6, CLIENT6, &sent);
    let (_, out) = fx.egress(&error);
    assert_eq!(
        icmp6_quoting(&out, 14 + 40),
        (VIP6, client, (VIP6, 80), true),
        "{out:02x?}"
    );
    // From the client's side about a reply (arriving): to the backend, quoting the reply
    // as the backend sent it.
    let (_, reply) = fx.egress(&tcp6(&[], backend, client, SYN | ACK));
    let error = icmp6_error(PACKET_TOO_BIG, 0, CLIENT6, VIP6, &reply);
    let (verdict, out) = fx.ingress(&error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(&out[38..54], &BACKEND6, "to the backend");
    assert_eq!(
        icmp6_quoting(&out, 14 + 40),
        (CLIENT6, backend, client, true),
        "{out:02x?}"
    );
    // An error about a flow we do not track passes untouched.
    let stranger = tcp6(&[], (CLIENT6, 41000), (BACKEND6, 9999), SYN);
    let error = icmp6_error(DEST_UNREACH, 4, BACKEND6, CLIENT6, &stranger);
    assert_eq!(fx.egress(&error), (TC_ACT_OK, error.clone()));
}

#[test]
fn icmpv6_errors_quoting_extension_headers_or_a_first_fragment_are_translated() {
    let mut fx = Fixture::new();
    const PACKET_TOO_BIG: u8 = 2;
    let router = [0xfd, 0, 2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    // A translated segment keeps the client's hop-by-hop and destination options headers,
    // and an error quotes them: the ports are found past them.
    let ext = [(IPPROTO_HOPOPTS, 1), (IPPROTO_DSTOPTS, 2)];
    let client = (CLIENT6, 40000);
    let (_, sent) = fx.ingress(&tcp6(&ext, client, (VIP6, 80), SYN));
    let error = icmp6_error(PACKET_TOO_BIG, 0, router, CLIENT6, &sent);
    let (verdict, out) = fx.egress(&error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        icmp6_quoting(&out, 14 + 40 + 24),
        (router, client, (VIP6, 80), true),
        "{out:02x?}"
    );
    // The first fragment of a datagram (fragment header; the ports in it): translated.
    let client = (CLIENT6, 40001);
    let [first, _] = fragmented_udp6(client, (VIP6, 53));
    let (_, sent) = fx.ingress(&first);
    let error = icmp6_error(PACKET_TOO_BIG, 0, router, CLIENT6, &sent);
    let (_, out) = fx.egress(&error);
    // The quoted UDP checksum covers the whole datagram: compare it with the first
    // fragment the client sent, which it must equal again.
    let quoted_ip = 14 + 40 + 8;
    assert_eq!(
        &out[quoted_ip..],
        &first[14..],
        "the client's fragment, quoted"
    );
    let (src, _, _, _) = icmp6_quoting(&out, 14 + 40 + 8);
    assert_eq!(src, router);
    let message = &out[54..];
    let pseudo = sum(&out[22..38]) + sum(&out[38..54]) + message.len() as u32 + 58;
    assert_eq!(fold(pseudo + sum(message)), 0xffff, "ICMPv6 checksum");
}
