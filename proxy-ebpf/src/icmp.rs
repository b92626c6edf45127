//! ICMP errors the tc programs write: an answer built from the packet (port unreachable for
//! a service without endpoints — ICMPv6's too —, time exceeded for a routed packet whose TTL
//! ran out), and the translation of an error (ICMP or ICMPv6) about a translated flow,
//! quoted header included.
use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::IPPROTO_TCP;

use crate::{
    family::Family,
    frame::{replace_words, replace16},
    packet::{
        ETH_HDR_LEN, Endpoint, ErrorTranslationOf, Flow, Flow6, IP_HDR_MIN_LEN, IP6_HDR_LEN,
        IPPROTO_ICMP, IPPROTO_ICMPV6, IcmpErrorOf, RewriteOf,
    },
};

/// ICMP header (type, code, checksum, unused) followed by the quoted IP header and the
/// first 8 bytes of its payload, as RFC 792 asks.
#[repr(C)]
struct IcmpQuote {
    header: [u8; 8],
    quote: [u8; IP_HDR_MIN_LEN + 8],
}

const REPLY_IP_LEN: usize = IP_HDR_MIN_LEN + core::mem::size_of::<IcmpQuote>();

/// One's-complement sum of `len` bytes at `ptr` (a multiple of 4) added to `seed`, unfolded.
#[inline(always)]
fn partial_sum(ptr: *mut u8, len: u32, seed: u32) -> u64 {
    // SAFETY: ptr points to `len` readable bytes on the stack.
    unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, ptr.cast(), len, seed) as u32 as u64 }
}

/// The checksum of a sum, in memory order: store it with `to_ne_bytes`.
#[inline(always)]
fn complement(sum: u64) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// One's-complement checksum of `len` bytes at `ptr` (a multiple of 4), in memory order.
#[inline(always)]
fn checksum(ptr: *mut u8, len: u32) -> u16 {
    complement(partial_sum(ptr, len, 0))
}

