//! Validation of Kubernetes objects into the proxy's model: what of a `Service` and an
//! `EndpointSlice` the datapath serves, with every problem reported as a `Rejection`.
//! Pure functions: every source (manifests, the API server) feeds objects through here.
use std::net::IpAddr;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::{
    cidr::Cidr,
    rejection::{Reason, Rejection},
};

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// The API server's upper bound for the affinity timeout.
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86_400;
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services with this label belong to the named proxy, not to the default one.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services (and their slices) with this label are headless: nothing to proxy.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Source ranges of a LoadBalancer whose `spec.loadBalancerSourceRanges` is empty.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::IPPROTO_TCP,
            Protocol::Udp => proxy_common::IPPROTO_UDP,
        }
    }

    pub fn from_ip_proto(proto: u8) -> Option<Self> {
        match proto {
            proxy_common::IPPROTO_TCP => Some(Protocol::Tcp),
            proxy_common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    #[default]
    ClusterIp,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn code(self) -> u8 {
        match self {
            ServiceType::ClusterIp => proxy_common::SERVICE_TYPE_CLUSTER_IP,
            ServiceType::NodePort => proxy_common::SERVICE_TYPE_NODE_PORT,
            ServiceType::LoadBalancer => proxy_common::SERVICE_TYPE_LOAD_BALANCER,
        }
    }

    pub fn from_code(code: u8) -> Self {
        match code {
            proxy_common::SERVICE_TYPE_NODE_PORT => ServiceType::NodePort,
            proxy_common::SERVICE_TYPE_LOAD_BALANCER => ServiceType::LoadBalancer,
            _ => ServiceType::ClusterIp,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// A Service as the datapath serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub service_type: ServiceType,
    /// `spec.clusterIPs`: one per family (two for a dual-stack service), the primary first.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<PortSpec>,
    /// `spec.externalIPs`, of the service's families.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of a LoadBalancer, of the service's families,
    /// except `ipMode: Proxy` ones (the load balancer proxies, so its traffic arrives
    /// addressed to the node).
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` of a LoadBalancer (else its
    /// `service.beta.kubernetes.io/load-balancer-source-ranges` annotation), both families:
    /// `None` when none is given; `Some` of an empty list lets no client in (a list none of
    /// whose ranges parses does not open the load balancer).
    pub source_ranges: Option<Vec<Cidr>>,
    /// `Some(timeout)` for `sessionAffinity: ClientIP`.
    pub affinity_timeout_secs: Option<u32>,
    /// `internalTrafficPolicy: Local`: only endpoints on this node.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`: external traffic only to endpoints on this node,
    /// with the client's address kept.
    pub external_local: bool,
    /// `spec.healthCheckNodePort` of an `externalTrafficPolicy: Local` LoadBalancer.
    pub health_check_node_port: Option<u16>,
}

/// A service port or an EndpointSlice port; `name` is `""` when unnamed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// The service port's `nodePort` (NodePort and LoadBalancer services).
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service: String,
    pub ports: Vec<PortSpec>,
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Of the slice's `addressType`.
    pub addr: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// `hints.forZones`: the zones whose clients this endpoint should serve.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes` (`trafficDistribution: PreferSameNode`): the nodes whose clients
    /// this endpoint should serve.
    pub node_hints: Vec<String>,
}

/// What validation made of an object.
#[derive(Debug)]
pub enum Validated<T> {
    /// Served, possibly without some parts that `warnings` explain.
    Valid(T, Vec<Rejection>),
    /// Legitimately not served by this proxy (e.g. a headless service); says why.
    Ignored(String),
    /// Not served: the whole object is invalid.
    Invalid(Vec<Rejection>),
}

fn object_name(
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String, String) {
    let namespace = meta
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let name = meta.name.clone().unwrap_or_default();
    let display = format!("{kind} {namespace}/{name}");
    (namespace, name, display)
}

fn parse_protocol(
    protocol: Option<&str>,
    object: &str,
    field: &str,
) -> Result<Protocol, Rejection> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err(Rejection::new(
            object,
            field,
            Reason::UnsupportedProtocol,
            "SCTP is not supported by this proxy; the port is not served",
        )),
        other => Err(Rejection::new(
            object,
            field,
            Reason::UnsupportedProtocol,
            format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)"),
        )),
    }
}

