//! Loads the eBPF object with every map pinned under the bpffs directory (re-opening maps a
//! previous agent pinned, so their content survives a restart) and attaches the programs:
//! the socket hooks to a cgroup, the tc programs to interfaces. Attachments are bpf_links
//! pinned under `<bpffs>/links/`, so the datapath keeps serving while the agent is down or
//! restarting; a restarted agent keeps those the kernel still shows attached to the right
//! target, and re-attaches the others. While it runs, the agent holds every link open and
//! `verify` puts back what was removed behind its back: a pin (the links stay attached
//! meanwhile) or an attachment (`bpftool link detach`, an interface re-created).
use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    programs::{
        CgroupAttachMode, CgroupSockAddr, Program, ProgramError, SchedClassifier, TcAttachType,
        Xdp, XdpMode,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{self, NlOptions, TcAttachOptions, TcError},
    },
    util::KernelVersion,
};
use proxy_common::maps;
use tracing::info;

use crate::{
    csum_state::{CsumState, patch_kfunc_calls},
    ct_upgrade::CtUpgrade,
    link_target::{self, LinkTarget},
    node_lock::NodeLock,
    preflight,
};

pub(crate) static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy"));

/// How the tc programs attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX links on kernels ≥ 6.6, clsact + netlink filters before.
    Auto,
    /// TCX links (kernel ≥ 6.6); listed by `bpftool link show`.
    Tcx,
    /// A clsact qdisc with netlink filters; listed by `tc filter show`.
    Netlink,
}

/// Whether and how the XDP fast path attaches to the tc interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttach {
    Off,
    /// In the driver (fastest; on veth, the peer needs GRO or XDP of its own for XDP_TX).
    Native,
    /// In the kernel's generic hook, on any interface.
    Generic,
}

impl XdpAttach {
    fn label(self) -> &'static str {
        match self {
            XdpAttach::Off => "off",
            XdpAttach::Native => "native",
            XdpAttach::Generic => "generic",
        }
    }
}

const XDP_PROGRAM: &str = "proxy_xdp";

/// IPv6 sockets' sends to IPv4-mapped addresses go through `sendmsg4` (the kernel hands
/// them to the IPv4 path): `sendmsg6` would only serve IPv6 services, which are not yet.
const SOCKET_HOOKS: [&str; 8] = [
    "proxy_connect4",
    "proxy_sendmsg4",
    "proxy_recvmsg4",
    "proxy_getpeername4",
    "proxy_connect6",
    "proxy_sendmsg6",
    "proxy_recvmsg6",
    "proxy_getpeername6",
];
pub(crate) const TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    ("proxy_ingress", TcAttachType::Ingress),
    ("proxy_egress", TcAttachType::Egress),
];
/// The mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup v2 hierarchy is mounted (socket load balancing needs cgroup v2)")
}

/// Where one program attaches.
#[derive(Clone, Debug, PartialEq)]
enum Target {
    Cgroup(PathBuf),
    Tc {
        iface: String,
        direction: TcAttachType,
        /// A TCX link; else a netlink filter, which cannot be pinned nor held.
        tcx: bool,
    },
    Xdp {
        iface: String,
        mode: XdpAttach,
    },
}

/// One attachment the configuration wants, and its link once made.
struct Attachment {
    program: &'static str,
    target: Target,
    /// Held open while the agent runs, so that a removed pin detaches nothing.
    link: Option<PinnedLink>,
}

impl Attachment {
    /// Its file under `links/`; `None` for a netlink filter.
    fn pin(&self) -> Option<String> {
        match &self.target {
            Target::Cgroup(path) => Some(pin_name(self.program, &path.to_string_lossy())),
            Target::Tc { iface, tcx, .. } => tcx.then(|| pin_name(self.program, iface)),
            Target::Xdp { iface, mode } => Some(xdp_pin_name(*mode, iface)),
        }
    }

    fn description(&self) -> String {
        match &self.target {
            Target::Cgroup(path) => format!("{} on cgroup {}", self.program, path.display()),
            Target::Tc {
                iface,
                direction,
                tcx,
            } => {
                let how = if *tcx { "tcx" } else { "netlink" };
                format!("{} on {iface} {direction:?} ({how})", self.program)
            }
            Target::Xdp { iface, mode } => {
                format!("{} on {iface} (XDP {})", self.program, mode.label())
            }
        }
    }

