//! Translation of validated Services and EndpointSlices into what the maps must hold: one
//! `DesiredService` per frontend of each service port (its cluster IP, node port, external
//! and load-balancer IPs), with its usable backends, plus the in-cluster scope of the
//! frontends whose in-cluster clients see other backends; and the health-check ports to
//! serve.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, hash_map::Entry},
    net::IpAddr,
};

use proxy_common::{
    BACKEND_FLAG_LOCAL, FRONTEND_CLUSTER_IP, FRONTEND_EXTERNAL_IP, FRONTEND_LOAD_BALANCER,
    FRONTEND_NODE_PORT, SCOPE_INTERNAL, UNUSED_NOT_LOCAL, UNUSED_NOT_READY, UNUSED_OTHER_NODE,
    UNUSED_OTHER_ZONE, UNUSED_TERMINATING,
};

use crate::{
    cidr::Cidr,
    family::{Backend, ServiceKey, UnusedEndpoint, node_port_addr, socket_text},
    model::{EndpointSpec, PortSpec, Protocol, ServiceSpec, ServiceType, SliceSpec},
    rejection::{Reason, Rejection},
};

/// Why an endpoint is not used (`UnusedEndpoint::reason`), as `proxyctl` says it.
pub fn unused_reason(code: u8) -> &'static str {
    match code {
        UNUSED_NOT_READY => "not_ready",
        UNUSED_TERMINATING => "terminating",
        UNUSED_NOT_LOCAL => "not_local",
        UNUSED_OTHER_ZONE => "other_zone",
        UNUSED_OTHER_NODE => "other_node",
        _ => "?",
    }
}

/// Which address of a service a frontend serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Frontend {
    #[default]
    ClusterIp,
    /// The node port, on every node address.
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl Frontend {
    pub fn code(self) -> u8 {
        match self {
            Frontend::ClusterIp => FRONTEND_CLUSTER_IP,
            Frontend::NodePort => FRONTEND_NODE_PORT,
            Frontend::ExternalIp => FRONTEND_EXTERNAL_IP,
            Frontend::LoadBalancer => FRONTEND_LOAD_BALANCER,
        }
    }

    pub fn from_code(code: u8) -> Self {
        match code {
            FRONTEND_NODE_PORT => Frontend::NodePort,
            FRONTEND_EXTERNAL_IP => Frontend::ExternalIp,
            FRONTEND_LOAD_BALANCER => Frontend::LoadBalancer,
            _ => Frontend::ClusterIp,
        }
    }

    /// As `proxyctl` names it.
    pub fn name(self) -> &'static str {
        match self {
            Frontend::ClusterIp => "ClusterIP",
            Frontend::NodePort => "NodePort",
            Frontend::ExternalIp => "ExternalIP",
            Frontend::LoadBalancer => "LoadBalancerIP",
        }
    }

    /// Traffic from outside the cluster, subject to `externalTrafficPolicy`.
    pub fn is_external(self) -> bool {
        self != Frontend::ClusterIp
    }

    /// The field a conflict on this frontend is reported against.
    fn field(self) -> &'static str {
        match self {
            Frontend::ClusterIp => "spec.clusterIP",
            Frontend::NodePort => "spec.ports.nodePort",
            Frontend::ExternalIp => "spec.externalIPs",
            Frontend::LoadBalancer => "status.loadBalancer.ingress",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredService {
    /// `namespace/name:port-name` (`namespace/name` for an unnamed port).
    pub name: String,
    pub frontend: Frontend,
    pub service_type: ServiceType,
    /// Sorted and de-duplicated, so that equal sets compare equal.
    pub backends: Vec<Backend>,
    pub affinity_timeout_secs: Option<u32>,
    /// No endpoint is ready: the backends are the serving-but-terminating ones.
    pub terminating: bool,
    pub internal_local: bool,
    pub external_local: bool,
    /// Connections to backends on other nodes are masqueraded: an external frontend with
    /// `externalTrafficPolicy: Cluster`.
    pub masquerade: bool,
    /// A `Local` policy leaves no backend although the service has endpoints elsewhere:
    /// drop new connections, as kube-proxy does, rather than reject them.
    pub drop_if_empty: bool,
    /// Clients inside the cluster use the entry of this frontend's key in `SCOPE_INTERNAL`
    /// (an external frontend with `externalTrafficPolicy: Local`).
    pub internal_scope: bool,
    /// A load-balancer frontend's `loadBalancerSourceRanges` (`Some`: only clients in
    /// them; sorted).
    pub source_ranges: Option<Vec<Cidr>>,
    /// The cluster IP frontend's list of the port's endpoints it does not use, and why
    /// (sorted); empty for the other frontends, whose differences `proxyctl` derives.
    pub unused: Vec<UnusedEndpoint>,
    /// Endpoints (address, port) it does not use for new connections that still serve
    /// (terminating, or left out by a traffic policy or hints): UDP flows and connected
    /// sockets to them are kept when they leave its backends, as kube-proxy's conntrack
    /// clean-up keeps flows to serving endpoints; the reconciler holds such a backend until
    /// it leaves this list.
    pub still_serving: Vec<(IpAddr, u16)>,
}

pub type DesiredState = BTreeMap<ServiceKey, DesiredService>;

/// What `healthCheckNodePort` answers for a service, on every node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the service on this node.
    pub local_endpoints: usize,
}