fn parse_port(port: i32, object: &str, field: &str) -> Result<u16, Rejection> {
    u16::try_from(port).ok().filter(|p| *p != 0).ok_or_else(|| {
        Rejection::new(
            object,
            field,
            Reason::InvalidPort,
            format!("{port} is not a port number (1-65535)"),
        )
    })
}

/// Validates a Service for the proxy named `proxy_name` (`None`: the default proxy, which
/// serves only services without a `service.kubernetes.io/service-proxy-name` label).
pub fn validate_service(svc: &Service, proxy_name: Option<&str>) -> Validated<ServiceSpec> {
    let (namespace, name, object) = object_name("Service", &svc.metadata);
    if name.is_empty() {
        return Validated::Invalid(vec![Rejection::new(
            &object,
            "metadata.name",
            Reason::MissingField,
            "a Service needs a name",
        )]);
    }
    let label = |key: &str| {
        svc.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(key))
            .map(String::as_str)
    };
    if label(SERVICE_PROXY_NAME_LABEL) != proxy_name {
        return Validated::Ignored(format!(
            "{object}: labelled {SERVICE_PROXY_NAME_LABEL}={}; served by another proxy",
            label(SERVICE_PROXY_NAME_LABEL).unwrap_or("<none>")
        ));
    }
    if label(HEADLESS_LABEL).is_some() {
        return Validated::Ignored(format!(
            "{object}: labelled {HEADLESS_LABEL}; nothing to proxy"
        ));
    }
    let Some(spec) = &svc.spec else {
        return Validated::Invalid(vec![Rejection::new(
            &object,
            "spec",
            Reason::MissingField,
            "a Service needs a spec",
        )]);
    };
    let service_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => {
            return Validated::Ignored(format!(
                "{object}: type ExternalName is DNS-only; nothing to proxy"
            ));
        }
        Some(other) => {
            return Validated::Invalid(vec![Rejection::new(
                &object,
                "spec.type",
                Reason::InvalidType,
                format!("unknown service type {other:?}"),
            )]);
        }
    };
    // Dual-stack services list one address per family in clusterIPs (clusterIPs[0] ==
    // clusterIP); a single-stack one may only set clusterIP.
    let cluster_ips: Vec<&str> = match (&spec.cluster_ips, spec.cluster_ip.as_deref()) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip],
        _ => vec![],
    };
    if cluster_ips
        .first()
        .is_none_or(|ip| ip.is_empty() || *ip == "None")
    {
        return Validated::Ignored(format!(
            "{object}: headless (no clusterIP); nothing to proxy"
        ));
    }
    let mut warnings = Vec::new();
    let mut parsed = Vec::new();
    for (i, ip) in cluster_ips.iter().enumerate() {
        let field = if spec.cluster_ips.is_some() {
            format!("spec.clusterIPs[{i}]")
        } else {
            "spec.clusterIP".to_owned()
        };
        match ip.parse::<IpAddr>() {
            // One per family, as the API server guarantees; a second of a family is ignored.
            Ok(ip) if parsed.iter().any(|p: &IpAddr| p.is_ipv4() == ip.is_ipv4()) => {
                warnings.push(Rejection::new(
                    &object,
                    field,
                    Reason::Conflict,
                    format!("a second {} cluster IP ({ip}) is ignored", family_name(ip)),
                ))
            }
            Ok(ip) => parsed.push(ip),
            Err(_) => {
                return Validated::Invalid(vec![Rejection::new(
                    &object,
                    field,
                    Reason::InvalidAddress,
                    format!("{ip:?} is not an IP address"),
                )]);
            }
        }
    }
    let cluster_ips = parsed;
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Validated::Invalid(vec![Rejection::new(
                &object,
                "spec.internalTrafficPolicy",
                Reason::InvalidPolicy,
                format!("{other:?} is neither Cluster nor Local"),
            )]);
        }
    };
    let external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Validated::Invalid(vec![Rejection::new(
                &object,
                "spec.externalTrafficPolicy",
                Reason::InvalidPolicy,
                format!("{other:?} is neither Cluster nor Local"),
            )]);
        }
    };
    let affinity_timeout_secs = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_SECS),
                Some(t) if t > 0 && t as u32 <= MAX_AFFINITY_TIMEOUT_SECS => Some(t as u32),
                Some(t) => {
                    return Validated::Invalid(vec![Rejection::new(
                        &object,
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        Reason::InvalidAffinity,
                        format!("{t} is outside 1-{MAX_AFFINITY_TIMEOUT_SECS}"),
                    )]);
                }
            }
        }
        Some(other) => {
            return Validated::Invalid(vec![Rejection::new(
                &object,
                "spec.sessionAffinity",
                Reason::InvalidAffinity,
                format!("{other:?} is neither None nor ClientIP"),
            )]);
        }
    };

    let mut ports = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let parsed = parse_protocol(
            port.protocol.as_deref(),
            &object,
            &format!("{field}.protocol"),
        )
        .and_then(|protocol| {
            let node_port = match (service_type, port.node_port) {
                (ServiceType::ClusterIp, _) | (_, None) => None,
                (_, Some(n)) => Some(parse_port(n, &object, &format!("{field}.nodePort"))?),
            };
            Ok(PortSpec {
                name: port.name.clone().unwrap_or_default(),
                port: parse_port(port.port, &object, &format!("{field}.port"))?,
                protocol,
                node_port,
            })
        })
        .and_then(|p| {
            match ports
                .iter()
                .any(|q: &PortSpec| q.port == p.port && q.protocol == p.protocol)
            {
                true => Err(Rejection::new(
                    &object,
                    &field,
                    Reason::Conflict,
                    format!("port {}/{} is listed twice", p.port, p.protocol.name()),
                )),
                false => Ok(p),
            }
        });
        match parsed {
            Ok(p) => ports.push(p),
            Err(r) => warnings.push(r),
        }
    }
    if ports.is_empty() {
        warnings.push(Rejection::new(
            &object,
            "spec.ports",
            Reason::MissingField,
            "no servable port",
        ));
        return Validated::Invalid(warnings);
    }
    let external_ips = ip_list(
        spec.external_ips.iter().flatten().map(String::as_str),
        &cluster_ips,
        &object,
        "spec.externalIPs",
        &mut warnings,
    );
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let load_balancer_ips = match service_type {
        ServiceType::LoadBalancer => ip_list(
            ingress
                .into_iter()
                .flatten()
                .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|i| i.ip.as_deref()),
            &cluster_ips,
            &object,
            "status.loadBalancer.ingress",
            &mut warnings,
        ),
        _ => Vec::new(),
    };
    let source_ranges = match service_type {
        ServiceType::LoadBalancer => source_ranges(svc, &object, &mut warnings),
        _ => None,
    };
    let health_check_node_port = match (external_local, spec.health_check_node_port) {
        (true, Some(port)) => match parse_port(port, &object, "spec.healthCheckNodePort") {
            Ok(port) => Some(port),
            Err(r) => {
                warnings.push(r);
                None
            }
        },
        _ => None,
    };
    // Specs are held for every service: no spare capacity.
    ports.shrink_to_fit();
    Validated::Valid(
        ServiceSpec {
            namespace,
            name,
            service_type,
            cluster_ips,
            ports,
            external_ips,
            load_balancer_ips,
            source_ranges,
            affinity_timeout_secs,
            internal_local,
            external_local,
            health_check_node_port,
        },
        warnings,
    )
}

