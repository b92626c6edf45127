//! Loads the eBPF object with every map pinned under the bpffs directory (re-opening maps a
//! previous agent pinned, so their content survives a restart) and attaches the programs:
//! the socket hooks to a cgroup, the tc programs to interfaces. Attachments are bpf_links
//! pinned under `<bpffs>/links/`, so the datapath keeps serving while the agent is down or
//! restarting; a restarted agent keeps them instead of re-attaching.
use std::{
    fs::File,
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

static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy"));

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

const SOCKET_HOOKS: [&str; 4] = [
    "proxy_connect4",
    "proxy_sendmsg4",
    "proxy_recvmsg4",
    "proxy_getpeername4",
];
const TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    ("proxy_ingress", TcAttachType::Ingress),
    ("proxy_egress", TcAttachType::Egress),
];
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The loaded datapath. Pinned attachments and maps outlive it; netlink tc filters (which
/// cannot be pinned) are detached when it is dropped.
pub struct Datapath {
    ebpf: Ebpf,
    links_dir: PathBuf,
    /// Pin names of the attachments this configuration wants.
    wanted: Vec<String>,
    /// Where each program is attached, for logs and `proxyctl`.
    pub attachments: Vec<String>,
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

fn ensure_bpffs_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the pin directory {}", dir.display()))?;
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .with_context(|| format!("pin directory {} contains a NUL byte", dir.display()))?;
    // SAFETY: valid C string and an out-parameter of the right type.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", dir.display()));
    }
    if stat.f_type as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not on a BPF filesystem, so maps cannot be pinned there; mount one with \
             `mount -t bpf bpf /sys/fs/bpf` (`cargo xtask setup` does) or pass another --bpffs",
            dir.display()
        );
    }
    Ok(())
}

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

