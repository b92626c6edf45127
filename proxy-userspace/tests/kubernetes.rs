//! The agent in Kubernetes mode against a real kube-apiserver (`KUBECONFIG`), with real
//! traffic through the namespace world: pods 1-3 serve as backends, pod 4 is the client.
//! `cargo xtask test` starts the API server and sets PROXY_K8S_TESTS=required, which makes
//! a missing or unreachable API server a failure instead of a skip.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use proxy::testbed::{Agent, BACKEND_PORT, Family, World};
use serde_json::{Value, json};

const CLIENT: usize = 4;
static NAMESPACES: AtomicUsize = AtomicUsize::new(0);

struct Cluster {
    rt: tokio::runtime::Runtime,
    client: Client,
    kubeconfig: String,
    namespace: String,
}

/// Whether a test that cannot run against the given cluster fails rather than skips.
fn required() -> bool {
    std::env::var("PROXY_K8S_TESTS").is_ok_and(|v| v == "required")
}

/// A fresh namespace on the test API server, or `None` (skip) when there is none and none
/// is required.
fn cluster() -> Option<Cluster> {
    let required = required();
    let Ok(kubeconfig) = std::env::var("KUBECONFIG") else {
        assert!(
            !required,
            "PROXY_K8S_TESTS=required but KUBECONFIG is not set"
        );
        eprintln!("skipping: no KUBECONFIG (cargo xtask test provides an API server)");
        return None;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reachable = rt.block_on(async {
        let client = proxy::kubernetes::client(
            Some(kubeconfig.as_ref()),
            None,
            &proxy::rest_client_metrics::RestClientMetrics::new().unwrap(),
        )
        .await?
        .0;
        tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await??;
        anyhow::Ok(client)
    });
    let client = match reachable {
        Ok(client) => client,
        Err(e) if !required => {
            eprintln!("skipping: API server of {kubeconfig} unreachable: {e:#}");
            return None;
        }
        Err(e) => panic!(
            "PROXY_K8S_TESTS=required but the API server of {kubeconfig} is unreachable: {e:#}"
        ),
    };
    let namespace = format!(
        "pt-{}-{}",
        std::process::id(),
        NAMESPACES.fetch_add(1, Ordering::SeqCst)
    );
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
    rt.block_on(Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns))
        .expect("creating the test namespace");
    Some(Cluster {
        rt,
        client,
        kubeconfig,
        namespace,
    })
}

fn service_object(name: &str, labels: Value, affinity: bool) -> Service {
    let mut spec = json!({
        "ports": [
            {"name": "http", "port": 80, "targetPort": "web"},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": BACKEND_PORT},
        ]
    });
    if affinity {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 600}});
    }
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "spec": spec}))
        .unwrap()
}

