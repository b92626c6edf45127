//! The `bpf()` system call, for what aya 0.14 does not wrap: link targets and detaching
//! (`link_target`), and the hand-assembled socket-destroying iterators (`sock_destroy`).
use std::os::fd::{FromRawFd as _, OwnedFd};

pub use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Calls `bpf(cmd, attr)`. `attr` is a `bpf_attr`, or a zero-padded prefix of one at least
/// as long as what `cmd` reads.
pub fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is valid for its size, which is passed along: the kernel reads and
    // writes no more than that.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A command that returns a new file descriptor (an object, a link, an iterator).
pub fn bpf_fd<T>(cmd: bpf_cmd, attr: &mut T) -> std::io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A zeroed `bpf_attr`, for the fields of one command to be filled in.
pub fn attr() -> bpf_attr {
    // SAFETY: plain integers and unions of them: all zeroes is the kernel's "unset".
    unsafe { std::mem::zeroed() }
}