    /// What the kernel must show the link attached to; `None` when the target is gone.
    fn expected(&self) -> Option<LinkTarget> {
        match &self.target {
            Target::Cgroup(path) => std::fs::metadata(path)
                .ok()
                .map(|m| LinkTarget::Cgroup(m.ino())),
            Target::Tc { iface, .. } | Target::Xdp { iface, .. } => {
                link_target::ifindex(iface).map(LinkTarget::Interface)
            }
        }
    }
}

fn xdp_pin_name(mode: XdpAttach, iface: &str) -> String {
    pin_name(&format!("{XDP_PROGRAM}_{}", mode.label()), iface)
}

/// A bpffs file name for an attachment (bpffs refuses some characters, dots among them).
fn pin_name(program: &str, target: &str) -> String {
    let target: String = target
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{program}@{target}")
}

/// The loaded datapath. Pinned attachments and maps outlive it; netlink tc filters (which
/// cannot be pinned) are detached when it is dropped. It holds the pin directory's lock.
pub struct Datapath {
    ebpf: Ebpf,
    bpffs: PathBuf,
    lock: NodeLock,
    wanted: Vec<Attachment>,
    /// How `attach_tc` attaches (TCX links or netlink filters), for `follow_tc`.
    tcx: bool,
    /// Conntrack maps of an earlier agent whose flows are moving (`finish_upgrade`).
    upgrade: Option<CtUpgrade>,
}

/// Whether the kernel takes `BPF_F_IPV6` in `bpf_l4_csum_replace` (what the IPv6 address
/// rewrite needs for packets whose checksum the NIC completed): its BTF names the flag
/// (the enumerator's name is in the string table of every kernel that has it). Without
/// BTF, assumed not: the datapath then keeps the checksum state right itself, at one more
/// helper call per IPv6 address rewrite.
fn kernel_has_bpf_f_ipv6() -> bool {
    std::fs::read("/sys/kernel/btf/vmlinux")
        .is_ok_and(|btf| btf.windows(12).any(|w| w == b"\0BPF_F_IPV6\0"))
}

impl Datapath {
    /// Takes the pin directory's lock and loads the datapath; `sizes` overrides map
    /// capacities (a map already pinned keeps the capacity it was created with); `xdp`: the
    /// XDP mode `attach_xdp` will be given, without which tc ingress reads no XDP marks.
    pub fn load(bpffs: &Path, sizes: &[(String, u32)], xdp: XdpAttach) -> anyhow::Result<Self> {
        let csum_state = CsumState::from_kernel()
            .inspect_err(|e| {
                tracing::warn!(
                    "tc cannot read socket buffers' checksum state ({e:#}): it updates TCP \
                     and UDP checksums through its helper, one more call per translated packet"
                )
            })
            .ok();
        Self::load_with_csum_state(bpffs, sizes, xdp, csum_state)
    }

