//! How the kernel keeps a socket buffer's checksum (`sk_buff->ip_summed`), which no
//! `__sk_buff` field shows: read from the kernel's socket buffer itself, reached through
//! the `bpf_cast_to_kern_ctx` kfunc (the verifier turns the call into a register move, and
//! the read into one guarded load). Knowing it, tc updates the TCP and UDP checksum in the
//! frame for every kind but a complete one, without `bpf_l4_csum_replace` (~29 ns a packet
//! on this VM's CPU).
use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use proxy_common::KFUNC_ID_PLACEHOLDER;

// The other two: `CHECKSUM_NONE` (nothing checked yet) and `CHECKSUM_UNNECESSARY` (checked
// by the NIC), in both of which the field is the segment's whole checksum.
/// `CHECKSUM_COMPLETE`: the field is the whole checksum, and the socket buffer holds the
/// sum of the whole packet (from the NIC), which a change of the pseudo-header alters.
pub const CHECKSUM_COMPLETE: u8 = 2;
/// `CHECKSUM_PARTIAL`: to be completed by the NIC or the stack; the field holds the
/// pseudo-header's sum only.
pub const CHECKSUM_PARTIAL: u8 = 3;

/// The byte of `struct sk_buff` that holds the 2-bit `ip_summed`, and its shift in that
/// byte: set by the agent at load time from the kernel's BTF (constants to the verifier).
/// 0 when the kernel's BTF lacks the kfunc or the field: the state is then not read.
#[unsafe(no_mangle)]
static SKB_IP_SUMMED_BYTE: u32 = 0;
#[unsafe(no_mangle)]
static SKB_IP_SUMMED_SHIFT: u8 = 0;

/// The socket buffer's `ip_summed`, if the kernel lets it be read.
#[inline(always)]
pub fn ip_summed(ctx: &TcContext) -> Option<u8> {
    // SAFETY: constants of the object, read as the loader set them.
    let (byte, shift) = unsafe {
        (
            core::ptr::read_volatile(&SKB_IP_SUMMED_BYTE),
            core::ptr::read_volatile(&SKB_IP_SUMMED_SHIFT),
        )
    };
    if byte == 0 {
        return None;
    }
    // SAFETY: the agent took the byte's offset from the kernel's BTF of `struct sk_buff`;
    // the verifier checks it against the same BTF and guards the load.
    let bits = unsafe { kernel_skb(ctx.skb.skb).add(byte as usize).read_volatile() };
    Some((bits >> shift) & 3)
}

/// `bpf_cast_to_kern_ctx(ctx)`: the `struct sk_buff` behind the program's context. The
/// call is written as its instruction, with a placeholder id the agent patches
/// (`proxy_common::kfunc_call`); it clobbers the caller-saved registers, as any call.
///
/// SAFETY: `ctx` is the program's context, unmodified.
#[inline(always)]
unsafe fn kernel_skb(ctx: *mut __sk_buff) -> *const u8 {
    let skb: *const u8;
    // SAFETY: a kfunc call by the eBPF calling convention (argument in r1, result in r0,
    // r1-r5 clobbered); it reads nothing but its argument.
    unsafe {
        core::arch::asm!(
            ".8byte ({id} << 32) | 0x2085",
            id = const KFUNC_ID_PLACEHOLDER as u64,
            inout("r1") ctx => _,
            lateout("r0") skb,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(nostack, readonly, preserves_flags),
        )
    };
    skb
}