/// Turns the packet into an ICMP error of `kind` and `code` from its destination back to
/// its source, quoting it as it arrived: port unreachable, as kube-proxy's REJECT rule
/// answers for a service without endpoints; time exceeded, as a router answers a packet
/// whose TTL ran out; fragmentation needed, with `next_hop_mtu`, as a router answers a
/// packet too large for the link it would leave by. The caller sends it back out of the
/// interface it came in on. Only for packets without IP options.
#[inline(always)]
pub fn into_icmp_error(
    ctx: &TcContext,
    flow: &Flow,
    kind: u8,
    code: u8,
    next_hop_mtu: u16,
) -> Result<(), i64> {
    if flow.ip_hdr_len != IP_HDR_MIN_LEN {
        return Err(0);
    }
    let mut icmp = IcmpQuote {
        header: [0; 8],
        quote: ctx.load(ETH_HDR_LEN)?,
    };
    icmp.header[0] = kind;
    icmp.header[1] = code;
    icmp.header[6..8].copy_from_slice(&next_hop_mtu.to_be_bytes());
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

/// ICMPv6 header (type, code, checksum, unused) followed by the quoted IPv6 header and the
/// first 8 bytes of its payload: enough for the sender's stack to find the socket (RFC 4443
/// allows up to the minimum MTU; Linux needs these).
#[repr(C)]
struct Icmp6Quote {
    header: [u8; 8],
    quote: [u8; IP6_HDR_LEN + 8],
}

/// The IPv6 pseudo-header an ICMPv6 checksum covers.
#[repr(C)]
struct Pseudo6 {
    src: [u8; 16],
    dst: [u8; 16],
    /// Upper-layer length, network order.
    len: u32,
    zero: [u8; 3],
    next: u8,
}

/// `into_icmp_error` for IPv6: an ICMPv6 error of `kind` and `code` (destination
/// unreachable / port unreachable for a service without endpoints, time exceeded, packet
/// too big with `mtu`) back to the sender. Only for packets without extension headers.
#[inline(always)]
pub fn into_icmp6_error(
    ctx: &TcContext,
    flow: &Flow6,
    kind: u8,
    code: u8,
    mtu: u32,
) -> Result<(), i64> {
    if flow.ip_hdr_len != IP6_HDR_LEN {
        return Err(0);
    }
    const MESSAGE_LEN: usize = core::mem::size_of::<Icmp6Quote>();
    let mut icmp = Icmp6Quote {
        header: [0; 8],
        quote: ctx.load(ETH_HDR_LEN)?,
    };
    icmp.header[0] = kind;
    icmp.header[1] = code;
    icmp.header[4..8].copy_from_slice(&mtu.to_be_bytes());
    let mut pseudo = Pseudo6 {
        src: flow.key.dst,
        dst: flow.key.src,
        len: (MESSAGE_LEN as u32).to_be(),
        zero: [0; 3],
        next: IPPROTO_ICMPV6,
    };
    let pseudo_len = core::mem::size_of::<Pseudo6>() as u32;
    let sum = partial_sum((&mut pseudo as *mut Pseudo6).cast(), pseudo_len, 0);
    let sum = partial_sum(
        (&mut icmp as *mut Icmp6Quote).cast(),
        MESSAGE_LEN as u32,
        sum as u32,
    );
    icmp.header[2..4].copy_from_slice(&complement(sum).to_ne_bytes());

    let mut ip = [0u8; IP6_HDR_LEN];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(MESSAGE_LEN as u16).to_be_bytes());
    ip[6] = IPPROTO_ICMPV6;
    ip[7] = 64; // hop limit
    ip[8..24].copy_from_slice(&flow.key.dst);
    ip[24..40].copy_from_slice(&flow.key.src);

    let mut macs: [u8; 12] = ctx.load(0)?;
    let (dst, src) = macs.split_at_mut(6);
    dst.swap_with_slice(src);

    let frame_len = (ETH_HDR_LEN + IP6_HDR_LEN + MESSAGE_LEN) as u32;
    // SAFETY: valid context.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, frame_len, 0) };
    if ret != 0 {
        return Err(ret);
    }
    ctx.store(0, &macs, 0)?;
    ctx.store(ETH_HDR_LEN, &ip, 0)?;
    ctx.store(ETH_HDR_LEN + IP6_HDR_LEN, &icmp, 0)?;
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

/// Where a family's `rewrite_quoted` runs.
pub trait QuotedRewrite: Family {
    fn rewrite_quoted(
        ctx: &TcContext,
        error: &IcmpErrorOf<Self>,
        which: Endpoint,
        to: RewriteOf<Self>,
    ) -> Result<(), i64>;
}

/// Inlined: as a subprogram, its frame under `run4`'s would pass 512 bytes.
impl QuotedRewrite for [u8; 4] {
    #[inline(always)]
    fn rewrite_quoted(
        ctx: &TcContext,
        error: &IcmpErrorOf<Self>,
        which: Endpoint,
        to: RewriteOf<Self>,
    ) -> Result<(), i64> {
        rewrite_quoted(ctx, error, which, to)
    }
}

/// A subprogram: inlined, its temporaries would take `error6`'s frame past 512 bytes (with
/// masqueraded flows' errors translated, and routed, too).
impl QuotedRewrite for [u8; 16] {
    #[inline(never)]
    fn rewrite_quoted(
        ctx: &TcContext,
        error: &IcmpErrorOf<Self>,
        which: Endpoint,
        to: RewriteOf<Self>,
    ) -> Result<(), i64> {
        rewrite_quoted(ctx, error, which, to)
    }
}

/// Rewrites one end of the packet an ICMP (ICMPv6) error quotes: its address, with the
/// quoted IPv4 header's checksum, its port, and the quoted TCP or UDP checksum when it is
/// quoted (a zero UDP checksum stays zero); the ICMP checksum follows every word changed.
#[inline(always)]
fn rewrite_quoted<A: Family>(
    ctx: &TcContext,
    error: &IcmpErrorOf<A>,
    which: Endpoint,
    to: RewriteOf<A>,
) -> Result<(), i64> {
    if !to.set {
        return Ok(());
    }
    let csum_off = error.icmp_off + 2;
    let q = &error.quoted;
    // The quoted IP header is laid out as the frame's own, from its IP header on.
    let (addr_off, port_off, old_addr, old_port) = match which {
        Endpoint::Source => (
            error.inner_ip_off + A::SRC_OFF - ETH_HDR_LEN,
            error.inner_l4_off,
            q.src,
            q.sport,
        ),
        Endpoint::Destination => (
            error.inner_ip_off + A::DST_OFF - ETH_HDR_LEN,
            error.inner_l4_off + 2,
            q.dst,
            q.dport,
        ),
    };
    let (old, new) = (old_addr.as_ref(), to.addr.as_ref());
    if A::HEADER_CHECKSUM {
        let ip_csum_off = error.inner_ip_off + 10;
        let ip_csum: u16 = ctx.load(ip_csum_off)?;
        icmp_store16(ctx, csum_off, ip_csum_off, replace_words(ip_csum, old, new))?;
    }
    for i in 0..size_of::<A>() / 2 {
        let (old_word, new_word) = ([old[2 * i], old[2 * i + 1]], [new[2 * i], new[2 * i + 1]]);
        if old_word != new_word {
            icmp_store16(
                ctx,
                csum_off,
                addr_off + 2 * i,
                u16::from_ne_bytes(new_word),
            )?;
        }
    }
    let new_port = to.port.to_be();
    icmp_store16(ctx, csum_off, port_off, new_port)?;
    if error.inner_csum_present {
        let tcp = q.proto == IPPROTO_TCP;
        let l4_csum_off = error.inner_l4_off + if tcp { 16 } else { 6 };
        let l4_csum: u16 = ctx.load(l4_csum_off)?;
        if tcp || l4_csum != 0 {
            let mut csum = replace16(replace_words(l4_csum, old, new), old_port.to_be(), new_port);
            if !tcp && csum == 0 {
                csum = 0xffff;
            }
            icmp_store16(ctx, csum_off, l4_csum_off, csum)?;
        }
    }
    Ok(())
}

/// Translates an ICMP (ICMPv6) error: the quoted packet's ends, then the error's own
/// addresses (`Family::rewrite_error_address`: ICMP has no pseudo-header, ICMPv6 has).
#[inline(always)]
pub fn rewrite_icmp_error<A: QuotedRewrite>(
    ctx: &TcContext,
    error: &IcmpErrorOf<A>,
    t: &ErrorTranslationOf<A>,
) -> Result<(), i64> {
    A::rewrite_quoted(ctx, error, Endpoint::Source, t.inner_src)?;
    A::rewrite_quoted(ctx, error, Endpoint::Destination, t.inner_dst)?;
    // One at a time, not over an array of both: IPv6's would take stack there is none of.
    let csum_off = error.icmp_off + 2;
    if t.outer_src.set {
        A::rewrite_error_address(ctx, A::SRC_OFF, error.src, &t.outer_src, csum_off).ok_or(0)?;
    }
    if t.outer_dst.set {
        A::rewrite_error_address(ctx, A::DST_OFF, error.dst, &t.outer_dst, csum_off).ok_or(0)?;
    }
    Ok(())
}
