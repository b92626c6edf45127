//! What a pinned bpf_link is attached to, as the kernel says (`BPF_OBJ_GET_INFO_BY_FD`):
//! a pin file proves nothing, since `bpftool link detach` or a deleted interface leaves the
//! link defunct behind it; and removing a pinned link at once (`BPF_LINK_DETACH`). aya
//! 0.14 exposes neither the target nor the detach, hence these raw calls.
use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
};

use crate::bpf_syscall::{bpf, bpf_cmd, bpf_fd};

const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// Where a link is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkTarget {
    /// A cgroup, by id (the inode number of its directory).
    Cgroup(u64),
    /// An interface, by index (XDP and TCX links).
    Interface(u32),
    /// Attached to nothing any more.
    Detached,
    /// A kind of link this module does not read.
    Other,
}

/// `struct bpf_link_info` up to the union, which is 8-byte aligned at offset 16; the
/// union's first fields are the cgroup id (cgroup links) or the ifindex (XDP, TCX).
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    target: [u64; 4],
}

/// Opens the object pinned at `path`.
fn open_pin(path: &Path) -> std::io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut attr = [path.as_ptr() as u64, 0, 0, 0];
    bpf_fd(bpf_cmd::BPF_OBJ_GET, &mut attr)
}

/// What the link pinned at `path` is attached to.
pub fn of_pin(path: &Path) -> std::io::Result<LinkTarget> {
    let fd = open_pin(path)?;
    let mut info = LinkInfo::default();
    let mut attr = [
        fd.as_raw_fd() as u64 | ((std::mem::size_of::<LinkInfo>() as u64) << 32),
        &mut info as *mut LinkInfo as u64,
        0,
        0,
    ];
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(match info.kind {
        BPF_LINK_TYPE_CGROUP => match info.target[0] {
            0 => LinkTarget::Detached,
            id => LinkTarget::Cgroup(id),
        },
        BPF_LINK_TYPE_XDP | BPF_LINK_TYPE_TCX => match info.target[0] as u32 {
            0 => LinkTarget::Detached,
            index => LinkTarget::Interface(index),
        },
        _ => LinkTarget::Other,
    })
}

/// Detaches the link pinned at `path` now, then removes the pin. Removing the pin alone
/// detaches it only when the kernel frees the pin's inode, after an RCU grace period and a
/// workqueue pass: a connection made right after could still be balanced by it. A link
/// that cannot be detached this way (the kernel says so) goes with its pin as before.
pub fn detach_and_unpin(path: &Path) -> std::io::Result<()> {
    if let Ok(fd) = open_pin(path) {
        let mut attr = [fd.as_raw_fd() as u64, 0, 0, 0];
        // An error is a link already detached or of a kind without this command.
        let _ = bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr);
    }
    std::fs::remove_file(path)
}

/// The index of interface `name` in this network namespace, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The names of the interfaces of this network namespace (`if_nameindex`: `/sys/class/net`
/// shows the namespace sysfs was mounted in, not necessarily the process's).
pub fn interfaces() -> Vec<String> {
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Vec::new();
    }
    let mut names = Vec::new();
    let mut cursor = list;
    // SAFETY: entries up to the terminating one are valid until if_freenameindex.
    unsafe {
        while (*cursor).if_index != 0 {
            names.push(
                std::ffi::CStr::from_ptr((*cursor).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            cursor = cursor.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}
