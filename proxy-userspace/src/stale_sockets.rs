//! Connected sockets that the socket hooks pointed at a backend which has since left the
//! service: found through `sock_rev_nat` (socket cookie and backend → service), looked for
//! in every pod's network namespace, destroyed (`sock_destroy`) so that the application
//! gets an error and connects again to a backend still there — as Cilium does, and for
//! the reason kube-proxy deletes the UDP conntrack entries of removed endpoints. UDP
//! always; TCP only when asked (`--destroy-tcp-to-removed-backends`): a TCP connection to
//! a backend that still answers is kept by kube-proxy too.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use prometheus::IntCounterVec;
use proxy_common::{
    IPPROTO_TCP, IPPROTO_UDP, SockRevKey, SockRevKey6, SockRevValue, SockRevValue6, maps,
};
use tracing::{debug, info, warn};

use crate::{
    reconcile::LostBackend,
    sock_destroy::{self, Destroyer, Protocol, SockDestroy, Target},
    sock_diag::SockDiag,
};

/// An endpoint: address and port.
type Endpoint = (IpAddr, u16);

/// Endpoints removed from service ids, by service id, with the service's protocol.
#[derive(Debug, Default)]
pub struct Removed(HashMap<u32, (Protocol, HashSet<Endpoint>)>);

impl Removed {
    /// Adds the backends lost by `service_id` that no longer serve (a socket to one that
    /// does is kept, as kube-proxy keeps such flows); other protocols than TCP and UDP are
    /// ignored.
    pub fn add(&mut self, service_id: u32, lost: &[LostBackend]) {
        for b in lost.iter().filter(|l| !l.serving).map(|l| l.backend) {
            let protocol = match b.proto {
                IPPROTO_UDP => Protocol::Udp,
                IPPROTO_TCP => Protocol::Tcp,
                _ => continue,
            };
            self.0
                .entry(service_id)
                .or_insert_with(|| (protocol, HashSet::new()))
                .1
                .insert((b.addr, b.port));
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The socket `cookie` a `sock_rev_nat` entry names, pointed at `backend` for
    /// `service_id`, if that endpoint was removed from the service.
    fn target(
        &self,
        cookie: u64,
        backend: Endpoint,
        service_id: u32,
    ) -> Option<(Protocol, Target)> {
        let (protocol, endpoints) = self.0.get(&service_id)?;
        endpoints
            .contains(&backend)
            .then(|| (*protocol, Target::new(cookie, backend.0, backend.1)))
    }
}

/// `sock_rev_nat` and `sock_rev_nat6`: (socket cookie, backend) → the service it was
/// balanced for.
type Socks = BpfHashMap<MapData, SockRevKey, SockRevValue>;
type Socks6 = BpfHashMap<MapData, SockRevKey6, SockRevValue6>;

pub struct StaleSockets {
    destroy: Box<dyn Destroyer>,
    protocols: Vec<Protocol>,
    rev_nat: Socks,
    rev_nat6: Socks6,
    cgroup: PathBuf,
    destroyed: IntCounterVec,
    /// What could not be done, by errno, is said once, not at every removal.
    said: HashSet<i32>,
}

impl StaleSockets {
    /// Loads the socket-destroying iterators for UDP, and TCP if `tcp`; on a kernel without
    /// `bpf_sock_destroy`, says so and falls back to sock_diag.
    pub fn new(bpffs: &Path, cgroup: &Path, tcp: bool, destroyed: IntCounterVec) -> Option<Self> {
        let mut protocols = vec![Protocol::Udp];
        if tcp {
            protocols.push(Protocol::Tcp);
        }
        // The targets come from them: their capacity is theirs.
        let opened = (|| {
            let v4 = crate::maps::open::<Socks>(bpffs, maps::SOCK_REV_NAT)?;
            let v6 = crate::maps::open::<Socks6>(bpffs, maps::SOCK_REV_NAT6)?;
            let capacity = aya::maps::IterableMap::map(&v4).info()?.max_entries()
                + aya::maps::IterableMap::map(&v6).info()?.max_entries();
            anyhow::Ok((v4, v6, capacity))
        })();
        let (rev_nat, rev_nat6, capacity) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                warn!(
                    "connected sockets that the socket hooks pointed at a removed backend \
                     keep sending to it (the application must reconnect by itself): {e:#}"
                );
                return None;
            }
        };
        let destroy: Box<dyn Destroyer> = match SockDestroy::load(&protocols, capacity) {
            Ok(iterators) => Box::new(iterators),
            Err(e) => {
                warn!(
                    "sockets connected to removed backends are destroyed through sock_diag \
                     (a dump of each namespace's sockets at each removal) instead of a BPF \
                     socket iterator: {e:#}"
                );
                Box::new(SockDiag::new(&protocols))
            }
        };
        Some(Self {
            destroy,
            protocols,
            rev_nat,
            rev_nat6,
            cgroup: cgroup.to_path_buf(),
            destroyed,
            said: HashSet::new(),
        })
    }

