//! Kernel functions' ids and where a member of a kernel struct lies, from the running
//! kernel's BTF (`/sys/kernel/btf/vmlinux`), parsed once per use: for the programs that
//! call kfuncs and read kernel structs directly (the socket iterator, tc's checksum state).
//! aya's BTF does not show members.
use anyhow::{Context as _, bail};
use btf_rs::{Btf, Type};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// The running kernel's BTF.
pub fn vmlinux() -> anyhow::Result<Btf> {
    Btf::from_file(VMLINUX).with_context(|| format!("reading {VMLINUX}"))
}

/// A member's place: bits from the start of its outermost struct, and its width if it is a
/// bitfield.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberPlace {
    pub bit_offset: u32,
    pub bitfield_size: Option<u32>,
}

/// The place of `member` in the kernel's `struct strukt`, also inside its anonymous struct
/// and union members (`struct_group`s, as in `sk_buff`).
pub fn member_place(btf: &Btf, strukt: &str, member: &str) -> anyhow::Result<MemberPlace> {
    for ty in btf
        .resolve_types_by_name(strukt)
        .with_context(|| format!("looking up struct {strukt} in {VMLINUX}"))?
    {
        if let Type::Struct(s) = ty
            && let Some(place) = find_member(btf, &s, member, 0)?
        {
            return Ok(place);
        }
    }
    bail!("the kernel's struct {strukt} has no member {member}")
}

fn find_member(
    btf: &Btf,
    s: &btf_rs::Struct,
    member: &str,
    base: u32,
) -> anyhow::Result<Option<MemberPlace>> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let bit_offset = base + m.bit_offset();
        if name == member {
            return Ok(Some(MemberPlace {
                bit_offset,
                bitfield_size: m.bitfield_size().filter(|size| *size != 0),
            }));
        }
        if name.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = btf.resolve_chained_type(m)?
            && let Some(place) = find_member(btf, &inner, member, bit_offset)?
        {
            return Ok(Some(place));
        }
    }
    Ok(None)
}

/// The BTF id of the kernel function `name` (a kfunc's, for a call to it).
pub fn func_id(btf: &Btf, name: &str) -> anyhow::Result<u32> {
    for id in btf.resolve_ids_by_name(name).unwrap_or_default() {
        if matches!(btf.resolve_type_by_id(id)?, Type::Func(_)) {
            return Ok(id);
        }
    }
    bail!("the kernel has no function {name} in its BTF")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_found_also_inside_anonymous_groups() {
        let btf = vmlinux().unwrap();
        let daddr = member_place(&btf, "sock_common", "skc_v6_daddr").unwrap();
        // After skc_daddr, ports, family, state, the bind node and the protocol pointer.
        assert!(
            daddr.bit_offset >= 40 * 8 && daddr.bit_offset.is_multiple_of(32),
            "{daddr:?}"
        );
        assert_eq!(daddr.bitfield_size, None);
        // In sk_buff's `headers` group (a union of two anonymous structs' views).
        let summed = member_place(&btf, "sk_buff", "ip_summed").unwrap();
        assert_eq!(summed.bitfield_size, Some(2));
        assert!(summed.bit_offset > 64 * 8, "{summed:?}");
        assert!(member_place(&btf, "sock_common", "no_such_member").is_err());
        assert!(func_id(&btf, "bpf_cast_to_kern_ctx").unwrap() > 0);
        assert!(func_id(&btf, "sk_buff").is_err());
    }
}
