//! IPv4 and IPv6 packets as the datapath sees them: parsed once (tc and XDP) into a TCP/UDP
//! `Flow` (`Flow6`), a later fragment or an ICMP (ICMPv6) error quoting a flow, and rewritten
//! an end at a time with incremental checksum updates, over `Frame`.
use proxy_common::{CtKey, CtKeyOf, IPPROTO_TCP, IPPROTO_UDP};

pub use crate::frame::Frame;
use crate::{
    family::Family,
    frame::{fold, word_diff, words_diff},
};

pub const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
pub const IP6_HDR_LEN: usize = 40;
pub const IPPROTO_ICMPV6: u8 = 58;
/// Extension headers walked before giving up on a packet (more is no traffic of ours).
const IP6_MAX_EXT_HEADERS: usize = 4;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// The byte of the IPv4 header holding its flags, and the "don't fragment" one.
pub const IP_FLAGS_OFF: usize = ETH_HDR_LEN + 6;
pub const IP_DF: u8 = 0x40;
pub const IP_TTL_OFF: usize = ETH_HDR_LEN + 8;
pub const IP_CSUM_OFF: usize = ETH_HDR_LEN + 10;
pub const IP_SRC_OFF: usize = ETH_HDR_LEN + 12;
pub const IP_DST_OFF: usize = ETH_HDR_LEN + 16;
pub const IP_HDR_MIN_LEN: usize = 20;
pub const IPPROTO_ICMP: u8 = 1;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A TCP or UDP packet (first fragment or unfragmented) whose headers are whole and
/// consistent, so that every rewrite of them succeeds.
#[derive(Clone, Copy)]
pub struct FlowOf<A> {
    pub key: CtKeyOf<A>,
    pub l4_off: usize,
    /// The IPv4 header's length (options included); IPv6: the fixed header's and its
    /// extension headers'.
    pub ip_hdr_len: usize,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
    /// The first fragment of a datagram (more follow), and its identification (IPv4's
    /// 16-bit IP id, IPv6's 32-bit fragment header one).
    pub first_fragment: bool,
    pub ip_id: u32,
}

pub type Flow = FlowOf<[u8; 4]>;
pub type Flow6 = FlowOf<[u8; 16]>;

/// Bound of a flow's header offsets: far above what the parsers accept (IPv6: four
/// extension headers of at most 2 KiB each).
const L4_OFF_MAX: usize = 16 * 1024;

impl<A: Copy> FlowOf<A> {
    /// The flow, if its offsets are within bounds the verifier can see. A flow read from a
    /// map has offsets that are any number to the verifier, which adds only bounded ones to
    /// a packet pointer: copied to the stack (this returns it) and bounded there.
    #[inline(always)]
    pub fn bounded(self) -> Option<Self> {
        (self.l4_off <= L4_OFF_MAX && self.ip_hdr_len <= L4_OFF_MAX).then_some(self)
    }
}

impl<A> FlowOf<A> {
    pub fn is_tcp(&self) -> bool {
        self.key.proto == IPPROTO_TCP
    }

    /// A TCP SYN without ACK, RST or FIN: the only segment that opens a connection (Linux's
    /// conntrack takes SYN+FIN or SYN+RST for invalid).
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
    }
}

/// The fixed IPv4 header as 16-bit words in memory order: one load, and its checksum is
/// their one's-complement sum whatever the byte order. Aligned to 4, so that the load is
/// five words (`Frame::read`).
#[repr(C, align(4))]
#[derive(Clone, Copy)]
struct Ipv4Words([u16; 10]);

impl Ipv4Words {
    fn byte(&self, i: usize) -> u8 {
        self.0[i / 2].to_ne_bytes()[i % 2]
    }

    fn be16(&self, word: usize) -> u16 {
        u16::from_be(self.0[word])
    }

    fn addr(&self, word: usize) -> [u8; 4] {
        let [a, b] = self.0[word].to_ne_bytes();
        let [c, d] = self.0[word + 1].to_ne_bytes();
        [a, b, c, d]
    }
}

