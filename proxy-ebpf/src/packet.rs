//! IPv4 TCP/UDP header access: parse once into a `Flow` (tc and XDP), and for tc rewrite
//! an address and port with incremental checksum updates, or turn the packet into an ICMP
//! port-unreachable answer.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_csum_diff, bpf_skb_change_tail, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};
use proxy_common::{CtKey, FragKey, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const IP_TTL_OFF: usize = ETH_HDR_LEN + 8;
pub const IP_CSUM_OFF: usize = ETH_HDR_LEN + 10;
pub const IP_SRC_OFF: usize = ETH_HDR_LEN + 12;
pub const IP_DST_OFF: usize = ETH_HDR_LEN + 16;
const IP_HDR_MIN_LEN: usize = 20;
pub const IPPROTO_ICMP: u8 = 1;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// An IPv4 TCP or UDP packet (first fragment or unfragmented) whose headers are whole and
/// consistent, so that every rewrite of them succeeds.
pub struct Flow {
    pub key: CtKey,
    pub l4_off: usize,
    pub ip_hdr_len: usize,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
    /// The first fragment of a datagram (more follow), and its IP id.
    pub first_fragment: bool,
    pub ip_id: u16,
}

impl Flow {
    pub fn is_tcp(&self) -> bool {
        self.key.proto == IPPROTO_TCP
    }

    /// A TCP SYN without ACK, RST or FIN: the only segment that opens a connection (Linux's
    /// conntrack takes SYN+FIN or SYN+RST for invalid).
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
    }
}

/// Bounds-checked reads of a frame, from its Ethernet header on.
pub trait Frame {
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
    /// Bytes from the Ethernet header to the end of the frame.
    fn frame_len(&self) -> usize;
    /// The frame carries a VLAN tag outside its data (tc sees offloaded tags so): it
    /// belongs to a VLAN device, not to the interface the program runs on.
    fn vlan_tagged(&self) -> bool;
}

impl Frame for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load(offset).ok()
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }

    #[inline(always)]
    fn vlan_tagged(&self) -> bool {
        // SAFETY: valid context.
        unsafe { (*self.skb.skb).vlan_present != 0 }
    }
}

/// Through the load helper rather than direct access: LLVM merges bounds checks of direct
/// reads in ways the verifier cannot follow.
impl Frame for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let mut value = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes at most size_of::<T>() bytes into `value`.
        let ret = unsafe {
            bpf_xdp_load_bytes(
                self.ctx.cast(),
                offset as u32,
                value.as_mut_ptr().cast(),
                core::mem::size_of::<T>() as u32,
            )
        };
        // SAFETY: fully written when the helper succeeds.
        (ret == 0).then(|| unsafe { value.assume_init() })
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.data_end() - self.data()
    }

    /// A tagged frame is still tagged in XDP: its ethertype is not IPv4.
    #[inline(always)]
    fn vlan_tagged(&self) -> bool {
        false
    }
}

/// The fixed IPv4 header as 16-bit words in memory order: one load, and its checksum is
/// their one's-complement sum whatever the byte order.
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

/// Folds a 32-bit one's-complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 incremental update of a checksum (as in memory) for a 16-bit word changing from
/// `old` to `new` (both as in memory).
#[inline(always)]
pub fn replace16(csum: u16, old: u16, new: u16) -> u16 {
    let sum = !u16::from_be(csum) as u32 + !u16::from_be(old) as u32 + u16::from_be(new) as u32;
    (!fold(sum)).to_be()
}

