//! This node's addressing as the datapath needs it: the addresses NodePorts answer on (those
//! of the served interfaces, and the node IPs) and the source address of masqueraded
//! connections.
use std::{
    collections::BTreeSet,
    ffi::CStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
    path::Path,
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap, MapData};
use proxy_common::{NodeConfig, NodeConfig6, maps};

use crate::nodeport_addresses::NodePortAddresses;

/// `--node-ip`: the node's address in each of its families (kubelet's `--node-ip` form:
/// one address, or an IPv4 and an IPv6 one, comma-separated).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeIps {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl NodeIps {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut ips = NodeIps::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) if ips.v4.is_none() => ips.v4 = Some(a),
                Ok(IpAddr::V6(a)) if ips.v6.is_none() => ips.v6 = Some(a),
                Ok(_) => return Err(format!("{text:?}: one address per family at most")),
                Err(_) => return Err(format!("{part:?} is not an IP address")),
            }
        }
        Ok(ips)
    }

    /// The node IP of `addr`'s family.
    pub fn of_family(&self, addr: IpAddr) -> Option<IpAddr> {
        match addr {
            IpAddr::V4(_) => self.v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.v6.map(IpAddr::V6),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = IpAddr> {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }
}

impl std::fmt::Display for NodeIps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.iter().map(|a| a.to_string()).collect();
        match list.is_empty() {
            true => f.write_str("<none>"),
            false => f.write_str(&list.join(",")),
        }
    }
}

/// The IPv4 and IPv6 addresses of the network interfaces `names`, in the order of `names`;
/// IPv6 link-local ones are left out (a NodePort there would need the interface's scope).
pub fn interface_addrs(names: &[String]) -> anyhow::Result<Vec<(String, IpAddr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing interface addresses");
    }
    let mut found = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: non-null sockaddr from getifaddrs.
        let addr: IpAddr = match i32::from(unsafe { (*entry.ifa_addr).sa_family }) {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into()
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
                let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if a.is_unicast_link_local() {
                    continue;
                }
                a.into()
            }
            _ => continue,
        };
        // SAFETY: ifa_name is a NUL-terminated string.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }.to_string_lossy();
        found.push((name.into_owned(), addr));
    }
    // SAFETY: the list from getifaddrs, not used afterwards.
    unsafe { libc::freeifaddrs(list) };
    Ok(names
        .iter()
        .flat_map(|n| found.iter().filter(move |(name, _)| name == n).cloned())
        .collect())
}

/// The node's addressing kept in step with its interfaces' addresses, which can change
/// while the agent runs (DHCP, an address added to the external interface): re-read and
/// reprogrammed on every `refresh`.
pub struct NodeAddresses {
    node_ips: NodeIps,
    node_ports: NodePortAddresses,
    interfaces: Vec<String>,
    bpffs: std::path::PathBuf,
    pub current: NodeAddressing,
    /// The interfaces' addresses behind `current`.
    pub interface_addrs: Vec<(String, IpAddr)>,
}

impl NodeAddresses {
    /// Reads the addresses of `interfaces`; `program` writes them to the maps under `bpffs`.
    pub fn new(
        node_ips: NodeIps,
        node_ports: NodePortAddresses,
        interfaces: &[String],
        snat_ports: RangeInclusive<u16>,
        bpffs: &Path,
    ) -> anyhow::Result<Self> {
        let interface_addrs = interface_addrs(interfaces)?;
        let current = NodeAddressing::new(node_ips, &interface_addrs, snat_ports, &node_ports);
        Ok(Self {
            node_ips,
            node_ports,
            interfaces: interfaces.to_vec(),
            bpffs: bpffs.to_owned(),
            current,
            interface_addrs,
        })
    }

    /// Serves `interfaces` from now on (their addresses are read at the next `refresh`).
    pub fn set_interfaces(&mut self, interfaces: &[String]) {
        self.interfaces = interfaces.to_vec();
    }

