//! Access to a frame, from its Ethernet header on, for parsing and for rewriting, the same
//! for tc and XDP: the translation code is written once over this trait. Both read and
//! write the headers directly where they are in the frame's linear part (its first buffer,
//! for XDP), else through the helpers. Checksums are updated in the frame (RFC 1624), but
//! for tc's TCP and UDP checksums of a socket buffer that holds a complete checksum of the
//! packet (or whose state cannot be read, `csum_state`): its helper keeps that sum right.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_csum_update, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::{TcContext, XdpContext},
};

use crate::{
    csum_state::{self, CHECKSUM_COMPLETE, CHECKSUM_PARTIAL},
    packet::IP_CSUM_OFF,
};

pub trait Frame {
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
    fn write<T>(&self, offset: usize, value: &T) -> Option<()> {
        self.write_aligned(offset, value, core::mem::align_of::<T>())
    }
    /// `write` of a value that lies at an address aligned to `align` (at least its type's
    /// alignment; a power of two), which lets it be copied in words of that width: an
    /// address of a 4-aligned struct (`RewriteOf`), though a byte array.
    fn write_aligned<T>(&self, offset: usize, value: &T, align: usize) -> Option<()>;
    /// Bytes from the Ethernet header to the end of the frame.
    fn frame_len(&self) -> usize;
    /// The frame's ethertype (host order).
    #[inline(always)]
    fn ethertype(&self) -> Option<u16> {
        self.read::<u16>(12).map(u16::from_be)
    }
    /// The frame carries a VLAN tag outside its data (tc sees offloaded tags so): it
    /// belongs to a VLAN device, not to the interface the program runs on.
    fn vlan_tagged(&self) -> bool;
    // The checksum updates below are done in the frame by default (RFC 1624). tc overrides
    // the TCP and UDP one: a partial (offloaded) checksum takes the pseudo-header's change
    // only, and a complete sum of the packet needs the helper. The IPv4 header's needs no
    // helper: no checksum offload covers it, and a complete sum of the packet does not
    // change with it (a header's sum stays 0). In the frame, it costs 11 ns less per
    // established flow's packet than `bpf_l3_csum_replace` (repeat mode, 156 to 145 ns).

    /// Updates the IPv4 header checksum for a 16-bit word changing (both as in memory).
    #[inline(always)]
    fn update_ip_csum16(&self, old: u16, new: u16) -> Option<()> {
        update_csum(self, IP_CSUM_OFF, false, |c| replace16(c, old, new))
    }

    /// Updates the IPv4 header checksum by `diff` (`words_diff`): addresses changed.
    #[inline(always)]
    fn update_ip_csum_diff(&self, diff: u32) -> Option<()> {
        update_csum(self, IP_CSUM_OFF, false, |c| add_diff(c, diff))
    }

