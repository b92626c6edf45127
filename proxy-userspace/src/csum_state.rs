//! What tc needs to read a socket buffer's checksum state (`csum_state` in the eBPF
//! crate): the id of the `bpf_cast_to_kern_ctx` kfunc, written into the object's calls of
//! it before loading (aya 0.14 does not relocate kfunc calls), and the place of
//! `sk_buff->ip_summed`, given as load-time constants. Both from the kernel's BTF; without
//! them (no BTF, a kernel before 6.3 without the kfunc) tc keeps updating checksums
//! through its helper, at one more call per translated packet.
use anyhow::{Context as _, bail};
use proxy_common::{KFUNC_ID_PLACEHOLDER, kfunc_call};

use crate::kernel_btf;

/// Where the datapath reads `ip_summed`: the kfunc's id, and the byte of `struct sk_buff`
/// holding the 2-bit field, with its shift in that byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CsumState {
    pub kfunc_id: u32,
    pub byte: u32,
    pub shift: u8,
}

impl CsumState {
    /// From the running kernel's BTF.
    pub fn from_kernel() -> anyhow::Result<Self> {
        let btf = kernel_btf::vmlinux()?;
        let kfunc_id = kernel_btf::func_id(&btf, "bpf_cast_to_kern_ctx").context(
            "the kernel cannot give programs its socket buffer (Linux 6.3 or later can)",
        )?;
        let place = kernel_btf::member_place(&btf, "sk_buff", "ip_summed")?;
        if place.bitfield_size != Some(2) || place.bit_offset % 8 > 6 {
            bail!("the kernel's sk_buff.ip_summed is not a 2-bit field within a byte: {place:?}");
        }
        Ok(Self {
            kfunc_id,
            byte: place.bit_offset / 8,
            shift: (place.bit_offset % 8) as u8,
        })
    }
}

/// `object` (an eBPF ELF object, 8-byte aligned as instructions are) in 64-bit words, with
/// its kfunc calls given `kfunc_id`; without one, each call becomes `r0 = 0`, code that
/// the load-time constants leave unreached. Fails if the object has no such call (then it
/// and the agent disagree on the placeholder).
pub fn patch_kfunc_calls(object: &[u8], kfunc_id: Option<u32>) -> anyhow::Result<Vec<u64>> {
    const MOV_R0_0: [u8; 8] = [0xb7, 0, 0, 0, 0, 0, 0, 0];
    let placeholder = u64::from_le_bytes(kfunc_call(KFUNC_ID_PLACEHOLDER));
    let replacement = u64::from_le_bytes(kfunc_id.map_or(MOV_R0_0, kfunc_call));
    let mut words: Vec<u64> = object
        .chunks(8)
        .map(|chunk| {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            u64::from_le_bytes(word)
        })
        .collect();
    let mut patched = 0;
    for word in words.iter_mut().filter(|w| **w == placeholder) {
        *word = replacement;
        patched += 1;
    }
    if patched == 0 {
        bail!("the datapath object has no kfunc call to patch (built from another source?)");
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_call_and_nothing_else_is_patched() {
        let call = kfunc_call(KFUNC_ID_PLACEHOLDER);
        let other = [0x85, 0, 0, 0, 0x43, 0x4e, 0x46, 0x4b];
        let object: Vec<u8> = [call, other, call].concat();
        let words = patch_kfunc_calls(&object, Some(1234)).unwrap();
        let bytes: Vec<[u8; 8]> = words.iter().map(|w| w.to_le_bytes()).collect();
        assert_eq!(bytes, [kfunc_call(1234), other, kfunc_call(1234)]);
        let without = patch_kfunc_calls(&object, None).unwrap();
        assert_eq!(without[0].to_le_bytes(), [0xb7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(without[1].to_le_bytes(), other);
        assert!(patch_kfunc_calls(&other, Some(1)).is_err());
        // An object whose length is not a multiple of 8 keeps its bytes.
        let words = patch_kfunc_calls(&[call.as_slice(), &[1, 2, 3]].concat(), None).unwrap();
        assert_eq!(words.len(), 2);
        assert_eq!(words[1], u64::from_le_bytes([1, 2, 3, 0, 0, 0, 0, 0]));
    }

    #[test]
    fn this_kernel_lets_tc_read_the_checksum_state() {
        let state = CsumState::from_kernel().unwrap();
        assert!(
            state.kfunc_id > 0 && state.byte > 64 && state.shift <= 6,
            "{state:?}"
        );
    }
}