    /// Re-reads the interfaces' addresses; returns true if they changed, and reprograms
    /// if the addressing did (an address `--nodeport-addresses` leaves out changes nothing).
    pub fn refresh(&mut self) -> anyhow::Result<bool> {
        let interface_addrs = interface_addrs(&self.interfaces)?;
        if interface_addrs == self.interface_addrs {
            return Ok(false);
        }
        let next = NodeAddressing::new(
            self.node_ips,
            &interface_addrs,
            self.current.snat_ports.clone(),
            &self.node_ports,
        );
        if next != self.current {
            next.program(&self.bpffs)?;
            self.current = next;
        }
        self.interface_addrs = interface_addrs;
        Ok(true)
    }
}

/// What this node answers NodePorts on and masquerades with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddressing {
    /// Both families.
    pub node_port_addrs: BTreeSet<IpAddr>,
    /// `None`: no address to masquerade with; externalTrafficPolicy: Cluster traffic to
    /// other nodes' backends is dropped.
    pub snat_addr: Option<Ipv4Addr>,
    /// The same for IPv6: the primary IPv6 address, if it is one other nodes can answer
    /// (not loopback or link-local).
    pub snat_addr6: Option<Ipv6Addr>,
    /// Source ports of masqueraded connections.
    pub snat_ports: RangeInclusive<u16>,
}

impl std::fmt::Display for NodeAddressing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodePorts answer on {:?}; ", self.node_port_addrs)?;
        let addrs: Vec<IpAddr> = [
            self.snat_addr.map(IpAddr::V4),
            self.snat_addr6.map(IpAddr::V6),
        ]
        .into_iter()
        .flatten()
        .collect();
        match addrs.as_slice() {
            [] => write!(
                f,
                "no masquerade address (no --node-ip or interface address)"
            ),
            addrs => write!(
                f,
                "masquerading as {addrs:?}, ports {}-{}",
                self.snat_ports.start(),
                self.snat_ports.end()
            ),
        }
    }
}

/// Parses a masquerade port range `MIN-MAX`: unprivileged ports, MIN <= MAX.
pub fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let (min, max) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not MIN-MAX"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port number"))
    };
    let (min, max) = (port(min)?, port(max)?);
    if min < 1024 || min > max {
        return Err(format!(
            "{text:?}: need 1024 <= MIN <= MAX (privileged ports belong to the node's services)"
        ));
    }
    Ok(min..=max)
}

impl NodeAddressing {
    /// From `--node-ip` and the addresses of the served interfaces: the node's primary
    /// address in each family is its node IP, else the first interface address of the
    /// family; masquerading uses them (an IPv6 one only if global) and `snat_ports`;
    /// NodePorts answer on those
    /// of the addresses `node_ports` admits.
    pub fn new(
        node_ips: NodeIps,
        interfaces: &[(String, IpAddr)],
        snat_ports: RangeInclusive<u16>,
        node_ports: &NodePortAddresses,
    ) -> Self {
        let primary = |addr: IpAddr| {
            node_ips.of_family(addr).or_else(|| {
                interfaces
                    .iter()
                    .map(|(_, a)| *a)
                    .find(|a| a.is_ipv4() == addr.is_ipv4())
            })
        };
        let node_port_addrs = interfaces
            .iter()
            .map(|(_, a)| *a)
            .chain(node_ips.iter())
            .filter(|a| node_ports.admits(*a, primary(*a)))
            .collect();
        let snat_addr = match primary(Ipv4Addr::UNSPECIFIED.into()) {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        };
        let snat_addr6 = match primary(Ipv6Addr::UNSPECIFIED.into()) {
            Some(IpAddr::V6(a)) if !a.is_loopback() && !a.is_unicast_link_local() => Some(a),
            _ => None,
        };
        Self {
            node_port_addrs,
            snat_addr,
            snat_addr6,
            snat_ports,
        }
    }