/// A slice of `service` with endpoints (address, ready); the "http" port is the named
/// targetPort "web" resolved to BACKEND_PORT. Its address type is that of the endpoints
/// (IPv4 for none).
fn slice_object<A: Into<IpAddr> + Copy>(
    name: &str,
    service: &str,
    endpoints: &[(A, bool)],
) -> EndpointSlice {
    let address_type = match endpoints.first().map(|(addr, _)| (*addr).into()) {
        Some(IpAddr::V6(_)) => "IPv6",
        _ => "IPv4",
    };
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(addr, ready)| json!({"addresses": [(*addr).into().to_string()], "conditions": {"ready": ready}, "nodeName": "node-a"}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}, {"name": "dns", "port": BACKEND_PORT, "protocol": "UDP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

impl Cluster {
    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn slices(&self) -> Api<EndpointSlice> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Creates a service and returns its allocated ClusterIP.
    fn create_service(&self, service: &Service) -> String {
        self.try_create_service(service)
            .expect("creating a Service")
            .swap_remove(0)
    }

    /// Creates a service and returns its allocated ClusterIPs (one per family).
    fn try_create_service(&self, service: &Service) -> kube::Result<Vec<String>> {
        let created = self
            .rt
            .block_on(self.services().create(&PostParams::default(), service))?;
        Ok(created
            .spec
            .and_then(|s| s.cluster_ips)
            .expect("allocated clusterIPs"))
    }

    /// Creates `service` dual-stack and returns its ClusterIPs, IPv4's first; on a cluster
    /// without an IPv6 service range (`cargo xtask test`'s has one) IPv4's alone, unless
    /// the Kubernetes tests are required.
    fn create_dual_stack(&self, service: &Service) -> Vec<(Family, String)> {
        let dual = with_families(service.clone(), "RequireDualStack", &["IPv4", "IPv6"]);
        let ips = match self.try_create_service(&dual) {
            Ok(ips) => ips,
            Err(e) if !required() => {
                eprintln!("IPv4 only: the cluster has no dual-stack service ranges: {e}");
                vec![self.create_service(service)]
            }
            Err(e) => panic!("creating a dual-stack Service: {e}"),
        };
        Family::BOTH.into_iter().zip(ips).collect()
    }

    /// For each of `vips`' families, a slice (`family_slice`) of service `name` over the
    /// world's pods `pods`, ready.
    fn create_family_slices(
        &self,
        world: &World,
        name: &str,
        vips: &[(Family, String)],
        pods: &[usize],
    ) {
        for (family, _) in vips {
            let endpoints = ready_pods(world, *family, pods);
            let slice = family_slice(name, *family);
            self.create_slice(&slice_object(&slice, name, &endpoints));
        }
    }

    fn create_slice(&self, slice: &EndpointSlice) {
        self.rt
            .block_on(self.slices().create(&PostParams::default(), slice))
            .expect("creating an EndpointSlice");
    }

    fn set_endpoints<A: Into<IpAddr> + Copy>(
        &self,
        slice: &str,
        service: &str,
        endpoints: &[(A, bool)],
    ) {
        let patch =
            Patch::Merge(json!({"endpoints": slice_object(slice, service, endpoints).endpoints}));
        self.rt
            .block_on(self.slices().patch(slice, &PatchParams::default(), &patch))
            .expect("updating an EndpointSlice");
    }

    fn delete_slice(&self, name: &str) {
        self.rt
            .block_on(self.slices().delete(name, &DeleteParams::default()))
            .expect("deleting an EndpointSlice");
    }

    fn delete_service(&self, name: &str) {
        self.rt
            .block_on(self.services().delete(name, &DeleteParams::default()))
            .expect("deleting a Service");
    }

    /// The API server's URL in the kubeconfig.
    fn server(&self) -> String {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("reading the kubeconfig");
        kubeconfig.clusters[0]
            .cluster
            .as_ref()
            .and_then(|c| c.server.clone())
            .expect("a server URL")
    }

    /// Makes the API server reachable in the node namespace, at the same address; its port.
    fn forward_api_server(&self, world: &mut World) -> u16 {
        let port: u16 = self
            .server()
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .expect("a server port");
        // Already forwarded when the agent restarts.
        let _ = world.forward_to_node(port);
        port
    }

    /// Starts the agent in the node namespace, with the API server forwarded into it.
    fn start_agent(&self, world: &mut World) -> Agent {
        self.forward_api_server(world);
        world
            .start_agent_with(
                &[
                    "--kubeconfig",
                    &self.kubeconfig,
                    "--namespace",
                    &self.namespace,
                ],
                true,
            )
            .expect("starting the agent in Kubernetes mode")
    }
}

/// The EndpointSlice of service `name` for `family`: `NAME-ipv4`, `NAME-ipv6`.
fn family_slice(name: &str, family: Family) -> String {
    format!("{name}-{}", family.name().to_lowercase())
}

/// The world's pods `pods` as ready endpoints of `family`.
fn ready_pods(world: &World, family: Family, pods: &[usize]) -> Vec<(IpAddr, bool)> {
    pods.iter()
        .map(|i| (world.pod(*i).addr(family), true))
        .collect()
}

/// Pods 1-3 serving as backend-1..3 (their addresses), pod 4 as client.
fn world() -> (World, Vec<Ipv4Addr>) {
    World::three_backends(proxy::test_binaries!()).expect("building the namespace world")
}

/// `vip:port` (`[vip]:port` for IPv6).
fn at(vip: &str, port: u16) -> String {
    SocketAddr::new(vip.parse().expect("a ClusterIP"), port).to_string()
}

/// Backends that answered `count` TCP connections to `vip:80` (failures are counted as
/// "<kind>").
fn tcp_spread(world: &World, vip: &str, hooked: bool, count: u32) -> BTreeMap<String, usize> {
    let results = world
        .probe(
            CLIENT,
            hooked,
            &[
                "tcp",
                "--to",
                &at(vip, 80),
                "--count",
                &count.to_string(),
                "--timeout-ms",
                "1000",
            ],
        )
        .unwrap();
    let mut spread = BTreeMap::new();
    for r in results {
        let who = if r["ok"] == true {
            r["backend"].as_str().unwrap().to_owned()
        } else {
            format!("<{}>", r["kind"].as_str().unwrap())
        };
        *spread.entry(who).or_default() += 1;
    }
    spread
}

/// Polls `check` for up to 5 s; the datapath follows the API within milliseconds, the
/// margin is for a loaded CI machine.
fn eventually<T: std::fmt::Debug>(
    what: &str,
    probe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    eventually_within(Duration::from_secs(5), what, probe, check)
}

fn eventually_within<T: std::fmt::Debug>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = probe();
        if check(&seen) {
            return seen;
        }
        assert!(Instant::now() < deadline, "{what}: still {seen:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn backends(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn answered(spread: &BTreeMap<String, usize>) -> BTreeSet<String> {
    spread.keys().cloned().collect()
}

#[test]
fn services_follow_the_api_create_scale_unready_affinity_delete_and_labels() {
    let Some(cluster) = cluster() else { return };
    let (mut world, pods) = world();
    let [p1, p2, p3]: [Ipv4Addr; 3] = pods.try_into().unwrap();
    let _agent = cluster.start_agent(&mut world);

    // Create: reachable over both ports, the named targetPort resolved through the slice.
    let vip = cluster.create_service(&service_object("web", json!({}), false));
    cluster.create_slice(&slice_object(
        "web-1",
        "web",
        &[(p1, true), (p2, true), (p3, true)],
    ));
    let all = backends(&["backend-1", "backend-2", "backend-3"]);
    eventually(
        "web answers from all backends",
        || tcp_spread(&world, &vip, true, 60),
        |s| answered(s) == all,
    );
    let udp = world
        .probe(
            CLIENT,
            true,
            &["udp", "--to", &at(&vip, 53), "--count", "30"],
        )
        .unwrap();
    assert!(
        udp.iter()
            .all(|r| r["ok"] == true && r["peer"] == at(&vip, 53)),
        "{udp:?}"
    );

    // The slices put the endpoints on node-a, the agent's node.
    let detail: Value = serde_json::from_str(
        &world
            .proxyctl(&[
                "service",
                "get",
                &format!("{}/web", cluster.namespace),
                "-o",
                "json",
            ])
            .unwrap(),
    )
    .unwrap();
    assert!(
        detail[0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["node_local"] == true),
        "{detail}"
    );

    // Scale down to two endpoints: the spread follows.
    cluster.set_endpoints("web-1", "web", &[(p1, true), (p2, true)]);
    let two = backends(&["backend-1", "backend-2"]);
    eventually(
        "spread follows the scale-down",
        || tcp_spread(&world, &vip, true, 40),
        |s| answered(s) == two,
    );
    // tc path too.
    eventually(
        "tc path follows",
        || tcp_spread(&world, &vip, false, 30),
        |s| answered(s) == two,
    );

    // Not ready: no new connections to it.
    cluster.set_endpoints("web-1", "web", &[(p1, true), (p2, false)]);
    eventually(
        "only the ready endpoint",
        || tcp_spread(&world, &vip, true, 30),
        |s| answered(s) == backends(&["backend-1"]),
    );

    // Session affinity.
    let sticky = cluster.create_service(&service_object("sticky", json!({}), true));
    cluster.create_slice(&slice_object(
        "sticky-1",
        "sticky",
        &[(p1, true), (p2, true), (p3, true)],
    ));
    let spread = eventually(
        "sticky reachable",
        || tcp_spread(&world, &sticky, true, 20),
        |s| s.keys().all(|k| k.starts_with("backend")),
    );
    assert_eq!(
        spread.len(),
        1,
        "ClientIP affinity keeps one backend: {spread:?}"
    );

    // Labels: another proxy's service and a headless-labelled one are not served.
    let other = cluster.create_service(&service_object(
        "other-proxy",
        json!({"service.kubernetes.io/service-proxy-name": "other"}),
        false,
    ));
    cluster.create_slice(&slice_object("other-proxy-1", "other-proxy", &[(p1, true)]));
    let headless = cluster.create_service(&service_object(
        "labelled-headless",
        json!({"service.kubernetes.io/headless": ""}),
        false,
    ));
    cluster.create_slice(&slice_object(
        "labelled-headless-1",
        "labelled-headless",
        &[(p1, true)],
    ));

    // Delete the endpoints: refused at once; delete the service: no longer served.
    cluster.delete_slice("web-1");
    eventually(
        "refused without endpoints",
        || tcp_spread(&world, &vip, true, 3),
        |s| answered(s) == backends(&["<refused>"]),
    );
    cluster.delete_service("web");
    let listed = || {
        world
            .proxyctl(&["service", "list", "--output", "json"])
            .unwrap()
    };
    let rows: Value = serde_json::from_str(&eventually("web gone from the maps", listed, |l| {
        !l.contains("\"web\"")
    }))
    .unwrap();
    let names: BTreeSet<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["sticky"].into(),
        "the labelled services were never programmed: {rows}"
    );
    for vip in [other, headless] {
        assert!(
            tcp_spread(&world, &vip, true, 2)
                .keys()
                .all(|k| k.starts_with('<')),
            "{vip} is not served"
        );
    }
}

/// `service` with the given `ipFamilyPolicy` and, if any, `ipFamilies`.
fn with_families(mut service: Service, policy: &str, families: &[&str]) -> Service {
    let spec = service.spec.get_or_insert_default();
    spec.ip_family_policy = Some(policy.into());
    if !families.is_empty() {
        spec.ip_families = Some(families.iter().map(|f| f.to_string()).collect());
    }
    service
}

/// The service list's (name, ip_family, ready_backends) rows.
fn family_rows(world: &World) -> BTreeSet<(String, String, u64)> {
    let rows: Value = serde_json::from_str(
        &world
            .proxyctl(&["service", "list", "--output", "json"])
            .unwrap(),
    )
    .unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["port_name"] == "http")
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["ip_family"].as_str().unwrap().to_owned(),
                r["ready_backends"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn dual_stack_and_ipv6_services_follow_the_api_per_family() {
    let Some(cluster) = cluster() else { return };
    let (mut world, pods) = world();
    let v6: Vec<Ipv6Addr> = (1..=3).map(|i| world.pod(i).ip6).collect();
    let _agent = cluster.start_agent(&mut world);

    // A dual-stack Service: one ClusterIP per family (cargo xtask test's API server has an
    // IPv6 service range; another cluster may not).
    let dual = with_families(
        service_object("web", json!({}), false),
        "RequireDualStack",
        &["IPv4", "IPv6"],
    );
    let ips = match cluster.try_create_service(&dual) {
        Ok(ips) => ips,
        Err(e) if !required() => {
            eprintln!("skipping: the cluster has no dual-stack service ranges: {e}");
            return;
        }
        Err(e) => panic!("creating a dual-stack Service: {e}"),
    };
    let [vip4, vip6]: [String; 2] = ips.try_into().unwrap();
    assert!(vip4.parse::<Ipv4Addr>().is_ok() && vip6.parse::<Ipv6Addr>().is_ok());
    let v4_slice: Vec<(Ipv4Addr, bool)> = pods.iter().map(|p| (*p, true)).collect();
    cluster.create_slice(&slice_object("web-v4", "web", &v4_slice));
    cluster.create_slice(&slice_object(
        "web-v6",
        "web",
        &[(v6[0], true), (v6[1], true), (v6[2], true)],
    ));
    let all = backends(&["backend-1", "backend-2", "backend-3"]);
    for vip in [&vip4, &vip6] {
        eventually(
            &format!("{vip} answers from all backends"),
            || tcp_spread(&world, vip, true, 60),
            |s| answered(s) == all,
        );
    }
    let udp = world
        .probe(
            CLIENT,
            true,
            &["udp", "--to", &at(&vip6, 53), "--count", "30"],
        )
        .unwrap();
    assert!(
        udp.iter()
            .all(|r| r["ok"] == true && r["peer"] == at(&vip6, 53)),
        "{udp:?}"
    );
    let row = |family: &str, ready: u64| ("web".to_owned(), family.to_owned(), ready);
    assert_eq!(family_rows(&world), [row("IPv4", 3), row("IPv6", 3)].into());

    // Each family follows its own slice: the IPv6 one scaled down and one endpoint unready
    // changes the IPv6 ClusterIP only, through the hooks and through tc.
    cluster.set_endpoints("web-v6", "web", &[(v6[0], true), (v6[1], false)]);
    let first = backends(&["backend-1"]);
    for hooked in [true, false] {
        eventually(
            "the IPv6 ClusterIP follows its slice",
            || tcp_spread(&world, &vip6, hooked, 20),
            |s| answered(s) == first,
        );
    }
    assert_eq!(answered(&tcp_spread(&world, &vip4, true, 60)), all);
    assert_eq!(family_rows(&world), [row("IPv4", 3), row("IPv6", 1)].into());

    // An IPv6-only Service with ClientIP affinity.
    let sticky = cluster.create_service(&with_families(
        service_object("sticky6", json!({}), true),
        "SingleStack",
        &["IPv6"],
    ));
    assert!(sticky.parse::<Ipv6Addr>().is_ok(), "{sticky}");
    cluster.create_slice(&slice_object(
        "sticky6-1",
        "sticky6",
        &[(v6[0], true), (v6[1], true), (v6[2], true)],
    ));
    let spread = eventually(
        "sticky6 reachable",
        || tcp_spread(&world, &sticky, true, 20),
        |s| s.keys().all(|k| k.starts_with("backend")),
    );
    assert_eq!(spread.len(), 1, "ClientIP affinity over IPv6: {spread:?}");

    // The IPv6 slice deleted: refused over IPv6 at once, IPv4 untouched; the Service
    // deleted: both families gone.
    cluster.delete_slice("web-v6");
    eventually(
        "the IPv6 ClusterIP refuses without endpoints",
        || tcp_spread(&world, &vip6, true, 3),
        |s| answered(s) == backends(&["<refused>"]),
    );
    assert_eq!(answered(&tcp_spread(&world, &vip4, true, 30)), all);
    cluster.delete_service("web");
    eventually(
        "web gone from the maps",
        || family_rows(&world),
        |rows| *rows == [("sticky6".to_owned(), "IPv6".to_owned(), 3)].into(),
    );
}

/// What the kubernetes-mixin's "Kubernetes / Proxy" dashboard queries, where it has a
/// meaning here: all but `go_goroutines` (no Go runtime) and `up` (Prometheus' own).
const MIXIN_PROXY_SERIES: [&str; 8] = [
    "kubeproxy_sync_proxy_rules_duration_seconds_count",
    "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
    "kubeproxy_network_programming_duration_seconds_count",
    "kubeproxy_network_programming_duration_seconds_bucket",
    "rest_client_requests_total",
    "rest_client_request_duration_seconds_bucket",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
];

/// The series names of a scrape's samples.
fn exported_series(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The series the chart's Grafana dashboard queries (every name written as a selector,
/// `name{...}`), but Prometheus' own `up`.
fn dashboard_series() -> BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/dashboards/ebpf-proxy.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{path} is not JSON: {e}"));
    let mut names = BTreeSet::new();
    let panels = dashboard["panels"].as_array().unwrap();
    for target in panels
        .iter()
        .filter_map(|p| p["targets"].as_array())
        .flatten()
    {
        let expr = target["expr"].as_str().unwrap();
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        for (at, _) in expr.match_indices('{') {
            let start = expr[..at].rfind(|c| !ident(c)).map_or(0, |i| i + 1);
            if start < at {
                names.insert(expr[start..at].to_owned());
            }
        }
    }
    names.remove("up");
    assert!(
        names.len() > 10,
        "too few series found in {path}: {names:?}"
    );
    names
}

#[test]
fn killed_agent_restarts_without_breaking_flows_or_rewriting_maps() {
    let Some(cluster) = cluster() else { return };
    let (mut world, _) = world();
    let agent = cluster.start_agent(&mut world);
    // Dual-stack: both families' flows and maps live through the restart.
    let vips = cluster.create_dual_stack(&service_object("web", json!({}), false));
    cluster.create_family_slices(&world, "web", &vips, &[1, 2, 3]);
    for (_, vip) in &vips {
        eventually(
            &format!("web reachable at {vip}"),
            || tcp_spread(&world, vip, true, 10),
            |s| s.keys().all(|k| k.starts_with("backend")),
        );
    }

    // Long-lived flows through both paths, TCP and UDP, of each family.
    let hold = ["--hold-ms", "6000", "--interval-ms", "100"];
    let mut flows = Vec::new();
    for (_, vip) in &vips {
        let (tcp_to, udp_to) = (at(vip, 80), at(vip, 53));
        for hooked in [true, false] {
            for (protocol, to) in [("tcp", &tcp_to), ("udp", &udp_to)] {
                let args: Vec<&str> = [protocol, "--to", to].into_iter().chain(hold).collect();
                let (handle, first) = world.spawn_probe(CLIENT, hooked, &args).unwrap();
                assert_eq!(first["ok"], true, "{first}");
                flows.push(handle);
            }
        }
    }

    world.kill(agent.pid).unwrap();
    // The datapath does not need the agent: new connections work while it is down. With the
    // probe's own timeout, 2 s, in which a lost SYN's retransmission fits (with 1 s, one
    // connection of 30 timed out once in some 25 runs under load), each failure shown whole.
    for (_, vip) in &vips {
        for hooked in [true, false] {
            let args = ["tcp", "--to", &at(vip, 80), "--count", "30"];
            for line in world.probe(CLIENT, hooked, &args).unwrap() {
                assert!(
                    line["ok"] == true
                        && line["backend"]
                            .as_str()
                            .is_some_and(|b| b.starts_with("backend")),
                    "agent down ({vip}, hooked={hooked}): {line}"
                );
            }
        }
    }

    let restarted = cluster.start_agent(&mut world);
    let ports = 2 * vips.len();
    restarted
        .wait_for_log(
            &[&format!("adopted {ports} service ports")],
            Duration::from_secs(5),
        )
        .unwrap();
    let synced = restarted
        .wait_for_log(&["synced"], Duration::from_secs(5))
        .unwrap();
    assert!(
        synced.contains(&format!(
            "0 service ports changed, 0 removed, {ports} unchanged"
        )),
        "no rewrite after a restart: {synced}"
    );
    let metrics = world.agent_http("/metrics").unwrap();
    assert!(metrics.contains("proxy_map_writes_total 0"), "{metrics}");
    // client-go's request metrics, as the "Kubernetes / Proxy" dashboard graphs them: the
    // lists and watches it made.
    let gets = metrics.lines().find(|l| {
        l.starts_with("rest_client_requests_total{code=\"200\"") && l.contains("method=\"GET\"")
    });
    assert!(
        gets.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .is_some_and(|n| n >= 2.0),
        "{metrics}"
    );
    assert!(
        metrics.contains("rest_client_request_duration_seconds_bucket{host="),
        "{metrics}"
    );
    let exported = exported_series(&metrics);
    for series in MIXIN_PROXY_SERIES {
        assert!(exported.contains(series), "no {series} in {metrics}");
    }
    for series in dashboard_series() {
        assert!(
            exported.contains(&series),
            "the dashboard queries {series}, which the agent does not export"
        );
    }

    for handle in flows {
        let summary = world.finish_probe(handle).unwrap();
        assert_eq!(
            summary["failures"], 0,
            "a flow broke across the restart: {summary}"
        );
        assert_eq!(summary["backend"], summary["last_backend"], "{summary}");
        assert!(summary["exchanges"].as_u64().unwrap() >= 40, "{summary}");
    }
}

#[test]
fn agent_keeps_serving_while_the_api_server_is_down_and_catches_up_after() {
    let Some(cluster) = cluster() else { return };
    // A private API server, so that stopping it does not disturb the other tests.
    let scripts = std::path::PathBuf::from(
        std::env::var("PROXY_K8S_SCRIPTS")
            .expect("PROXY_K8S_SCRIPTS: the shared k8s-apiserver scripts"),
    );
    let dir = std::env::temp_dir().join(format!("proxy-test-apiserver-{}", std::process::id()));
    let run = |script: &str| {
        let out = std::process::Command::new("bash")
            .arg(scripts.join(script))
            .arg(&dir)
            .arg("17443")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned()
    };
    struct Stop<F: Fn()>(F);
    impl<F: Fn()> Drop for Stop<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    let stop = || {
        let _ = std::process::Command::new("bash")
            .arg(scripts.join("stop.sh"))
            .arg(&dir)
            .status();
    };
    let _guard = Stop(|| {
        stop();
        let _ = std::fs::remove_dir_all(&dir);
    });
    let kubeconfig = run("start.sh");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt
        .block_on(proxy::kubernetes::client(
            Some(kubeconfig.as_ref()),
            None,
            &proxy::rest_client_metrics::RestClientMetrics::new().unwrap(),
        ))
        .unwrap()
        .0;
    let private = Cluster {
        rt,
        client,
        kubeconfig,
        namespace: "default".into(),
    };
    drop(cluster);
    let (mut world, _) = world();
    let agent = private.start_agent(&mut world);
    // Dual-stack (the test run's K8S_HOME configures private API servers so too).
    let vips = private.create_dual_stack(&service_object("web", json!({}), false));
    private.create_family_slices(&world, "web", &vips, &[1]);
    for (_, vip) in &vips {
        eventually(
            &format!("web reachable at {vip}"),
            || tcp_spread(&world, vip, true, 5),
            |s| answered(s) == backends(&["backend-1"]),
        );
    }

    // A crash (or a partition): SIGKILL our own API server and etcd by their PID files.
    // (A graceful stop keeps open watches alive while it drains, which is no outage.)
    for daemon in ["apiserver", "etcd"] {
        let pid: i32 = std::fs::read_to_string(dir.join(format!("{daemon}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: a process this test started.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGKILL) },
            0,
            "killing {daemon}"
        );
        let _ = std::fs::remove_file(dir.join(format!("{daemon}.pid")));
    }
    agent
        .wait_for_log(
            &[
                "source is unreachable",
                "still serving the last programmed state",
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    for (_, vip) in &vips {
        let spread = tcp_spread(&world, vip, true, 10);
        assert_eq!(
            answered(&spread),
            backends(&["backend-1"]),
            "{vip}: serving the last state while the API server is down"
        );
    }
    let metrics = world.agent_http("/metrics").unwrap();
    assert!(metrics.contains("proxy_source_connected 0"), "{metrics}");
    assert!(
        world
            .agent_http("/healthz")
            .unwrap()
            .contains("\"sourceConnected\":false")
    );

    // Said once, however often the watches retry meanwhile.
    let said = |agent: &Agent| {
        agent
            .log_lines()
            .iter()
            .filter(|l| l.contains("WARN") && l.contains("the source is unreachable"))
            .count()
    };
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(said(&agent), 1, "{}", agent.log_lines().join("\n"));

    run("start.sh");
    // The agent reconnects by itself (watch back-off) and catches up with a change made after.
    for (family, _) in &vips {
        let endpoints = ready_pods(&world, *family, &[2]);
        private.set_endpoints(&family_slice("web", *family), "web", &endpoints);
    }
    // Within the watchers' reconnect back-off.
    for (_, vip) in &vips {
        eventually_within(
            Duration::from_secs(45),
            &format!("{vip} caught up after the API server came back"),
            || tcp_spread(&world, vip, true, 5),
            |s| answered(s) == backends(&["backend-2"]),
        );
    }
    agent
        .wait_for_log(&["source is reachable again"], Duration::from_secs(30))
        .unwrap();
    assert!(
        world
            .agent_http("/healthz")
            .unwrap()
            .contains("\"sourceConnected\":true")
    );
}

#[test]
fn churn_of_services_and_endpoints_ends_with_maps_equal_to_the_api() {
    let Some(cluster) = cluster() else { return };
    let (mut world, _) = world();
    let agent = cluster.start_agent(&mut world);
    // CI size by default; PROXY_CHURN_FULL=1 runs the full scenario: 1,000 services x 10
    // endpoints, then 100 endpoint changes per second for a minute. The services are
    // dual-stack, each family's slice changing in turn.
    let full = std::env::var("PROXY_CHURN_FULL").is_ok_and(|v| v == "1");
    let (services, changes) = if full { (1000, 6000) } else { (100, 300) };
    const ENDPOINTS: u8 = 10;
    let endpoints = |family: Family, seed: usize| -> Vec<(IpAddr, bool)> {
        (0..ENDPOINTS)
            .map(|i| {
                let (third, host) = ((seed % 200) as u8, i + 1);
                let addr: IpAddr = match family {
                    Family::V4 => Ipv4Addr::new(10, 245, third, host).into(),
                    Family::V6 => {
                        Ipv6Addr::new(0xfd00, 0x245, third.into(), 0, 0, 0, 0, host.into()).into()
                    }
                };
                (addr, !(seed + i as usize).is_multiple_of(3))
            })
            .collect()
    };
    // (service, its ClusterIPs by family)
    let mut vips = Vec::new();
    for s in 0..services {
        let name = format!("svc-{s}");
        let ips = cluster.create_dual_stack(&service_object(&name, json!({}), false));
        for (family, _) in &ips {
            let slice = family_slice(&name, *family);
            cluster.create_slice(&slice_object(&slice, &name, &endpoints(*family, s)));
        }
        vips.push(ips);
    }
    // 100 endpoint changes per second.
    let mut last = BTreeMap::new();
    let started = Instant::now();
    for c in 0..changes {
        let s = (c * 7) % services;
        let family = vips[s][c % vips[s].len()].0;
        let eps = endpoints(family, s + c + 1);
        let name = format!("svc-{s}");
        cluster.set_endpoints(&family_slice(&name, family), &name, &eps);
        last.insert((s, family), eps);
        let due = started + Duration::from_millis(10 * (c as u64 + 1));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    // One real service among them still works, over each family.
    for (family, vip) in vips[0].clone() {
        let eps = ready_pods(&world, family, &[1]);
        cluster.set_endpoints(&family_slice("svc-0", family), "svc-0", &eps);
        last.insert((0, family), eps);
        eventually(
            &format!("svc-0 follows at {vip}"),
            || tcp_spread(&world, &vip, true, 3),
            |s| answered(s) == backends(&["backend-1"]),
        );
    }

    // The maps hold exactly the desired state: every service with its ready endpoints.
    let expected: BTreeMap<String, BTreeSet<IpAddr>> = vips
        .iter()
        .enumerate()
        .flat_map(|(s, ips)| ips.iter().map(move |(family, vip)| (s, *family, vip)))
        .map(|(s, family, vip)| {
            let eps = last
                .get(&(s, family))
                .cloned()
                .unwrap_or_else(|| endpoints(family, s));
            let ready = eps.into_iter().filter(|(_, ready)| *ready).map(|(a, _)| a);
            (vip.clone(), ready.collect())
        })
        .collect();
    let programmed = || {
        let maps = proxy::maps::Maps::open(&world.nodes[0].bpffs).unwrap();
        let existing = proxy::reconcile::ServiceMaps::read_existing(&maps).unwrap();
        let slots: std::collections::HashMap<_, _> = existing.slots.into_iter().collect();
        let addrs: BTreeMap<_, _> = existing.backends.into_iter().collect();
        existing
            .services
            .into_iter()
            .filter(|(key, _, _)| key.port == 80)
            .map(|(key, value, _)| {
                let set: BTreeSet<IpAddr> = (1..=value.count)
                    .map(|slot| {
                        let id = slots[&proxy_common::SlotKey {
                            service_id: value.id,
                            generation: value.generation,
                            pad: 0,
                            slot,
                        }];
                        addrs[&id].addr
                    })
                    .collect();
                (key.addr.to_string(), set)
            })
            .collect::<BTreeMap<_, _>>()
    };
    eventually("maps equal the API state", programmed, |p| *p == expected);
    let log = agent.log_lines();
    assert!(
        !log.iter().any(|l| l.contains("ERROR")),
        "no error under churn: {log:#?}"
    );
}

/// In a pod, the in-cluster configuration names the `kubernetes` Service's ClusterIP, which
/// nothing serves on a node whose service proxy has not programmed it yet (a new or
/// rebooted node once kube-proxy is gone): `--k8s-api-server` (or the address taken from
/// the kubelet's kubeconfig) reaches the API server anyway.
#[test]
fn an_agent_configured_with_the_kubernetes_cluster_ip_reaches_the_api_server_through_k8s_api_server()
 {
    let Some(cluster) = cluster() else { return };
    let (mut world, pods) = world();
    let port = cluster.forward_api_server(&mut world);
    let in_cluster = world.dir.join("in-cluster-kubeconfig");
    let text = std::fs::read_to_string(&cluster.kubeconfig).unwrap();
    std::fs::write(
        &in_cluster,
        text.replace(&cluster.server(), "https://10.96.0.1:443"),
    )
    .unwrap();
    let in_cluster = in_cluster.to_string_lossy().into_owned();
    let vip = cluster.create_service(&service_object("web", json!({}), false));
    let endpoints: Vec<(Ipv4Addr, bool)> = pods.iter().map(|p| (*p, true)).collect();
    cluster.create_slice(&slice_object("web-1", "web", &endpoints));
    let source = [
        "--kubeconfig",
        &in_cluster,
        "--namespace",
        &cluster.namespace,
    ];

    // Without: the node cannot reach the API server, so nothing is programmed, and the
    // agent says so.
    let stranded = world.spawn_agent_on(0, &source, true).unwrap();
    stranded
        .wait_for_log(&["the source is unreachable"], Duration::from_secs(15))
        .unwrap();
    let healthz = world.node_http(10256, "/healthz").unwrap();
    assert!(healthz.starts_with("HTTP/1.0 503"), "{healthz}");
    world.kill(stranded.pid).unwrap();

    let address = format!("127.0.0.1:{port}");
    for flag in [
        ["--k8s-api-server", address.as_str()],
        ["--k8s-api-server-from", cluster.kubeconfig.as_str()],
    ] {
        let args: Vec<&str> = source.iter().copied().chain(flag).collect();
        let agent = world.start_agent_on(0, &args, true).unwrap();
        agent
            .wait_for_log(
                &[&format!("the Kubernetes API at https://{address}/")],
                Duration::from_secs(1),
            )
            .unwrap();
        let all = backends(&["backend-1", "backend-2", "backend-3"]);
        eventually(
            "web answers from all backends",
            || tcp_spread(&world, &vip, true, 60),
            |s| answered(s) == all,
        );
        // The test API server has no Node objects: a --node-name that matches none is said.
        agent
            .wait_for_log(&["no Node named \"node-a\""], Duration::from_secs(5))
            .unwrap();
        world.kill(agent.pid).unwrap();
    }
}

/// `helm uninstall` deletes the agent's DaemonSet, then its pods: an agent stopped while its
/// DaemonSet still exists (an update, a restart) leaves the datapath to the next one; one
/// stopped after it is gone removes everything.
#[test]
fn an_agent_stopped_by_an_uninstall_removes_the_datapath_and_one_stopped_by_an_update_keeps_it() {
    let Some(cluster) = cluster() else { return };
    let (mut world, pods) = world();
    let daemon_sets: Api<k8s_openapi::api::apps::v1::DaemonSet> =
        Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let daemon_set = serde_json::from_value(json!({
        "metadata": {"name": "proxy"},
        "spec": {
            "selector": {"matchLabels": {"app": "proxy"}},
            "template": {"metadata": {"labels": {"app": "proxy"}}, "spec": {"containers": [{"name": "agent", "image": "proxy"}]}},
        },
    }))
    .unwrap();
    cluster
        .rt
        .block_on(daemon_sets.create(&PostParams::default(), &daemon_set))
        .expect("creating a DaemonSet");
    let vip = cluster.create_service(&service_object("web", json!({}), false));
    let endpoints: Vec<(Ipv4Addr, bool)> = pods.iter().map(|p| (*p, true)).collect();
    cluster.create_slice(&slice_object("web-1", "web", &endpoints));
    cluster.forward_api_server(&mut world);
    let owner = format!("{}/proxy", cluster.namespace);
    let args = [
        "--kubeconfig",
        &cluster.kubeconfig,
        "--namespace",
        &cluster.namespace,
        "--owner-daemonset",
        &owner,
    ];
    let bpffs = world.nodes[0].bpffs.clone();
    let all = backends(&["backend-1", "backend-2", "backend-3"]);
    // SIGTERM, as the kubelet stops a pod; the agent exits cleanly.
    let stop = |world: &mut World, pid: u32| {
        world.terminate(pid).unwrap();
        let status = world.wait_exit(pid, Duration::from_secs(10)).unwrap();
        assert!(status.success(), "{status}");
    };

    let agent = world.start_agent_on(0, &args, true).unwrap();
    stop(&mut world, agent.pid);
    assert!(bpffs.join("links").exists(), "an update keeps the datapath");
    assert_eq!(answered(&tcp_spread(&world, &vip, true, 30)), all);

    let agent = world.start_agent_on(0, &args, true).unwrap();
    cluster
        .rt
        .block_on(daemon_sets.delete("proxy", &DeleteParams::default()))
        .expect("deleting the DaemonSet");
    stop(&mut world, agent.pid);
    agent
        .wait_for_log(
            &["is gone: uninstalled, removing the datapath"],
            Duration::from_secs(1),
        )
        .unwrap();
    assert!(!bpffs.exists(), "an uninstall leaves nothing pinned");
    let cgroup = world.cgroup_programs(0).unwrap();
    assert!(cgroup.trim().is_empty(), "{cgroup}");
    let refused = tcp_spread(&world, &vip, true, 3);
    assert!(refused.keys().all(|k| k.starts_with('<')), "{refused:?}");
}

/// As kube-proxy's, `/healthz` tells load balancers to drain a node the cluster autoscaler
/// is about to delete (`nodeEligible: false`), while `/readyz` (the agent's own readiness)
/// stays 200: the datapath serves the node's pods until the end.
#[test]
fn healthz_drains_a_node_tainted_for_deletion_and_readyz_does_not() {
    let Some(cluster) = cluster() else { return };
    let (mut world, _pods) = world();
    // A Node of this test's own: the API server is shared by the tests.
    let name = format!("node-{}", cluster.namespace);
    world.nodes[0].name = name.clone();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(cluster.client.clone());
    let node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    cluster
        .rt
        .block_on(nodes.create(&PostParams::default(), &node))
        .expect("creating a Node");
    let agent = cluster.start_agent(&mut world);
    let probe = |path: &str| world.agent_http(path).unwrap();
    assert!(
        probe("/healthz").starts_with("HTTP/1.0 200"),
        "{}",
        probe("/healthz")
    );
    assert!(probe("/healthz").contains("\"nodeEligible\":true"));

    let taint = Patch::Merge(
        json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}]}}),
    );
    cluster
        .rt
        .block_on(nodes.patch(&name, &PatchParams::default(), &taint))
        .expect("tainting the Node");
    agent
        .wait_for_log(&["this node is being deleted"], Duration::from_secs(10))
        .unwrap();
    let healthz = probe("/healthz");
    assert!(healthz.starts_with("HTTP/1.0 503"), "{healthz}");
    assert!(healthz.contains("\"nodeEligible\":false"), "{healthz}");
    assert!(
        probe("/readyz").starts_with("HTTP/1.0 200"),
        "{}",
        probe("/readyz")
    );

    let untaint = Patch::Merge(json!({"spec": {"taints": null}}));
    cluster
        .rt
        .block_on(nodes.patch(&name, &PatchParams::default(), &untaint))
        .expect("removing the taint");
    eventually(
        "healthz back to 200",
        || probe("/healthz"),
        |h| h.starts_with("HTTP/1.0 200"),
    );
    let _ = cluster
        .rt
        .block_on(nodes.delete(&name, &DeleteParams::default()));
}
