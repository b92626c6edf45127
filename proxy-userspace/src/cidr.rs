//! IPv4 CIDRs, as `--nodeport-addresses` and `loadBalancerSourceRanges` give them.
use std::{fmt, net::Ipv4Addr, str::FromStr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The network address (host bits cleared).
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    fn mask(len: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & Self::mask(self.len) == u32::from(self.addr)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `ADDRESS/LENGTH`; host bits are cleared, as Kubernetes' own parsing does.
    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, len) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not an IPv4 CIDR (ADDRESS/LENGTH)"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} in {text:?} is not an IPv4 address"))?;
        match len.parse::<u8>() {
            Ok(len) if len <= 32 => Ok(Self {
                addr: Ipv4Addr::from(u32::from(addr) & Self::mask(len)),
                len,
            }),
            _ => Err(format!("{len:?} in {text:?} is not a prefix length (0-32)")),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsed_normalised_and_matched() {
        let c: Cidr = "192.168.50.9/29".parse().unwrap();
        assert_eq!(c.to_string(), "192.168.50.8/29");
        assert!(c.contains(Ipv4Addr::new(192, 168, 50, 15)));
        assert!(!c.contains(Ipv4Addr::new(192, 168, 50, 16)));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(203, 0, 113, 1)));
        for bad in ["", "10.0.0.0", "10.0.0.0/33", "fd00::/64", "10.0.0/8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