    /// Where the XDP fast path attaches: `chosen` (which must be served interfaces), or by
    /// default the served interfaces holding the masquerade address, the node's external
    /// interface. Not the pod-side veths: a frame XDP sends back out of a veth whose peer
    /// runs no XDP program waits in the peer's queue until other traffic wakes it.
    pub fn xdp_interfaces(
        &self,
        served: &[String],
        addrs: &[(String, IpAddr)],
        chosen: &[String],
    ) -> anyhow::Result<Vec<String>> {
        if let Some(stray) = chosen.iter().find(|c| !served.contains(c)) {
            bail!("--xdp-interfaces names {stray}, which is not one of --interfaces {served:?}");
        }
        if !chosen.is_empty() {
            return Ok(chosen.to_vec());
        }
        let mut external: Vec<String> = addrs
            .iter()
            .filter(|(_, a)| Some(*a) == self.snat_addr.map(IpAddr::V4))
            .map(|(name, _)| name.clone())
            .collect();
        external.dedup();
        if external.is_empty() {
            bail!(
                "no interface of --interfaces {served:?} holds the node IP {}: name the XDP \
                 interfaces with --xdp-interfaces",
                self.snat_addr
                    .map_or("<none>".to_owned(), |a| a.to_string())
            );
        }
        Ok(external)
    }

    /// Writes `node_addrs`, `node_addrs6`, `node_config` and `node_config6` under `bpffs`,
    /// replacing what they held.
    pub fn program(&self, bpffs: &Path) -> anyhow::Result<()> {
        let v4 = self.node_port_addrs.iter().filter_map(|a| match a {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        });
        let v6 = self.node_port_addrs.iter().filter_map(|a| match a {
            IpAddr::V4(_) => None,
            IpAddr::V6(a) => Some(a.octets()),
        });
        replace_addrs(bpffs, maps::NODE_ADDRS, v4.collect())?;
        replace_addrs(bpffs, maps::NODE_ADDRS6, v6.collect())?;
        let mut config: Array<MapData, NodeConfig> = crate::maps::open(bpffs, maps::NODE_CONFIG)?;
        let value = NodeConfig {
            snat_addr: self.snat_addr.map_or([0; 4], |a| a.octets()),
            snat_port_min: *self.snat_ports.start(),
            snat_port_max: *self.snat_ports.end(),
        };
        config
            .set(0, value, 0)
            .with_context(|| format!("writing map {}", maps::NODE_CONFIG))?;
        let mut config6: Array<MapData, NodeConfig6> =
            crate::maps::open(bpffs, maps::NODE_CONFIG6)?;
        let value = NodeConfig6 {
            snat_addr: self.snat_addr6.map_or([0; 16], |a| a.octets()),
        };
        config6
            .set(0, value, 0)
            .with_context(|| format!("writing map {}", maps::NODE_CONFIG6))
    }
}