/// The same for a 4-byte field (an address).
#[inline(always)]
pub fn replace32(csum: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let csum = replace16(
        csum,
        u16::from_ne_bytes([old[0], old[1]]),
        u16::from_ne_bytes([new[0], new[1]]),
    );
    replace16(
        csum,
        u16::from_ne_bytes([old[2], old[3]]),
        u16::from_ne_bytes([new[2], new[3]]),
    )
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

const TCP_HDR_MIN_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// A packet the datapath may translate.
pub enum Packet {
    /// TCP or UDP (first fragment or whole).
    Transport(Flow),
    /// A later fragment of a TCP or UDP datagram: no ports of its own.
    Fragment(FragKey),
    /// An ICMP error quoting a TCP or UDP packet.
    IcmpError(IcmpError),
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) and the
/// headers it quotes: the quoted packet's addresses and ports, as it was sent.
pub struct IcmpError {
    /// The error's sender (its IP source) and destination.
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// The quoted packet's tuple.
    pub quoted: CtKey,
    /// Offsets of the ICMP header, the quoted IP header and the quoted L4 header.
    pub icmp_off: usize,
    pub inner_ip_off: usize,
    pub inner_l4_off: usize,
    /// The quoted L4 header's checksum field is inside the frame.
    pub inner_csum_present: bool,
}

pub const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP_HDR_LEN: usize = 8;

/// The packet, if it is an IPv4 TCP or UDP packet (first fragment or whole) or an ICMP
/// error quoting one, that the kernel itself would accept: lengths consistent with the
/// frame, a valid header checksum, a TCP data offset of at least 5. Anything else is left
/// to the kernel (which drops what is malformed) before any state is recorded for it.
#[inline(always)]
pub fn parse<F: Frame>(ctx: &F) -> Option<Packet> {
    let ethertype: u16 = ctx.read(12)?;
    if u16::from_be(ethertype) != ETH_P_IP || ctx.vlan_tagged() {
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
        return Some(Packet::Fragment(FragKey {
            src: ip.addr(6),
            dst: ip.addr(8),
            id: ip.be16(2),
            proto,
            pad: 0,
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
            pad: [0; 3],
        },
        l4_off,
        ip_hdr_len,
        tcp_flags,
        first_fragment: frag & IP_MF != 0,
        ip_id: ip.be16(2),
    }))
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
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    // The ports, at least, must be quoted (RFC 792: the first 8 bytes of the payload).
    let inner_l4_off = inner_ip_off + inner_ihl;
    let quoted = ICMP_HDR_LEN + inner_ihl;
    if len < quoted + 8 {
        return None;
    }
    let ports: [u16; 2] = ctx.read(inner_l4_off)?;
    let csum_end = if proto == IPPROTO_TCP { 18 } else { 8 };
    Some(IcmpError {
        src: ip.addr(6),
        dst: ip.addr(8),
        quoted: CtKey {
            src: inner.addr(6),
            dst: inner.addr(8),
            sport: u16::from_be(ports[0]),
            dport: u16::from_be(ports[1]),
            proto,
            pad: [0; 3],
        },
        icmp_off,
        inner_ip_off,
        inner_l4_off,
        inner_csum_present: len >= quoted + csum_end,
    })
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
    pub fn to(addr: [u8; 4], port: u16) -> Self {
        Rewrite {
            set: true,
            addr,
            port,
        }
    }
}

/// The rewrites of an ICMP error about a translated flow.
pub struct ErrorTranslation {
    /// The quoted packet's new source and destination.
    pub inner_src: Rewrite,
    pub inner_dst: Rewrite,
    /// The error's own new source (when the quoted packet's destination sent it) and
    /// destination; their ports are unused.
    pub outer_src: Rewrite,
    pub outer_dst: Rewrite,
    /// A masqueraded flow's error: route it ourselves.
    pub route: bool,
}

#[derive(Clone, Copy)]
pub enum Endpoint {
    Source,
    Destination,
}

impl Flow {
    /// Offsets of an endpoint's address and port, and its current values.
    #[inline(always)]
    pub fn endpoint(&self, which: Endpoint) -> (usize, usize, [u8; 4], u16) {
        match which {
            Endpoint::Source => (IP_SRC_OFF, self.l4_off, self.key.src, self.key.sport),
            Endpoint::Destination => (IP_DST_OFF, self.l4_off + 2, self.key.dst, self.key.dport),
        }
    }

    /// Offset of the L4 checksum.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + if self.is_tcp() { 16 } else { 6 }
    }
}

