//! The far end of a test "wire" for native XDP. A veth sends frames an XDP program
//! transmits (`XDP_TX`) into its peer's receive ring, but the kernel wakes that ring only
//! if the peer runs an XDP program itself; otherwise the frames wait there until the peer
//! happens to receive other traffic. A NIC's wire has no such need, so the world gives the
//! veths that stand in for the wire the datapath's program that passes everything.
use std::{path::Path, process::Command};

use anyhow::Context as _;
use aya::{EbpfLoader, programs::Xdp};
use proxy_common::maps;

use super::run;

const PROGRAM: &str = "proxy_wire_pass";

/// Attaches the pass-everything XDP program (driver mode) to `devices` of network namespace
/// `netns`, through a pin at `pin` that is removed again: the attachment keeps the program
/// alive until the devices go away.
pub fn attach_pass(netns: &str, devices: &[String], pin: &Path) -> anyhow::Result<()> {
    let mut loader = EbpfLoader::new();
    // Only the program is wanted: the object's maps are made as small as they go (a ring
    // buffer's size is fixed in pages).
    for name in maps::ALL.into_iter().filter(|n| *n != maps::EVENTS) {
        loader.map_max_entries(name, 64);
    }
    let mut ebpf = loader
        .load(crate::datapath::OBJECT)
        .context("loading the eBPF object for the wire's program")?;
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM)
        .with_context(|| format!("program {PROGRAM} missing from the eBPF object"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("loading {PROGRAM} (verifier)"))?;
    program
        .pin(pin)
        .with_context(|| format!("pinning {PROGRAM} at {}", pin.display()))?;
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