/// Makes map `name` (address → 1) hold `wanted` exactly.
fn replace_addrs<A>(bpffs: &Path, name: &str, wanted: BTreeSet<A>) -> anyhow::Result<()>
where
    A: aya::Pod + Ord + Into<IpAddr>,
{
    let mut addrs: HashMap<MapData, A, u32> = crate::maps::open(bpffs, name)?;
    let stale: Vec<A> = addrs
        .keys()
        .filter_map(Result::ok)
        .filter(|a| !wanted.contains(a))
        .collect();
    for addr in stale {
        let text: IpAddr = addr.into();
        addrs
            .remove(&addr)
            .with_context(|| format!("removing {text} from map {name}"))?;
    }
    if wanted.len() > maps::MAX_NODE_ADDRS as usize {
        bail!(
            "{} node addresses is more than map {name} holds ({})",
            wanted.len(),
            maps::MAX_NODE_ADDRS
        );
    }
    for addr in wanted {
        let text: IpAddr = addr.into();
        addrs
            .insert(addr, 1, 0)
            .with_context(|| format!("writing {text} to map {name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proxy_common::{SNAT_PORT_MAX, SNAT_PORT_MIN};

    use super::*;

    const PORTS: RangeInclusive<u16> = SNAT_PORT_MIN..=SNAT_PORT_MAX;

    #[test]
    fn masquerade_port_ranges_are_unprivileged_and_ordered() {
        assert_eq!(parse_port_range("61000-65535"), Ok(61000..=65535));
        assert_eq!(parse_port_range("40000-40000"), Ok(40000..=40000));
        for bad in ["61000", "500-600", "65535-61000", "x-70000", "61000-70000"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
    }

    fn v4(ip: Ipv4Addr) -> NodeIps {
        NodeIps {
            v4: Some(ip),
            v6: None,
        }
    }

    #[test]
    fn loopback_has_its_address_and_the_node_ip_masquerades() {
        let lo = interface_addrs(&["lo".to_owned()]).unwrap();
        let localhost4 = IpAddr::from(Ipv4Addr::LOCALHOST);
        let localhost6 = IpAddr::from(Ipv6Addr::LOCALHOST);
        assert_eq!(
            lo,
            [("lo".to_owned(), localhost4), ("lo".to_owned(), localhost6)]
        );
        let node_ip = Ipv4Addr::new(192, 168, 50, 1);
        let addressing = NodeAddressing::new(v4(node_ip), &lo, PORTS, &NodePortAddresses::All);
        assert_eq!(addressing.snat_addr, Some(node_ip));
        assert_eq!(
            addressing.node_port_addrs,
            [localhost4, node_ip.into(), localhost6]
                .into_iter()
                .collect()
        );
        // By default (kube-proxy's nftables mode), the primary address of each family only.
        let primary = NodeAddressing::new(v4(node_ip), &lo, PORTS, &NodePortAddresses::Primary);
        assert_eq!(
            primary.node_port_addrs,
            [node_ip.into(), localhost6].into_iter().collect()
        );
        let none = NodeAddressing::new(NodeIps::default(), &lo, PORTS, &NodePortAddresses::Primary);
        assert_eq!(none.snat_addr, Some(Ipv4Addr::LOCALHOST));
        // A node IP per family.
        let both = NodeIps::parse("fd00::1, 192.168.50.1").unwrap();
        assert_eq!(both.v4, Some(node_ip));
        let dual = NodeAddressing::new(both, &lo, PORTS, &NodePortAddresses::Primary);
        let fd00: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(dual.snat_addr6, Some("fd00::1".parse().unwrap()));
        // Loopback is no address to masquerade IPv6 with (other nodes cannot answer it).
        assert_eq!(none.snat_addr6, None);
        assert_eq!(
            dual.node_port_addrs,
            [node_ip.into(), fd00].into_iter().collect()
        );
        for bad in ["10.0.0.1,10.0.0.2", "fd00::1,fd00::2", "node-a"] {
            assert!(NodeIps::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn xdp_goes_on_the_interface_with_the_node_ip_unless_chosen() {
        let served = ["eth0".to_owned(), "vh1".to_owned()];
        let node_ip = Ipv4Addr::new(192, 168, 50, 1);
        let addrs = [
            ("eth0".to_owned(), node_ip.into()),
            ("vh1".to_owned(), Ipv4Addr::new(10, 244, 1, 1).into()),
        ];
        let addressing = NodeAddressing::new(v4(node_ip), &addrs, PORTS, &NodePortAddresses::All);
        assert_eq!(
            addressing.xdp_interfaces(&served, &addrs, &[]).unwrap(),
            ["eth0"]
        );
        assert_eq!(
            addressing
                .xdp_interfaces(&served, &addrs, &["vh1".to_owned()])
                .unwrap(),
            ["vh1"]
        );
        let stray = addressing
            .xdp_interfaces(&served, &addrs, &["eth9".to_owned()])
            .unwrap_err();
        assert!(stray.to_string().contains("eth9"), "{stray}");
        let elsewhere = NodeAddressing::new(
            v4(Ipv4Addr::new(10, 0, 0, 9)),
            &addrs,
            PORTS,
            &NodePortAddresses::All,
        );
        let none = elsewhere.xdp_interfaces(&served, &addrs, &[]).unwrap_err();
        assert!(none.to_string().contains("--xdp-interfaces"), "{none}");
    }
}
