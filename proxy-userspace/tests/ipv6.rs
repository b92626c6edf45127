//! IPv6 and dual-stack services through the socket hooks, with real TCP and UDP between
//! network namespaces: pods 1-3 serve as backends on their IPv4 and IPv6 (unique local)
//! addresses, pod 4 is the client, in the cgroup of the socket hooks.
use std::{collections::BTreeMap, net::Ipv6Addr, time::Instant};

use proxy::testbed::{World, endpoint_slice, ready, service_manifest};
use serde_json::Value;

const VIP6: &str = "fd00:96::10";
const VIP4: &str = "10.96.0.10";
const CLIENT: usize = 4;

/// Pods 1-3 serving as backend-1..3 (both families), pod 4 as client; the backends' IPv6
/// addresses.
fn three_backends() -> (World, Vec<Ipv6Addr>) {
    let (world, _) =
        World::three_backends(proxy::test_binaries!()).expect("building the namespace world");
    let backends = (1..=3).map(|i| world.pod(i).ip6).collect();
    (world, backends)
}

/// `[ADDRESS]:PORT`.
fn at(addr: &str, port: u16) -> String {
    std::net::SocketAddr::new(addr.parse().unwrap(), port).to_string()
}

/// How many results each backend answered; fails the test on a failed attempt.
fn spread(results: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in results {
        assert_eq!(r["ok"], true, "attempt failed: {r}");
        *counts
            .entry(r["backend"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    counts
}

#[test]
fn an_ipv6_cluster_ip_balances_tcp_and_udp_and_apps_see_the_service_address() {
    let (mut world, backends) = three_backends();
    world
        .start_agent(
            &service_manifest("web6", VIP6, None, &ready(&backends)),
            true,
        )
        .unwrap();
    let client = world.pod(CLIENT).ip6.to_string();
    let cases: [(&str, u16, &[&str]); 3] = [
        ("tcp", 80, &[]),
        ("udp", 53, &[]),
        ("udp", 53, &["--connected"]),
    ];
    for (protocol, port, extra) in cases {
        let to = at(VIP6, port);
        let mut args = vec![protocol, "--to", &to, "--count", "90"];
        args.extend_from_slice(extra);
        let results = world.probe(CLIENT, true, &args).unwrap();
        let counts = spread(&results);
        assert_eq!(
            counts.len(),
            3,
            "{protocol} {extra:?}: every backend: {counts:?}"
        );
        for r in &results {
            // getpeername()/recvfrom() report the service; the backend saw the pod itself.
            assert_eq!(r["peer"], to, "{protocol} {extra:?}: {r}");
            let saw = r["server_saw"].as_str().unwrap();
            assert!(saw.starts_with(&format!("[{client}]:")), "{r}");
        }
    }
    // Balanced at the socket: no conntrack flow, per-service counters, the IPv6 row.
    let rows: Value = serde_json::from_str(
        &world
            .proxyctl(&["service", "list", "--output", "json"])
            .unwrap(),
    )
    .unwrap();
    let http = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["port_name"] == "http")
        .unwrap();
    assert_eq!(http["ip_family"], "IPv6", "{rows}");
    assert_eq!(http["address"], VIP6, "{rows}");
    assert_eq!(http["ready_backends"], 3, "{rows}");
    assert_eq!(http["connections"], 90, "{rows}");
    let detail = world
        .proxyctl(&["service", "get", &format!("{}/TCP", at(VIP6, 80))])
        .unwrap();
    for b in &backends {
        assert!(detail.contains(&at(&b.to_string(), 8080)), "{detail}");
    }
}

#[test]
fn an_ipv6_service_without_endpoints_is_refused_at_once_by_the_hooks_and_by_tc() {
    // As kube-proxy's REJECT: ECONNREFUSED from the connect hook, ICMPv6 port unreachable
    // from tc; each counted as no_endpoints and shown by proxyctl monitor.
    let (mut world, _) = three_backends();
    let none: &[(Ipv6Addr, bool, bool, bool)] = &[];
    world
        .start_agent(&service_manifest("empty6", VIP6, None, none), true)
        .unwrap();
    let to = at(VIP6, 80);
    let client = world.pod(CLIENT).ip6.to_string();
    for (hooked, hook) in [(true, "connect"), (false, "tc")] {
        let event = world
            .first_monitored(0, |world| {
                let started = Instant::now();
                let refused = world
                    .probe(
                        CLIENT,
                        hooked,
                        &["tcp", "--to", &to, "--timeout-ms", "2000"],
                    )
                    .unwrap();
                assert_eq!(refused[0]["kind"], "refused", "{hook}: {refused:?}");
                assert!(
                    started.elapsed().as_millis() < 2000,
                    "refused, not timed out"
                );
            })
            .unwrap();
        assert_eq!(event["reason"], "no_endpoints", "{event}");
        assert_eq!(event["action"], "reject", "{event}");
        assert_eq!(event["service"], "default/empty6:http", "{event}");
        assert_eq!(event["destination"], to, "{event}");
        assert_eq!(event["hook"], hook, "{event}");
        if !hooked {
            // tc sees the client's flow; a refused connect() has no source yet.
            let source = event["source"].as_str().unwrap();
            assert!(source.starts_with(&format!("[{client}]:")), "{event}");
        }
    }
}

#[test]
fn a_dual_stack_service_is_reached_over_both_families_each_to_its_own_endpoints() {
    let (mut world, backends6) = three_backends();
    let backends4: Vec<_> = (1..=3).map(|i| world.pod(i).ip).collect();
    // Backends 1 and 2 in the IPv6 slice, 2 and 3 in the IPv4 one: each family is balanced
    // over its own slice.
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dual, namespace: default}}\nspec:\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n  clusterIP: '{VIP6}'\n  clusterIPs: ['{VIP6}', {VIP4}]\n  sessionAffinity: ClientIP\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: 8080}}\n{}{}",
        endpoint_slice("dual-6", "dual", &ready(&backends6[..2])),
        endpoint_slice("dual-4", "dual", &ready(&backends4[1..])),
    );
    world.start_agent(&manifest, true).unwrap();
    for (vip, expected) in [
        (VIP6, ["backend-1", "backend-2"]),
        (VIP4, ["backend-2", "backend-3"]),
    ] {
        for (protocol, port) in [("tcp", 80), ("udp", 53)] {
            let to = at(vip, port);
            let results = world
                .probe(CLIENT, true, &[protocol, "--to", &to, "--count", "30"])
                .unwrap();
            let counts = spread(&results);
            // Session affinity (ClientIP) holds per family: one backend for all 30.
            assert_eq!(counts.len(), 1, "{to} {protocol}: {counts:?}");
            let backend = counts.keys().next().unwrap();
            assert!(expected.contains(&backend.as_str()), "{to}: {counts:?}");
            assert!(results.iter().all(|r| r["peer"] == to), "{results:?}");
        }
    }
    let rows: Value = serde_json::from_str(
        &world
            .proxyctl(&["service", "list", "--output", "json"])
            .unwrap(),
    )
    .unwrap();
    let families: Vec<(&str, &str)> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["port_name"] == "http")
        .map(|r| {
            (
                r["ip_family"].as_str().unwrap(),
                r["address"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(families, [("IPv4", VIP4), ("IPv6", VIP6)], "{rows}");
}

#[test]
fn node_ports_answer_on_the_nodes_primary_address_of_each_family() {
    let (mut world, backends6) = three_backends();
    let backends4: Vec<_> = (1..=3).map(|i| world.pod(i).ip).collect();
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: default}}\nspec:\n  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 10.96.0.30\n  clusterIPs: [10.96.0.30, 'fd00:96::30']\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: 8080, nodePort: 30053}}\n{}{}",
        endpoint_slice("np-6", "np", &ready(&backends6)),
        endpoint_slice("np-4", "np", &ready(&backends4)),
    );
    world.start_agent(&manifest, true).unwrap();
    // Without --node-ip, the primary address of a family is the first one of the served
    // interfaces (vh1's); NodePorts answer there only (`--nodeport-addresses primary`).
    let primary6 = "fd00:244:1::1";
    for (protocol, port) in [("tcp", 30080), ("udp", 30053)] {
        let to = at(primary6, port);
        let results = world
            .probe(CLIENT, true, &[protocol, "--to", &to, "--count", "30"])
            .unwrap();
        assert!(spread(&results).len() > 1, "{to}: {results:?}");
        assert!(results.iter().all(|r| r["peer"] == to), "{results:?}");
    }
    let other = at("fd00:244:2::1", 30080);
    let refused = world
        .probe(
            CLIENT,
            true,
            &["tcp", "--to", &other, "--timeout-ms", "2000"],
        )
        .unwrap();
    assert_eq!(
        refused[0]["kind"], "refused",
        "{other} is no NodePort address: {refused:?}"
    );
    let node_ports = world.proxyctl(&["service", "get", "[::]:30080"]).unwrap();
    assert!(node_ports.contains("[::]:30080/TCP"), "{node_ports}");
}