/// Rewrites the source or destination address and port, updating the IP and L4 checksums
/// with the kernel's helpers, which also keep offloaded checksums right.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    which: Endpoint,
    addr: [u8; 4],
    port: u16,
) -> Result<(), i64> {
    let (addr_off, port_off, old_addr, old_port) = flow.endpoint(which);
    let csum_off = flow.l4_csum_off();
    // A zero UDP checksum means "none" and must stay zero.
    let l4_flags = if flow.is_tcp() {
        0
    } else {
        BPF_F_MARK_MANGLED_0 as u64
    };
    let old_addr = u32::from_ne_bytes(old_addr);
    let new_addr = u32::from_ne_bytes(addr);
    let old_port = old_port.to_be();
    let new_port = port.to_be();
    ctx.l4_csum_replace(
        csum_off,
        old_addr as u64,
        new_addr as u64,
        BPF_F_PSEUDO_HDR as u64 | l4_flags | 4,
    )?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)?;
    ctx.store(addr_off, &new_addr, 0)?;
    ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, l4_flags | 2)?;
    ctx.store(port_off, &new_port, 0)?;
    Ok(())
}

/// ICMP header (type, code, checksum, unused) followed by the quoted IP header and the
/// first 8 bytes of its payload, as RFC 792 asks.
#[repr(C)]
struct IcmpQuote {
    header: [u8; 8],
    quote: [u8; IP_HDR_MIN_LEN + 8],
}

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
const REPLY_IP_LEN: usize = IP_HDR_MIN_LEN + core::mem::size_of::<IcmpQuote>();