/// The IPv4 header's checksum holds, options included.
#[inline(always)]
fn header_checksum_ok<F: Frame>(ctx: &F, ip: &Ipv4Words, ip_hdr_len: usize) -> Option<bool> {
    let mut sum: u32 = ip.0.iter().map(|w| *w as u32).sum();
    // Options: at most 40 bytes, in 4-byte words.
    for i in 0..10 {
        let off = IP_HDR_MIN_LEN + i * 4;
        if off >= ip_hdr_len {
            break;
        }
        let word: [u16; 2] = ctx.read(ETH_HDR_LEN + off)?;
        sum += word[0] as u32 + word[1] as u32;
    }
    Some(fold(sum) == 0xffff)
}

/// TCP header up to its flags.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpStart {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    data_off: u8,
    flags: u8,
}

/// UDP header.
#[repr(C)]
#[derive(Clone, Copy)]
struct UdpHeader {
    sport: u16,
    dport: u16,
    len: u16,
    csum: u16,
}

pub const TCP_HDR_MIN_LEN: usize = 20;
pub const UDP_HDR_LEN: usize = 8;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// A packet the datapath may translate.
pub enum Packet {
    /// TCP or UDP (first fragment or whole).
    Transport(Flow),
    /// A later fragment of a TCP or UDP datagram: no ports of its own.
    Fragment(Fragment),
    /// An ICMP error quoting a TCP or UDP packet.
    IcmpError(IcmpError),
}

/// A later fragment of a datagram (no L4 header): what names its datagram.
pub struct FragmentOf<A> {
    pub src: A,
    pub dst: A,
    pub id: u32,
    pub proto: u8,
}

pub type Fragment = FragmentOf<[u8; 4]>;

/// An ICMP (ICMPv6) error — destination unreachable, time exceeded, parameter problem;
/// ICMPv6's packet too big — and the headers it quotes: the quoted packet's addresses and
/// ports, as it was sent.
pub struct IcmpErrorOf<A> {
    /// The error's sender (its IP source) and destination.
    pub src: A,
    pub dst: A,
    /// The quoted packet's tuple.
    pub quoted: CtKeyOf<A>,
    /// Offsets of the ICMP header, the quoted IP header and the quoted L4 header.
    pub icmp_off: usize,
    pub inner_ip_off: usize,
    pub inner_l4_off: usize,
    /// The quoted L4 header's checksum field is inside the frame.
    pub inner_csum_present: bool,
}

pub type IcmpError = IcmpErrorOf<[u8; 4]>;
pub type IcmpError6 = IcmpErrorOf<[u8; 16]>;

pub const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP_HDR_LEN: usize = 8;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
/// Destination unreachable's "fragmentation needed and DF set", with the next hop's MTU.
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
pub const ICMPV6_PORT_UNREACH: u8 = 4;

