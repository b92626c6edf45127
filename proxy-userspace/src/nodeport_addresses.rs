//! Which node addresses NodePorts answer on: kube-proxy's `--nodeport-addresses`.
use std::{fmt, net::IpAddr};

use crate::cidr::Cidr;

/// `--nodeport-addresses`: `primary` (kube-proxy's nftables default: the node IP of each
/// family only), `all` (every address of the served interfaces), or CIDRs (the addresses
/// of the served interfaces and the node IPs inside them; as kube-proxy, a family without a
/// CIDR in the list answers on all its addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddresses {
    Primary,
    All,
    Cidrs(Vec<Cidr>),
}

impl NodePortAddresses {
    /// Whether NodePorts answer on `addr`, given the node's primary address of its family.
    pub fn admits(&self, addr: IpAddr, primary: Option<IpAddr>) -> bool {
        match self {
            NodePortAddresses::Primary => Some(addr) == primary,
            NodePortAddresses::All => true,
            NodePortAddresses::Cidrs(cidrs) => {
                let mut of_family = cidrs
                    .iter()
                    .filter(|c| c.is_ipv4() == addr.is_ipv4())
                    .peekable();
                of_family.peek().is_none() || of_family.any(|c| c.contains(addr))
            }
        }
    }

    /// Parses `primary`, `all` or comma-separated CIDRs.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "primary" => return Ok(NodePortAddresses::Primary),
            "all" => return Ok(NodePortAddresses::All),
            _ => {}
        }
        let cidrs = text
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Cidr>, _>>()?;
        if cidrs.is_empty() {
            return Err("expected primary, all, or CIDRs".to_owned());
        }
        Ok(NodePortAddresses::Cidrs(cidrs))
    }
}

impl fmt::Display for NodePortAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodePortAddresses::Primary => f.write_str("primary"),
            NodePortAddresses::All => f.write_str("all"),
            NodePortAddresses::Cidrs(cidrs) => {
                let list: Vec<String> = cidrs.iter().map(Cidr::to_string).collect();
                f.write_str(&list.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_and_cidrs_as_kube_proxy_takes_them() {
        let node_ip = IpAddr::from([192, 168, 50, 1]);
        let primary = Some(node_ip);
        let other = IpAddr::from([192, 168, 50, 11]);
        let p = NodePortAddresses::parse("primary").unwrap();
        assert!(p.admits(node_ip, primary) && !p.admits(other, primary));
        assert!(
            NodePortAddresses::parse("all")
                .unwrap()
                .admits(other, primary)
        );
        let c = NodePortAddresses::parse("192.168.50.8/29, 10.0.0.0/8").unwrap();
        assert!(c.admits(other, primary) && !c.admits(node_ip, primary));
        assert!(c.admits(IpAddr::from([10, 1, 2, 3]), None));
        // No IPv6 CIDR: every IPv6 address, as kube-proxy.
        assert!(c.admits("fd00::1".parse().unwrap(), None));
        let six = NodePortAddresses::parse("fd00:50::/64").unwrap();
        assert!(six.admits("fd00:50::1".parse().unwrap(), None));
        assert!(!six.admits("fd00:51::1".parse().unwrap(), None));
        assert!(
            six.admits(node_ip, primary),
            "no IPv4 CIDR: every IPv4 address"
        );
        assert!(
            NodePortAddresses::parse("0.0.0.0/0")
                .unwrap()
                .admits(other, None)
        );
        assert_eq!(c.to_string(), "192.168.50.8/29,10.0.0.0/8");
        for bad in [
            "",
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "primary,10.0.0.0/8",
        ] {
            assert!(NodePortAddresses::parse(bad).is_err(), "{bad}");
        }
    }
}