    /// Updates the TCP or UDP checksum at `offset` for the addresses of its pseudo-header
    /// changing by `pseudo` (`ipv6`: an IPv6 header's, which has no checksum of its own)
    /// and, if any, fields of the segment itself (ports) by `fields` (both `words_diff`s);
    /// a zero UDP checksum means "none" and stays so.
    #[inline(always)]
    fn update_l4_csum(
        &self,
        offset: usize,
        pseudo: u32,
        fields: Option<u32>,
        udp: bool,
        _ipv6: bool,
    ) -> Option<()> {
        update_csum(self, offset, udp, |c| {
            add_diff(c, pseudo + fields.unwrap_or(0))
        })
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

/// What a 16-bit word changing from `old` to `new` (both as in memory) adds to a
/// one's-complement sum of words as in memory, unfolded.
#[inline(always)]
pub fn word_diff(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

/// The same for a field of 16-bit words (an address, of either family; both as in memory).
#[inline(always)]
pub fn replace_words(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    add_diff(csum, words_diff(old, new))
}

/// What a field of 16-bit words changing from `old` to `new` adds to a one's-complement
/// sum of words as in memory, unfolded (at most 16 words: no overflow).
#[inline(always)]
pub fn words_diff(old: &[u8], new: &[u8]) -> u32 {
    let mut diff = 0;
    for i in 0..old.len().min(new.len()) / 2 {
        diff += u32::from(!u16::from_ne_bytes([old[2 * i], old[2 * i + 1]]))
            + u32::from(u16::from_ne_bytes([new[2 * i], new[2 * i + 1]]));
    }
    diff
}

/// A checksum (as in memory) updated by `diff` (`words_diff`): the sum is independent of
/// byte order, so words as in memory need no swapping.
#[inline(always)]
fn add_diff(csum: u16, diff: u32) -> u16 {
    !fold(u32::from(!csum) + diff)
}

/// Whether the kernel takes `BPF_F_IPV6` in `bpf_l4_csum_replace` (6.16 on, and stable
/// kernels the fix went to): set by the agent at load time (a constant to the verifier).
#[unsafe(no_mangle)]
static KERNEL_HAS_BPF_F_IPV6: u8 = 0;
/// `BPF_F_IPV6`, newer than aya's bindings.
const BPF_F_IPV6: u64 = 1 << 7;

/// `size_of::<T>()` bytes at `offset` of the frame `start..end`, if they are in it — the
/// linear part of a socket buffer, an XDP frame's first buffer — where the program may read
/// and write them directly (a helper call costs ~14 ns here).
#[inline(always)]
fn linear<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
    // At least two bytes: for one, LLVM turns `ptr + 1 > end` into `ptr >= end`, from which
    // the verifier does not learn that the byte is inside the packet.
    if start + offset + core::mem::size_of::<T>().max(2) > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// A `T` read from packet memory at `src`, which may be misaligned, in words as wide as
/// `T`'s alignment (up to 8 bytes) where its size allows. Rust's unaligned read is a byte
/// at a time on BPF (LLVM may not assume the target loads misaligned words), 80
/// instructions for an IPv6 header; the verifier allows misaligned *packet* loads on the
/// architectures that do them efficiently (x86-64, arm64), though never misaligned stack
/// stores, hence the words written as wide as `T` is aligned.
///
/// SAFETY: `src..src + size_of::<T>()` is in the packet, bounds-checked.
#[inline(always)]
unsafe fn read_packet<T: Copy>(src: *const T) -> T {
    let (size, align) = (core::mem::size_of::<T>(), core::mem::align_of::<T>().min(8));
    if align < 2 || size % align != 0 {
        // SAFETY: in the packet (the caller's contract).
        return unsafe { src.read_unaligned() };
    }
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    let (from, to) = (src.cast::<u8>(), value.as_mut_ptr().cast::<u8>());
    let mut at = 0;
    while at < size {
        // SAFETY: `at` < size: inside the packet bytes and inside `value`, which is aligned
        // to `align`, as is `at`.
        unsafe {
            let from = from.add(at);
            let to = to.add(at);
            match align {
                8 => to.cast::<u64>().write(load!(from, "u64")),
                4 => to.cast::<u32>().write(load!(from, "u32") as u32),
                _ => to.cast::<u16>().write(load!(from, "u16") as u16),
            }
        }
        at += align;
    }
    // SAFETY: every byte written (`size` is a multiple of `align`); `T` is plain data.
    unsafe { value.assume_init() }
}

/// Writes `*src`, which lies at an address aligned to `align` (at least `T`'s alignment),
/// to packet memory at `dst`, which may be misaligned: in words as wide as `align` (up to 8
/// bytes) where `T`'s size allows, read straight from `src`, without a copy on the stack
/// (IPv6's frames have no room for one). Rust's unaligned write is a byte at a time on BPF,
/// 16 stores for an IPv6 address.
///
/// SAFETY: `dst..dst + size_of::<T>()` is in the packet, bounds-checked; `src` is aligned
/// to `align`.
#[inline(always)]
unsafe fn write_packet<T>(dst: *mut T, src: *const T, align: usize) {
    let (size, align) = (core::mem::size_of::<T>(), align.min(8));
    if align < 2 || size % align != 0 {
        // SAFETY: in the packet (the caller's contract).
        return unsafe { dst.write_unaligned(core::ptr::read(src)) };
    }
    let (from, to) = (src.cast::<u8>(), dst.cast::<u8>());
    let mut at = 0;
    while at < size {
        // SAFETY: `at` < size: inside `*src`, at a multiple of `align` (the caller's
        // contract), and inside the packet bytes.
        unsafe {
            let (from, to) = (from.add(at), to.add(at));
            match align {
                8 => store!(to, "u64", from.cast::<u64>().read()),
                4 => store!(to, "u32", u64::from(from.cast::<u32>().read())),
                _ => store!(to, "u16", u64::from(from.cast::<u16>().read())),
            }
        }
        at += align;
    }
}

/// A load of the given width from `ptr`, whatever its alignment.
macro_rules! load {
    ($ptr:expr, $width:literal) => {{
        let word: u64;
        core::arch::asm!(
            concat!("{0} = *(", $width, " *)({1} + 0)"),
            out(reg) word,
            in(reg) $ptr,
            options(nostack, readonly, preserves_flags),
        );
        word
    }};
}
use load;

/// A store of the given width to `ptr`, whatever its alignment.
macro_rules! store {
    ($ptr:expr, $width:literal, $value:expr) => {{
        let word: u64 = $value;
        core::arch::asm!(
            concat!("*(", $width, " *)({0} + 0) = {1}"),
            in(reg) $ptr,
            in(reg) word,
            options(nostack, preserves_flags),
        );
    }};
}
use store;

/// Direct access where the headers are in the linear part, the helpers elsewhere.
impl Frame for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        match linear::<T>(self.data(), self.data_end(), offset) {
            // SAFETY: bounds-checked just above, against the packet's end.
            Some(ptr) => Some(unsafe { read_packet(ptr) }),
            None => self.load(offset).ok(),
        }
    }

    #[inline(always)]
    fn write_aligned<T>(&self, offset: usize, value: &T, align: usize) -> Option<()> {
        match linear::<T>(self.data(), self.data_end(), offset) {
            // SAFETY: as in `read`; `value`'s alignment is the caller's.
            Some(ptr) => {
                unsafe { write_packet(ptr, value, align) };
                Some(())
            }
            None => self.store(offset, value, 0).ok(),
        }
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

    /// As the socket buffer has it, as the frame's (untagged, or tagged outside its data,
    /// which `vlan_tagged` tells): no read of the frame, whose helper fallback would give
    /// the program entry a stack frame of its own, on top of each family's.
    #[inline(always)]
    fn ethertype(&self) -> Option<u16> {
        // SAFETY: valid context.
        Some(u16::from_be(unsafe { (*self.skb.skb).protocol } as u16))
    }

    /// As the socket buffer keeps the checksum (`csum_state`): a partial one takes the
    /// pseudo-header's change only, in the frame; a whole one, both changes in the frame,
    /// but for a complete sum of the packet, which the helper keeps right along with the
    /// pseudo-header's change. Where the state cannot be read, `update_l4_csum_inferred`.
    #[inline(always)]
    fn update_l4_csum(
        &self,
        offset: usize,
        pseudo: u32,
        fields: Option<u32>,
        udp: bool,
        ipv6: bool,
    ) -> Option<()> {
        let Some(kind) = csum_state::ip_summed(self) else {
            return update_l4_csum_inferred(self, offset, pseudo, fields, udp, ipv6);
        };
        let fields = fields.unwrap_or(0);
        match kind {
            CHECKSUM_PARTIAL => update_csum(self, offset, udp, |c| !add_diff(!c, pseudo)),
            CHECKSUM_COMPLETE => {
                pseudo_csum_by_helper(self, offset, pseudo, udp, ipv6)?;
                update_csum(self, offset, udp, |c| add_diff(c, fields))
            }
            _ => update_csum(self, offset, udp, |c| add_diff(c, pseudo + fields)),
        }
    }
}

/// The pseudo-header's change through the helper, which keeps the checksum as the socket
/// buffer has it (`pseudo_csum_by_helper`), and the fields' in the frame when the helper's
/// effect showed a whole checksum (`SumKind::after_pseudo`), through the helper when that
/// could not be told.
#[inline(always)]
fn update_l4_csum_inferred(
    ctx: &TcContext,
    offset: usize,
    pseudo: u32,
    fields: Option<u32>,
    udp: bool,
    ipv6: bool,
) -> Option<()> {
    // A value on every path, which LLVM cannot trace back to the bounds check (`opaque`):
    // it would test the bounds again after the helper call, whose packet pointers the
    // verifier has forgotten by then, and read a `before` only one path wrote.
    let before = opaque(linear_csum(ctx, offset).map_or(NOT_LINEAR, u64::from));
    pseudo_csum_by_helper(ctx, offset, pseudo, udp, ipv6)?;
    let Some(fields) = fields else {
        return Some(());
    };
    let kind = match (before, linear_csum(ctx, offset)) {
        (NOT_LINEAR, _) | (_, None) => SumKind::Unknown,
        (before, Some(after)) => SumKind::after_pseudo(before as u16, after, pseudo),
    };
    match kind {
        SumKind::Full => update_csum(ctx, offset, udp, |c| add_diff(c, fields)),
        SumKind::Partial => Some(()),
        SumKind::Unknown => ctx
            .l4_csum_replace(offset, 0, fields as u64, mangled_0(udp))
            .ok(),
    }
}

/// No checksum read (`linear_csum`), beside the 16-bit ones.
const NOT_LINEAR: u64 = 0x1_0000;

/// `value`, of which LLVM knows nothing past this point.
#[inline(always)]
fn opaque(mut value: u64) -> u64 {
    // SAFETY: a register moved to itself.
    unsafe {
        core::arch::asm!("{0} = {0}", inout(reg) value, options(pure, nomem, nostack, preserves_flags))
    };
    value
}

/// The checksum at `offset`, if in the linear part (else its reads would be helper calls,
/// more than the one they save).
#[inline(always)]
fn linear_csum(ctx: &TcContext, offset: usize) -> Option<u16> {
    let ptr = linear::<u16>(ctx.data(), ctx.data_end(), offset)?;
    // SAFETY: bounds-checked against the packet's end.
    Some(unsafe { read_packet(ptr) })
}

/// A received packet's checksum may be complete (`CHECKSUM_COMPLETE`: the sum of the
/// whole packet, from the NIC): an IPv6 address changed with its pseudo-header's
/// checksum leaves that sum as it was, but the helper, unless told `BPF_F_IPV6`, takes
/// the checksum's change off it (right for IPv4, whose header checksum changes too).
/// Kernels without the flag get that change added back (`bpf_csum_update` acts on
/// complete sums only); else the stack would find the sum wrong, check the packet in
/// software and log "hw csum failure".
#[inline(always)]
fn pseudo_csum_by_helper(
    ctx: &TcContext,
    offset: usize,
    diff: u32,
    udp: bool,
    ipv6: bool,
) -> Option<()> {
    let flags = BPF_F_PSEUDO_HDR as u64 | mangled_0(udp);
    if !ipv6 {
        return ctx.l4_csum_replace(offset, 0, diff as u64, flags).ok();
    }
    // SAFETY: a constant of the object, read as the loader set it.
    let flag_known = unsafe { core::ptr::read_volatile(&KERNEL_HAS_BPF_F_IPV6) } != 0;
    if flag_known {
        ctx.l4_csum_replace(offset, 0, diff as u64, flags | BPF_F_IPV6)
            .ok()
    } else {
        ctx.l4_csum_replace(offset, 0, diff as u64, flags).ok()?;
        // SAFETY: valid context.
        unsafe { bpf_csum_update(ctx.skb.skb, diff) };
        Some(())
    }
}

/// How a socket buffer keeps its TCP or UDP checksum, as far as the checksum field goes:
/// full (`CHECKSUM_NONE`, `_UNNECESSARY`, `_COMPLETE`: the field is the segment's whole
/// checksum) or partial (`CHECKSUM_PARTIAL`: the field holds the pseudo-header's sum, the
/// NIC or the stack adds the segment's later). No `__sk_buff` field says which.
enum SumKind {
    Full,
    Partial,
    Unknown,
}

impl SumKind {
    /// Which of its two updates `bpf_l4_csum_replace` made of the field, from `before` to
    /// `after`, for a pseudo-header change of `diff`: the full checksum's (its complement's
    /// sum with `diff`) or the partial one's (its sum with `diff`). The two agree only for
    /// a change of zero (mod 0xffff), when it cannot be told. Sums compare mod 0xffff, as
    /// one's-complement sums: all ones is zero too (a helper writes a UDP zero so).
    #[inline(always)]
    fn after_pseudo(before: u16, after: u16, diff: u32) -> SumKind {
        let same = |a: u16, b: u16| a % 0xffff == b % 0xffff;
        let full = same(after, add_diff(before, diff));
        let partial = same(after, !add_diff(!before, diff));
        match (full, partial) {
            (true, false) => SumKind::Full,
            (false, true) => SumKind::Partial,
            _ => SumKind::Unknown,
        }
    }
}

/// The helper flag that keeps a zero UDP checksum ("none") zero, and writes a computed
/// zero as all ones.
#[inline(always)]
fn mangled_0(udp: bool) -> u64 {
    if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 }
}

/// Replaces the 16-bit checksum at `offset` with `update(checksum)`, unless it is a UDP
/// checksum of zero ("none"); a UDP checksum computed as zero is sent as all ones.
#[inline(always)]
fn update_csum<F: Frame + ?Sized>(
    ctx: &F,
    offset: usize,
    udp: bool,
    update: impl Fn(u16) -> u16,
) -> Option<()> {
    let csum: u16 = ctx.read(offset)?;
    if udp && csum == 0 {
        return Some(());
    }
    let mut csum = update(csum);
    if udp && csum == 0 {
        csum = 0xffff;
    }
    ctx.write(offset, &csum)
}

/// Direct access in the frame's first buffer, the helpers past it (a multi-buffer frame).
impl Frame for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        if let Some(ptr) = linear::<T>(self.data(), self.data_end(), offset) {
            // SAFETY: bounds-checked against the first buffer's end.
            return Some(unsafe { read_packet(ptr) });
        }
        // Past the first buffer of a multi-buffer frame.
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
    fn write_aligned<T>(&self, offset: usize, value: &T, align: usize) -> Option<()> {
        if let Some(ptr) = linear::<T>(self.data(), self.data_end(), offset) {
            // SAFETY: as in `read`; `value`'s alignment is the caller's.
            unsafe { write_packet(ptr, value, align) };
            return Some(());
        }
        // SAFETY: the helper reads size_of::<T>() bytes from `value` and bounds-checks the
        // frame.
        let ret = unsafe {
            bpf_xdp_store_bytes(
                self.ctx.cast(),
                offset as u32,
                (value as *const T).cast_mut().cast(),
                core::mem::size_of::<T>() as u32,
            )
        };
        (ret == 0).then_some(())
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