/// The packet, if it is an IPv4 TCP or UDP packet (first fragment or whole) or an ICMP
/// error quoting one, that the kernel itself would accept: lengths consistent with the
/// frame, a valid header checksum, a TCP data offset of at least 5. Anything else is left
/// to the kernel (which drops what is malformed) before any state is recorded for it.
#[inline(always)]
pub fn parse<F: Frame>(ctx: &F) -> Option<Packet> {
    if !is_ipv6(ctx).is_some_and(|v6| !v6) {
        return None;
    }
    let ip: Ipv4Words = ctx.read(ETH_HDR_LEN)?;
    let version_ihl = ip.byte(0);
    let ip_hdr_len = (version_ihl & 0x0f) as usize * 4;
    if version_ihl >> 4 != 4 || ip_hdr_len < IP_HDR_MIN_LEN {
        return None;
    }
    let frag = ip.be16(3);
    let proto = ip.byte(9);
    let total = ip.be16(1) as usize;
    // The frame may be longer (Ethernet padding), never shorter.
    if total > ctx.frame_len().saturating_sub(ETH_HDR_LEN) || total < ip_hdr_len {
        return None;
    }
    // Later fragments carry no ports: their first fragment named the flow.
    if frag & IP_OFFSET != 0 {
        if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
            || !header_checksum_ok(ctx, &ip, ip_hdr_len)?
        {
            return None;
        }
        return Some(Packet::Fragment(Fragment {
            src: ip.addr(6),
            dst: ip.addr(8),
            id: ip.be16(2).into(),
            proto,
        }));
    }
    let l4_off = ETH_HDR_LEN + ip_hdr_len;
    let l4_len = total.checked_sub(ip_hdr_len)?;
    let (sport, dport, tcp_flags) = match proto {
        IPPROTO_TCP => {
            let tcp: TcpStart = ctx.read(l4_off)?;
            let tcp_hdr_len = (tcp.data_off >> 4) as usize * 4;
            if tcp_hdr_len < TCP_HDR_MIN_LEN || tcp_hdr_len > l4_len {
                return None;
            }
            (tcp.sport, tcp.dport, tcp.flags)
        }
        IPPROTO_UDP => {
            let udp: UdpHeader = ctx.read(l4_off)?;
            let udp_len = u16::from_be(udp.len) as usize;
            // A first fragment holds only part of the datagram its length counts.
            let whole = frag & IP_MF == 0;
            if udp_len < UDP_HDR_LEN || l4_len < UDP_HDR_LEN || (whole && udp_len > l4_len) {
                return None;
            }
            (udp.sport, udp.dport, 0)
        }
        IPPROTO_ICMP => {
            let error = parse_icmp_error(ctx, &ip, l4_off, l4_len)?;
            if !header_checksum_ok(ctx, &ip, ip_hdr_len)? {
                return None;
            }
            return Some(Packet::IcmpError(error));
        }
        _ => return None,
    };
    if !header_checksum_ok(ctx, &ip, ip_hdr_len)? {
        return None;
    }
    Some(Packet::Transport(Flow {
        key: CtKey {
            src: ip.addr(6),
            dst: ip.addr(8),
            sport: u16::from_be(sport),
            dport: u16::from_be(dport),
            proto,
            kind: proxy_common::CT_KEY_TUPLE,
            pad: 0,
        },
        l4_off,
        ip_hdr_len,
        tcp_flags,
        first_fragment: frag & IP_MF != 0,
        ip_id: ip.be16(2).into(),
    }))
}

/// Whether the frame holds IPv6 (`Some(true)`) or IPv4 (`Some(false)`) for this interface
/// (not a frame of a VLAN device), else `None`.
#[inline(always)]
pub fn is_ipv6<F: Frame>(ctx: &F) -> Option<bool> {
    let ethertype = ctx.ethertype()?;
    if ctx.vlan_tagged() {
        return None;
    }
    match ethertype {
        ETH_P_IP => Some(false),
        ETH_P_IPV6 => Some(true),
        _ => None,
    }
}

/// The fixed IPv6 header; aligned to 8, so that it is read in five words (`Frame::read`).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Ipv6Header {
    version_class_flow: [u8; 4],
    payload_len: u16,
    next: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// The start of an extension header: the next header and its length in 8-byte units,
/// not counting the first 8.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Extension {
    next: u8,
    len: u8,
}

/// The fragment header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Fragment {
    next: u8,
    reserved: u8,
    /// Offset (13 bits, in 8-byte units), 2 reserved bits, the M (more fragments) flag.
    offset_flags: u16,
    id: u32,
}

/// Where an IPv6 header's extension headers lead.
struct Extensions {
    /// The upper layer's protocol.
    next: u8,
    /// Length of the IPv6 headers (the fixed one and the extension headers).
    ip_hdr_len: usize,
    /// A fragment header's: more fragments follow, the fragment is not the first, and the
    /// identification.
    more_fragments: bool,
    later_fragment: bool,
    fragment_id: u32,
}

impl Extensions {
    fn fragmented(&self) -> bool {
        self.more_fragments || self.later_fragment
    }
}