/// Health checks by port.
pub type HealthChecks = BTreeMap<u16, HealthCheck>;

/// Everything the agent must program and serve, computed at once (the tests' oracle).
#[cfg(test)]
#[derive(Debug, Default)]
pub struct Desired {
    pub services: DesiredState,
    pub health_checks: HealthChecks,
    /// Conflicting service ports and health-check ports, not served.
    pub rejections: Vec<Rejection>,
}

/// The frontends of a service port in the family of `cluster_ip`, one of its cluster IPs:
/// where clients address it.
fn frontends(
    spec: &ServiceSpec,
    port: &PortSpec,
    cluster_ip: IpAddr,
) -> Vec<(Frontend, ServiceKey)> {
    let key = |addr: IpAddr, port_number: u16| {
        ServiceKey::new(addr, port_number, port.protocol.ip_proto())
    };
    let same_family = |ip: &&IpAddr| ip.is_ipv4() == cluster_ip.is_ipv4();
    let mut out = vec![(Frontend::ClusterIp, key(cluster_ip, port.port))];
    if let Some(node_port) = port.node_port {
        out.push((
            Frontend::NodePort,
            key(node_port_addr(cluster_ip), node_port),
        ));
    }
    for ip in spec.external_ips.iter().filter(same_family) {
        out.push((Frontend::ExternalIp, key(*ip, port.port)));
    }
    for ip in spec.load_balancer_ips.iter().filter(same_family) {
        out.push((Frontend::LoadBalancer, key(*ip, port.port)));
    }
    out
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

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "<none>".to_owned());
        write!(
            f,
            "node {}, zone {}",
            or_none(&self.node_name),
            or_none(&self.zone)
        )
    }
}

impl Topology {
    fn is_local(&self, e: &EndpointSpec) -> bool {
        self.node_name.is_some() && e.node_name == self.node_name
    }

    /// Which hints a service port follows here, as kube-proxy's `topologyModeFromHints`:
    /// node hints (`trafficDistribution: PreferSameNode`) when every ready endpoint has
    /// some and one is for this node; else zone hints when every ready endpoint has some
    /// and one is for this node's zone; else none (hints that would leave this node or zone
    /// without an endpoint are ignored).
    fn mode<'a>(&'a self, endpoints: &[(&EndpointSpec, u16)]) -> Hints<'a> {
        let ready: Vec<&EndpointSpec> = endpoints
            .iter()
            .filter(|(e, _)| e.ready)
            .map(|(e, _)| *e)
            .collect();
        let followed = |name: Option<&'a str>, hints: fn(&EndpointSpec) -> &[String]| {
            let name = name?;
            let complete = !ready.is_empty() && ready.iter().all(|e| !hints(e).is_empty());
            let here = ready.iter().any(|e| hints(e).iter().any(|h| h == name));
            (complete && here).then_some(name)
        };
        if let Some(node) = followed(self.node_name.as_deref(), |e| &e.node_hints) {
            Hints::Node(node)
        } else if let Some(zone) = followed(self.zone.as_deref(), |e| &e.zone_hints) {
            Hints::Zone(zone)
        } else {
            Hints::None
        }
    }
}

/// The hints a service port follows on this node (`Topology::mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hints<'a> {
    None,
    /// Endpoints hinted for this node only.
    Node(&'a str),
    /// Endpoints hinted for this zone only.
    Zone(&'a str),
}

impl Hints<'_> {
    /// kube-proxy's `availableForTopology`.
    fn admit(self, e: &EndpointSpec) -> bool {
        match self {
            Hints::None => true,
            Hints::Node(node) => e.node_hints.iter().any(|h| h == node),
            Hints::Zone(zone) => e.zone_hints.iter().any(|h| h == zone),
        }
    }
}

/// The usable backends of a service port under a traffic policy.
struct Backends {
    backends: Vec<Backend>,
    /// The other endpoints, and why each is not used.
    unused: Vec<UnusedEndpoint>,
    /// Those of them that still serve.
    still_serving: Vec<(IpAddr, u16)>,
    /// They are the serving-terminating fallback.
    terminating: bool,
    /// None here, but the service has usable endpoints elsewhere.
    only_elsewhere: bool,
}