/// kube-proxy's source ranges of a LoadBalancer: the field, else the annotation
/// (comma-separated), both families. Garbage becomes warnings.
fn source_ranges(svc: &Service, object: &str, warnings: &mut Vec<Rejection>) -> Option<Vec<Cidr>> {
    let field = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_ref())
        .filter(|r| !r.is_empty());
    let (path, ranges): (String, Vec<&str>) = match field {
        Some(ranges) => (
            "spec.loadBalancerSourceRanges".to_owned(),
            ranges.iter().map(String::as_str).collect(),
        ),
        None => {
            let annotation = svc
                .metadata
                .annotations
                .as_ref()?
                .get(SOURCE_RANGES_ANNOTATION)?;
            let ranges: Vec<&str> = annotation
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .collect();
            if ranges.is_empty() {
                return None;
            }
            (
                format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"),
                ranges,
            )
        }
    };
    let mut out = Vec::new();
    for (i, text) in ranges.into_iter().enumerate() {
        match text.parse::<Cidr>() {
            Ok(cidr) if !out.contains(&cidr) => out.push(cidr),
            Ok(_) => {}
            Err(detail) => warnings.push(Rejection::new(
                object,
                format!("{path}[{i}]"),
                Reason::InvalidAddress,
                detail,
            )),
        }
    }
    out.sort();
    Some(out)
}

