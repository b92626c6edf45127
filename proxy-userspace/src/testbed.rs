//! A test world made of network namespaces: `node` namespaces (where the tc programs
//! attach and an agent runs) and `pod` namespaces joined to their node by veth pairs. Pod
//! `i` has addresses 10.244.i.2/24 and fd00:244:i::2/64 (unique local: never routed off the
//! machine) with its gateways 10.244.i.1 and fd00:244:i::1 on the node side of its veth
//! `vhI`. A two-node world adds `ext`, an outside client on a LAN (a bridge in `ext`,
//! 192.168.50.0/24) with each node's `eth0`: node-a is 192.168.50.1, node-b .2, ext .100;
//! ext routes `EXTERNAL_NET` (external and load-balancer IPs) to node-a, and each node
//! routes the other's pod subnets to it (`client_behind_ext` moves the client a routed hop
//! away, behind ext). No namespace has a route to the host's
//! interfaces; each node's socket hooks attach to a cgroup made for the test and its maps
//! are pinned in a directory of its own. Everything is torn down on drop, also when the
//! test fails.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

mod wire;

/// Paths of the project's binaries, which the world runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub agent: PathBuf,
    pub proxyctl: PathBuf,
    pub netprobe: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`, e.g. `target/debug`.
    pub fn in_dir(dir: &std::path::Path) -> Self {
        Self {
            agent: dir.join("proxy-agent"),
            proxyctl: dir.join("proxyctl"),
            netprobe: dir.join("netprobe"),
        }
    }
}

/// The project's binaries as Cargo built them for the integration test that expands this
/// (`CARGO_BIN_EXE_*` exists only there).
#[macro_export]
macro_rules! test_binaries {
    () => {
        $crate::testbed::Binaries {
            agent: env!("CARGO_BIN_EXE_proxy-agent").into(),
            proxyctl: env!("CARGO_BIN_EXE_proxyctl").into(),
            netprobe: env!("CARGO_BIN_EXE_netprobe").into(),
        }
    };
}

/// Port every backend serves, TCP and UDP.
pub const BACKEND_PORT: u16 = 8080;

static WORLDS: AtomicUsize = AtomicUsize::new(0);

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

fn node_letter(n: usize) -> char {
    (b'a' + n as u8) as char
}

/// The LAN bridge's port (in ext) for node `n`'s `eth0`.
fn lan_port(n: usize) -> String {
    format!("lan-{}", node_letter(n))
}

/// Turns off `device`'s transmit checksum offload (and so its segmentation offloads): the
/// stack completes checksums before the packet leaves.
fn tx_checksums_off(netns: &str, device: &str) -> anyhow::Result<()> {
    run(Command::new("ip").args(["netns", "exec", netns, "ethtool", "-K", device, "tx", "off"]))?;
    Ok(())
}

/// Where ext routes external and load-balancer IPs (via node-a) in a two-node world.
pub const EXTERNAL_NET: &str = "203.0.113.0/24";
/// The same for IPv6 (a documentation prefix).
pub const EXTERNAL_NET6: &str = "2001:db8:203::/64";
/// ext's address on the LAN of a two-node world.
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
/// The LAN of a two-node world.
const LAN_NET: &str = "192.168.50.0/24";
/// The subnet between ext and an outside client behind it (`client_behind_ext`), and ext's
/// address there.
const CLIENT_NET: &str = "192.168.60.0/24";
const CLIENT_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 1);
/// The address of an outside client behind ext (`client_behind_ext`).
pub const ROUTED_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 2);

/// Host `host` of the LAN's IPv6 prefix (fd00:50::/64): node-a is 1, node-b 2, ext 100.
pub const fn lan6(host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, host)
}

/// The address family a scenario runs over, for the tests written once for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    /// Test ClusterIP number `n`: 10.96.0.`n`, or fd00:96::`n` for IPv6 (the same digits:
    /// 10.96.0.30 and fd00:96::30).
    pub fn cluster_ip(self, n: u8) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 96, 0, n).into(),
            Family::V6 => format!("fd00:96::{n}").parse::<Ipv6Addr>().unwrap().into(),
        }
    }

    /// Its name in `ipFamilies` and in proxyctl's `ip_family`.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// `addr:port`, `[addr]:port` for IPv6.
pub fn at(addr: impl Into<IpAddr>, port: u16) -> String {
    std::net::SocketAddr::new(addr.into(), port).to_string()
}

pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The node-side veth.
    pub iface: String,
    /// Index of its node in `World::nodes`.
    pub node: usize,
}

impl Pod {
    /// Its address of `family`.
    pub fn addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.ip.into(),
            Family::V6 => self.ip6.into(),
        }
    }
}

pub struct Node {
    /// The Kubernetes node name: node-a, node-b.
    pub name: String,
    pub netns: String,
    /// Its `eth0` address on the LAN, in a two-node world.
    pub ip: Option<Ipv4Addr>,
    /// Its `eth0` IPv6 address on the LAN (`LAN6`), in a two-node world.
    pub ip6: Option<Ipv6Addr>,
    /// The cgroup of its pods, where its agent's socket hooks attach.
    pub cgroup: PathBuf,
    /// Its agent's pin directory.
    pub bpffs: PathBuf,
}

pub struct World {
    pub bins: Binaries,
    /// A program and its arguments that run the agent, e.g. `setpriv` with fewer
    /// capabilities; empty: the agent runs directly.
    pub agent_wrapper: Vec<String>,
    /// `--interfaces` of the agents; `None`: the node's `eth0` and pod veths by name.
    pub agent_interfaces: Option<String>,
    /// `RUST_LOG` of the agents.
    pub agent_log: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// The outside client's namespace, in a two-node world.
    pub ext: Option<String>,
    /// Where `probe_ext` runs when not in ext: behind it (`client_behind_ext`).
    ext_client: Option<String>,
    pub dir: PathBuf,
    netns: Vec<String>,
    children: Vec<Child>,
    readers: Vec<BufReader<std::process::ChildStdout>>,
    /// Tells the forwarders to stop.
    stop: Arc<AtomicBool>,
}

/// Runs `f` on a thread of its own inside the network namespace at `netns`.
fn in_netns<T: Send + 'static>(
    netns: PathBuf,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    std::thread::spawn(move || {
        let ns =
            std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        // SAFETY: a valid namespace fd; setns affects only this thread.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("entering {}", netns.display()));
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a namespace helper thread panicked"))?
}

/// Copies both ways between two connected streams until either side closes.
fn relay(a: TcpStream, b: TcpStream) -> std::io::Result<()> {
    let (mut a2, mut b2) = (a.try_clone()?, b.try_clone()?);
    let (mut a, mut b) = (a, b);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut a2, &mut b2);
        let _ = b2.shutdown(std::net::Shutdown::Write);
    });
    std::io::copy(&mut b, &mut a)?;
    let _ = a.shutdown(std::net::Shutdown::Write);
    Ok(())
}

impl World {
    /// One node (node-a) with `pods` pod namespaces (numbered from 1).
    pub fn new(pods: usize, bins: Binaries) -> anyhow::Result<World> {
        Self::build(&[pods], bins)
    }

    /// One node with four pods: pods 1-3 serve as backend-1..3 (their addresses returned),
    /// pod 4 is the client.
    pub fn three_backends(bins: Binaries) -> anyhow::Result<(World, Vec<Ipv4Addr>)> {
        let mut world = Self::new(4, bins)?;
        for i in 1..=3 {
            world.serve(i, &format!("backend-{i}"))?;
        }
        let backends = (1..=3).map(|i| world.pod(i).ip).collect();
        Ok((world, backends))
    }

    /// ext, node-a with pods 1..=`pods_a` and node-b with the next `pods_b`, on one LAN.
    pub fn two_nodes(pods_a: usize, pods_b: usize, bins: Binaries) -> anyhow::Result<World> {
        Self::build(&[pods_a, pods_b], bins)
    }

    fn build(pods_per_node: &[usize], bins: Binaries) -> anyhow::Result<World> {
        // SAFETY: no preconditions.
        ensure!(
            unsafe { libc::geteuid() } == 0,
            "the namespace world needs root (network namespaces, BPF)"
        );
        let id = format!(
            "px{}-{}",
            std::process::id(),
            WORLDS.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("proxy-test-{id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on, Drop cleans up whatever was made.
        let mut world = World {
            bins,
            agent_wrapper: Vec::new(),
            agent_interfaces: None,
            agent_log: "info".to_owned(),
            nodes: Vec::new(),
            pods: Vec::new(),
            ext: None,
            ext_client: None,
            dir,
            netns: Vec::new(),
            children: Vec::new(),
            readers: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let lan = pods_per_node.len() > 1;
        if lan {
            let ext = format!("{id}-ext");
            world.add_netns(&ext)?;
            ip(&["-n", &ext, "link", "add", "lan", "type", "bridge"])?;
            ip(&[
                "-n",
                &ext,
                "addr",
                "add",
                &format!("{EXT_IP}/24"),
                "dev",
                "lan",
            ])?;
            ip(&[
                "-n",
                &ext,
                "addr",
                "add",
                &format!("{}/64", lan6(100)),
                "dev",
                "lan",
            ])?;
            ip(&["-n", &ext, "link", "set", "lan", "up"])?;
            ip(&[
                "-n",
                &ext,
                "route",
                "add",
                EXTERNAL_NET,
                "via",
                "192.168.50.1",
            ])?;
            let via6 = lan6(1).to_string();
            ip(&[
                "-n",
                &ext,
                "-6",
                "route",
                "add",
                EXTERNAL_NET6,
                "via",
                &via6,
            ])?;
            world.ext = Some(ext);
        }
        for (n, _) in pods_per_node.iter().enumerate() {
            let letter = node_letter(n);
            let suffix = if n == 0 {
                String::new()
            } else {
                format!("-{letter}")
            };
            let node = Node {
                name: format!("node-{letter}"),
                netns: format!("{id}-node{suffix}"),
                ip: lan.then(|| Ipv4Addr::new(192, 168, 50, n as u8 + 1)),
                ip6: lan.then(|| lan6(n as u16 + 1)),
                cgroup: crate::datapath::cgroup2_mount()?.join(format!("proxy-test-{id}{suffix}")),
                bpffs: PathBuf::from(format!("/sys/fs/bpf/proxy-test-{id}{suffix}")),
            };
            std::fs::create_dir(&node.cgroup)
                .with_context(|| format!("creating the test cgroup {}", node.cgroup.display()))?;
            let netns = node.netns.clone();
            let (node_ip, node_ip6) = (node.ip, node.ip6);
            world.nodes.push(node);
            world.add_netns(&netns)?;
            run(Command::new("ip").args([
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ]))?;
            if let (Some(node_ip), Some(ext)) = (node_ip, &world.ext) {
                let port = lan_port(n);
                ip(&[
                    "-n", ext, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &netns,
                ])?;
                ip(&["-n", ext, "link", "set", &port, "master", "lan", "up"])?;
                ip(&[
                    "-n",
                    &netns,
                    "addr",
                    "add",
                    &format!("{node_ip}/24"),
                    "dev",
                    "eth0",
                ])?;
                if let Some(node_ip6) = node_ip6 {
                    ip(&[
                        "-n",
                        &netns,
                        "addr",
                        "add",
                        &format!("{node_ip6}/64"),
                        "dev",
                        "eth0",
                    ])?;
                }
                ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            }
        }
        let mut next = 1;
        for (n, count) in pods_per_node.iter().enumerate() {
            for _ in 0..*count {
                world.add_pod(next, n)?;
                next += 1;
            }
        }
        world.wait_for_link_local_addresses()?;
        // Each node reaches the other nodes' pods through them, in both families.
        for pod in &world.pods {
            let home = &world.nodes[pod.node];
            let (Some(via), Some(via6)) = (home.ip, home.ip6) else {
                continue;
            };
            let subnet = pod.ip.octets()[2];
            for (n, node) in world.nodes.iter().enumerate() {
                if n != pod.node {
                    let ns = node.netns.as_str();
                    let (subnet4, subnet6) = (
                        format!("10.244.{subnet}.0/24"),
                        format!("fd00:244:{subnet}::/64"),
                    );
                    ip(&["-n", ns, "route", "add", &subnet4, "via", &via.to_string()])?;
                    ip(&[
                        "-n",
                        ns,
                        "-6",
                        "route",
                        "add",
                        &subnet6,
                        "via",
                        &via6.to_string(),
                    ])?;
                }
            }
        }
        Ok(world)
    }

    /// Waits until both ends of every pod's veth (and the LAN's ports) have their IPv6
    /// link-local address, which the kernel adds a moment after the link comes up: until
    /// then neighbour discovery over it can fail (seen as the first IPv6 datagram of a fresh
    /// world lost).
    fn wait_for_link_local_addresses(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let pods = self.pods.iter().flat_map(|pod| {
            [
                (&pod.netns, "eth0"),
                (&self.nodes[pod.node].netns, pod.iface.as_str()),
            ]
        });
        let lan = self.nodes.iter().filter(|n| n.ip.is_some());
        let lan = lan
            .map(|n| (&n.netns, "eth0"))
            .chain(self.ext.iter().map(|ext| (ext, "lan")));
        for (netns, dev) in pods.chain(lan) {
            let args = ["-n", netns, "-6", "-o", "addr", "show", "dev", dev];
            let link_local = [&args[..], &["scope", "link", "-tentative"]].concat();
            while run(Command::new("ip").args(&link_local))?.trim().is_empty() {
                ensure!(
                    Instant::now() < deadline,
                    "{dev} in {netns} has no IPv6 link-local address after 5 s"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// Pod `i` (10.244.i.2) on node `node`.
    fn add_pod(&mut self, i: usize, node: usize) -> anyhow::Result<()> {
        let netns = format!("{}-p{i}", self.nodes[node].netns);
        let node_netns = self.nodes[node].netns.clone();
        let iface = format!("vh{i}");
        self.add_netns(&netns)?;
        ip(&[
            "-n",
            &node_netns,
            "link",
            "add",
            &iface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ])?;
        ip(&[
            "-n",
            &node_netns,
            "addr",
            "add",
            &format!("10.244.{i}.1/24"),
            "dev",
            &iface,
        ])?;
        let ip6 = |host: u16| Ipv6Addr::new(0xfd00, 0x244, i as u16, 0, 0, 0, 0, host);
        ip(&[
            "-n",
            &node_netns,
            "addr",
            "add",
            &format!("{}/64", ip6(1)),
            "dev",
            &iface,
        ])?;
        ip(&["-n", &node_netns, "link", "set", &iface, "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("10.244.{i}.2/24"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/64", ip6(2)),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        // The pod's only routes out lead to its node.
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.244.{i}.1"),
        ])?;
        ip(&[
            "-n",
            &netns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &ip6(1).to_string(),
        ])?;
        self.pods.push(Pod {
            netns,
            ip: Ipv4Addr::new(10, 244, i as u8, 2),
            ip6: ip6(2),
            iface,
            node,
        });
        Ok(())
    }

    /// Makes every veth send complete checksums, as frames from a wire carry: XDP cannot
    /// see a checksum that a virtual device deferred.
    pub fn use_wire_checksums(&self) -> anyhow::Result<()> {
        if self.ext.is_some() {
            self.complete_checksums_from_ext()?;
        }
        (0..self.nodes.len()).try_for_each(|n| self.complete_checksums_from_node(n))
    }

    /// Makes ext's LAN ports send complete checksums: the nodes receive no partial ones
    /// from outside.
    pub fn complete_checksums_from_ext(&self) -> anyhow::Result<()> {
        let ext = self.ext.as_deref().context("this world has no LAN")?;
        (0..self.nodes.len()).try_for_each(|n| tx_checksums_off(ext, &lan_port(n)))
    }

    /// Makes node `n`'s `eth0` and its pods' veths (both ends) send complete checksums:
    /// what leaves the node carries the sum the stack computed from what it was left.
    pub fn complete_checksums_from_node(&self, n: usize) -> anyhow::Result<()> {
        let node = &self.nodes[n];
        if node.ip.is_some() {
            tx_checksums_off(&node.netns, "eth0")?;
        }
        for pod in self.pods.iter().filter(|p| p.node == n) {
            tx_checksums_off(&node.netns, &pod.iface)?;
            tx_checksums_off(&pod.netns, "eth0")?;
        }
        Ok(())
    }

    /// Lets native XDP on the nodes' `eth0` transmit onto the LAN, as onto a wire: the
    /// LAN's ports get a pass-through XDP program (see `wire`).
    pub fn ready_lan_for_native_xdp(&self) -> anyhow::Result<()> {
        let ext = self.ext.as_deref().context("this world has no LAN")?;
        let ports: Vec<String> = (0..self.nodes.len()).map(lan_port).collect();
        let pin = PathBuf::from(format!("{}-wire", self.nodes[0].bpffs.display()));
        wire::attach_pass(ext, &ports, &pin)
    }

    /// The driver statistics (`ethtool -S`) of `device` on node `node`.
    pub fn device_stats(
        &self,
        node: usize,
        device: &str,
    ) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let out = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.nodes[node].netns,
            "ethtool",
            "-S",
            device,
        ]))?;
        Ok(out
            .lines()
            .filter_map(|l| l.trim().split_once(": "))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect())
    }

    /// Moves the outside client of a two-node world one routed hop from the LAN, over
    /// IPv4: into a namespace of its own behind ext (`ROUTED_CLIENT_IP`), which forwards,
    /// with routes through ext to the LAN, the pods and the external IPs; `probe_ext` runs
    /// there from then on. A client on ext itself hands the nodes the very buffers its TCP
    /// keeps for retransmission (a veth passes them on as they are): a tc program that
    /// writes to a packet copies it first, within its run, and XDP's copy comes before the
    /// program runs. Forwarded, as from a NIC, a packet arrives in a buffer of its own.
    pub fn client_behind_ext(&mut self) -> anyhow::Result<()> {
        let ext = self
            .ext
            .clone()
            .context("this world has no ext namespace")?;
        let client = format!("{ext}-client");
        self.add_netns(&client)?;
        ip(&[
            "-n", &ext, "link", "add", "client", "type", "veth", "peer", "name", "eth0", "netns",
            &client,
        ])?;
        let (gateway, at) = (CLIENT_GATEWAY.to_string(), format!("{ROUTED_CLIENT_IP}/24"));
        let at_gateway = format!("{gateway}/24");
        ip(&["-n", &ext, "addr", "add", &at_gateway, "dev", "client"])?;
        ip(&["-n", &ext, "link", "set", "client", "up"])?;
        ip(&["-n", &client, "addr", "add", &at, "dev", "eth0"])?;
        ip(&["-n", &client, "link", "set", "eth0", "up"])?;
        for to in [LAN_NET, "10.244.0.0/16", EXTERNAL_NET] {
            ip(&["-n", &client, "route", "add", to, "via", &gateway])?;
        }
        let forward = [
            "netns",
            "exec",
            &ext,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ];
        run(Command::new("ip").args(forward))?;
        let via = EXT_IP.to_string();
        for node in &self.nodes {
            ip(&["-n", &node.netns, "route", "add", CLIENT_NET, "via", &via])?;
        }
        self.ext_client = Some(client);
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.netns.push(name.to_owned());
        // No duplicate address detection on its interfaces: their link-local IPv6
        // addresses (which neighbour discovery speaks from) are usable at once, not a
        // second or two after the link comes up.
        run(Command::new("ip").args([
            "netns",
            "exec",
            name,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ]))?;
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    pub fn pod(&self, i: usize) -> &Pod {
        &self.pods[i - 1]
    }

    /// Starts an echo server answering as `id` on pod `i` (TCP and UDP `BACKEND_PORT`).
    pub fn serve(&mut self, i: usize, id: &str) -> anyhow::Result<()> {
        let port = BACKEND_PORT.to_string();
        let mut child = Command::new(&self.bins.netprobe)
            .args([
                "--netns",
                &self.pod(i).netns,
                "serve",
                "--id",
                id,
                "--tcp",
                &port,
                "--udp",
                &port,
                "--max-secs",
                "600",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.bins.netprobe.display()))?;
        let stdout = child.stdout.take();
        self.children.push(child);
        let mut ready = String::new();
        BufReader::new(stdout.context("server stdout")?).read_line(&mut ready)?;
        ensure!(
            ready.contains("serving"),
            "server {id} did not start: {ready:?}"
        );
        Ok(())
    }

    pub fn write_manifest(&self, yaml: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("services.yaml");
        // Write then rename, as editors and config management do.
        let tmp = self.dir.join(".services.yaml.tmp");
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(path)
    }

    /// Starts the agent in the node namespace on `yaml`, with tc on every pod interface,
    /// and waits for its first sync. Its log lines are echoed to stderr if `echo_log`.
    pub fn start_agent(&mut self, yaml: &str, echo_log: bool) -> anyhow::Result<Agent> {
        let manifest = self.write_manifest(yaml)?;
        let manifest = manifest.to_string_lossy().into_owned();
        self.start_agent_with(&["--manifests", &manifest], echo_log)
    }

    /// Starts node-a's agent with `source_args` (e.g. `--kubeconfig PATH --namespace NS`),
    /// tc on every pod interface, and waits for its first sync.
    pub fn start_agent_with(
        &mut self,
        source_args: &[&str],
        echo_log: bool,
    ) -> anyhow::Result<Agent> {
        self.start_agent_on(0, source_args, echo_log)
    }

    /// Starts node `node`'s agent with `args` (a source and any other flags), tc on its
    /// `eth0` (with `--node-ip`) and pod interfaces, and waits for its first sync.
    pub fn start_agent_on(
        &mut self,
        node: usize,
        args: &[&str],
        echo_log: bool,
    ) -> anyhow::Result<Agent> {
        let agent = self.spawn_agent_on(node, args, echo_log)?;
        agent.wait_for_syncs(1)?;
        Ok(agent)
    }

    /// Starts node `node`'s agent as `start_agent_on` does, without waiting for anything.
    pub fn spawn_agent_on(
        &mut self,
        node: usize,
        args: &[&str],
        echo_log: bool,
    ) -> anyhow::Result<Agent> {
        let n = &self.nodes[node];
        let mut interfaces: Vec<&str> = n.ip.map(|_| "eth0").into_iter().collect();
        interfaces.extend(
            self.pods
                .iter()
                .filter(|p| p.node == node)
                .map(|p| p.iface.as_str()),
        );
        let interfaces = match &self.agent_interfaces {
            Some(chosen) => chosen.clone(),
            None => interfaces.join(","),
        };
        let mut command = self.agent_command(node);
        command
            .args(args)
            .arg("--cgroup")
            .arg(&n.cgroup)
            .arg("--bpffs")
            .arg(&n.bpffs)
            .arg("--interfaces")
            .arg(interfaces)
            .args(["--conntrack-gc-interval", "1", "--node-name", &n.name]);
        let node_ips: Vec<String> = [n.ip.map(IpAddr::V4), n.ip6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
            .map(|a| a.to_string())
            .collect();
        if !node_ips.is_empty() {
            command.args(["--node-ip", &node_ips.join(",")]);
        }
        let mut child = command
            .env("RUST_LOG", &self.agent_log)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.bins.agent.display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().context("agent stderr")?;
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo_log {
                    eprintln!("agent: {line}");
                }
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let agent = Agent {
            log,
            pid: child.id(),
        };
        self.children.push(child);
        Ok(agent)
    }

    /// `proxy-agent` in node `node`'s network namespace (behind `agent_wrapper`), without
    /// arguments.
    pub fn agent_command(&self, node: usize) -> Command {
        let agent = self.bins.agent.to_string_lossy();
        match self.agent_wrapper.split_first() {
            Some((program, args)) => {
                let mut command = self.in_node(node, program);
                command.args(args).arg(agent.as_ref());
                command
            }
            None => self.in_node(node, &agent),
        }
    }

    /// `program` in node `node`'s network namespace, without arguments.
    pub fn in_node(&self, node: usize, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/var/run/netns/{}", self.nodes[node].netns))
            .arg("--")
            .arg(program);
        command
    }

    /// Runs `program args` in node `node`'s network namespace; its standard output.
    pub fn run_in_node(&self, node: usize, program: &str, args: &[&str]) -> anyhow::Result<String> {
        run(self.in_node(node, program).args(args))
    }

    /// The programs attached to node `node`'s cgroup (`bpftool cgroup show`); empty if none.
    pub fn cgroup_programs(&self, node: usize) -> anyhow::Result<String> {
        let cgroup = self.nodes[node].cgroup.to_string_lossy();
        self.run_in_node(node, "bpftool", &["cgroup", "show", &cgroup])
    }

    /// Waits (at most `timeout`) for a process this world started to exit; its status.
    pub fn wait_exit(
        &mut self,
        pid: u32,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let child = self
            .children
            .iter_mut()
            .find(|c| c.id() == pid)
            .with_context(|| format!("no process {pid} of ours"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "process {pid} still runs after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `command` as a process of this world (killed on drop); its pid.
    pub fn spawn(&mut self, command: &mut Command) -> anyhow::Result<u32> {
        let child = command
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Sends SIGTERM to a process this world started.
    pub fn terminate(&self, pid: u32) -> anyhow::Result<()> {
        ensure!(
            self.children.iter().any(|c| c.id() == pid),
            "no process {pid} of ours"
        );
        // SAFETY: a child of ours, not reaped yet (its pid is not reused).
        if unsafe { libc::kill(pid as i32, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    fn probe_command(&self, pod: usize, hooked: bool, args: &[&str]) -> Command {
        let pod = self.pod(pod);
        let mut cmd = Command::new(&self.bins.netprobe);
        cmd.args(["--netns", &pod.netns]);
        if hooked {
            cmd.arg("--cgroup").arg(&self.nodes[pod.node].cgroup);
        }
        cmd.args(args);
        cmd
    }

    /// Runs a netprobe client in ext, the outside client of a two-node world (or behind it,
    /// `client_behind_ext`); returns its JSON lines.
    pub fn probe_ext(&self, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        let client = self
            .ext_client
            .as_deref()
            .or(self.ext.as_deref())
            .context("this world has no ext namespace")?;
        let out = run(Command::new(&self.bins.netprobe)
            .args(["--netns", client])
            .args(args))?;
        out.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("bad netprobe line {l:?}")))
            .collect()
    }

    /// Runs a netprobe client in pod `pod`, inside the hooked cgroup if `hooked` (socket
    /// LB) or outside it (the tc path); returns its JSON lines.
    pub fn probe(&self, pod: usize, hooked: bool, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        let out = run(&mut self.probe_command(pod, hooked, args))?;
        out.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("bad netprobe line {l:?}")))
            .collect()
    }

    /// Runs netprobe in pod `pod` and returns what it printed.
    pub fn probe_text(&self, pod: usize, hooked: bool, args: &[&str]) -> anyhow::Result<String> {
        run(&mut self.probe_command(pod, hooked, args))
    }

    /// Starts a long-running netprobe client and returns it with the first JSON line it
    /// printed.
    pub fn spawn_probe(
        &mut self,
        pod: usize,
        hooked: bool,
        args: &[&str],
    ) -> anyhow::Result<(usize, Value)> {
        let mut child = self
            .probe_command(pod, hooked, args)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting netprobe")?;
        let stdout = child.stdout.take().context("netprobe stdout")?;
        self.children.push(child);
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        self.readers.push(reader);
        let first =
            serde_json::from_str(&line).with_context(|| format!("bad netprobe line {line:?}"))?;
        Ok((self.readers.len() - 1, first))
    }

    /// Waits for a client started by `spawn_probe` and returns its last JSON line.
    pub fn finish_probe(&mut self, handle: usize) -> anyhow::Result<Value> {
        let rest = self.finish_output(handle)?;
        let Some(last) = rest.lines().last() else {
            bail!("netprobe printed no summary line")
        };
        serde_json::from_str(last).with_context(|| format!("bad netprobe line {last:?}"))
    }

    /// Runs `proxyctl monitor -o json --count 1` on node `node`'s maps, repeating `trigger`
    /// (at most 10 times) until the monitor has printed its event — it skips what happened
    /// before it started; the event.
    pub fn first_monitored(
        &mut self,
        node: usize,
        mut trigger: impl FnMut(&World),
    ) -> anyhow::Result<Value> {
        let args = [
            "monitor",
            "--output",
            "json",
            "--count",
            "1",
            "--seconds",
            "10",
        ];
        let (output, pid) = self.spawn_proxyctl_on(node, &args)?;
        for _ in 0..10 {
            trigger(self);
            if self.wait_exit(pid, Duration::from_millis(300)).is_ok() {
                break;
            }
        }
        let printed = self.finish_output(output)?;
        serde_json::from_str(printed.trim()).with_context(|| format!("monitor printed {printed:?}"))
    }

    /// Starts proxyctl on node `node`'s maps in the background; returns a handle for
    /// `finish_output` and its pid.
    pub fn spawn_proxyctl_on(
        &mut self,
        node: usize,
        args: &[&str],
    ) -> anyhow::Result<(usize, u32)> {
        let mut child = Command::new(&self.bins.proxyctl)
            .arg("--bpffs")
            .arg(&self.nodes[node].bpffs)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting proxyctl")?;
        let stdout = child.stdout.take().context("proxyctl stdout")?;
        let pid = child.id();
        self.children.push(child);
        self.readers.push(BufReader::new(stdout));
        Ok((self.readers.len() - 1, pid))
    }

    /// Waits for a process started by `spawn_probe` or `spawn_proxyctl_on` to close its
    /// output; the rest of what it printed.
    pub fn finish_output(&mut self, handle: usize) -> anyhow::Result<String> {
        let mut rest = String::new();
        self.readers[handle].read_to_string(&mut rest)?;
        Ok(rest)
    }

    /// Makes `127.0.0.1:port` of the host (e.g. a test API server) reachable at the same
    /// address inside the node namespace, where the agent runs: a listener made inside the
    /// node namespace relays each connection to the host's loopback.
    pub fn forward_to_node(&mut self, port: u16) -> anyhow::Result<()> {
        let netns = PathBuf::from("/var/run/netns").join(&self.nodes[0].netns);
        let listener = in_netns(netns, move || {
            TcpListener::bind(("127.0.0.1", port))
                .with_context(|| format!("binding 127.0.0.1:{port} in the node namespace"))
        })?;
        listener.set_nonblocking(true)?;
        let stop = self.stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inside, _)) => {
                        std::thread::spawn(move || {
                            let _ = inside.set_nonblocking(false);
                            if let Ok(outside) = TcpStream::connect(("127.0.0.1", port)) {
                                let _ = relay(inside, outside);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(())
    }

    /// Kills (SIGKILL) a process this world started, e.g. the agent.
    pub fn kill(&mut self, pid: u32) -> anyhow::Result<()> {
        let child = self
            .children
            .iter_mut()
            .find(|c| c.id() == pid)
            .with_context(|| format!("no process {pid} of ours"))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Runs proxyctl on node-a's maps.
    pub fn proxyctl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.proxyctl_on(0, args)
    }

    pub fn proxyctl_on(&self, node: usize, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new(&self.bins.proxyctl)
            .arg("--bpffs")
            .arg(&self.nodes[node].bpffs)
            .args(args))
    }

    /// An HTTP GET to the agent's metrics endpoint (127.0.0.1:10249 in the node namespace).
    pub fn agent_http(&self, path: &str) -> anyhow::Result<String> {
        self.node_http(10249, path)
    }

    /// An HTTP GET to `127.0.0.1:port` in node-a's namespace; the whole response.
    pub fn node_http(&self, port: u16, path: &str) -> anyhow::Result<String> {
        self.http_in(&self.nodes[0].netns, Ipv4Addr::LOCALHOST, port, path)
    }

    /// An HTTP GET to `addr:port` from the namespace `netns`; the whole response.
    pub fn http_in(
        &self,
        netns: &str,
        addr: impl Into<IpAddr>,
        port: u16,
        path: &str,
    ) -> anyhow::Result<String> {
        let addr: IpAddr = addr.into();
        let netns = PathBuf::from("/var/run/netns").join(netns);
        let path = path.to_owned();
        in_netns(netns, move || {
            let to = std::net::SocketAddr::new(addr, port);
            let mut stream =
                TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(stream, "GET {path} HTTP/1.0\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for netns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
        for node in &self.nodes {
            remove_cgroup(&node.cgroup);
            let _ = std::fs::remove_dir_all(&node.bpffs);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes a cgroup made for a test or benchmark: possible once the processes that were in
/// it are gone and it is released, which can take a moment after they exit (up to 5 s).
pub fn remove_cgroup(cgroup: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(cgroup).is_err() && cgroup.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Agent {
    log: Arc<Mutex<Vec<String>>>,
    pub pid: u32,
}

impl Agent {
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn syncs(&self) -> usize {
        self.log_lines()
            .iter()
            .filter(|l| l.contains("synced"))
            .count()
    }

    /// Waits (at most 10 s) until the agent has logged `n` syncs in all.
    pub fn wait_for_syncs(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.syncs() < n {
            ensure!(
                Instant::now() < deadline,
                "agent did not sync {n} times; log:\n{}",
                self.log_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The first log line containing every one of `parts`, waiting at most `timeout`.
    pub fn wait_for_log(&self, parts: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .log_lines()
                .into_iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return Ok(line);
            }
            ensure!(
                Instant::now() < deadline,
                "no agent log line with {parts:?}; log:\n{}",
                self.log_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A ClusterIP service `default/NAME` at `vip` with TCP port 80 "http" and UDP port 53 "dns"
/// to `BACKEND_PORT` on the given pods (by address, all of `vip`'s family;
/// `(addr, ready, serving, terminating)`).
pub fn service_manifest<A: Into<IpAddr> + Copy>(
    name: &str,
    vip: &str,
    affinity_secs: Option<u32>,
    endpoints: &[(A, bool, bool, bool)],
) -> String {
    let affinity = affinity_secs.map_or(String::new(), |t| {
        format!("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}\n")
    });
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n{affinity}  ports:\n  - {{name: http, port: 80, targetPort: {BACKEND_PORT}}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: {BACKEND_PORT}}}\n"
    );
    if !endpoints.is_empty() {
        yaml += &endpoint_slice(&format!("{name}-1"), name, endpoints);
    }
    yaml
}

/// An EndpointSlice `default/SLICE` of service `NAME`'s ports "http" and "dns" (see
/// `service_manifest`), of the endpoints' family.
pub fn endpoint_slice<A: Into<IpAddr> + Copy>(
    slice: &str,
    name: &str,
    endpoints: &[(A, bool, bool, bool)],
) -> String {
    let family = match endpoints.first().map(|e| e.0.into()) {
        Some(IpAddr::V6(_)) => "IPv6",
        _ => "IPv4",
    };
    let mut yaml = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {slice}, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: {family}\nports:\n- {{name: http, port: {BACKEND_PORT}}}\n- {{name: dns, port: {BACKEND_PORT}, protocol: UDP}}\nendpoints:\n"
    );
    for (addr, ready, serving, terminating) in endpoints {
        let addr: IpAddr = (*addr).into();
        yaml += &format!(
            "- addresses: ['{addr}']\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n"
        );
    }
    yaml
}

/// No endpoints, for `service_manifest`.
pub const NO_ENDPOINTS: &[(Ipv4Addr, bool, bool, bool)] = &[];

pub fn ready<A: Copy>(addrs: &[A]) -> Vec<(A, bool, bool, bool)> {
    addrs.iter().map(|a| (*a, true, true, false)).collect()
}
