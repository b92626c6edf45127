//! Checks of the node and the configuration that run before the agent touches the datapath:
//! a misspelt interface or a missing capability must fail with the fix in the message, and
//! leave nothing pinned or attached behind.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::link_target;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Capabilities the datapath needs, by number (linux/capability.h): each with the one that
/// also grants it on kernels where it is split out.
const CAPABILITIES: [(&str, u32, Option<u32>); 3] = [
    ("CAP_BPF", 39, Some(CAP_SYS_ADMIN)),
    ("CAP_PERFMON", 38, Some(CAP_SYS_ADMIN)),
    ("CAP_NET_ADMIN", 12, None),
];
const CAP_SYS_ADMIN: u32 = 21;

/// The filesystem type of `path` (`statfs`'s `f_type`).
pub fn fs_type(path: &Path) -> std::io::Result<i64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid C string and an out-parameter of the right type.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_type as i64)
}

pub fn is_bpffs(path: &Path) -> std::io::Result<bool> {
    fs_type(path).map(|t| t == BPF_FS_MAGIC)
}

/// The capabilities of `CAPABILITIES` missing from a `CapEff` mask.
fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    CAPABILITIES
        .iter()
        .filter(|(_, cap, alternative)| !has(*cap) && !alternative.is_some_and(has))
        .map(|(name, ..)| *name)
        .collect()
}

fn effective_capabilities() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff line in /proc/self/status")?;
    u64::from_str_radix(mask.trim(), 16).with_context(|| format!("CapEff {mask:?}"))
}

/// The agent can load programs, create maps and attach to interfaces.
pub fn capabilities() -> anyhow::Result<()> {
    let missing = missing_capabilities(effective_capabilities()?);
    if !missing.is_empty() {
        bail!(
            "missing capabilities {}: run the agent as root, or grant them (in Kubernetes, \
             the chart's securityContext adds BPF, PERFMON, NET_ADMIN and SYS_RESOURCE)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// `--bpffs` is, or will be created, on a BPF filesystem.
pub fn bpffs(dir: &Path) -> anyhow::Result<()> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let on_bpffs = is_bpffs(existing).with_context(|| format!("statfs {}", existing.display()))?;
    if !on_bpffs {
        bail!(
            "--bpffs {}: {} is not on a BPF filesystem, so maps cannot be pinned there; mount \
             one with `mount -t bpf bpf /sys/fs/bpf` (`cargo xtask setup` does; in Kubernetes, \
             mount the host's /sys/fs/bpf into the pod) or pass a directory under one",
            dir.display(),
            existing.display()
        );
    }
    Ok(())
}

/// `--cgroup` is a directory of the cgroup v2 hierarchy.
pub fn cgroup(dir: &Path) -> anyhow::Result<()> {
    let fs = fs_type(dir).with_context(|| {
        format!(
            "--cgroup {}: cannot read it; pass a directory of the cgroup v2 hierarchy \
             (the root, e.g. /sys/fs/cgroup, balances every process of the node)",
            dir.display()
        )
    })?;
    if fs != CGROUP2_SUPER_MAGIC || !dir.is_dir() {
        bail!(
            "--cgroup {} is not a cgroup v2 directory; pass one (the root of the cgroup2 \
             mount, e.g. /sys/fs/cgroup, balances every process of the node; on a host with \
             the hybrid layout it is /sys/fs/cgroup/unified)",
            dir.display()
        );
    }
    Ok(())
}

/// Every interface named exists in this network namespace.
pub fn interfaces(names: &[String], flag: &str) -> anyhow::Result<()> {
    let missing: Vec<&str> = names
        .iter()
        .filter(|name| link_target::ifindex(name).is_none())
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        let mut present = link_target::interfaces();
        present.sort();
        bail!(
            "{flag}: no interface {} in this network namespace (it has {})",
            missing.join(", "),
            present.join(", ")
        );
    }
    Ok(())
}

/// A file the source will read exists.
pub fn readable(path: &Path, flag: &str) -> anyhow::Result<PathBuf> {
    std::fs::metadata(path).with_context(|| format!("{flag} {}", path.display()))?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_but_not_net_admin() {
        assert_eq!(
            missing_capabilities(0),
            ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        );
        assert_eq!(missing_capabilities(1 << CAP_SYS_ADMIN), ["CAP_NET_ADMIN"]);
        assert!(missing_capabilities((1 << 39) | (1 << 38) | (1 << 12)).is_empty());
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup_nor_a_bpffs() {
        let dir = std::env::temp_dir();
        let cgroup = super::cgroup(&dir).unwrap_err().to_string();
        assert!(cgroup.contains("is not a cgroup v2 directory"), "{cgroup}");
        let bpffs = super::bpffs(&dir.join("proxy")).unwrap_err().to_string();
        assert!(bpffs.contains("is not on a BPF filesystem"), "{bpffs}");
    }

    #[test]
    fn a_missing_interface_is_named_with_those_present() {
        let e = interfaces(&["lo".into(), "nosuch0".into()], "--interfaces")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no interface nosuch0") && e.contains("lo"),
            "{e}"
        );
    }
}
