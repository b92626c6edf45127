//! IPv4 TCP/UDP header access: parse once into a `Flow` (tc and XDP), and for tc rewrite
//! an address and port with incremental checksum updates, or turn the packet into an ICMP
//! port-unreachable answer.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_csum_diff, bpf_skb_change_tail, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};
use proxy_common::{CtKey, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const IP_TTL_OFF: usize = ETH_HDR_LEN + 8;
pub const IP_CSUM_OFF: usize = ETH_HDR_LEN + 10;
pub const IP_SRC_OFF: usize = ETH_HDR_LEN + 12;
pub const IP_DST_OFF: usize = ETH_HDR_LEN + 16;
const IP_HDR_MIN_LEN: usize = 20;
const IPPROTO_ICMP: u8 = 1;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// An IPv4 TCP or UDP packet (first fragment or unfragmented).
pub struct Flow {
    pub key: CtKey,
    pub l4_off: usize,
    pub ip_hdr_len: usize,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
}

impl Flow {
    pub fn is_tcp(&self) -> bool {
        self.key.proto == IPPROTO_TCP
    }

    /// A TCP SYN without ACK: the first packet of a connection.
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Bounds-checked reads of a frame, from its Ethernet header on.
pub trait Frame {
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
}

impl Frame for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load(offset).ok()
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
}

#[inline(always)]
pub fn parse<F: Frame>(ctx: &F) -> Option<Flow> {
    let ethertype: u16 = ctx.read(12)?;
    if u16::from_be(ethertype) != ETH_P_IP {
        return None;
    }
    let version_ihl: u8 = ctx.read(ETH_HDR_LEN)?;
    let ip_hdr_len = (version_ihl & 0x0f) as usize * 4;
    if version_ihl >> 4 != 4 || ip_hdr_len < IP_HDR_MIN_LEN {
        return None;
    }
    // Later fragments carry no ports.
    let frag: u16 = ctx.read(ETH_HDR_LEN + 6)?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return None;
    }
    let proto: u8 = ctx.read(ETH_HDR_LEN + 9)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let l4_off = ETH_HDR_LEN + ip_hdr_len;
    let sport: u16 = ctx.read(l4_off)?;
    let dport: u16 = ctx.read(l4_off + 2)?;
    let tcp_flags = if proto == IPPROTO_TCP {
        ctx.read::<u8>(l4_off + 13)?
    } else {
        0
    };
    Some(Flow {
        key: CtKey {
            src: ctx.read(IP_SRC_OFF)?,
            dst: ctx.read(IP_DST_OFF)?,
            sport: u16::from_be(sport),
            dport: u16::from_be(dport),
            proto,
            pad: [0; 3],
        },
        l4_off,
        ip_hdr_len,
        tcp_flags,
    })
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
struct IcmpUnreachable {
    header: [u8; 8],
    quote: [u8; IP_HDR_MIN_LEN + 8],
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const REPLY_IP_LEN: usize = IP_HDR_MIN_LEN + core::mem::size_of::<IcmpUnreachable>();

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

/// Turns the packet into an ICMP port-unreachable from its destination back to its source,
/// as kube-proxy's REJECT rule answers for a service without endpoints; the caller sends it
/// back out of the interface it came in on. Only for packets without IP options.
#[inline(always)]
pub fn into_port_unreachable(ctx: &TcContext, flow: &Flow) -> Result<(), i64> {
    if flow.ip_hdr_len != IP_HDR_MIN_LEN {
        return Err(0);
    }
    let mut icmp = IcmpUnreachable {
        header: [0; 8],
        quote: ctx.load(ETH_HDR_LEN)?,
    };
    icmp.header[0] = ICMP_DEST_UNREACH;
    icmp.header[1] = ICMP_PORT_UNREACH;
    let icmp_csum = checksum((&mut icmp as *mut IcmpUnreachable).cast(), 36);
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