impl Datapath {
    /// Loads the datapath; `sizes` overrides map capacities (a map already pinned keeps
    /// the capacity it was created with).
    pub fn load(bpffs: &Path, sizes: &[(String, u32)]) -> anyhow::Result<Self> {
        ensure_bpffs_dir(bpffs)?;
        let mut loader = EbpfLoader::new();
        for name in maps::ALL {
            loader.map_pin_path(name, bpffs.join(name));
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
                // Ids start at 1: one more slot than the entries they number.
                loader.map_max_entries(companion, size.saturating_add(1));
            }
        }
        let ebpf = loader.load(OBJECT).with_context(|| {
            format!(
                "loading the eBPF datapath with maps pinned under {}",
                bpffs.display()
            )
        })?;
        let links_dir = bpffs.join("links");
        std::fs::create_dir_all(&links_dir)
            .with_context(|| format!("creating {}", links_dir.display()))?;
        Ok(Self {
            ebpf,
            links_dir,
            wanted: Vec::new(),
            attachments: Vec::new(),
        })
    }

    /// Whether `name` is already attached by a pinned link (from a previous agent).
    fn kept(&mut self, name: String, description: String) -> anyhow::Result<bool> {
        let path = self.links_dir.join(&name);
        self.wanted.push(name);
        if !path.exists() {
            return Ok(false);
        }
        PinnedLink::from_pin(&path)
            .with_context(|| format!("opening pinned link {}", path.display()))?;
        self.attachments.push(format!("{description} (kept)"));
        Ok(true)
    }

    fn pin(&mut self, link: FdLink, name: &str, description: String) -> anyhow::Result<()> {
        let path = self.links_dir.join(name);
        link.pin(&path)
            .with_context(|| format!("pinning link {}", path.display()))?;
        self.attachments.push(description);
        Ok(())
    }

    /// Detaches what a previous configuration attached and this one does not want (e.g. an
    /// interface dropped from --interfaces).
    pub fn detach_stale(&mut self) -> anyhow::Result<()> {
        let entries = std::fs::read_dir(&self.links_dir)
            .with_context(|| format!("listing {}", self.links_dir.display()))?;
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if self.wanted.contains(&name) {
                continue;
            }
            let link = PinnedLink::from_pin(entry.path())
                .with_context(|| format!("opening pinned link {name}"))?;
            link.unpin()
                .with_context(|| format!("unpinning stale link {name}"))?;
            info!("detached stale attachment {name}");
        }
        Ok(())
    }

    /// Socket-level load balancing for every process in `cgroup` and its descendants.
    pub fn attach_socket_hooks(&mut self, cgroup: &Path) -> anyhow::Result<()> {
        let fd =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for name in SOCKET_HOOKS {
            let pin = pin_name(name, &cgroup.to_string_lossy());
            let description = format!("{name} on cgroup {}", cgroup.display());
            if self.kept(pin.clone(), description.clone())? {
                continue;
            }
            let program = self.loaded(name, CgroupSockAddr::load)?;
            // A bpf_link attachment: it coexists with other programs on the cgroup.
            let id = program
                .attach(&fd, CgroupAttachMode::default())
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
            let link = FdLink::try_from(program.take_link(id)?)
                .context("a cgroup attachment is a bpf_link")?;
            self.pin(link, &pin, description)?;
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

    /// The XDP fast path for masqueraded flows on `interfaces`; `Off` attaches nothing (and
    /// `detach_stale` removes a previous agent's).
    pub fn attach_xdp(&mut self, interfaces: &[String], mode: XdpAttach) -> anyhow::Result<()> {
        let xdp_mode = match mode {
            XdpAttach::Off => return Ok(()),
            XdpAttach::Native => XdpMode::Driver,
            XdpAttach::Generic => XdpMode::Skb,
        };
        for iface in interfaces {
            // An interface runs one XDP mode at a time: drop a previous agent's other one.
            for other in [XdpAttach::Native, XdpAttach::Generic] {
                let path = self
                    .links_dir
                    .join(pin_name(&format!("{XDP_PROGRAM}_{}", other.label()), iface));
                if other != mode && path.exists() {
                    PinnedLink::from_pin(&path)
                        .with_context(|| format!("opening pinned link {}", path.display()))?
                        .unpin()
                        .with_context(|| format!("detaching {}", path.display()))?;
                }
            }
            let pin = pin_name(&format!("{XDP_PROGRAM}_{}", mode.label()), iface);
            let description = format!("{XDP_PROGRAM} on {iface} (XDP {})", mode.label());
            if self.kept(pin.clone(), description.clone())? {
                continue;
            }
            let program = self.loaded(XDP_PROGRAM, Xdp::load)?;
            let id = program.attach(iface, xdp_mode).with_context(|| {
                format!(
                    "attaching {XDP_PROGRAM} to {iface} in {} mode",
                    mode.label()
                )
            })?;
            let link = FdLink::try_from(program.take_link(id)?)
                .context("an XDP attachment is a bpf_link")?;
            self.pin(link, &pin, description)?;
        }
        Ok(())
    }

    /// Packet-level NAT on `interfaces`: DNAT on ingress, reverse NAT on egress.
    pub fn attach_tc(&mut self, interfaces: &[String], mode: TcAttach) -> anyhow::Result<()> {
        let tcx = match mode {
            TcAttach::Tcx => true,
            TcAttach::Netlink => false,
            TcAttach::Auto => {
                KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
            }
        };
        let how = if tcx { "tcx" } else { "netlink" };
        for (name, attach_type) in TC_PROGRAMS {
            for iface in interfaces {
                let description = format!("{name} on {iface} {attach_type:?} ({how})");
                let pin = pin_name(name, iface);
                // Netlink filters cannot be pinned: they are re-attached by every agent.
                if tcx && self.kept(pin.clone(), description.clone())? {
                    continue;
                }
                let program = self.loaded(name, SchedClassifier::load)?;
                let options = if tcx {
                    TcAttachOptions::TcxOrder(LinkOrder::default())
                } else {
                    match tc::qdisc_add_clsact(iface) {
                        Ok(()) | Err(TcError::AlreadyAttached) => {}
                        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                        }
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("adding a clsact qdisc to {iface}"));
                        }
                    }
                    TcAttachOptions::Netlink(NlOptions::default())
                };
                let id = program
                    .attach_with_options(iface, attach_type, options)
                    .with_context(|| format!("attaching {name} to {iface} ({attach_type:?})"))?;
                if tcx {
                    let link = FdLink::try_from(program.take_link(id)?)
                        .context("a TCX attachment is a bpf_link")?;
                    self.pin(link, &pin, description)?;
                } else {
                    self.attachments.push(description);
                }
            }
        }
        Ok(())
    }
}