#[test]
fn a_connected_ipv6_udp_socket_pointed_at_a_removed_backend_is_destroyed() {
    // As for IPv4 (see clusterip.rs): the hook connected the socket to the backend's IPv6
    // address; once that endpoint leaves, the socket is destroyed (ECONNABORTED) and the
    // client's next one is balanced to a backend still there. The removed backend still
    // answers throughout.
    let (mut world, backends) = three_backends();
    let agent = world
        .start_agent(
            &service_manifest("web6", VIP6, None, &ready(&backends)),
            true,
        )
        .unwrap();
    let to = at(VIP6, 53);
    let hold = [
        "udp",
        "--to",
        &to,
        "--connected",
        "--reconnect-on-error",
        "--hold-ms",
        "4000",
        "--interval-ms",
        "100",
    ];
    let started = Instant::now();
    let (flow, first) = world.spawn_probe(CLIENT, true, &hold).unwrap();
    assert_eq!(first["peer"], to, "{first}");
    let left = first["backend"].as_str().unwrap().to_owned();
    let kept: Vec<Ipv6Addr> = (1..=3)
        .filter(|i| format!("backend-{i}") != left)
        .map(|i| world.pod(i).ip6)
        .collect();
    let syncs = agent.syncs();
    world
        .write_manifest(&service_manifest("web6", VIP6, None, &ready(&kept)))
        .unwrap();
    agent.wait_for_syncs(syncs + 1).unwrap();
    let removed_at = started.elapsed().as_millis() as u64;
    let summary = world.finish_probe(flow).unwrap();
    let last = summary["last_backend"].as_str().unwrap();
    assert_ne!(
        last, left,
        "the socket still reaches the removed backend: {summary}"
    );
    assert!(last.starts_with("backend-"), "{summary}");
    assert_eq!(summary["reconnects"], 1, "{summary}");
    assert_eq!(summary["failures"], 1, "{summary}");
    let failed_at = summary["failed_at_ms"][0].as_u64().unwrap();
    assert!(
        failed_at < removed_at + 2000,
        "destroyed {} ms after the removal was programmed: {summary}",
        failed_at.saturating_sub(removed_at)
    );
    let metrics = world.agent_http("/metrics").unwrap();
    assert!(
        metrics.contains(r#"proxy_stale_sockets_destroyed_total{protocol="udp"} 1"#),
        "{metrics}"
    );
}

#[test]
fn health_check_node_ports_answer_over_both_families() {
    // Load balancers of either family check a node's healthCheckNodePort: it answers on the
    // node's IPv4 and IPv6 addresses alike.
    let (mut world, backends6) = three_backends();
    let backends4: Vec<_> = (1..=3).map(|i| world.pod(i).ip).collect();
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: default}}\nspec:\n  type: LoadBalancer\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 10.96.0.40\n  clusterIPs: [10.96.0.40, 'fd00:96::40']\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}\n{}{}",
        endpoint_slice("lb-6", "lb", &ready(&backends6)),
        endpoint_slice("lb-4", "lb", &ready(&backends4)),
    );
    world.start_agent(&manifest, true).unwrap();
    let netns = world.pod(CLIENT).netns.clone();
    let node6: std::net::IpAddr = "fd00:244:4::1".parse().unwrap();
    let node4: std::net::IpAddr = [10, 244, 4, 1].into();
    for node in [node4, node6] {
        let answer = world.http_in(&netns, node, 32000, "/").unwrap();
        // No endpoint runs on this node (the slices name none): 503, as kube-proxy says.
        assert!(answer.starts_with("HTTP/1.0 503"), "{node}: {answer}");
        assert!(
            answer.contains(r#""localEndpoints": 0"#),
            "{node}: {answer}"
        );
    }
}