    /// `load`, with tc reading socket buffers' checksum state where `csum_state` says (not
    /// at all without it).
    pub fn load_with_csum_state(
        bpffs: &Path,
        sizes: &[(String, u32)],
        xdp: XdpAttach,
        csum_state: Option<CsumState>,
    ) -> anyhow::Result<Self> {
        preflight::bpffs(bpffs)?;
        std::fs::create_dir_all(bpffs)
            .with_context(|| format!("creating the pin directory {}", bpffs.display()))?;
        let lock = NodeLock::acquire(bpffs)?;
        let bpf_f_ipv6 = u8::from(kernel_has_bpf_f_ipv6());
        let mut loader = EbpfLoader::new();
        loader.override_global("KERNEL_HAS_BPF_F_IPV6", &bpf_f_ipv6, true);
        let xdp_attached = u8::from(xdp != XdpAttach::Off);
        loader.override_global("XDP_ATTACHED", &xdp_attached, true);
        let (byte, shift) = csum_state.map_or((0, 0), |s| (s.byte, s.shift));
        loader.override_global("SKB_IP_SUMMED_BYTE", &byte, true);
        loader.override_global("SKB_IP_SUMMED_SHIFT", &shift, true);
        let object = patch_kfunc_calls(OBJECT, csum_state.map(|s| s.kfunc_id))?;
        for name in maps::ALL {
            loader.map_pin_path(name, bpffs.join(name));
        }
        for name in maps::RETIRED {
            let path = bpffs.join(name);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(e)
                    .with_context(|| format!("removing the retired pin {}", path.display()));
            }
        }
        let (mut upgrade, capacities) = CtUpgrade::prepare(bpffs)?;
        for (name, capacity) in capacities {
            loader.map_max_entries(name, capacity);
        }
        for (name, size) in sizes {
            let Some(name) = maps::RESIZABLE.iter().find(|n| **n == name.as_str()) else {
                bail!(
                    "--map-size {name}: not a resizable map (one of {})",
                    maps::RESIZABLE.join(", ")
                );
            };
            loader.map_max_entries(name, *size);
            let companions = maps::COMPANIONS.iter().filter(|(owner, _)| owner == name);
            for companion in companions.flat_map(|(_, companions)| companions.iter()) {
                // Ids start at 1: one more slot than the entries they number (one more is
                // harmless for the IPv6 maps).
                loader.map_max_entries(companion, size.saturating_add(1));
            }
        }
        let ebpf = loader
            .load(&bytemuck::cast_slice(&object)[..OBJECT.len()])
            .with_context(|| {
                format!(
                    "loading the eBPF datapath with maps pinned under {}",
                    bpffs.display()
                )
            })?;
        upgrade.copy()?;
        let datapath = Self {
            ebpf,
            bpffs: bpffs.to_path_buf(),
            lock,
            wanted: Vec::new(),
            tcx: false,
            upgrade: Some(upgrade),
        };
        let links = datapath.links_dir();
        std::fs::create_dir_all(&links).with_context(|| format!("creating {}", links.display()))?;
        Ok(datapath)
    }

    /// Once this datapath's programs are attached: moves the last flows out of the
    /// conntrack maps of an earlier agent, and removes those (`ct_upgrade`).
    pub fn finish_upgrade(&mut self) -> anyhow::Result<()> {
        self.upgrade.take().map_or(Ok(()), CtUpgrade::finish)
    }

    fn links_dir(&self) -> PathBuf {
        self.bpffs.join("links")
    }

    /// Wants `program` on `target`: keeps a previous agent's link if the kernel still shows
    /// it attached there, else attaches it.
    fn want(&mut self, program: &'static str, target: Target) -> anyhow::Result<()> {
        self.wanted.push(Attachment {
            program,
            target,
            link: None,
        });
        let i = self.wanted.len() - 1;
        let description = self.wanted[i].description();
        if let Some(pin) = self.wanted[i].pin() {
            let path = self.links_dir().join(pin);
            if path.exists() {
                let current = link_target::of_pin(&path).ok();
                if current.is_some() && current == self.wanted[i].expected() {
                    let link = PinnedLink::from_pin(&path)
                        .with_context(|| format!("opening pinned link {}", path.display()))?;
                    self.wanted[i].link = Some(link);
                    info!("kept {description}");
                    return Ok(());
                }
                unpin(&path)?;
                info!("{description}: the pinned link was no longer attached; attaching anew");
            }
        }
        self.attach(i)?;
        info!("attached {description}");
        Ok(())
    }

    /// Attaches `wanted[i]`, pins its link and holds it.
    fn attach(&mut self, i: usize) -> anyhow::Result<()> {
        let (program, target) = (self.wanted[i].program, self.wanted[i].target.clone());
        let link = match &target {
            Target::Cgroup(cgroup) => {
                let fd = File::open(cgroup)
                    .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
                let hook = self.loaded(program, CgroupSockAddr::load)?;
                // A bpf_link attachment: it coexists with other programs on the cgroup.
                let id = hook
                    .attach(&fd, CgroupAttachMode::default())
                    .with_context(|| {
                        format!("attaching {program} to cgroup {}", cgroup.display())
                    })?;
                Some(FdLink::try_from(hook.take_link(id)?).context("a cgroup link is a bpf_link")?)
            }
            Target::Tc {
                iface,
                direction,
                tcx,
            } => {
                let options = if *tcx {
                    TcAttachOptions::TcxOrder(LinkOrder::default())
                } else {
                    add_clsact(iface)?;
                    TcAttachOptions::Netlink(NlOptions::default())
                };
                let classifier = self.loaded(program, SchedClassifier::load)?;
                let id = classifier
                    .attach_with_options(iface, *direction, options)
                    .with_context(|| format!("attaching {program} to {iface} ({direction:?})"))?;
                // A netlink filter stays with the program, detached when the agent exits.
                (*tcx)
                    .then(|| classifier.take_link(id))
                    .transpose()?
                    .map(FdLink::try_from)
                    .transpose()
                    .context("a TCX link is a bpf_link")?
            }
            Target::Xdp { iface, mode } => {
                let xdp_mode = match mode {
                    XdpAttach::Native => XdpMode::Driver,
                    _ => XdpMode::Skb,
                };
                let xdp = self.loaded(program, Xdp::load)?;
                let id = xdp.attach(iface, xdp_mode).with_context(|| {
                    format!("attaching {program} to {iface} in {} mode", mode.label())
                })?;
                Some(FdLink::try_from(xdp.take_link(id)?).context("an XDP link is a bpf_link")?)
            }
        };
        if let (Some(link), Some(pin)) = (link, self.wanted[i].pin()) {
            let path = self.links_dir().join(pin);
            let pinned = link
                .pin(&path)
                .with_context(|| format!("pinning link {}", path.display()))?;
            self.wanted[i].link = Some(pinned);
        }
        Ok(())
    }

    /// Detaches what a previous configuration attached and this one does not want (e.g. an
    /// interface dropped from --interfaces).
    pub fn detach_stale(&mut self) -> anyhow::Result<()> {
        let links = self.links_dir();
        let entries =
            std::fs::read_dir(&links).with_context(|| format!("listing {}", links.display()))?;
        let wanted: Vec<String> = self.wanted.iter().filter_map(Attachment::pin).collect();
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !wanted.contains(&name) {
                unpin(&entry.path())?;
                info!("detached stale attachment {name}");
            }
        }
        Ok(())
    }

    /// Socket-level load balancing for every process in `cgroup` and its descendants.
    pub fn attach_socket_hooks(&mut self, cgroup: &Path) -> anyhow::Result<()> {
        for name in SOCKET_HOOKS {
            self.want(name, Target::Cgroup(cgroup.to_path_buf()))?;
        }
        Ok(())
    }

    /// Program `name` as a `P`, through the verifier on first use.
    fn loaded<P>(
        &mut self,
        name: &str,
        load: fn(&mut P) -> Result<(), ProgramError>,
    ) -> anyhow::Result<&mut P>
    where
        for<'a> &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        let program = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?;
        let unloaded = program.fd().is_err();
        let program: &mut P = program.try_into()?;
        if unloaded {
            load(program).with_context(|| format!("loading {name} (verifier)"))?;
        }
        Ok(program)
    }

    /// A tc program loaded but not attached, e.g. for `BPF_PROG_TEST_RUN` in the benchmark.
    pub fn load_classifier(&mut self, name: &str) -> anyhow::Result<&SchedClassifier> {
        Ok(self.loaded(name, SchedClassifier::load)?)
    }

    /// The XDP program loaded but not attached, for `BPF_PROG_TEST_RUN` in the tests.
    pub fn load_xdp(&mut self) -> anyhow::Result<&Xdp> {
        Ok(self.loaded(XDP_PROGRAM, Xdp::load)?)
    }

    /// The XDP fast path for masqueraded flows on `interfaces`; `Off` attaches nothing (and
    /// `detach_stale` removes a previous agent's).
    pub fn attach_xdp(&mut self, interfaces: &[String], mode: XdpAttach) -> anyhow::Result<()> {
        if mode == XdpAttach::Off {
            return Ok(());
        }
        for iface in interfaces {
            // An interface runs one XDP mode at a time: drop a previous agent's other one.
            for other in [XdpAttach::Native, XdpAttach::Generic] {
                let path = self.links_dir().join(xdp_pin_name(other, iface));
                if other != mode && path.exists() {
                    unpin(&path)?;
                }
            }
            let target = Target::Xdp {
                iface: iface.clone(),
                mode,
            };
            self.want(XDP_PROGRAM, target)?;
        }
        Ok(())
    }

    /// Packet-level NAT on `interfaces`: DNAT on ingress, reverse NAT on egress.
    pub fn attach_tc(&mut self, interfaces: &[String], mode: TcAttach) -> anyhow::Result<()> {
        self.tcx = match mode {
            TcAttach::Tcx => true,
            TcAttach::Netlink => false,
            TcAttach::Auto => {
                KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
            }
        };
        for (name, direction) in TC_PROGRAMS {
            for iface in interfaces {
                let target = Target::Tc {
                    iface: iface.clone(),
                    direction,
                    tcx: self.tcx,
                };
                self.want(name, target)?;
            }
        }
        Ok(())
    }

    /// Moves the tc programs to `interfaces` (as `attach_tc` put them): attaches them to
    /// interfaces that appeared, lets go of those that are gone or no longer selected.
    /// Returns what it did.
    pub fn follow_tc(&mut self, interfaces: &[String]) -> anyhow::Result<Vec<String>> {
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.wanted.len() {
            let Target::Tc {
                iface, direction, ..
            } = &self.wanted[i].target
            else {
                i += 1;
                continue;
            };
            if interfaces.contains(iface) {
                i += 1;
                continue;
            }
            let (iface, direction) = (iface.clone(), *direction);
            let gone = self.wanted.remove(i);
            match gone.pin() {
                Some(pin) => {
                    let path = self.links_dir().join(pin);
                    if path.exists() {
                        unpin(&path)?;
                    }
                }
                // A netlink filter goes with its interface; one still there is removed.
                None => {
                    let _ = tc::qdisc_detach_program(&iface, direction, gone.program);
                }
            }
            done.push(format!("let go of {}", gone.description()));
        }
        let attached: Vec<String> = self
            .wanted
            .iter()
            .filter_map(|a| match &a.target {
                Target::Tc { iface, .. } => Some(iface.clone()),
                _ => None,
            })
            .collect();
        let new: Vec<String> = interfaces
            .iter()
            .filter(|iface| !attached.contains(iface))
            .cloned()
            .collect();
        for (name, direction) in TC_PROGRAMS {
            for iface in &new {
                let target = Target::Tc {
                    iface: iface.clone(),
                    direction,
                    tcx: self.tcx,
                };
                self.want(name, target)?;
                done.push(format!("attached {name} to {iface}"));
            }
        }
        Ok(done)
    }

    /// Puts back what was removed behind the agent's back: the pin directory, map pins,
    /// link pins (from the links it holds) and attachments the kernel no longer shows
    /// (re-attached). Returns what it repaired; an error says what is still missing.
    /// Netlink filters cannot be checked this way: they are not bpf_links.
    pub fn verify(&mut self) -> (Vec<String>, Vec<anyhow::Error>) {
        let mut repaired = Vec::new();
        let mut failed = Vec::new();
        if !self.bpffs.exists() {
            match self.recreate_dir() {
                Ok(()) => repaired.push(format!("the pin directory {}", self.bpffs.display())),
                Err(e) => {
                    failed.push(e);
                    return (repaired, failed);
                }
            }
        }
        for name in maps::ALL {
            let path = self.bpffs.join(name);
            if path.exists() {
                continue;
            }
            let pinned = self
                .ebpf
                .map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
                .and_then(|map| {
                    map.pin(&path)
                        .with_context(|| format!("re-pinning map {}", path.display()))
                });
            match pinned {
                Ok(()) => repaired.push(format!("the pin of map {name}")),
                Err(e) => failed.push(e),
            }
        }
        for i in 0..self.wanted.len() {
            match self.verify_one(i) {
                Ok(Some(what)) => repaired.push(what),
                Ok(None) => {}
                Err(e) => failed.push(e),
            }
        }
        (repaired, failed)
    }

    fn recreate_dir(&mut self) -> anyhow::Result<()> {
        let links = self.links_dir();
        std::fs::create_dir_all(&links)
            .with_context(|| format!("re-creating the pin directory {}", links.display()))?;
        // The lock was on the removed directory: take it on the new one.
        self.lock = NodeLock::acquire(&self.bpffs)?;
        Ok(())
    }

    fn verify_one(&mut self, i: usize) -> anyhow::Result<Option<String>> {
        let Some(pin) = self.wanted[i].pin() else {
            return Ok(None);
        };
        let description = self.wanted[i].description();
        let path = self.links_dir().join(pin);
        let mut repaired = None;
        if !path.exists()
            && let Some(held) = self.wanted[i].link.take()
        {
            let pinned = FdLink::from(held)
                .pin(&path)
                .with_context(|| format!("re-pinning link {}", path.display()))?;
            self.wanted[i].link = Some(pinned);
            repaired = Some(format!("the pin of {description}"));
        }
        let expected = self.wanted[i].expected().with_context(|| {
            format!("{description} is not attached: its target no longer exists")
        })?;
        if link_target::of_pin(&path).ok() == Some(expected) {
            return Ok(repaired);
        }
        self.wanted[i].link = None;
        if path.exists() {
            unpin(&path)?;
        }
        self.attach(i)
            .with_context(|| format!("re-attaching {description}"))?;
        Ok(Some(format!("{description} (it had been detached)")))
    }
}

/// Detaches a pinned link and removes its pin.
fn unpin(path: &Path) -> anyhow::Result<()> {
    link_target::detach_and_unpin(path)
        .with_context(|| format!("removing the pin {}", path.display()))
}

fn add_clsact(iface: &str) -> anyhow::Result<()> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) | Err(TcError::AlreadyAttached) => Ok(()),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("adding a clsact qdisc to {iface}")),
    }
}

#[cfg(test)]
mod tests {
    /// The kernels this project is tested on (6.16 on) have the flag; an older one, or a
    /// change in how BTF stores names, would turn this false.
    #[test]
    fn this_kernels_btf_names_bpf_f_ipv6() {
        assert!(super::kernel_has_bpf_f_ipv6());
    }
}
