//! Translation of validated Services and EndpointSlices into what the maps must hold: one
//! `DesiredService` per service port, with its usable backends.
use std::collections::BTreeMap;

use proxy_common::{BACKEND_FLAG_LOCAL, Backend, ServiceKey};

use crate::{
    model::{EndpointSpec, PortSpec, ServiceSpec, SliceSpec},
    rejection::{Reason, Rejection},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// `namespace/name:port-name` (`namespace/name` for an unnamed port).
    pub name: String,
    /// Sorted and de-duplicated, so that equal sets compare equal.
    pub backends: Vec<Backend>,
    pub affinity_timeout_secs: Option<u32>,
    /// No endpoint is ready: the backends are the serving-but-terminating ones.
    pub terminating: bool,
    pub internal_local: bool,
}

pub type DesiredState = BTreeMap<ServiceKey, DesiredService>;

pub fn service_key(spec: &ServiceSpec, port: &PortSpec) -> ServiceKey {
    ServiceKey {
        addr: spec.cluster_ip.octets(),
        port: port.port,
        proto: port.protocol.ip_proto(),
        pad: 0,
    }
}

pub fn port_display_name(spec: &ServiceSpec, port: &PortSpec) -> String {
    match port.name.as_str() {
        "" => format!("{}/{}", spec.namespace, spec.name),
        name => format!("{}/{}:{name}", spec.namespace, spec.name),
    }
}

/// Where this agent runs: for node-local and topology-aware endpoint selection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    pub node_name: Option<String>,
    /// The node's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

impl Topology {
    fn is_local(&self, e: &EndpointSpec) -> bool {
        self.node_name.is_some() && e.node_name == self.node_name
    }

    /// kube-proxy's rule for zone hints: only when every ready endpoint has hints and at
    /// least one is hinted for this node's zone (otherwise hints could starve the zone).
    fn hinted_zone<'a>(&'a self, endpoints: &[(&EndpointSpec, u16)]) -> Option<&'a str> {
        let zone = self.zone.as_deref()?;
        let mut ready = endpoints.iter().filter(|(e, _)| e.ready).peekable();
        ready.peek()?;
        let mut any_for_zone = false;
        for (e, _) in ready {
            if e.zone_hints.is_empty() {
                return None;
            }
            any_for_zone |= e.zone_hints.iter().any(|z| z == zone);
        }
        any_for_zone.then_some(zone)
    }
}

/// The backends of one service port, and whether they are the terminating fallback: endpoints of the service's slices whose port has the
/// service port's name and protocol (the slice port number is the resolved targetPort),
/// chosen as kube-proxy does: ready endpoints that are eligible (on this node for
/// `internalTrafficPolicy: Local`, hinted for this zone when hints apply); when none is,
/// the serving-and-terminating ones (node-local ones for Local), so that a rollout's last
/// pods drain gracefully.
fn backends(
    spec: &ServiceSpec,
    port: &PortSpec,
    slices: &[&SliceSpec],
    topology: &Topology,
) -> (Vec<Backend>, bool) {
    let candidates: Vec<(&EndpointSpec, u16)> = slices
        .iter()
        .filter_map(|s| {
            let p = s
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)?;
            Some(s.endpoints.iter().map(move |e| (e, p.port)))
        })
        .flatten()
        .collect();
    let zone = if spec.internal_local {
        None
    } else {
        topology.hinted_zone(&candidates)
    };
    let placed = |e: &EndpointSpec| {
        if spec.internal_local {
            topology.is_local(e)
        } else {
            zone.is_none_or(|z| e.zone_hints.iter().any(|h| h == z))
        }
    };
    let mut chosen: Vec<&(&EndpointSpec, u16)> = candidates
        .iter()
        .filter(|(e, _)| e.ready && placed(e))
        .collect();
    let terminating = chosen.is_empty();
    if terminating {
        chosen = candidates
            .iter()
            .filter(|(e, _)| {
                e.serving && e.terminating && (!spec.internal_local || topology.is_local(e))
            })
            .collect();
    }
    let mut out: Vec<Backend> = chosen
        .into_iter()
        .map(|(e, target)| Backend {
            addr: e.addr.octets(),
            port: *target,
            proto: port.protocol.ip_proto(),
            flags: if topology.is_local(e) {
                BACKEND_FLAG_LOCAL
            } else {
                0
            },
        })
        .collect();
    out.sort();
    out.dedup();
    let terminating = terminating && !out.is_empty();
    (out, terminating)
}