#[test]
fn an_ipv6_cluster_ip_is_served_on_the_tc_path_to_clients_outside_the_cgroup() {
    // The client is not in the hooked cgroup: tc on the pods' veths DNATs its packets to a
    // backend and reverse-translates the replies, tracking the flows in conntrack6.
    let (mut world, backends) = three_backends();
    world
        .start_agent(
            &service_manifest("web6", VIP6, None, &ready(&backends)),
            true,
        )
        .unwrap();
    let client = world.pod(CLIENT).ip6.to_string();
    for (protocol, port) in [("tcp", 80), ("udp", 53)] {
        let to = at(VIP6, port);
        let results = world
            .probe(CLIENT, false, &[protocol, "--to", &to, "--count", "60"])
            .unwrap();
        let counts = spread(&results);
        assert_eq!(counts.len(), 3, "{protocol}: every backend: {counts:?}");
        for r in &results {
            assert_eq!(r["peer"], to, "replies come from the service: {r}");
            let saw = r["server_saw"].as_str().unwrap();
            assert!(saw.starts_with(&format!("[{client}]:")), "{r}");
        }
    }
    let flows: Value = serde_json::from_str(
        &world
            .proxyctl(&["conntrack", "list", "--output", "json"])
            .unwrap(),
    )
    .unwrap();
    let flows = flows.as_array().unwrap();
    assert!(!flows.is_empty(), "the flows are tracked");
    for f in flows {
        assert!(
            f["service_address"]
                .as_str()
                .unwrap()
                .starts_with("[fd00:96::10]:"),
            "{f}"
        );
        assert!(
            f["client"]
                .as_str()
                .unwrap()
                .starts_with(&format!("[{client}]:")),
            "{f}"
        );
    }
    let maps = world.proxyctl(&["maps"]).unwrap();
    assert!(maps.lines().any(|l| l.starts_with("ct_flows6 ")), "{maps}");
}