/// "IPv4" or "IPv6", as Kubernetes names the families.
pub fn family_name(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// The addresses of a list that are of a family of `cluster_ips` (kube-proxy serves a
/// service's addresses in its own families only); others and garbage become warnings.
fn ip_list<'a>(
    addrs: impl Iterator<Item = &'a str>,
    cluster_ips: &[IpAddr],
    object: &str,
    field: &str,
    warnings: &mut Vec<Rejection>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (i, addr) in addrs.enumerate() {
        match addr.parse::<IpAddr>() {
            Ok(ip) if out.contains(&ip) => {}
            Ok(ip) if cluster_ips.iter().any(|c| c.is_ipv4() == ip.is_ipv4()) => out.push(ip),
            Ok(ip) => warnings.push(Rejection::new(
                object,
                format!("{field}[{i}]"),
                Reason::UnsupportedFamily,
                format!(
                    "{ip} is {}, not a family of the service (ipFamilies); not served",
                    family_name(ip)
                ),
            )),
            Err(_) => warnings.push(Rejection::new(
                object,
                format!("{field}[{i}]"),
                Reason::InvalidAddress,
                format!("{addr:?} is not an IP address"),
            )),
        }
    }
    out
}

pub fn validate_slice(slice: &EndpointSlice) -> Validated<SliceSpec> {
    let (namespace, name, object) = object_name("EndpointSlice", &slice.metadata);
    if name.is_empty() {
        return Validated::Invalid(vec![Rejection::new(
            &object,
            "metadata.name",
            Reason::MissingField,
            "an EndpointSlice needs a name",
        )]);
    }
    let labels = slice.metadata.labels.as_ref();
    let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        return Validated::Ignored(format!(
            "{object}: no {SERVICE_NAME_LABEL} label; not a Service's slice"
        ));
    };
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return Validated::Ignored(format!(
            "{object}: labelled {HEADLESS_LABEL}; nothing to proxy"
        ));
    }
    let ipv4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        "FQDN" => return Validated::Ignored(format!("{object}: FQDN endpoints are not proxied")),
        other => {
            return Validated::Invalid(vec![Rejection::new(
                &object,
                "addressType",
                Reason::InvalidAddress,
                format!("unknown address type {other:?}"),
            )]);
        }
    };
    let mut warnings = Vec::new();
    let mut ports = Vec::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        let Some(number) = port.port else {
            // An EndpointSlice port without a number means "all ports"; Services never use it.
            warnings.push(Rejection::new(
                &object,
                format!("{field}.port"),
                Reason::MissingField,
                "port without a number is not served",
            ));
            continue;
        };
        let parsed = parse_protocol(
            port.protocol.as_deref(),
            &object,
            &format!("{field}.protocol"),
        )
        .and_then(|protocol| {
            Ok(PortSpec {
                name: port.name.clone().unwrap_or_default(),
                port: parse_port(number, &object, &format!("{field}.port"))?,
                protocol,
                node_port: None,
            })
        });
        match parsed {
            Ok(p) => ports.push(p),
            Err(r) => warnings.push(r),
        }
    }
    let mut endpoints = Vec::new();
    for (i, endpoint) in slice.endpoints.iter().flatten().enumerate() {
        // Like kube-proxy, use the first address: all addresses of an endpoint are fungible.
        let field = format!("endpoints[{i}].addresses[0]");
        let Some(addr) = endpoint.addresses.first() else {
            warnings.push(Rejection::new(
                &object,
                field,
                Reason::MissingField,
                "endpoint without an address",
            ));
            continue;
        };
        let addr = match addr.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv4() == ipv4 => ip,
            _ => {
                warnings.push(Rejection::new(
                    &object,
                    field,
                    Reason::InvalidAddress,
                    format!("{addr:?} is not an {} address", slice.address_type),
                ));
                continue;
            }
        };
        let conditions = endpoint.conditions.as_ref();
        // As kube-proxy reads them (endpointslicecache.go): an unset ready or serving means
        // true (whatever ready says), an unset terminating false.
        let hints = endpoint.hints.as_ref();
        endpoints.push(EndpointSpec {
            addr,
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            node_name: endpoint.node_name.clone(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        });
    }
    ports.shrink_to_fit();
    endpoints.shrink_to_fit();
    Validated::Valid(
        SliceSpec {
            namespace,
            name,
            service: service.clone(),
            ports,
            endpoints,
        },
        warnings,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).unwrap()
    }

    const WEB: &str = "
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
";

    #[test]
    fn valid_service_with_defaults() {
        let Validated::Valid(spec, warnings) = validate_service(&service(WEB), None) else {
            panic!()
        };
        assert!(warnings.is_empty());
        assert_eq!(spec.namespace, "shop");
        assert_eq!(spec.cluster_ips, [IpAddr::from([10, 96, 0, 10])]);
        assert_eq!(
            spec.ports[0],
            PortSpec {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                node_port: None,
            }
        );
        assert_eq!(spec.ports[1].protocol, Protocol::Udp);
        assert_eq!(spec.affinity_timeout_secs, None);
    }

    #[test]
    fn affinity_timeout_default_and_explicit() {
        let s = service(
            "metadata: {name: a}\nspec: {clusterIP: 10.96.0.1, sessionAffinity: ClientIP, ports: [{port: 80}]}",
        );
        let Validated::Valid(spec, _) = validate_service(&s, None) else {
            panic!()
        };
        assert_eq!(spec.namespace, "default");
        assert_eq!(
            spec.affinity_timeout_secs,
            Some(DEFAULT_AFFINITY_TIMEOUT_SECS)
        );
        let s = service(
            "metadata: {name: a}\nspec: {clusterIP: 10.96.0.1, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}, ports: [{port: 80}]}",
        );
        let Validated::Valid(spec, _) = validate_service(&s, None) else {
            panic!()
        };
        assert_eq!(spec.affinity_timeout_secs, Some(5));
    }

    #[test]
    fn invalid_cluster_ip_names_the_field() {
        let s = service(
            "metadata: {name: bad, namespace: x}\nspec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}",
        );
        let Validated::Invalid(r) = validate_service(&s, None) else {
            panic!()
        };
        assert_eq!(
            r[0].to_string(),
            "Service x/bad: spec.clusterIP: \"10.96.0.999\" is not an IP address"
        );
        assert_eq!(r[0].reason, Reason::InvalidAddress);
    }

    #[test]
    fn bad_ports_are_dropped_one_by_one() {
        let s = service(
            "metadata: {name: m}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}, {port: 70000}, {port: 9, protocol: SCTP}, {port: 80}]}",
        );
        let Validated::Valid(spec, warnings) = validate_service(&s, None) else {
            panic!()
        };
        assert_eq!(spec.ports.len(), 1);
        let fields: Vec<_> = warnings
            .iter()
            .map(|w| (w.field.as_str(), w.reason))
            .collect();
        assert_eq!(
            fields,
            [
                ("spec.ports[1].port", Reason::InvalidPort),
                ("spec.ports[2].protocol", Reason::UnsupportedProtocol),
                ("spec.ports[3]", Reason::Conflict),
            ]
        );
    }

    #[test]
    fn headless_and_external_name_are_ignored_not_rejected() {
        for yaml in [
            "metadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}",
            "metadata: {name: e}\nspec: {type: ExternalName, externalName: example.org}",
        ] {
            assert!(
                matches!(
                    validate_service(&service(yaml), None),
                    Validated::Ignored(_)
                ),
                "{yaml}"
            );
        }
    }

    #[test]
    fn proxy_name_and_headless_labels_are_honoured() {
        let labelled = service(
            "metadata: {name: a, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}",
        );
        assert!(matches!(
            validate_service(&labelled, None),
            Validated::Ignored(_)
        ));
        assert!(matches!(
            validate_service(&labelled, Some("other")),
            Validated::Valid(..)
        ));
        let plain =
            service("metadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}");
        assert!(matches!(
            validate_service(&plain, Some("other")),
            Validated::Ignored(_)
        ));
        let headless = service(
            "metadata: {name: a, labels: {service.kubernetes.io/headless: ''}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}",
        );
        assert!(matches!(
            validate_service(&headless, None),
            Validated::Ignored(_)
        ));
    }

    #[test]
    fn dual_stack_serves_both_families_and_their_addresses_only() {
        let s = service(
            "metadata: {name: d}\nspec: {type: LoadBalancer, clusterIP: 'fd00::10', clusterIPs: ['fd00::10', 10.96.0.10], ipFamilies: [IPv6, IPv4], internalTrafficPolicy: Local, externalIPs: ['2001:db8::1', 203.0.113.1], ports: [{port: 80}]}",
        );
        let Validated::Valid(spec, warnings) = validate_service(&s, None) else {
            panic!()
        };
        let v6: IpAddr = "fd00::10".parse().unwrap();
        assert_eq!(spec.cluster_ips, [v6, IpAddr::from([10, 96, 0, 10])]);
        assert_eq!(spec.external_ips.len(), 2);
        assert!(spec.internal_local);
        assert!(warnings.is_empty(), "{warnings:?}");
        // A single-stack service's addresses of the other family are not served.
        let s = service(
            "metadata: {name: s}\nspec: {clusterIP: 'fd00::11', externalIPs: ['2001:db8::1', 203.0.113.1], ports: [{port: 80}]}",
        );
        let Validated::Valid(spec, warnings) = validate_service(&s, None) else {
            panic!()
        };
        assert_eq!(spec.cluster_ips, ["fd00::11".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            spec.external_ips,
            ["2001:db8::1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(warnings[0].field, "spec.externalIPs[1]");
        assert_eq!(warnings[0].reason, Reason::UnsupportedFamily);
    }

    #[test]
    fn ipv6_slices_hold_ipv6_endpoints_only() {
        let s = slice(
            "
metadata: {name: web-6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- addresses: ['fd00:244::2']
- addresses: [10.244.1.3]
",
        );
        let Validated::Valid(spec, warnings) = validate_slice(&s) else {
            panic!()
        };
        assert_eq!(spec.endpoints.len(), 1);
        assert_eq!(
            spec.endpoints[0].addr,
            "fd00:244::2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(warnings[0].field, "endpoints[1].addresses[0]");
    }

    #[test]
    fn invalid_affinity_is_rejected() {
        let s = service(
            "metadata: {name: a}\nspec: {clusterIP: 10.96.0.1, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]}",
        );
        let Validated::Invalid(r) = validate_service(&s, None) else {
            panic!()
        };
        assert_eq!(
            r[0].field,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        );
    }

    #[test]
    fn slice_conditions_follow_kubernetes_defaults() {
        let s = slice(
            "
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.1.2]
  nodeName: node-a
  hints: {forZones: [{name: zone-a}]}
- addresses: [10.244.1.3]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [not-an-ip]
- addresses: [10.244.1.4]
  conditions: {ready: false}
  hints: {forNodes: [{name: node-b}]}
",
        );
        let Validated::Valid(spec, warnings) = validate_slice(&s) else {
            panic!()
        };
        assert_eq!(spec.service, "web");
        let ep =
            |last, ready, serving, terminating, node: Option<&str>, zones: &[&str]| EndpointSpec {
                addr: IpAddr::from([10, 244, 1, last]),
                ready,
                serving,
                terminating,
                node_name: node.map(str::to_owned),
                zone_hints: zones.iter().map(|z| z.to_string()).collect(),
                node_hints: Vec::new(),
            };
        assert_eq!(
            spec.endpoints[0],
            ep(2, true, true, false, Some("node-a"), &["zone-a"])
        );
        assert_eq!(spec.endpoints[1], ep(3, false, true, true, None, &[]));
        // kube-proxy reads an unset serving as true, whatever ready says.
        assert_eq!(
            spec.endpoints[2],
            EndpointSpec {
                node_hints: vec!["node-b".to_owned()],
                ..ep(4, false, true, false, None, &[])
            }
        );
        assert_eq!(spec.endpoints.len(), 3);
        assert_eq!(warnings[0].field, "endpoints[2].addresses[0]");
    }

    #[test]
    fn load_balancer_with_local_policy_node_ports_and_external_addresses() {
        let svc = service(
            "metadata: {name: lb}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.20\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  externalIPs: [203.0.113.20, 2001:db8::1, bogus]\n  ports: [{port: 80, nodePort: 30080}, {port: 53, protocol: UDP, nodePort: 70000}]\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.10}, {ip: 203.0.113.11, ipMode: Proxy}, {hostname: lb.example}]}}",
        );
        let Validated::Valid(spec, warnings) = validate_service(&svc, None) else {
            panic!()
        };
        assert_eq!(spec.service_type, ServiceType::LoadBalancer);
        assert!(spec.external_local);
        assert_eq!(spec.health_check_node_port, Some(32000));
        assert_eq!(spec.external_ips, [IpAddr::from([203, 0, 113, 20])]);
        // ipMode: Proxy ingress points are the load balancer's own: traffic arrives at nodes.
        assert_eq!(spec.load_balancer_ips, [IpAddr::from([203, 0, 113, 10])]);
        assert_eq!(spec.ports[0].node_port, Some(30080));
        let fields: Vec<&str> = warnings.iter().map(|w| w.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.ports[1].nodePort",
                "spec.externalIPs[1]",
                "spec.externalIPs[2]"
            ],
            "{warnings:?}"
        );
    }

    #[test]
    fn load_balancer_source_ranges_from_the_field_else_the_annotation() {
        let ranges = |yaml: &str| {
            let Validated::Valid(spec, warnings) = validate_service(&service(yaml), None) else {
                panic!()
            };
            let list = spec
                .source_ranges
                .map(|r| r.iter().map(Cidr::to_string).collect::<Vec<_>>());
            (list, warnings.iter().map(|w| w.reason).collect::<Vec<_>>())
        };
        let lb = "spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.20\n  ports: [{port: 80}]\n";
        assert_eq!(
            ranges(&format!("metadata: {{name: lb}}\n{lb}")),
            (None, vec![])
        );
        assert_eq!(
            ranges(&format!(
                "metadata: {{name: lb}}\n{lb}  loadBalancerSourceRanges: [10.0.0.0/8, 2001:db8::/32, 192.168.1.7/24, bogus]\n"
            )),
            (
                Some(vec![
                    "10.0.0.0/8".into(),
                    "192.168.1.0/24".into(),
                    "2001:db8::/32".into()
                ]),
                vec![Reason::InvalidAddress]
            )
        );
        // kube-proxy reads the annotation when the field is empty.
        let annotated = format!(
            "metadata: {{name: lb, annotations: {{{SOURCE_RANGES_ANNOTATION}: '203.0.113.0/24, 198.51.100.0/24'}}}}\n{lb}"
        );
        assert_eq!(
            ranges(&annotated).0,
            Some(vec!["198.51.100.0/24".into(), "203.0.113.0/24".into()])
        );
        // None parses: nobody is let in (rather than everybody).
        assert_eq!(
            ranges(&format!(
                "metadata: {{name: lb}}\n{lb}  loadBalancerSourceRanges: [bogus]\n"
            )),
            (Some(vec![]), vec![Reason::InvalidAddress])
        );
        // Not a LoadBalancer: ignored.
        assert_eq!(
            ranges("metadata: {name: c}\nspec:\n  clusterIP: 10.96.0.21\n  ports: [{port: 80}]\n  loadBalancerSourceRanges: [10.0.0.0/8]\n").0,
            None
        );
    }

    #[test]
    fn unknown_type_or_external_policy_is_rejected() {
        for (spec, field) in [
            ("type: Weird, clusterIP: 10.96.0.1", "spec.type"),
            (
                "type: NodePort, clusterIP: 10.96.0.1, externalTrafficPolicy: Nearby",
                "spec.externalTrafficPolicy",
            ),
        ] {
            let svc = service(&format!(
                "metadata: {{name: x}}\nspec: {{{spec}, ports: [{{port: 80}}]}}"
            ));
            let Validated::Invalid(r) = validate_service(&svc, None) else {
                panic!("{spec} should be invalid")
            };
            assert_eq!(r[0].field, field);
        }
    }
}