/// The extension headers after the IPv6 header at `ip_off`, whose next header is `next`,
/// skipped: hop-by-hop, routing and destination options headers (at most
/// `IP6_MAX_EXT_HEADERS`) and a fragment header after them. `None` for a hop-by-hop header
/// that is not the first, which the kernel drops (RFC 8200 allows it only there).
#[inline(always)]
fn extensions<F: Frame>(ctx: &F, ip_off: usize, next: u8) -> Option<Extensions> {
    let mut e = Extensions {
        next,
        ip_hdr_len: IP6_HDR_LEN,
        more_fragments: false,
        later_fragment: false,
        fragment_id: 0,
    };
    for _ in 0..IP6_MAX_EXT_HEADERS {
        match e.next {
            IPPROTO_HOPOPTS if e.ip_hdr_len != IP6_HDR_LEN => return None,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext: Ipv6Extension = ctx.read(ip_off + e.ip_hdr_len)?;
                e.next = ext.next;
                e.ip_hdr_len += (ext.len as usize + 1) * 8;
            }
            _ => break,
        }
    }
    // The fragment header follows those (RFC 8200's order), once: read after the walk, so
    // that the verifier does not follow each header's kind with each fragment's state.
    if e.next == IPPROTO_FRAGMENT {
        let frag: Ipv6Fragment = ctx.read(ip_off + e.ip_hdr_len)?;
        let offset_flags = u16::from_be(frag.offset_flags);
        e.next = frag.next;
        e.ip_hdr_len += 8;
        e.more_fragments = offset_flags & 1 != 0;
        e.later_fragment = offset_flags >> 3 != 0;
        e.fragment_id = u32::from_be(frag.id);
    }
    Some(e)
}

/// An IPv6 packet's headers up to its upper layer.
struct Ipv6Headers {
    ip: Ipv6Header,
    ext: Extensions,
    /// Length of what follows the IPv6 headers.
    l4_len: usize,
}

/// An IPv6 packet's headers up to its upper layer (`extensions`), if its payload length is
/// within the frame.
#[inline(always)]
fn ipv6_headers<F: Frame>(ctx: &F) -> Option<Ipv6Headers> {
    if is_ipv6(ctx) != Some(true) {
        return None;
    }
    let ip: Ipv6Header = ctx.read(ETH_HDR_LEN)?;
    if ip.version_class_flow[0] >> 4 != 6 {
        return None;
    }
    let payload = u16::from_be(ip.payload_len) as usize;
    // The frame may be longer (Ethernet padding), never shorter; a zero length is a jumbogram.
    if payload == 0 || payload > ctx.frame_len().saturating_sub(ETH_HDR_LEN + IP6_HDR_LEN) {
        return None;
    }
    let ext = extensions(ctx, ETH_HDR_LEN, ip.next)?;
    let l4_len = payload.checked_sub(ext.ip_hdr_len - IP6_HDR_LEN)?;
    Some(Ipv6Headers { ip, ext, l4_len })
}

/// The packet, if it is an IPv6 TCP or UDP packet (first fragment or whole) that the kernel
/// itself would accept (`ipv6_headers`): a TCP data offset of at least 5, a UDP length within
/// the payload (of a whole datagram). Later fragments, ICMPv6 and anything else are not.
#[inline(always)]
pub fn parse6<F: Frame>(ctx: &F) -> Option<Flow6> {
    let h = ipv6_headers(ctx)?;
    if h.ext.later_fragment {
        return None;
    }
    let (l4_off, l4_len) = (ETH_HDR_LEN + h.ext.ip_hdr_len, h.l4_len);
    let (sport, dport, tcp_flags) = match h.ext.next {
        IPPROTO_TCP => {
            let tcp: TcpStart = ctx.read(l4_off)?;
            let tcp_hdr_len = (tcp.data_off >> 4) as usize * 4;
            if tcp_hdr_len < TCP_HDR_MIN_LEN || tcp_hdr_len > l4_len {
                return None;
            }
            (tcp.sport, tcp.dport, tcp.flags)
        }
        IPPROTO_UDP => {
            let udp: UdpHeader = ctx.read(l4_off)?;
            let udp_len = u16::from_be(udp.len) as usize;
            // A first fragment holds only part of the datagram its length counts.
            let whole = !h.ext.more_fragments;
            if udp_len < UDP_HDR_LEN || l4_len < UDP_HDR_LEN || (whole && udp_len > l4_len) {
                return None;
            }
            (udp.sport, udp.dport, 0)
        }
        _ => return None,
    };
    Some(Flow6 {
        key: CtKeyOf {
            src: h.ip.src,
            dst: h.ip.dst,
            sport: u16::from_be(sport),
            dport: u16::from_be(dport),
            proto: h.ext.next,
            kind: proxy_common::CT_KEY_TUPLE,
            pad: 0,
        },
        l4_off,
        ip_hdr_len: h.ext.ip_hdr_len,
        tcp_flags,
        first_fragment: h.ext.more_fragments,
        ip_id: h.ext.fragment_id,
    })
}