#[test]
fn icmpv6_errors_about_tc_path_flows_reach_the_client_translated() {
    let (mut world, backends) = three_backends();
    // UDP port 54 leads to a port the backend does not serve.
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web6, namespace: default}}\nspec:\n  clusterIP: '{VIP6}'\n  ipFamilies: [IPv6]\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: closed, port: 54, protocol: UDP, targetPort: 9999}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web6-1, namespace: default, labels: {{kubernetes.io/service-name: web6}}}}\naddressType: IPv6\nports:\n- {{name: http, port: 8080}}\n- {{name: closed, port: 9999, protocol: UDP}}\nendpoints:\n- addresses: ['{}']\n",
        backends[0]
    );
    world.start_agent(&manifest, true).unwrap();
    // The backend's port unreachable comes back as from the ClusterIP, quoting what the
    // client sent: a connected socket sees ECONNREFUSED at once, not a timeout.
    let udp = world
        .probe(
            CLIENT,
            false,
            &[
                "udp",
                "--to",
                &at(VIP6, 54),
                "--connected",
                "--count",
                "3",
                "--timeout-ms",
                "2000",
            ],
        )
        .unwrap();
    assert!(udp.iter().all(|r| r["kind"] == "refused"), "{udp:?}");
    // IPv6's minimum MTU towards the backend: the node's "packet too big" quotes the
    // translated segment; translated back, the client's TCP lowers its segment size and a
    // line longer than any segment gets through (IPv6 routers do not fragment: without the
    // translation the path is a black hole).
    let iface = world.pod(1).iface.clone();
    world
        .run_in_node(0, "ip", &["link", "set", &iface, "mtu", "1280"])
        .unwrap();
    for hooked in [false, true] {
        let tcp = world
            .probe(
                CLIENT,
                hooked,
                &[
                    "tcp",
                    "--to",
                    &at(VIP6, 80),
                    "--line-bytes",
                    "20000",
                    "--timeout-ms",
                    "5000",
                ],
            )
            .unwrap();
        assert_eq!(tcp[0]["ok"], true, "hooked: {hooked}: {tcp:?}");
    }
}

