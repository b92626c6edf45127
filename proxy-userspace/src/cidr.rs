//! IPv4 and IPv6 CIDRs, as `--nodeport-addresses` and `loadBalancerSourceRanges` give them.
use std::{fmt, net::IpAddr, str::FromStr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The network address (host bits cleared).
    pub addr: IpAddr,
    pub len: u8,
}

/// `addr` as a number, and its family's width in bits.
fn bits(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

/// The mask of the top `len` of `width` bits.
fn mask(len: u8, width: u8) -> u128 {
    let all = u128::MAX >> (128 - u32::from(width));
    match len.min(width) {
        0 => 0,
        len => all & (all << (width - len)),
    }
}

impl Cidr {
    /// Whether `addr` is in the range (never for another family).
    pub fn contains(&self, addr: IpAddr) -> bool {
        let ((net, width), (a, w)) = (bits(self.addr), bits(addr));
        width == w && a & mask(self.len, width) == net
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `ADDRESS/LENGTH`; host bits are cleared, as Kubernetes' own parsing does.
    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, len) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR (ADDRESS/LENGTH)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} in {text:?} is not an IP address"))?;
        let (n, width) = bits(addr);
        match len.parse::<u8>() {
            Ok(len) if len <= width => {
                let net = n & mask(len, width);
                let addr = match addr {
                    IpAddr::V4(_) => IpAddr::from((net as u32).to_be_bytes()),
                    IpAddr::V6(_) => IpAddr::from(net.to_be_bytes()),
                };
                Ok(Self { addr, len })
            }
            _ => Err(format!(
                "{len:?} in {text:?} is not a prefix length (0-{width})"
            )),
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

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parsed_normalised_and_matched_in_both_families() {
        let c: Cidr = "192.168.50.9/29".parse().unwrap();
        assert_eq!(c.to_string(), "192.168.50.8/29");
        assert!(c.contains(ip("192.168.50.15")));
        assert!(!c.contains(ip("192.168.50.16")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.1")));
        assert!(!all.contains(ip("::1")), "another family");
        let six: Cidr = "fd00:244:4::9/64".parse().unwrap();
        assert_eq!(six.to_string(), "fd00:244:4::/64");
        assert!(six.contains(ip("fd00:244:4::2")));
        assert!(!six.contains(ip("fd00:244:5::2")));
        assert!(!six.contains(ip("10.0.0.1")));
        let host: Cidr = "fd00::1/128".parse().unwrap();
        assert!(host.contains(ip("fd00::1")) && !host.contains(ip("fd00::2")));
        let any6: Cidr = "::/0".parse().unwrap();
        assert!(any6.contains(ip("2001:db8::1")));
        for bad in ["", "10.0.0.0", "10.0.0.0/33", "fd00::/129", "10.0.0/8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