/// Builds the desired state of every service port; conflicting service ports (same address,
/// port and protocol) are rejected, the first one by name wins.
pub fn desired_state<'a>(
    services: impl Iterator<Item = &'a ServiceSpec>,
    slices: impl Iterator<Item = &'a SliceSpec>,
    topology: &Topology,
) -> (DesiredState, Vec<Rejection>) {
    let mut by_service: BTreeMap<(&str, &str), Vec<&SliceSpec>> = BTreeMap::new();
    for slice in slices {
        by_service
            .entry((&slice.namespace, &slice.service))
            .or_default()
            .push(slice);
    }
    let mut state = DesiredState::new();
    let mut rejections = Vec::new();
    for spec in services {
        let slices = by_service
            .get(&(spec.namespace.as_str(), spec.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for port in &spec.ports {
            let key = service_key(spec, port);
            let name = port_display_name(spec, port);
            if let Some(existing) = state.get(&key) {
                rejections.push(Rejection::new(
                    &format!("Service {}/{}", spec.namespace, spec.name),
                    "spec.clusterIP",
                    Reason::Conflict,
                    format!(
                        "{}:{}/{} is already served for {}",
                        spec.cluster_ip,
                        port.port,
                        port.protocol.name(),
                        existing.name
                    ),
                ));
                continue;
            }
            let (backends, terminating) = backends(spec, port, slices, topology);
            state.insert(
                key,
                DesiredService {
                    name,
                    backends,
                    affinity_timeout_secs: spec.affinity_timeout_secs,
                    terminating,
                    internal_local: spec.internal_local,
                },
            );
        }
    }
    (state, rejections)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::Protocol;

    fn port(name: &str, port: u16, protocol: Protocol) -> PortSpec {
        PortSpec {
            name: name.into(),
            port,
            protocol,
        }
    }

    fn svc(name: &str, ip: [u8; 4], ports: Vec<PortSpec>) -> ServiceSpec {
        ServiceSpec {
            namespace: "ns".into(),
            name: name.into(),
            cluster_ip: Ipv4Addr::from(ip),
            ports,
            affinity_timeout_secs: None,
            internal_local: false,
        }
    }

    fn ep(last: u8, ready: bool, serving: bool, terminating: bool) -> EndpointSpec {
        EndpointSpec {
            addr: Ipv4Addr::new(10, 244, 0, last),
            ready,
            serving,
            terminating,
            node_name: None,
            zone_hints: vec![],
        }
    }

    fn slice(
        name: &str,
        service: &str,
        ports: Vec<PortSpec>,
        endpoints: Vec<EndpointSpec>,
    ) -> SliceSpec {
        SliceSpec {
            namespace: "ns".into(),
            name: name.into(),
            service: service.into(),
            ports,
            endpoints,
        }
    }

    fn addrs(d: &DesiredService) -> Vec<(u8, u16)> {
        d.backends.iter().map(|b| (b.addr[3], b.port)).collect()
    }

    #[test]
    fn multi_port_named_target_ports_and_merged_slices() {
        let web = svc(
            "web",
            [10, 96, 0, 10],
            vec![
                port("http", 80, Protocol::Tcp),
                port("dns", 53, Protocol::Udp),
            ],
        );
        let slices = [
            slice(
                "web-a",
                "web",
                vec![
                    port("http", 8080, Protocol::Tcp),
                    port("dns", 5353, Protocol::Udp),
                ],
                vec![ep(1, true, true, false)],
            ),
            // The same endpoint in a second slice is counted once.
            slice(
                "web-b",
                "web",
                vec![port("http", 8080, Protocol::Tcp)],
                vec![ep(2, true, true, false), ep(1, true, true, false)],
            ),
            slice(
                "other",
                "other",
                vec![port("http", 9999, Protocol::Tcp)],
                vec![ep(9, true, true, false)],
            ),
        ];
        let (state, rejections) =
            desired_state([&web].into_iter(), slices.iter(), &Topology::default());
        assert!(rejections.is_empty());
        let http = &state[&ServiceKey {
            addr: [10, 96, 0, 10],
            port: 80,
            proto: 6,
            pad: 0,
        }];
        assert_eq!(http.name, "ns/web:http");
        assert_eq!(addrs(http), [(1, 8080), (2, 8080)]);
        let dns = &state[&ServiceKey {
            addr: [10, 96, 0, 10],
            port: 53,
            proto: 17,
            pad: 0,
        }];
        assert_eq!(addrs(dns), [(1, 5353)]);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let web = svc("web", [10, 96, 0, 10], vec![port("", 80, Protocol::Tcp)]);
        let with_ready = [slice(
            "s",
            "web",
            vec![port("", 80, Protocol::Tcp)],
            vec![
                ep(1, true, true, false),
                ep(2, false, true, true),
                ep(3, false, false, false),
            ],
        )];
        let (state, _) = desired_state([&web].into_iter(), with_ready.iter(), &Topology::default());
        assert_eq!(addrs(state.values().next().unwrap()), [(1, 80)]);

        let draining = [slice(
            "s",
            "web",
            vec![port("", 80, Protocol::Tcp)],
            vec![
                ep(2, false, true, true),
                ep(3, false, false, true),
                ep(4, false, false, false),
            ],
        )];
        let (state, _) = desired_state([&web].into_iter(), draining.iter(), &Topology::default());
        assert_eq!(addrs(state.values().next().unwrap()), [(2, 80)]);
    }

    #[test]
    fn service_without_slices_has_no_backends() {
        let web = svc("web", [10, 96, 0, 10], vec![port("", 80, Protocol::Tcp)]);
        let (state, _) =
            desired_state([&web].into_iter(), std::iter::empty(), &Topology::default());
        let d = state.values().next().unwrap();
        assert_eq!(d.name, "ns/web");
        assert!(d.backends.is_empty());
    }

    #[test]
    fn conflicting_service_ports_are_rejected() {
        let a = svc("a", [10, 96, 0, 10], vec![port("", 80, Protocol::Tcp)]);
        let b = svc(
            "b",
            [10, 96, 0, 10],
            vec![port("", 80, Protocol::Tcp), port("", 81, Protocol::Tcp)],
        );
        let (state, rejections) = desired_state(
            [&a, &b].into_iter(),
            std::iter::empty(),
            &Topology::default(),
        );
        assert_eq!(state.len(), 2);
        assert_eq!(rejections.len(), 1);
        assert_eq!(rejections[0].reason, Reason::Conflict);
        assert!(
            rejections[0]
                .to_string()
                .contains("already served for ns/a"),
            "{}",
            rejections[0]
        );
    }

    fn placed(
        last: u8,
        ready: bool,
        terminating: bool,
        node: &str,
        zones: &[&str],
    ) -> EndpointSpec {
        EndpointSpec {
            node_name: Some(node.into()),
            zone_hints: zones.iter().map(|z| z.to_string()).collect(),
            ..ep(last, ready, ready || terminating, terminating)
        }
    }

    fn here() -> Topology {
        Topology {
            node_name: Some("node-a".into()),
            zone: Some("zone-a".into()),
        }
    }

    #[test]
    fn internal_traffic_policy_local_keeps_node_local_endpoints_only() {
        let web = ServiceSpec {
            internal_local: true,
            ..svc("web", [10, 96, 0, 10], vec![port("", 80, Protocol::Tcp)])
        };
        let slices = [slice(
            "s",
            "web",
            vec![port("", 80, Protocol::Tcp)],
            vec![
                placed(1, true, false, "node-a", &[]),
                placed(2, true, false, "node-b", &[]),
            ],
        )];
        let (state, _) = desired_state([&web].into_iter(), slices.iter(), &here());
        assert_eq!(addrs(state.values().next().unwrap()), [(1, 80)]);
        // No local endpoint: nothing (kube-proxy drops), even though node-b has one.
        let remote = [slice(
            "s",
            "web",
            vec![port("", 80, Protocol::Tcp)],
            vec![placed(2, true, false, "node-b", &[])],
        )];
        let (state, _) = desired_state([&web].into_iter(), remote.iter(), &here());
        assert!(state.values().next().unwrap().backends.is_empty());
        // Only a terminating local one: it serves.
        let draining = [slice(
            "s",
            "web",
            vec![port("", 80, Protocol::Tcp)],
            vec![
                placed(1, false, true, "node-a", &[]),
                placed(2, true, false, "node-b", &[]),
            ],
        )];
        let (state, _) = desired_state([&web].into_iter(), draining.iter(), &here());
        assert_eq!(addrs(state.values().next().unwrap()), [(1, 80)]);
    }

    #[test]
    fn zone_hints_apply_only_when_complete_and_matching() {
        let web = svc("web", [10, 96, 0, 10], vec![port("", 80, Protocol::Tcp)]);
        let pick = |eps: Vec<EndpointSpec>| {
            let slices = [slice("s", "web", vec![port("", 80, Protocol::Tcp)], eps)];
            addrs(
                desired_state([&web].into_iter(), slices.iter(), &here())
                    .0
                    .values()
                    .next()
                    .unwrap(),
            )
        };
        let hinted = vec![
            placed(1, true, false, "node-a", &["zone-a"]),
            placed(2, true, false, "node-b", &["zone-b"]),
        ];
        assert_eq!(pick(hinted), [(1, 80)]);
        // One ready endpoint without hints: hints are ignored.
        let partial = vec![
            placed(1, true, false, "node-a", &["zone-a"]),
            placed(2, true, false, "node-b", &[]),
        ];
        assert_eq!(pick(partial), [(1, 80), (2, 80)]);
        // No endpoint hinted for our zone: all of them.
        let elsewhere = vec![
            placed(1, true, false, "node-b", &["zone-b"]),
            placed(2, true, false, "node-c", &["zone-c"]),
        ];
        assert_eq!(pick(elsewhere), [(1, 80), (2, 80)]);
    }
}
