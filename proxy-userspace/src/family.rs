//! The agent's frontends, backends and unused endpoints hold an `IpAddr`: one type for both
//! families, converted at the maps (`proxy_common::ByFamily`), where each family has its own.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proxy_common::{BackendOf, NODE_PORT_ADDR, NODE_PORT_ADDR6, ServiceKeyOf, UnusedEndpointOf};

pub type ServiceKey = ServiceKeyOf<IpAddr>;
pub type Backend = BackendOf<IpAddr>;
pub type UnusedEndpoint = UnusedEndpointOf<IpAddr>;

/// The frontend address of a NodePort in `ip`'s family (the port on every node address).
pub fn node_port_addr(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::from(NODE_PORT_ADDR).into(),
        IpAddr::V6(_) => Ipv6Addr::from(NODE_PORT_ADDR6).into(),
    }
}

/// Whether `addr` stands for a NodePort's every node address.
pub fn is_node_port_addr(addr: IpAddr) -> bool {
    addr.is_unspecified()
}

/// A frontend's address and port as clients write it (`10.96.0.10:80`, `[fd00::10]:80`).
pub fn socket_text(addr: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

/// A frontend as `proxyctl` and messages name it: `10.96.0.10:80/TCP`, `[fd00::10]:80/UDP`.
pub fn frontend_text(key: &ServiceKey) -> String {
    format!(
        "{}/{}",
        socket_text(key.addr, key.port),
        crate::inspect::protocol(key.proto)
    )
}