/// The backends of one service port under a traffic policy (`local`: `Local`): endpoints of
/// the service's slices whose port has the service port's name and protocol (the slice port
/// number is the resolved targetPort), chosen as kube-proxy does: ready endpoints that are
/// eligible (on this node for a `Local` policy, hinted for this node or zone when hints
/// apply);
/// when none is, the serving-and-terminating ones (node-local ones for `Local`), so that a
/// rollout's last pods drain gracefully.
fn backends(
    port: &PortSpec,
    candidates: &[(&EndpointSpec, u16)],
    local: bool,
    topology: &Topology,
) -> Backends {
    let hints = if local {
        Hints::None
    } else {
        topology.mode(candidates)
    };
    let placed = |e: &EndpointSpec| {
        if local {
            topology.is_local(e)
        } else {
            hints.admit(e)
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
            .filter(|(e, _)| e.serving && e.terminating && (!local || topology.is_local(e)))
            .collect();
    }
    let mut out: Vec<Backend> = chosen
        .into_iter()
        .map(|(e, target)| Backend {
            addr: e.addr,
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
    let only_elsewhere = out.is_empty()
        && candidates
            .iter()
            .any(|(e, _)| e.ready || (e.serving && e.terminating));
    let why = |e: &EndpointSpec| {
        let usable = e.ready || (e.serving && e.terminating);
        if !usable {
            UNUSED_NOT_READY
        } else if local && !topology.is_local(e) {
            UNUSED_NOT_LOCAL
        } else if !e.ready {
            UNUSED_TERMINATING
        } else if matches!(hints, Hints::Node(_)) {
            UNUSED_OTHER_NODE
        } else {
            UNUSED_OTHER_ZONE
        }
    };
    let used: HashSet<(IpAddr, u16)> = out.iter().map(|b| (b.addr, b.port)).collect();
    let mut unused: Vec<UnusedEndpoint> = candidates
        .iter()
        .filter(|(e, target)| !used.contains(&(e.addr, *target)))
        .map(|(e, target)| UnusedEndpoint {
            addr: e.addr,
            port: *target,
            proto: port.protocol.ip_proto(),
            reason: why(e),
        })
        .collect();
    unused.sort();
    unused.dedup_by_key(|u| (u.addr, u.port));
    let still_serving = unused
        .iter()
        .filter(|u| u.reason != UNUSED_NOT_READY)
        .map(|u| (u.addr, u.port))
        .collect();
    Backends {
        terminating: terminating && !out.is_empty(),
        backends: out,
        unused,
        still_serving,
        only_elsewhere,
    }
}

/// The endpoints of a service port in `cluster_ip`'s family: those of its slices' matching
/// ports, with the target port, one per address and port. Where slices list one twice (a pod's IP reused while its
/// old pod terminates), kube-proxy keeps a local one over a remote one, and a
/// non-terminating one over a terminating one (kubernetes PR #135593: a new pod is not
/// served through its predecessor's conditions); else the first, in slice name order.
fn candidates<'a>(
    port: &PortSpec,
    slices: &[&'a SliceSpec],
    cluster_ip: IpAddr,
    topology: &Topology,
) -> Vec<(&'a EndpointSpec, u16)> {
    let mut out: Vec<(&'a EndpointSpec, u16)> = Vec::new();
    let mut at: HashMap<(IpAddr, u16), usize> = HashMap::new();
    let all = slices.iter().filter_map(|s| {
        let p = s
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)?;
        let of_family = s
            .endpoints
            .iter()
            .filter(|e| e.addr.is_ipv4() == cluster_ip.is_ipv4());
        Some(of_family.map(move |e| (e, p.port)))
    });
    for (e, target) in all.flatten() {
        match at.entry((e.addr, target)) {
            Entry::Vacant(slot) => {
                slot.insert(out.len());
                out.push((e, target));
            }
            Entry::Occupied(slot) => {
                let kept = &mut out[*slot.get()];
                let better = (topology.is_local(e) && !topology.is_local(kept.0))
                    || (kept.0.terminating && !e.terminating);
                if better {
                    *kept = (e, target);
                }
            }
        }
    }
    out
}

/// One frontend of a service port: the entries its service programs when it owns the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendEntry {
    pub key: ServiceKey,
    pub service: DesiredService,
    /// What clients inside the cluster get, under `in_cluster_key(key)`: an external
    /// frontend with `externalTrafficPolicy: Local`. Boxed: rare, and one is kept per
    /// frontend of every service.
    pub in_cluster: Option<Box<DesiredService>>,
}

/// What one service asks for, before conflicts with other services are resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// In claim order: within a service, the first frontend with a key wins it.
    pub frontends: Vec<FrontendEntry>,
    pub health_check: Option<(u16, HealthCheck)>,
}

/// A load-balancer frontend's `loadBalancerSourceRanges` at `addr`: those of its family, as
/// kube-proxy's proxier per family takes them — a list without any of this family leaves
/// this family's frontend open; a list none of whose ranges parsed keeps every one closed.
fn source_ranges(spec: &ServiceSpec, frontend: Frontend, addr: IpAddr) -> Option<Vec<Cidr>> {
    let ranges = spec
        .source_ranges
        .as_ref()
        .filter(|_| frontend == Frontend::LoadBalancer)?;
    let of_family: Vec<Cidr> = ranges
        .iter()
        .filter(|r| r.is_ipv4() == addr.is_ipv4())
        .copied()
        .collect();
    (ranges.is_empty() || !of_family.is_empty()).then_some(of_family)
}

/// The key of a frontend's in-cluster scope entry.
pub fn in_cluster_key(key: &ServiceKey) -> ServiceKey {
    ServiceKey {
        scope: SCOPE_INTERNAL,
        ..*key
    }
}

/// `Service namespace/name`, the object a rejection names.
pub fn service_object(namespace: &str, name: &str) -> String {
    format!("Service {namespace}/{name}")
}

/// Translates one service and its slices into every frontend of every port and its health
/// check.
pub fn translate(spec: &ServiceSpec, slices: &[&SliceSpec], topology: &Topology) -> Translation {
    let mut out = Translation::default();
    // A dual-stack service is two services to the datapath, one per family (as kube-proxy
    // runs one proxier per family), each with the endpoints of its family's slices.
    let per_family = spec
        .cluster_ips
        .iter()
        .flat_map(|ip| spec.ports.iter().map(move |p| (*ip, p)));
    for (cluster_ip, port) in per_family {
        let name = port_display_name(spec, port);
        let candidates = candidates(port, slices, cluster_ip, topology);
        let internal = backends(port, &candidates, spec.internal_local, topology);
        let external = backends(port, &candidates, spec.external_local, topology);
        // kube-proxy sends pods and nodes reaching a Local external frontend to every
        // endpoint, not only this node's: a pod calling its ingress's load-balancer IP
        // must not depend on where the ingress controller runs.
        let cluster_wide = spec
            .external_local
            .then(|| backends(port, &candidates, false, topology));
        for (frontend, key) in frontends(spec, port, cluster_ip) {
            let (chosen, local) = if frontend.is_external() {
                (&external, spec.external_local)
            } else {
                (&internal, spec.internal_local)
            };
            let in_cluster = cluster_wide.as_ref().filter(|_| frontend.is_external());
            let service = DesiredService {
                name: name.clone(),
                frontend,
                service_type: spec.service_type,
                backends: chosen.backends.clone(),
                affinity_timeout_secs: spec.affinity_timeout_secs,
                terminating: chosen.terminating,
                internal_local: spec.internal_local,
                external_local: spec.external_local,
                masquerade: frontend.is_external() && !spec.external_local,
                drop_if_empty: local && chosen.only_elsewhere,
                internal_scope: in_cluster.is_some(),
                source_ranges: source_ranges(spec, frontend, key.addr),
                unused: if frontend == Frontend::ClusterIp {
                    chosen.unused.clone()
                } else {
                    Vec::new()
                },
                still_serving: chosen.still_serving.clone(),
            };
            let in_cluster = in_cluster.map(|all| {
                Box::new(DesiredService {
                    backends: all.backends.clone(),
                    terminating: all.terminating,
                    masquerade: false,
                    drop_if_empty: false,
                    internal_scope: false,
                    // Pods reaching a load-balancer IP with source ranges go through tc,
                    // which checks their address against the frontend's entry.
                    source_ranges: None,
                    unused: Vec::new(),
                    still_serving: all.still_serving.clone(),
                    ..service.clone()
                })
            });
            out.frontends.push(FrontendEntry {
                key,
                service,
                in_cluster,
            });
        }
    }
    if let Some(port) = spec.health_check_node_port {
        // The primary family's endpoints: a dual-stack pod is one endpoint, not two.
        let primary = spec.cluster_ips.first().is_none_or(IpAddr::is_ipv4);
        let local_endpoints = slices
            .iter()
            .flat_map(|s| &s.endpoints)
            .filter(|e| e.ready && topology.is_local(e) && e.addr.is_ipv4() == primary)
            .map(|e| e.addr)
            .collect::<BTreeSet<_>>()
            .len();
        let check = HealthCheck {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            local_endpoints,
        };
        out.health_check = Some((port, check));
    }
    // Translations are kept for every service: no spare capacity.
    out.frontends.shrink_to_fit();
    out
}

/// `object`'s frontend `entry` loses its key to the service port named `owner`.
pub fn frontend_conflict(object: &str, entry: &FrontendEntry, owner: &str) -> Rejection {
    let key = &entry.key;
    let frontend = match entry.service.frontend {
        Frontend::NodePort => format!("node port {}", key.port),
        _ => socket_text(key.addr, key.port),
    };
    let protocol = Protocol::from_ip_proto(key.proto).map_or("?", Protocol::name);
    Rejection::new(
        object,
        entry.service.frontend.field(),
        Reason::Conflict,
        format!("{frontend}/{protocol} is already served for {owner}"),
    )
}

/// `object`'s health-check node port `port` is already `owner`'s.
pub fn health_check_conflict(object: &str, port: u16, owner: &HealthCheck) -> Rejection {
    Rejection::new(
        object,
        "spec.healthCheckNodePort",
        Reason::Conflict,
        format!(
            "port {port} is already the health check of {}/{}",
            owner.namespace, owner.name
        ),
    )
}

/// The whole desired state at once: every service translated, conflicting frontends (same
/// address, port and protocol) and health-check ports rejected, the first one by name
/// wins. The incremental controller must always end where this does; the tests use it as
/// their oracle.
#[cfg(test)]
pub fn desired_state<'a>(
    services: impl Iterator<Item = &'a ServiceSpec>,
    slices: impl Iterator<Item = &'a SliceSpec>,
    topology: &Topology,
) -> Desired {
    let mut by_service: BTreeMap<(&str, &str), Vec<&SliceSpec>> = BTreeMap::new();
    for slice in slices {
        by_service
            .entry((&slice.namespace, &slice.service))
            .or_default()
            .push(slice);
    }
    let mut desired = Desired::default();
    for spec in services {
        let slices = by_service
            .get(&(spec.namespace.as_str(), spec.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let object = service_object(&spec.namespace, &spec.name);
        let translation = translate(spec, slices, topology);
        for entry in translation.frontends {
            if let Some(owner) = desired.services.get(&entry.key) {
                let rejection = frontend_conflict(&object, &entry, &owner.name);
                desired.rejections.push(rejection);
                continue;
            }
            if let Some(view) = entry.in_cluster {
                desired.services.insert(in_cluster_key(&entry.key), *view);
            }
            desired.services.insert(entry.key, entry.service);
        }
        if let Some((port, check)) = translation.health_check {
            match desired.health_checks.get(&port) {
                Some(owner) => {
                    let rejection = health_check_conflict(&object, port, owner);
                    desired.rejections.push(rejection);
                }
                None => {
                    desired.health_checks.insert(port, check);
                }
            }
        }
    }
    desired
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proxy_common::NODE_PORT_ADDR;

    use super::*;

    /// The last byte of an IPv4 address, as the tests name endpoints.
    fn last(addr: IpAddr) -> u8 {
        match addr {
            IpAddr::V4(a) => a.octets()[3],
            IpAddr::V6(a) => a.octets()[15],
        }
    }

    fn port(name: &str, port: u16, protocol: Protocol) -> PortSpec {
        PortSpec {
            name: name.into(),
            port,
            protocol,
            node_port: None,
        }
    }

    fn svc(name: &str, ip: [u8; 4], ports: Vec<PortSpec>) -> ServiceSpec {
        ServiceSpec {
            namespace: "ns".into(),
            name: name.into(),
            service_type: ServiceType::ClusterIp,
            cluster_ips: vec![Ipv4Addr::from(ip).into()],
            ports,
            external_ips: vec![],
            load_balancer_ips: vec![],
            source_ranges: None,
            affinity_timeout_secs: None,
            internal_local: false,
            external_local: false,
            health_check_node_port: None,
        }
    }

    /// The desired services and rejections.
    fn desired<'a>(
        services: impl Iterator<Item = &'a ServiceSpec>,
        slices: impl Iterator<Item = &'a SliceSpec>,
        topology: &Topology,
    ) -> (DesiredState, Vec<Rejection>) {
        let desired = desired_state(services, slices, topology);
        (desired.services, desired.rejections)
    }

    fn ep(last: u8, ready: bool, serving: bool, terminating: bool) -> EndpointSpec {
        EndpointSpec {
            addr: Ipv4Addr::new(10, 244, 0, last).into(),
            ready,
            serving,
            terminating,
            node_name: None,
            zone_hints: vec![],
            node_hints: vec![],
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
        d.backends.iter().map(|b| (last(b.addr), b.port)).collect()
    }

    #[test]
    fn a_dual_stack_service_is_served_per_family_with_that_familys_endpoints() {
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut web = svc("web", [10, 96, 0, 10], vec![port("", 80, Protocol::Tcp)]);
        web.cluster_ips.insert(0, v6("fd00:96::10"));
        web.external_ips = vec![v6("2001:db8::20"), IpAddr::from([203, 0, 113, 20])];
        let slices = [
            slice(
                "web-4",
                "web",
                vec![port("", 8080, Protocol::Tcp)],
                vec![ep(2, true, true, false)],
            ),
            slice(
                "web-6",
                "web",
                vec![port("", 8080, Protocol::Tcp)],
                vec![EndpointSpec {
                    addr: v6("fd00:244::2"),
                    ..ep(0, true, true, false)
                }],
            ),
        ];
        let (state, rejections) = desired([web].iter(), slices.iter(), &Topology::default());
        assert!(rejections.is_empty());
        let served: Vec<(String, Vec<IpAddr>)> = state
            .iter()
            .map(|(k, d)| {
                let addr = crate::family::socket_text(k.addr, k.port);
                (addr, d.backends.iter().map(|b| b.addr).collect())
            })
            .collect();
        let four = vec![IpAddr::from([10, 244, 0, 2])];
        let six = vec![v6("fd00:244::2")];
        assert_eq!(
            served,
            [
                ("10.96.0.10:80".to_owned(), four.clone()),
                ("203.0.113.20:80".to_owned(), four),
                ("[2001:db8::20]:80".to_owned(), six.clone()),
                ("[fd00:96::10]:80".to_owned(), six),
            ]
        );
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
        let (state, rejections) = desired([&web].into_iter(), slices.iter(), &Topology::default());
        assert!(rejections.is_empty());
        let http = &state[&ServiceKey::new([10, 96, 0, 10].into(), 80, 6)];
        assert_eq!(http.name, "ns/web:http");
        assert_eq!(addrs(http), [(1, 8080), (2, 8080)]);
        let dns = &state[&ServiceKey::new([10, 96, 0, 10].into(), 53, 17)];
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
        let (state, _) = desired([&web].into_iter(), with_ready.iter(), &Topology::default());
        assert_eq!(addrs(state.values().next().unwrap()), [(1, 80)]);
        // The terminating one still serves: its flows are kept (kube-proxy's conntrack
        // clean-up, `TestCleanStaleEntries`, keeps what serving endpoints answer); the
        // not-serving one's are not.
        assert_eq!(
            state.values().next().unwrap().still_serving,
            [(IpAddr::from([10, 244, 0, 2]), 80)]
        );

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
        let (state, _) = desired([&web].into_iter(), draining.iter(), &Topology::default());
        assert_eq!(addrs(state.values().next().unwrap()), [(2, 80)]);
    }

    #[test]
    fn service_without_slices_has_no_backends() {
        let web = svc("web", [10, 96, 0, 10], vec![port("", 80, Protocol::Tcp)]);
        let (state, _) = desired([&web].into_iter(), std::iter::empty(), &Topology::default());
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
        let (state, rejections) = desired(
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
        let (state, _) = desired([&web].into_iter(), slices.iter(), &here());
        assert_eq!(addrs(state.values().next().unwrap()), [(1, 80)]);
        // No local endpoint: nothing (kube-proxy drops), even though node-b has one.
        let remote = [slice(
            "s",
            "web",
            vec![port("", 80, Protocol::Tcp)],
            vec![placed(2, true, false, "node-b", &[])],
        )];
        let (state, _) = desired([&web].into_iter(), remote.iter(), &here());
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
        let (state, _) = desired([&web].into_iter(), draining.iter(), &here());
        assert_eq!(addrs(state.values().next().unwrap()), [(1, 80)]);
    }

    #[test]
    fn the_cluster_ip_lists_each_endpoint_it_does_not_use_with_why() {
        let web = ServiceSpec {
            internal_local: true,
            ..svc("web", [10, 96, 0, 10], vec![port("", 80, Protocol::Tcp)])
        };
        let not_ready = EndpointSpec {
            node_name: Some("node-a".into()),
            ..ep(4, false, false, false)
        };
        let slices = [slice(
            "s",
            "web",
            vec![port("", 80, Protocol::Tcp)],
            vec![
                placed(1, true, false, "node-a", &[]),
                placed(2, true, false, "node-b", &[]),
                placed(3, false, true, "node-a", &[]),
                not_ready,
            ],
        )];
        let (state, _) = desired([&web].into_iter(), slices.iter(), &here());
        let cluster_ip = state.values().next().unwrap();
        assert_eq!(addrs(cluster_ip), [(1, 80)]);
        let why: Vec<(u8, &str)> = cluster_ip
            .unused
            .iter()
            .map(|u| (last(u.addr), unused_reason(u.reason)))
            .collect();
        assert_eq!(
            why,
            [(2, "not_local"), (3, "terminating"), (4, "not_ready")]
        );
        // Zone hints for another zone.
        let web = svc("web", [10, 96, 0, 10], vec![port("", 80, Protocol::Tcp)]);
        let hinted = [slice(
            "s",
            "web",
            vec![port("", 80, Protocol::Tcp)],
            vec![
                placed(1, true, false, "node-a", &["zone-a"]),
                placed(2, true, false, "node-b", &["zone-b"]),
            ],
        )];
        let (state, _) = desired([&web].into_iter(), hinted.iter(), &here());
        let unused = &state.values().next().unwrap().unused;
        assert_eq!(unused.len(), 1);
        assert_eq!(
            (last(unused[0].addr), unused_reason(unused[0].reason)),
            (2, "other_zone")
        );
    }

    #[test]
    fn zone_hints_apply_only_when_complete_and_matching() {
        let web = svc("web", [10, 96, 0, 10], vec![port("", 80, Protocol::Tcp)]);
        let pick = |eps: Vec<EndpointSpec>| {
            let slices = [slice("s", "web", vec![port("", 80, Protocol::Tcp)], eps)];
            addrs(
                desired([&web].into_iter(), slices.iter(), &here())
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
        // kube-proxy's TestCategorizeEndpoints, "unready endpoint" and "only unready
        // endpoints in same zone (should not filter)": only ready endpoints count.
        let unready_here = vec![
            placed(1, false, false, "node-a", &["zone-a"]),
            placed(2, true, false, "node-b", &["zone-b"]),
            placed(3, true, false, "node-c", &["zone-c"]),
        ];
        assert_eq!(pick(unready_here), [(2, 80), (3, 80)]);
    }

    /// `placed`, with node hints.
    fn for_nodes(last: u8, node: &str, zones: &[&str], nodes: &[&str]) -> EndpointSpec {
        EndpointSpec {
            node_hints: nodes.iter().map(|n| n.to_string()).collect(),
            ..placed(last, true, false, node, zones)
        }
    }

    #[test]
    fn node_hints_come_before_zone_hints_and_apply_only_when_complete_and_matching() {
        // kube-proxy's topologyModeFromHints (PreferSameNode, then PreferSameZone) and its
        // TestCategorizeEndpoints cases for node hints.
        let web = svc("web", [10, 96, 0, 10], vec![port("", 80, Protocol::Tcp)]);
        let pick = |eps: Vec<EndpointSpec>| {
            let slices = [slice("s", "web", vec![port("", 80, Protocol::Tcp)], eps)];
            let (state, _) = desired([&web].into_iter(), slices.iter(), &here());
            let d = state.values().next().unwrap().clone();
            let why: Vec<(u8, &str)> = d
                .unused
                .iter()
                .map(|u| (last(u.addr), unused_reason(u.reason)))
                .collect();
            (addrs(&d), why)
        };
        // Node hints for this node win over zone hints for its zone.
        let (used, why) = pick(vec![
            for_nodes(1, "node-a", &["zone-a"], &["node-a"]),
            for_nodes(2, "node-b", &["zone-a"], &["node-b"]),
        ]);
        assert_eq!(used, [(1, 80)]);
        assert_eq!(why, [(2, "other_node")]);
        // An endpoint without node hints: they are ignored, zone hints apply.
        let (used, _) = pick(vec![
            for_nodes(1, "node-a", &["zone-a"], &["node-a"]),
            for_nodes(2, "node-b", &["zone-a"], &[]),
            for_nodes(3, "node-c", &["zone-c"], &["node-c"]),
        ]);
        assert_eq!(used, [(1, 80), (2, 80)]);
        // No endpoint hinted for this node: zone hints.
        let (used, why) = pick(vec![
            for_nodes(1, "node-b", &["zone-a"], &["node-b"]),
            for_nodes(2, "node-c", &["zone-c"], &["node-c"]),
        ]);
        assert_eq!(used, [(1, 80)]);
        assert_eq!(why, [(2, "other_zone")]);
    }

    #[test]
    fn an_address_listed_twice_is_served_through_its_non_terminating_entry() {
        // kube-proxy's endpointslicecache addEndpoints since kubernetes PR #135593: an old
        // pod terminating (serving) in one slice, a new not-ready pod with its IP in
        // another: the IP is not served through the old pod's conditions.
        let web = svc("web", [10, 96, 0, 10], vec![port("", 80, Protocol::Tcp)]);
        let slices = [
            slice(
                "a-old",
                "web",
                vec![port("", 80, Protocol::Tcp)],
                vec![ep(1, false, true, true)],
            ),
            slice(
                "b-new",
                "web",
                vec![port("", 80, Protocol::Tcp)],
                vec![ep(1, false, false, false)],
            ),
        ];
        let (state, _) = desired([&web].into_iter(), slices.iter(), &Topology::default());
        let d = state.values().next().unwrap();
        assert!(d.backends.is_empty(), "{d:?}");
        assert_eq!(d.unused.len(), 1);
        assert_eq!(unused_reason(d.unused[0].reason), "not_ready");
        // Once the new pod is ready, it serves; in either slice order.
        let ready_new = [slices[0].clone(), {
            let mut s = slices[1].clone();
            s.endpoints[0] = ep(1, true, true, false);
            s
        }];
        for order in [[0, 1], [1, 0]] {
            let reordered = [&ready_new[order[0]], &ready_new[order[1]]];
            let (state, _) = desired(
                [&web].into_iter(),
                reordered.into_iter(),
                &Topology::default(),
            );
            assert_eq!(addrs(state.values().next().unwrap()), [(1, 80)]);
        }
        // A local entry is kept over a remote one (kube-proxy's "favor a true isLocal").
        let local_twice = [
            slice(
                "a",
                "web",
                vec![port("", 80, Protocol::Tcp)],
                vec![placed(1, true, false, "node-b", &[])],
            ),
            slice(
                "b",
                "web",
                vec![port("", 80, Protocol::Tcp)],
                vec![placed(1, true, false, "node-a", &[])],
            ),
        ];
        let (state, _) = desired([&web].into_iter(), local_twice.iter(), &here());
        let b = &state.values().next().unwrap().backends[0];
        assert_eq!(b.flags & BACKEND_FLAG_LOCAL, BACKEND_FLAG_LOCAL);
    }

    fn load_balancer(external_local: bool) -> ServiceSpec {
        ServiceSpec {
            service_type: ServiceType::LoadBalancer,
            external_ips: vec![Ipv4Addr::new(203, 0, 113, 20).into()],
            load_balancer_ips: vec![Ipv4Addr::new(203, 0, 113, 10).into()],
            external_local,
            health_check_node_port: external_local.then_some(32000),
            ..svc(
                "lb",
                [10, 96, 0, 20],
                vec![PortSpec {
                    node_port: Some(30080),
                    ..port("", 80, Protocol::Tcp)
                }],
            )
        }
    }

    fn frontend(state: &DesiredState, addr: [u8; 4], port: u16) -> &DesiredService {
        &state[&ServiceKey::new(addr.into(), port, 6)]
    }

    #[test]
    fn every_frontend_of_a_load_balancer_and_its_external_policy() {
        let slices = [slice(
            "s",
            "lb",
            vec![port("", 80, Protocol::Tcp)],
            vec![
                placed(1, true, false, "node-a", &[]),
                placed(2, true, false, "node-b", &[]),
            ],
        )];
        let (state, _) = desired([&load_balancer(false)].into_iter(), slices.iter(), &here());
        assert_eq!(state.len(), 4, "cluster IP, node port, external IP, LB IP");
        let cluster = frontend(&state, [10, 96, 0, 20], 80);
        assert_eq!(cluster.frontend, Frontend::ClusterIp);
        assert!(!cluster.masquerade, "cluster traffic is never masqueraded");
        let node_port = frontend(&state, NODE_PORT_ADDR, 30080);
        assert_eq!(node_port.frontend, Frontend::NodePort);
        assert!(node_port.masquerade);
        assert!(
            !node_port.internal_scope,
            "Cluster: one backend set for every client"
        );
        assert_eq!(addrs(node_port), [(1, 80), (2, 80)]);
        assert_eq!(node_port.backends[0].flags, BACKEND_FLAG_LOCAL);
        assert_eq!(node_port.backends[1].flags, 0);
        assert_eq!(
            frontend(&state, [203, 0, 113, 20], 80).frontend,
            Frontend::ExternalIp
        );
        assert_eq!(
            frontend(&state, [203, 0, 113, 10], 80).frontend,
            Frontend::LoadBalancer
        );

        // Local: external frontends keep node-a's endpoint only and are not masqueraded;
        // the cluster IP keeps both.
        let (state, _) = desired([&load_balancer(true)].into_iter(), slices.iter(), &here());
        let node_port = frontend(&state, NODE_PORT_ADDR, 30080);
        assert_eq!(addrs(node_port), [(1, 80)]);
        assert!(!node_port.masquerade);
        assert_eq!(addrs(frontend(&state, [203, 0, 113, 10], 80)), [(1, 80)]);
        assert_eq!(
            addrs(frontend(&state, [10, 96, 0, 20], 80)),
            [(1, 80), (2, 80)]
        );
        // ...and clients inside the cluster reach every endpoint through each external
        // frontend's in-cluster scope, without masquerade or drop.
        assert_eq!(
            state.len(),
            4 + 3,
            "three external frontends, in-cluster scope each"
        );
        for addr in [NODE_PORT_ADDR, [203, 0, 113, 20], [203, 0, 113, 10]] {
            let port = if addr == NODE_PORT_ADDR { 30080 } else { 80 };
            let outside = frontend(&state, addr, port);
            assert!(outside.internal_scope, "{addr:?}");
            let inside = &state[&ServiceKey {
                scope: SCOPE_INTERNAL,
                ..ServiceKey::new(addr.into(), port, 6)
            }];
            assert_eq!(addrs(inside), [(1, 80), (2, 80)], "{addr:?}");
            assert_eq!(inside.frontend, outside.frontend);
            assert!(!inside.masquerade && !inside.drop_if_empty && !inside.internal_scope);
        }
    }

    #[test]
    fn local_policy_without_local_endpoints_drops_and_health_check_counts_them() {
        let remote_only = [slice(
            "s",
            "lb",
            vec![port("", 80, Protocol::Tcp)],
            vec![placed(2, true, false, "node-b", &[])],
        )];
        let lb = load_balancer(true);
        let d = desired_state([&lb].into_iter(), remote_only.iter(), &here());
        let node_port = frontend(&d.services, NODE_PORT_ADDR, 30080);
        assert!(node_port.backends.is_empty());
        assert!(
            node_port.drop_if_empty,
            "endpoints elsewhere: drop, not reject"
        );
        assert_eq!(d.health_checks[&32000].local_endpoints, 0);
        assert_eq!(d.health_checks[&32000].name, "lb");

        // No endpoint anywhere: reject as for any service without endpoints.
        let d = desired_state([&lb].into_iter(), std::iter::empty(), &here());
        assert!(!frontend(&d.services, NODE_PORT_ADDR, 30080).drop_if_empty);

        let local = [slice(
            "s",
            "lb",
            vec![port("", 80, Protocol::Tcp)],
            vec![
                placed(1, true, false, "node-a", &[]),
                placed(3, false, true, "node-a", &[]),
            ],
        )];
        let d = desired_state([&lb].into_iter(), local.iter(), &here());
        assert_eq!(
            d.health_checks[&32000].local_endpoints, 1,
            "ready ones only"
        );
    }

    #[test]
    fn node_port_and_health_check_conflicts_are_rejected() {
        let a = load_balancer(true);
        let b = ServiceSpec {
            name: "other".into(),
            cluster_ips: vec![Ipv4Addr::new(10, 96, 0, 21).into()],
            external_ips: vec![],
            load_balancer_ips: vec![],
            ..load_balancer(true)
        };
        let d = desired_state([&a, &b].into_iter(), std::iter::empty(), &here());
        let fields: Vec<&str> = d.rejections.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.ports.nodePort", "spec.healthCheckNodePort"],
            "{:?}",
            d.rejections
        );
        assert_eq!(frontend(&d.services, NODE_PORT_ADDR, 30080).name, "ns/lb");
    }
}
