//! The far end of a test "wire" for native XDP. A veth sends frames an XDP program
//! transmits (`XDP_TX`) into its peer's receive ring, but the kernel wakes that ring only
//! if the peer runs an XDP program itself; otherwise the frames wait there until the peer
//! happens to receive other traffic. A NIC's wire has no such need, so the world gives the
//! veths that stand in for the wire a program that passes everything.
use std::{os::fd::FromRawFd as _, path::Path, process::Command};

use anyhow::Context as _;

use super::run;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TYPE_XDP: u32 = 6;

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// The fields of `union bpf_attr` for `BPF_OBJ_PIN`.
#[repr(C)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `r0 = XDP_PASS; exit`, as eBPF instructions.
const PASS: [u64; 2] = [
    u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
    u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
];

fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a prefix of union bpf_attr for `cmd`, its pointers valid for the
    // call; the kernel zero-extends the rest.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Attaches a pass-everything XDP program (driver mode) to `devices` of network namespace
/// `netns`, through a pin at `pin` that is removed again: the attachment keeps the program
/// alive until the devices go away.
pub fn attach_pass(netns: &str, devices: &[String], pin: &Path) -> anyhow::Result<()> {
    let license = c"GPL";
    let mut load = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: PASS.len() as u32,
        insns: PASS.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    load.prog_name[..9].copy_from_slice(b"wire_pass");
    let fd = bpf(BPF_PROG_LOAD, &load).context("loading the wire's pass-through XDP program")?;
    // SAFETY: a new file descriptor that nothing else owns.
    let prog = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())
        .with_context(|| format!("pin path {}", pin.display()))?;
    bpf(
        BPF_OBJ_PIN,
        &ObjPin {
            pathname: path.as_ptr() as u64,
            bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&prog) as u32,
            file_flags: 0,
        },
    )
    .with_context(|| format!("pinning the wire's XDP program at {}", pin.display()))?;
    // `ip -n` would remount /sys inside the namespace, hiding the pin; nsenter does not.
    let attached = devices.iter().try_for_each(|device| {
        run(Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{netns}"))
            .args(["ip", "link", "set", "dev", device, "xdpdrv", "pinned"])
            .arg(pin))
        .map(drop)
    });
    std::fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
    attached
}