    /// How sockets are destroyed here: `bpf_iterator` or `sock_diag`.
    pub fn mode(&self) -> &'static str {
        self.destroy.mode()
    }

    /// Destroys the connected sockets pointed at endpoints in `removed`.
    pub fn destroy(&mut self, removed: &Removed) {
        if removed.is_empty() {
            return;
        }
        let mut found = Vec::new();
        // A map that cannot be read now leaves those sockets as they are.
        let _ = crate::map_batch::for_each_chunk(&self.rev_nat, |keys, values| {
            found.extend(keys.iter().zip(values).filter_map(|(k, v)| {
                removed.target(k.cookie, (k.addr.into(), k.port), v.service_id)
            }));
        });
        let _ = crate::map_batch::for_each_chunk(&self.rev_nat6, |keys, values| {
            found.extend(keys.iter().zip(values).filter_map(|(k, v)| {
                removed.target(k.cookie, (k.addr.into(), k.port), v.service_id)
            }));
        });
        let targets: Vec<(Protocol, Target)> = found
            .into_iter()
            .filter(|(p, _)| self.protocols.contains(p))
            .collect();
        if targets.is_empty() {
            return;
        }
        let namespaces =
            crate::pod_namespaces::open(&self.cgroup, Path::new(crate::pod_namespaces::PINNED));
        match sock_destroy::run(self.destroy.as_mut(), &targets, &namespaces) {
            Ok(destroyed) => {
                for (protocol, count) in [
                    (Protocol::Udp, destroyed.udp),
                    (Protocol::Tcp, destroyed.tcp),
                ] {
                    if count > 0 {
                        self.destroyed
                            .with_label_values(&[protocol.name()])
                            .inc_by(count);
                        info!(
                            "destroyed {count} connected {} sockets to removed backends \
                             ({} network namespaces searched)",
                            protocol.name().to_uppercase(),
                            namespaces.len()
                        );
                    }
                }
                self.report(&destroyed.errors);
            }
            Err(e) => warn!("destroying sockets connected to removed backends: {e:#}"),
        }
    }

    /// Says why sockets could not be destroyed: a missing capability or kernel option
    /// once, as a warning; a namespace gone meanwhile (its pod ended) is no news.
    fn report(&mut self, errors: &[std::io::Error]) {
        for e in errors {
            let code = e.raw_os_error().unwrap_or_default();
            let why = match code {
                libc::EPERM => {
                    "cannot enter pods' network namespaces (it needs CAP_SYS_ADMIN): connected \
                     sockets of pods outside the host network keep sending to removed backends"
                }
                libc::EOPNOTSUPP => {
                    "this kernel cannot destroy sockets (sock_diag's SOCK_DESTROY needs \
                     CONFIG_INET_DIAG_DESTROY): connected sockets keep sending to removed \
                     backends"
                }
                _ => {
                    debug!("a network namespace was not searched for stale sockets: {e}");
                    continue;
                }
            };
            if self.said.insert(code) {
                warn!("{why} ({e})");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost(addr: impl Into<IpAddr>, port: u16, proto: u8, serving: bool) -> LostBackend {
        LostBackend {
            id: 0,
            backend: crate::family::Backend {
                addr: addr.into(),
                port,
                proto,
                flags: 0,
            },
            serving,
        }
    }

    #[test]
    fn a_socket_is_a_target_only_through_the_service_that_lost_its_backend() {
        let mut removed = Removed::default();
        removed.add(
            1,
            &[
                lost([10, 0, 0, 1], 53, IPPROTO_UDP, false),
                lost([10, 0, 0, 4], 53, IPPROTO_UDP, true),
            ],
        );
        removed.add(2, &[lost([10, 0, 0, 2], 80, IPPROTO_TCP, false)]);
        let v6: IpAddr = "fd00::2".parse().unwrap();
        removed.add(3, &[lost(v6, 53, IPPROTO_UDP, false)]);
        assert_eq!(
            removed.target(7, (v6, 53), 3),
            Some((Protocol::Udp, Target::new(7, v6, 53)))
        );
        let socket = |cookie, addr: [u8; 4], port, service_id| {
            removed.target(cookie, (addr.into(), port), service_id)
        };
        assert_eq!(
            socket(5, [10, 0, 0, 1], 53, 1),
            Some((Protocol::Udp, Target::new(5, [10, 0, 0, 1].into(), 53)))
        );
        assert_eq!(
            socket(6, [10, 0, 0, 2], 80, 2),
            Some((Protocol::Tcp, Target::new(6, [10, 0, 0, 2].into(), 80)))
        );
        assert_eq!(
            socket(5, [10, 0, 0, 1], 53, 3),
            None,
            "another service keeps it"
        );
        assert_eq!(socket(5, [10, 0, 0, 1], 54, 1), None, "another port");
        assert_eq!(socket(5, [10, 0, 0, 3], 53, 1), None, "a remaining backend");
        assert_eq!(
            socket(5, [10, 0, 0, 4], 53, 1),
            None,
            "a backend that still serves"
        );
    }
}