/// The packet, if it is a later fragment of an IPv6 TCP or UDP datagram.
#[inline(always)]
pub fn parse_fragment6<F: Frame>(ctx: &F) -> Option<FragmentOf<[u8; 16]>> {
    let h = ipv6_headers(ctx)?;
    if !h.ext.later_fragment || (h.ext.next != IPPROTO_TCP && h.ext.next != IPPROTO_UDP) {
        return None;
    }
    Some(FragmentOf {
        src: h.ip.src,
        dst: h.ip.dst,
        id: h.ext.fragment_id,
        proto: h.ext.next,
    })
}

/// The packet, if it is an ICMPv6 error (destination unreachable, packet too big, time
/// exceeded, parameter problem) quoting at least the IPv6 headers and the ports of a TCP or
/// UDP packet (whole or a first fragment): a translated packet keeps the client's
/// extension headers, and the quote has them.
#[inline(always)]
pub fn parse_icmp6_error<F: Frame>(ctx: &F) -> Option<IcmpError6> {
    let h = ipv6_headers(ctx)?;
    if h.ext.next != IPPROTO_ICMPV6 || h.ext.fragmented() {
        return None;
    }
    let (ip, len) = (h.ip, h.l4_len);
    let icmp_off = ETH_HDR_LEN + h.ext.ip_hdr_len;
    let kind: u8 = ctx.read(icmp_off)?;
    if !matches!(
        kind,
        ICMPV6_DEST_UNREACH
            | ICMPV6_PACKET_TOO_BIG
            | ICMPV6_TIME_EXCEEDED
            | ICMPV6_PARAMETER_PROBLEM
    ) {
        return None;
    }
    let inner_ip_off = icmp_off + ICMP_HDR_LEN;
    let inner: Ipv6Header = ctx.read(inner_ip_off)?;
    if inner.version_class_flow[0] >> 4 != 6 {
        return None;
    }
    let quoted = extensions(ctx, inner_ip_off, inner.next)?;
    if quoted.later_fragment {
        return None;
    }
    quoting(
        ctx,
        (ip.src, ip.dst),
        (inner.src, inner.dst, quoted.next),
        (icmp_off, inner_ip_off, inner_ip_off + quoted.ip_hdr_len),
        len,
    )
}

/// The ICMP error at `icmp_off` (`len` bytes of ICMP message), if it quotes at least the
/// IP header and the ports of a TCP or UDP packet.
#[inline(always)]
fn parse_icmp_error<F: Frame>(
    ctx: &F,
    ip: &Ipv4Words,
    icmp_off: usize,
    len: usize,
) -> Option<IcmpError> {
    let kind: u8 = ctx.read(icmp_off)?;
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETER_PROBLEM {
        return None;
    }
    let inner_ip_off = icmp_off + ICMP_HDR_LEN;
    let inner: Ipv4Words = ctx.read(inner_ip_off)?;
    let inner_ihl = (inner.byte(0) & 0x0f) as usize * 4;
    let proto = inner.byte(9);
    if inner.byte(0) >> 4 != 4 || inner_ihl < IP_HDR_MIN_LEN {
        return None;
    }
    quoting(
        ctx,
        (ip.addr(6), ip.addr(8)),
        (inner.addr(6), inner.addr(8), proto),
        (icmp_off, inner_ip_off, inner_ip_off + inner_ihl),
        len,
    )
}

/// The error whose `len` bytes of ICMP message from `icmp_off` quote a packet between
/// `inner` addresses of protocol `inner.2` at `offsets` (ICMP header, quoted IP header,
/// quoted L4 header), sent between `outer` addresses; if that packet is TCP or UDP and
/// at least its ports are quoted (RFC 792: the first 8 bytes of the payload).
#[inline(always)]
fn quoting<F: Frame, A: Copy>(
    ctx: &F,
    outer: (A, A),
    inner: (A, A, u8),
    (icmp_off, inner_ip_off, inner_l4_off): (usize, usize, usize),
    len: usize,
) -> Option<IcmpErrorOf<A>> {
    let proto = inner.2;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let quoted = inner_l4_off - icmp_off;
    if len < quoted + 8 {
        return None;
    }
    let ports: [u16; 2] = ctx.read(inner_l4_off)?;
    let csum_end = if proto == IPPROTO_TCP { 18 } else { 8 };
    Some(IcmpErrorOf {
        src: outer.0,
        dst: outer.1,
        quoted: CtKeyOf {
            src: inner.0,
            dst: inner.1,
            sport: u16::from_be(ports[0]),
            dport: u16::from_be(ports[1]),
            proto,
            kind: proxy_common::CT_KEY_TUPLE,
            pad: 0,
        },
        icmp_off,
        inner_ip_off,
        inner_l4_off,
        inner_csum_present: len >= quoted + csum_end,
    })
}