/// One's-complement checksum of `len` bytes at `ptr` (a multiple of 4), in memory order:
/// store it with `to_ne_bytes`.
#[inline(always)]
fn checksum(ptr: *mut u8, len: u32) -> u16 {
    // SAFETY: ptr points to `len` readable bytes on the stack.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, ptr.cast(), len, 0) } as u64;
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Turns the packet into an ICMP error of `kind` and `code` from its destination back to
/// its source, quoting it as it arrived: port unreachable, as kube-proxy's REJECT rule
/// answers for a service without endpoints; time exceeded, as a router answers a packet
/// whose TTL ran out. The caller sends it back out of the interface it came in on. Only
/// for packets without IP options.
#[inline(always)]
pub fn into_icmp_error(ctx: &TcContext, flow: &Flow, kind: u8, code: u8) -> Result<(), i64> {
    if flow.ip_hdr_len != IP_HDR_MIN_LEN {
        return Err(0);
    }
    let mut icmp = IcmpQuote {
        header: [0; 8],
        quote: ctx.load(ETH_HDR_LEN)?,
    };
    icmp.header[0] = kind;
    icmp.header[1] = code;
    let icmp_csum = checksum((&mut icmp as *mut IcmpQuote).cast(), 36);
    icmp.header[2..4].copy_from_slice(&icmp_csum.to_ne_bytes());

    let mut ip = [0u8; IP_HDR_MIN_LEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(REPLY_IP_LEN as u16).to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = IPPROTO_ICMP;
    ip[12..16].copy_from_slice(&flow.key.dst);
    ip[16..20].copy_from_slice(&flow.key.src);
    let ip_csum = checksum(ip.as_mut_ptr(), IP_HDR_MIN_LEN as u32);
    ip[10..12].copy_from_slice(&ip_csum.to_ne_bytes());

    let mut macs: [u8; 12] = ctx.load(0)?;
    let (dst, src) = macs.split_at_mut(6);
    dst.swap_with_slice(src);

    // SAFETY: valid context.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HDR_LEN + REPLY_IP_LEN) as u32, 0) };
    if ret != 0 {
        return Err(ret);
    }
    ctx.store(0, &macs, 0)?;
    ctx.store(ETH_HDR_LEN, &ip, 0)?;
    ctx.store(ETH_HDR_LEN + IP_HDR_MIN_LEN, &icmp, 0)?;
    Ok(())
}

/// Writes the 16-bit `new` (as in memory) at `off` inside the ICMP message whose checksum
/// is at `csum_off`, and updates that checksum.
#[inline(always)]
fn icmp_store16(ctx: &TcContext, csum_off: usize, off: usize, new: u16) -> Result<(), i64> {
    let old: u16 = ctx.load(off)?;
    ctx.l4_csum_replace(csum_off, old as u64, new as u64, 2)?;
    ctx.store(off, &new, 0)
}

/// Rewrites one end of the packet an ICMP error quotes: its address, with the quoted IP
/// header's checksum, its port, and the quoted TCP or UDP checksum when it is quoted (a
/// zero UDP checksum stays zero); the ICMP checksum follows every word changed.
#[inline(always)]
fn rewrite_quoted(
    ctx: &TcContext,
    error: &IcmpError,
    which: Endpoint,
    to: Rewrite,
) -> Result<(), i64> {
    if !to.set {
        return Ok(());
    }
    let csum_off = error.icmp_off + 2;
    let q = &error.quoted;
    let (addr_off, port_off, old_addr, old_port) = match which {
        Endpoint::Source => (error.inner_ip_off + 12, error.inner_l4_off, q.src, q.sport),
        Endpoint::Destination => (
            error.inner_ip_off + 16,
            error.inner_l4_off + 2,
            q.dst,
            q.dport,
        ),
    };
    let ip_csum_off = error.inner_ip_off + 10;
    let ip_csum: u16 = ctx.load(ip_csum_off)?;
    icmp_store16(
        ctx,
        csum_off,
        ip_csum_off,
        replace32(ip_csum, old_addr, to.addr),
    )?;
    let [a, b, c, d] = to.addr;
    icmp_store16(ctx, csum_off, addr_off, u16::from_ne_bytes([a, b]))?;
    icmp_store16(ctx, csum_off, addr_off + 2, u16::from_ne_bytes([c, d]))?;
    let new_port = to.port.to_be();
    icmp_store16(ctx, csum_off, port_off, new_port)?;
    if error.inner_csum_present {
        let tcp = q.proto == IPPROTO_TCP;
        let l4_csum_off = error.inner_l4_off + if tcp { 16 } else { 6 };
        let l4_csum: u16 = ctx.load(l4_csum_off)?;
        if tcp || l4_csum != 0 {
            let mut csum = replace16(
                replace32(l4_csum, old_addr, to.addr),
                old_port.to_be(),
                new_port,
            );
            if !tcp && csum == 0 {
                csum = 0xffff;
            }
            icmp_store16(ctx, csum_off, l4_csum_off, csum)?;
        }
    }
    Ok(())
}

/// Translates an ICMP error: the quoted packet's ends, then the error's own addresses
/// (ICMP has no pseudo-header: only the IP checksum follows those).
#[inline(always)]
pub fn rewrite_icmp_error(
    ctx: &TcContext,
    error: &IcmpError,
    t: &ErrorTranslation,
) -> Result<(), i64> {
    rewrite_quoted(ctx, error, Endpoint::Source, t.inner_src)?;
    rewrite_quoted(ctx, error, Endpoint::Destination, t.inner_dst)?;
    for (to, off, old) in [
        (t.outer_src, IP_SRC_OFF, error.src),
        (t.outer_dst, IP_DST_OFF, error.dst),
    ] {
        if to.set {
            rewrite_address(ctx, off, old, to.addr)?;
        }
    }
    Ok(())
}

/// Rewrites an address in the IP header alone (a later fragment has no L4 header; its
/// first fragment's L4 checksum covers the pseudo-header).
#[inline(always)]
pub fn rewrite_address(
    ctx: &TcContext,
    offset: usize,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), i64> {
    let (old, new) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
    ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4)?;
    ctx.store(offset, &new, 0)
}