#[test]
fn udp_datagrams_larger_than_the_mtu_arrive_whole_through_an_ipv6_cluster_ip() {
    let (mut world, backends) = three_backends();
    world
        .start_agent(
            &service_manifest("web6", VIP6, None, &ready(&backends)),
            true,
        )
        .unwrap();
    // 4,000 bytes: three fragments each way. On the tc path every fragment must follow its
    // datagram's flow (to one backend, and back from the ClusterIP) or nothing arrives.
    let to = at(VIP6, 53);
    for hooked in [false, true] {
        let udp = world
            .probe(
                CLIENT,
                hooked,
                &[
                    "udp",
                    "--to",
                    &to,
                    "--count",
                    "30",
                    "--datagram-bytes",
                    "4000",
                ],
            )
            .unwrap();
        assert_eq!(spread(&udp).len(), 3, "hooked: {hooked}: every backend");
        for r in &udp {
            assert_eq!(r["peer"], to, "hooked: {hooked}: {r}");
        }
    }
}

#[test]
fn load_balancer_source_ranges_apply_per_family() {
    // As kube-proxy's proxier per family: the IPv6 range admits pod 4 alone at the IPv6
    // load-balancer IP; the list has no IPv4 range, so the IPv4 one stays open to all.
    // (externalTrafficPolicy: Local and the endpoints on this node: IPv6 is not masqueraded
    // yet.)
    let (mut world, _) = three_backends();
    let local_slice = |name: &str, family: &str, addrs: Vec<String>| {
        let endpoints: String = addrs
            .iter()
            .map(|a| format!("- {{addresses: ['{a}'], nodeName: node-a}}\n"))
            .collect();
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: lb}}}}\naddressType: {family}\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}"
        )
    };
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: default}}\nspec:\n  type: LoadBalancer\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 10.96.0.50\n  clusterIPs: [10.96.0.50, 'fd00:96::50']\n  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: ['fd00:244:4::/64']\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 203.0.113.50}}, {{ip: 'fd00:200::50'}}]}}}}\n{}{}",
        local_slice(
            "lb-6",
            "IPv6",
            (1..=3).map(|i| world.pod(i).ip6.to_string()).collect()
        ),
        local_slice(
            "lb-4",
            "IPv4",
            (1..=3).map(|i| world.pod(i).ip.to_string()).collect()
        ),
    );
    world.start_agent(&manifest, true).unwrap();
    let (lb6, lb4) = (at("fd00:200::50", 80), "203.0.113.50:80".to_owned());
    let tcp = |world: &World, pod: usize, to: &str| {
        world
            .probe(pod, false, &["tcp", "--to", to, "--timeout-ms", "1500"])
            .unwrap()
            .remove(0)
    };
    let inside = tcp(&world, CLIENT, &lb6);
    assert_eq!(inside["ok"], true, "pod 4 is in the range: {inside}");
    let outside = tcp(&world, 3, &lb6);
    assert_eq!(outside["kind"], "timeout", "pod 3 is not: {outside}");
    let four = tcp(&world, 3, &lb4);
    assert_eq!(four["ok"], true, "no IPv4 range: open: {four}");
    let status: Value =
        serde_json::from_str(&world.proxyctl(&["status", "--output", "json"]).unwrap()).unwrap();
    assert!(
        status["drops"]["source_range"].as_u64().unwrap_or(0) >= 1,
        "{status}"
    );
}