/// A new address and port for one end of a packet, if `set`. Not an `Option`: the verifier
/// rejects the uninitialised payload of a `None` when the compiler spills it. The address
/// first and aligned to 4, as in the conntrack entries it comes from: copied and summed in
/// words, not a byte at a time (BPF may not load misaligned stack data).
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct RewriteOf<A> {
    pub addr: A,
    pub port: u16,
    pub set: bool,
}

impl<A> RewriteOf<A> {
    /// Writes the new address at `offset` of the frame, in words: it comes first in this
    /// 4-aligned struct, though a byte array.
    #[inline(always)]
    pub fn write_address<F: Frame>(&self, ctx: &F, offset: usize) -> Option<()> {
        ctx.write_aligned(offset, &self.addr, core::mem::align_of::<Self>())
    }
}

impl<A: Family> RewriteOf<A> {
    pub const NONE: Self = RewriteOf {
        set: false,
        addr: A::ZERO,
        port: 0,
    };

    #[inline(always)]
    pub fn to(addr: A, port: u16) -> Self {
        RewriteOf {
            set: true,
            addr,
            port,
        }
    }

    /// This rewrite if `needed`, else none.
    #[inline(always)]
    pub fn when(self, needed: bool) -> Self {
        RewriteOf {
            set: self.set && needed,
            ..self
        }
    }
}

/// The rewrites of an ICMP error about a translated flow.
pub struct ErrorTranslationOf<A> {
    /// The quoted packet's new source and destination.
    pub inner_src: RewriteOf<A>,
    pub inner_dst: RewriteOf<A>,
    /// The error's own new source (when the quoted packet's destination sent it) and
    /// destination; their ports are unused.
    pub outer_src: RewriteOf<A>,
    pub outer_dst: RewriteOf<A>,
    /// A masqueraded flow's error: route it ourselves.
    pub route: bool,
}

#[derive(Clone, Copy)]
pub enum Endpoint {
    Source,
    Destination,
}

impl<A: Family> FlowOf<A> {
    /// Offset of the L4 checksum.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + if self.is_tcp() { 16 } else { 6 }
    }
}

/// Rewrites the ends of the packet that `src` and `dst` set, addresses and ports. Each
/// checksum is updated once for all that changed: on tc, one helper call for the
/// pseudo-header's addresses, and the ports in the frame unless the checksum is partial
/// (`Frame::update_l4_csum`), where a call per field took four for a masqueraded packet.
#[inline(always)]
pub fn rewrite<F: Frame, A: Family>(
    ctx: &F,
    flow: &FlowOf<A>,
    src: &RewriteOf<A>,
    dst: &RewriteOf<A>,
) -> Option<()> {
    if !src.set && !dst.set {
        return Some(());
    }
    let key = &flow.key;
    let (mut addrs, mut ports) = (0, 0);
    if src.set {
        addrs += words_diff(key.src.as_ref(), src.addr.as_ref());
        ports += word_diff(key.sport.to_be(), src.port.to_be());
    }
    if dst.set {
        addrs += words_diff(key.dst.as_ref(), dst.addr.as_ref());
        ports += word_diff(key.dport.to_be(), dst.port.to_be());
    }
    let csum_off = flow.l4_csum_off();
    let udp = !flow.is_tcp();
    A::update_checksums(ctx, csum_off, addrs, Some(ports), udp)?;
    if src.set {
        src.write_address(ctx, A::SRC_OFF)?;
        ctx.write(flow.l4_off, &src.port.to_be())?;
    }
    if dst.set {
        dst.write_address(ctx, A::DST_OFF)?;
        ctx.write(flow.l4_off + 2, &dst.port.to_be())?;
    }
    Some(())
}
