//! Traffic from outside the cluster through the real datapath, in a two-node world: `ext`
//! (192.168.50.100) reaches node-a (192.168.50.1) and node-b (.2) on a LAN, each node runs
//! its own agent on `eth0` and its pods' veths. Pod 1 (node-a) serves as `pod-a`, pod 2
//! (node-b) as `pod-b`.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use proxy::testbed::{Agent, BACKEND_PORT, EXT_IP, ROUTED_CLIENT_IP, World, lan6};
use serde_json::Value;

const CLUSTER_IP: &str = "10.96.0.20";
const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const LB_IP: &str = "203.0.113.10";
const EXTERNAL_IP: &str = "203.0.113.20";
const NODE_PORT_TCP: u16 = 30080;
const NODE_PORT_UDP: u16 = 30053;
const HEALTH_PORT: u16 = 32000;

/// A Service `default/web` of type `LoadBalancer`: TCP 80 (node port 30080) and UDP 53
/// (node port 30053) to `BACKEND_PORT`, with `extra` spec lines, `status` lines, and the
/// given endpoints as `(address, node, ready)`.
fn manifest(extra_spec: &str, status: &str, endpoints: &[(Ipv4Addr, &str, bool)]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: {CLUSTER_IP}\n{extra_spec}  ports:\n  - {{name: http, port: 80, targetPort: {BACKEND_PORT}, nodePort: {NODE_PORT_TCP}}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: {BACKEND_PORT}, nodePort: {NODE_PORT_UDP}}}\n{status}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports:\n- {{name: http, port: {BACKEND_PORT}}}\n- {{name: dns, port: {BACKEND_PORT}, protocol: UDP}}\nendpoints:\n"
    );
    for (addr, node, ready) in endpoints {
        yaml += &format!(
            "- addresses: [{addr}]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: {ready}, terminating: false}}\n"
        );
    }
    yaml
}

const LOCAL_POLICY: &str = "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n";

fn lb_status(ip: &str) -> String {
    format!("status: {{loadBalancer: {{ingress: [{{ip: {ip}}}]}}}}\n")
}

/// How the agents run: tc only, or with the XDP fast path.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Tc,
    XdpGeneric,
    XdpNative,
}

/// The two-node world with both backends serving and both agents running on `yaml`.
fn cluster(yaml: &str, mode: Mode) -> (World, Vec<Agent>) {
    cluster_with(yaml, mode, &[])
}

/// `cluster`, with `extra` arguments for the agents.
fn cluster_with(yaml: &str, mode: Mode, extra: &[&str]) -> (World, Vec<Agent>) {
    let mut world =
        World::two_nodes(1, 1, proxy::test_binaries!()).expect("building the two-node world");
    let xdp = match mode {
        Mode::Tc => None,
        Mode::XdpGeneric => Some("generic"),
        Mode::XdpNative => Some("native"),
    };
    if xdp.is_some() {
        world.use_wire_checksums().unwrap();
    }
    if matches!(mode, Mode::XdpNative) {
        world.ready_lan_for_native_xdp().unwrap();
    }
    world.serve(1, "pod-a").unwrap();
    world.serve(2, "pod-b").unwrap();
    let manifest = world.write_manifest(yaml).unwrap();
    let mut args = vec!["--manifests", manifest.to_str().unwrap()];
    if let Some(xdp) = xdp {
        args.extend(["--xdp", xdp]);
    }
    args.extend(extra);
    let agents = (0..2)
        .map(|n| world.start_agent_on(n, &args, true).unwrap())
        .collect();
    (world, agents)
}

fn tcp(world: &World, to: String, count: u32) -> Vec<Value> {
    world
        .probe_ext(&["tcp", "--to", &to, "--count", &count.to_string()])
        .unwrap()
}

/// For each backend that answered: the client addresses it saw. Fails on a failed attempt.
fn seen_by_backend(results: &[Value]) -> BTreeMap<String, Vec<IpAddr>> {
    let mut seen: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for r in results {
        assert_eq!(r["ok"], true, "attempt failed: {r}");
        let saw: SocketAddr = r["server_saw"].as_str().unwrap().parse().unwrap();
        seen.entry(r["backend"].as_str().unwrap().to_owned())
            .or_default()
            .push(saw.ip());
    }
    seen
}

fn assert_all(addrs: &[IpAddr], expected: impl Into<IpAddr>, what: &str) {
    let expected = expected.into();
    assert!(
        addrs.iter().all(|a| *a == expected),
        "{what}: expected every connection from {expected}, saw {addrs:?}"
    );
}

#[test]
fn cluster_policy_node_port_reaches_pods_on_both_nodes_masquerading_remote_ones() {
    cluster_policy_node_port(Mode::Tc);
}

/// 60 connections from ext to the TCP node port on `node`: both pods answer, the one on
/// `node` (`pods[0]`) seeing `client`, the other (`pods[1]`) the node that masqueraded.
fn node_port_masquerades(world: &World, node: IpAddr, client: IpAddr, pods: [&str; 2]) {
    let to = SocketAddr::new(node, NODE_PORT_TCP).to_string();
    let results = tcp(world, to.clone(), 60);
    for r in &results {
        assert_eq!(r["peer"], to, "{r}");
    }
    let seen = seen_by_backend(&results);
    assert_eq!(
        seen.len(),
        2,
        "both nodes' pods answer via {node}: {seen:?}"
    );
    let [local, remote] = pods;
    assert_all(&seen[local], client, &format!("{local} via {node}"));
    assert_all(&seen[remote], node, &format!("{remote} via {node}"));
}

/// A client a routed hop away, behind ext: node-a sends the answers it translates back
/// through ext, the route's gateway; the local pod sees the client's own address, the
/// remote one node-a's.
#[test]
fn a_client_behind_a_router_reaches_a_node_port() {
    for mode in [Mode::Tc, Mode::XdpGeneric] {
        eprintln!("{mode:?}");
        let endpoints = [
            (world_pod(1), "node-a", true),
            (world_pod(2), "node-b", true),
        ];
        let (mut world, _agents) = cluster(&manifest("", "", &endpoints), mode);
        world.client_behind_ext().unwrap();
        let pods = ["pod-a", "pod-b"];
        node_port_masquerades(&world, NODE_A.into(), ROUTED_CLIENT_IP.into(), pods);
    }
}

/// `proxyctl conntrack` on node-a shows masqueraded flows, as `node` and a port of the
/// masquerade range.
fn masqueraded_as(world: &World, node: IpAddr) {
    let flows: Vec<Value> = serde_json::from_str(
        &world
            .proxyctl(&["conntrack", "list", "--output", "json"])
            .unwrap(),
    )
    .unwrap();
    let masqueraded: Vec<&str> = flows
        .iter()
        .filter_map(|f| f["masqueraded_as"].as_str())
        .collect();
    assert!(!masqueraded.is_empty(), "{flows:?}");
    for m in masqueraded {
        let saw: SocketAddr = m.parse().unwrap();
        assert_eq!(saw.ip(), node, "{m}");
        assert!(saw.port() >= proxy_common::SNAT_PORT_MIN, "{m}");
    }
}

fn cluster_policy_node_port(mode: Mode) -> World {
    let endpoints = [
        (world_pod(1), "node-a", true),
        (world_pod(2), "node-b", true),
    ];
    let (world, _agents) = cluster(&manifest("", "", &endpoints), mode);
    for (node, local, remote) in [(NODE_A, "pod-a", "pod-b"), (NODE_B, "pod-b", "pod-a")] {
        node_port_masquerades(&world, node.into(), EXT_IP.into(), [local, remote]);
    }
    masqueraded_as(&world, NODE_A.into());
    // UDP: both backends answer, from the node port's address.
    let results = world
        .probe_ext(&[
            "udp",
            "--to",
            &format!("{NODE_A}:{NODE_PORT_UDP}"),
            "--count",
            "40",
        ])
        .unwrap();
    for r in &results {
        assert_eq!(r["peer"], format!("{NODE_A}:{NODE_PORT_UDP}"), "{r}");
    }
    let seen = seen_by_backend(&results);
    assert_eq!(seen.len(), 2, "UDP reaches both nodes' pods: {seen:?}");
    assert_all(&seen["pod-b"], NODE_A, "UDP to the remote pod");
    // Datagrams of 4,000 bytes travel in three fragments each way: every fragment follows
    // its datagram's flow (masqueraded and routed too), so each arrives whole.
    let results = world
        .probe_ext(&[
            "udp",
            "--to",
            &format!("{NODE_A}:{NODE_PORT_UDP}"),
            "--count",
            "30",
            "--datagram-bytes",
            "4000",
        ])
        .unwrap();
    for r in &results {
        assert_eq!(r["peer"], format!("{NODE_A}:{NODE_PORT_UDP}"), "{r}");
    }
    let seen = seen_by_backend(&results);
    assert_eq!(seen.len(), 2, "fragmented UDP reaches both pods: {seen:?}");
    // A TTL running out at the node (traceroute's first hop): time exceeded comes back,
    // quoting the datagram as the client sent it, both when the kernel forwards to the
    // local pod and when the datapath routes a masqueraded one to the remote pod. Five: the
    // kernel sends six such errors to one destination at once, then one a second.
    let expired = world
        .probe_ext(&[
            "udp",
            "--to",
            &format!("{NODE_A}:{NODE_PORT_UDP}"),
            "--connected",
            "--ttl",
            "1",
            "--count",
            "5",
        ])
        .unwrap();
    assert!(
        expired.iter().all(|r| r["kind"] == "unreachable"),
        "{expired:?}"
    );
    world
}

/// An IPv6 EndpointSlice of `web` with the given endpoints as `(address, node, ready)`.
fn slice6(endpoints: &[(Ipv6Addr, &str, bool)]) -> String {
    let mut yaml = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-v6, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv6\nports:\n- {{name: http, port: {BACKEND_PORT}}}\n- {{name: dns, port: {BACKEND_PORT}, protocol: UDP}}\nendpoints:\n"
    );
    for (addr, node, ready) in endpoints {
        yaml += &format!(
            "- addresses: [\"{addr}\"]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: {ready}, terminating: false}}\n"
        );
    }
    yaml
}

/// `web` dual-stack (its IPv6 cluster IP `fd00:96::20`) with `extra_spec` lines, pod-a and
/// pod-b (ready or not) behind both families.
fn dual_stack_manifest(extra_spec: &str, ready: [bool; 2]) -> String {
    let dual = format!(
        "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [10.96.0.20, \"fd00:96::20\"]\n{extra_spec}"
    );
    let endpoints = [
        (world_pod(1), "node-a", ready[0]),
        (world_pod(2), "node-b", ready[1]),
    ];
    let endpoints6 = [
        (world_pod6(1), "node-a", ready[0]),
        (world_pod6(2), "node-b", ready[1]),
    ];
    manifest(&dual, "", &endpoints) + &slice6(&endpoints6)
}

#[test]
fn an_ipv6_local_policy_node_port_keeps_the_client_and_a_node_without_local_endpoints_drops() {
    let (world, _agents) = cluster(&dual_stack_manifest(LOCAL_POLICY, [true, false]), Mode::Tc);
    let to = SocketAddr::new(lan6(1).into(), NODE_PORT_TCP).to_string();
    let seen = seen_by_backend(&tcp(&world, to.clone(), 20));
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["pod-a"], "{to}: {seen:?}");
    assert_all(&seen["pod-a"], lan6(100), &to);
    let to = SocketAddr::new(lan6(2).into(), NODE_PORT_TCP).to_string();
    let dropped = world
        .probe_ext(&["tcp", "--to", &to, "--timeout-ms", "500"])
        .unwrap();
    assert_eq!(
        dropped[0]["kind"], "timeout",
        "dropped, not refused: {dropped:?}"
    );
    assert!(drops(&world, 1, "no_local_endpoint") > 0);
}

#[test]
fn an_ipv6_node_port_masquerades_remote_pods_and_a_pod_balanced_to_itself() {
    ipv6_node_port(Mode::Tc);
}

fn ipv6_node_port(mode: Mode) {
    // As the IPv4 node port: through each node's IPv6 address, a local pod sees ext's
    // address and a remote one the node that masqueraded, which routes the replies back.
    let (world, _agents) = cluster(&dual_stack_manifest("", [true, true]), mode);
    for (node, local, remote) in [(lan6(1), "pod-a", "pod-b"), (lan6(2), "pod-b", "pod-a")] {
        node_port_masquerades(&world, node.into(), lan6(100).into(), [local, remote]);
    }
    if let Mode::XdpNative = mode {
        // The driver's own count: node-a sent masqueraded IPv6 packets back out from XDP
        // (only IPv6 traffic in this world so far).
        let stats = world.device_stats(0, "eth0").unwrap();
        assert!(stats["rx_queue_0_xdp_tx"] > 0, "{stats:?}");
    }
    masqueraded_as(&world, lan6(1).into());
    // UDP, datagrams in three fragments each way included.
    let to = SocketAddr::new(lan6(1).into(), NODE_PORT_UDP).to_string();
    for bytes in ["16", "4000"] {
        let results = world
            .probe_ext(&[
                "udp",
                "--to",
                &to,
                "--count",
                "40",
                "--datagram-bytes",
                bytes,
            ])
            .unwrap();
        for r in &results {
            assert_eq!(r["peer"], to, "{r}");
        }
        let seen = seen_by_backend(&results);
        assert_eq!(
            seen.len(),
            2,
            "{bytes}-byte UDP reaches both pods: {seen:?}"
        );
        assert_all(&seen["pod-b"], lan6(1), "UDP to the remote pod");
    }
    // The hop limit running out at the node: time exceeded comes back, whether the kernel
    // forwards to the local pod or the datapath routes a masqueraded datagram to the remote.
    let expired = world
        .probe_ext(&[
            "udp",
            "--to",
            &to,
            "--connected",
            "--ttl",
            "1",
            "--count",
            "5",
        ])
        .unwrap();
    assert!(
        expired.iter().all(|r| r["kind"] == "unreachable"),
        "{expired:?}"
    );
    // Hairpin: pod-a, outside the hooked cgroup, balanced to itself through the IPv6
    // cluster IP is masqueraded (its own reply comes back through the node); balanced to
    // pod-b, it is not.
    let to = "[fd00:96::20]:80";
    let results = world
        .probe(1, false, &["tcp", "--to", to, "--count", "30"])
        .unwrap();
    for r in &results {
        assert_eq!(r["peer"], to, "{r}");
    }
    let seen = seen_by_backend(&results);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_all(&seen["pod-a"], lan6(1), "pod-a balanced to itself");
    assert_all(&seen["pod-b"], world_pod6(1), "pod-a to pod-b");
}

#[test]
fn masquerade_ports_of_ended_connections_are_reused() {
    // Four masquerade ports for eight connections, one after the other: a port comes back
    // once its connection has closed (both FINs) and been quiet for 250 ms; until then the
    // SYN that needs it is dropped, and its retransmission gets it. IPv4, then IPv6 (whose
    // flows have a conntrack map, and so the four ports, of their own).
    let yaml = format!(
        "{}{}",
        manifest(
            "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [10.96.0.20, \"fd00:96::20\"]\n",
            "",
            &[(world_pod(2), "node-b", true)],
        ),
        slice6(&[(world_pod6(2), "node-b", true)]),
    );
    let (world, _agents) = cluster_with(&yaml, Mode::Tc, &["--masquerade-ports", "61000-61003"]);
    for node in [IpAddr::V4(NODE_A), IpAddr::V6(lan6(1))] {
        let to = SocketAddr::new(node, NODE_PORT_TCP).to_string();
        let results = world
            .probe_ext(&["tcp", "--to", &to, "--count", "8", "--timeout-ms", "5000"])
            .unwrap();
        let mut ports = std::collections::BTreeSet::new();
        for r in &results {
            assert_eq!(r["ok"], true, "attempt failed: {r}");
            let saw: SocketAddr = r["server_saw"].as_str().unwrap().parse().unwrap();
            assert_eq!(saw.ip(), node, "{r}");
            assert!((61000..=61003).contains(&saw.port()), "{r}");
            ports.insert(saw.port());
        }
        assert!(ports.len() <= 4, "{ports:?}");
    }
    // The SYNs that found every port taken were dropped, and counted.
    assert!(drops(&world, 0, "no_masquerade_port") > 0);
}

/// A masqueraded flow whose next hop has a smaller MTU (a narrower link between the nodes,
/// as a tunnel would be): node-a answers "fragmentation needed" (IPv6: packet too big) with
/// that MTU, quoting the segment as the client sent it, and the client's TCP lowers its
/// segment size, so a line larger than any segment gets through, as through the kernel's
/// forwarding. Else the full-size segments vanish at node-a and the transfer hangs. On tc
/// the client's segments arrive as GSO packets (the veths keep TSO on), checked by the
/// size they leave in; with XDP as single packets (checksums on the wire), which XDP leaves
/// to tc to answer.
#[test]
fn a_masqueraded_flow_over_a_narrower_link_gets_fragmentation_needed() {
    for mode in [Mode::Tc, Mode::XdpGeneric] {
        let (world, _agents) = cluster(&dual_stack_manifest("", [false, true]), mode);
        narrow_link(&world);
        let paths: [(IpAddr, IpAddr, &str); 2] = [
            (NODE_A.into(), world_pod(2).into(), "10.250.0.2"),
            (lan6(1).into(), world_pod6(2).into(), "fd00:250::2"),
        ];
        for (node, pod, via) in paths {
            // Node-a's route to pod-b takes the narrow link; its answers come by the LAN.
            let pod = format!("{pod}/{}", if pod.is_ipv4() { 32 } else { 128 });
            world
                .run_in_node(
                    0,
                    "ip",
                    &["route", "replace", &pod, "via", via, "dev", "narrow0"],
                )
                .unwrap();
            let to = SocketAddr::new(node, NODE_PORT_TCP).to_string();
            let tcp = long_line(&world, &to);
            assert_eq!(tcp[0]["ok"], true, "{mode:?} {to}: {tcp:?}");
            let saw: SocketAddr = tcp[0]["server_saw"].as_str().unwrap().parse().unwrap();
            assert_eq!(saw.ip(), node, "{mode:?} {to}: masqueraded");
        }
    }
}

#[test]
fn masqueraded_packets_leave_with_a_right_checksum_whether_it_came_partial_or_whole() {
    let (world, _agents) = cluster(&dual_stack_manifest("", [false, true]), Mode::Tc);
    // Node-a completes the checksums of what it sends, from what the datapath left in the
    // checksum field, and the receivers check them. First, packets arrive at node-a with
    // their checksums left to the NIC (partial: the field holds the pseudo-header's sum),
    // from ext and from node-b alike; then with whole ones.
    world.complete_checksums_from_node(0).unwrap();
    for arriving in ["partial", "whole"] {
        if arriving == "whole" {
            world.complete_checksums_from_ext().unwrap();
            world.complete_checksums_from_node(1).unwrap();
        }
        for node in [IpAddr::from(NODE_A), lan6(1).into()] {
            // A line of many segments, and datagrams, each way through pod-b.
            let to = SocketAddr::new(node, NODE_PORT_TCP).to_string();
            let tcp = long_line(&world, &to);
            assert_eq!(tcp[0]["ok"], true, "{arriving}, {to}: {tcp:?}");
            let to = SocketAddr::new(node, NODE_PORT_UDP).to_string();
            let udp = world
                .probe_ext(&["udp", "--to", &to, "--count", "5", "--timeout-ms", "2000"])
                .unwrap();
            let answered = udp.iter().filter(|r| r["ok"] == true).count();
            assert_eq!(answered, 5, "{arriving}, {to}: {udp:?}");
            for r in tcp.iter().chain(&udp) {
                assert_eq!(r["backend"], "pod-b", "{arriving}: {r}");
            }
        }
    }
}

/// One TCP connection from ext to `to` carrying a 20,000-byte line each way: segments as
/// large as the path allows, many of them.
fn long_line(world: &World, to: &str) -> Vec<Value> {
    world
        .probe_ext(&[
            "tcp",
            "--to",
            to,
            "--line-bytes",
            "20000",
            "--timeout-ms",
            "5000",
        ])
        .unwrap()
}

/// A link of MTU 1280 (IPv6's least) between node-a and node-b, with addresses of both
/// families, below the LAN's 1500.
fn narrow_link(world: &World) {
    let node_b = world.nodes[1].netns.as_str();
    let peer = [
        "link", "add", "narrow0", "mtu", "1280", "type", "veth", "peer", "name", "narrow1",
        "netns", node_b, "mtu", "1280",
    ];
    world.run_in_node(0, "ip", &peer).unwrap();
    for (node, end) in [(0, "narrow0"), (1, "narrow1")] {
        let (v4, v6) = match node {
            0 => ("10.250.0.1/30", "fd00:250::1/64"),
            _ => ("10.250.0.2/30", "fd00:250::2/64"),
        };
        for args in [
            &["addr", "add", v4, "dev", end][..],
            &["-6", "addr", "add", v6, "dev", end, "nodad"],
            &["link", "set", end, "up"],
        ] {
            world.run_in_node(node, "ip", args).unwrap();
        }
    }
    // Node-a's packets arrive by the narrow link from an address node-b reaches by the LAN.
    world
        .run_in_node(
            1,
            "sysctl",
            &[
                "-qw",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.narrow1.rp_filter=0",
            ],
        )
        .unwrap();
}

/// Node `node`'s datapath drops for `reason`, from `proxyctl status`, checked against its
/// metric.
fn drops(world: &World, node: usize, reason: &str) -> u64 {
    let status: Value = serde_json::from_str(
        &world
            .proxyctl_on(node, &["status", "--output", "json"])
            .unwrap(),
    )
    .unwrap();
    let count = status["drops"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no {reason} in {status}"));
    let metrics = world
        .http_in(
            &world.nodes[node].netns,
            Ipv4Addr::LOCALHOST,
            10249,
            "/metrics",
        )
        .unwrap();
    let line = format!("proxy_datapath_drops_total{{reason=\"{reason}\"}} {count}");
    assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
    count
}

#[test]
fn node_ports_follow_addresses_added_while_the_agent_runs() {
    // By default NodePorts answer on the node's primary address only (kube-proxy's
    // nftables default); --nodeport-addresses CIDRs admit the others inside them. Each
    // family: an address added to node-a's LAN interface.
    let families: [(&str, &str, IpAddr); 2] = [
        ("192.168.50.11/24", "192.168.50.0/24", NODE_A.into()),
        ("fd00:50::11/64", "fd00:50::/64", lan6(1).into()),
    ];
    for (added, cidr, primary) in families {
        for (extra, served) in [
            (&[][..], false),
            (&["--nodeport-addresses", cidr][..], true),
        ] {
            let (world, agents) =
                cluster_with(&dual_stack_manifest("", [true, false]), Mode::Tc, extra);
            // No duplicate address detection: the address is usable at once.
            world
                .run_in_node(0, "ip", &["addr", "add", added, "dev", "eth0", "nodad"])
                .unwrap();
            // The agent re-reads its interfaces' addresses at every housekeeping tick (1 s
            // here).
            agents[0]
                .wait_for_log(&["node addresses changed"], Duration::from_secs(5))
                .unwrap();
            let added: IpAddr = added.split('/').next().unwrap().parse().unwrap();
            let to = SocketAddr::new(added, NODE_PORT_TCP).to_string();
            if served {
                let seen = seen_by_backend(&tcp(&world, to, 3));
                assert_eq!(seen.keys().collect::<Vec<_>>(), ["pod-a"], "{seen:?}");
            } else {
                let refused = &world
                    .probe_ext(&["tcp", "--to", &to, "--timeout-ms", "1000"])
                    .unwrap()[0];
                assert_eq!(
                    refused["kind"], "refused",
                    "{to} is not a node port address: {refused}"
                );
            }
            // The primary address serves either way.
            let to = SocketAddr::new(primary, NODE_PORT_TCP).to_string();
            let seen = seen_by_backend(&tcp(&world, to, 3));
            assert_eq!(seen.keys().collect::<Vec<_>>(), ["pod-a"], "{seen:?}");
        }
    }
}

/// Pod `i`'s address (10.244.i.2), known before the world exists.
fn world_pod(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i, 2)
}

fn world_pod6(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, i, 0, 0, 0, 0, 2)
}

/// A health-check answer from ext: (status code, JSON body).
fn health(world: &World, node: Ipv4Addr) -> (u16, Value) {
    let ext = world.ext.clone().unwrap();
    let response = world.http_in(&ext, node, HEALTH_PORT, "/").unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response:?}")),
    )
}

#[test]
fn local_policy_keeps_the_client_ip_and_nodes_without_local_endpoints_drop() {
    local_policy(Mode::Tc);
}

fn local_policy(mode: Mode) {
    let endpoints = [
        (world_pod(1), "node-a", true),
        (world_pod(2), "node-b", false),
    ];
    let (mut world, agents) = cluster(&manifest(LOCAL_POLICY, &lb_status(LB_IP), &endpoints), mode);
    // Node-a has the ready endpoint: the pod sees the real client, via the node port and
    // the load-balancer IP.
    for to in [format!("{NODE_A}:{NODE_PORT_TCP}"), format!("{LB_IP}:80")] {
        let seen = seen_by_backend(&tcp(&world, to.clone(), 20));
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["pod-a"], "{to}: {seen:?}");
        assert_all(&seen["pod-a"], EXT_IP, &to);
    }
    // Node-b has none: it drops (no answer, not even a refusal), as kube-proxy does, and
    // `proxyctl monitor` there shows each drop with its flow and service.
    let event = world
        .first_monitored(1, |world| {
            let dropped = world
                .probe_ext(&[
                    "tcp",
                    "--to",
                    &format!("{NODE_B}:{NODE_PORT_TCP}"),
                    "--timeout-ms",
                    "500",
                ])
                .unwrap();
            assert_eq!(dropped[0]["ok"], false, "{dropped:?}");
            assert_eq!(
                dropped[0]["kind"], "timeout",
                "dropped, not refused: {dropped:?}"
            );
        })
        .unwrap();
    assert!(drops(&world, 1, "no_local_endpoint") > 0);
    assert_eq!(event["action"], "drop", "{event}");
    assert_eq!(event["reason"], "no_local_endpoint", "{event}");
    assert_eq!(event["service"], "default/web:http", "{event}");
    assert_eq!(event["frontend"], "NodePort", "{event}");
    assert_eq!(
        event["destination"],
        format!("{NODE_B}:{NODE_PORT_TCP}"),
        "{event}"
    );
    assert!(
        event["source"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("{EXT_IP}:"))),
        "{event}"
    );
    let hook = if matches!(mode, Mode::Tc) {
        "tc"
    } else {
        "xdp"
    };
    assert_eq!(event["hook"], hook, "{event}");
    // Its per-frontend view says so: the load-balancer IP (and the node port) drop outside
    // clients, while pods and nodes get every endpoint there.
    let query = format!("{LB_IP}:80/TCP");
    let detail: Value = serde_json::from_str(
        &world
            .proxyctl_on(1, &["service", "get", &query, "--output", "json"])
            .unwrap(),
    )
    .unwrap();
    let frontends = detail[0]["frontends"].as_array().unwrap();
    let lb = |clients: &str| {
        frontends
            .iter()
            .find(|f| f["address"] == query && f["clients"] == clients)
            .unwrap_or_else(|| panic!("no {clients} frontend {query} in {detail}"))
    };
    assert_eq!(lb("all")["new_connections"], "dropped", "{detail}");
    assert_eq!(lb("all")["reason"], "no_local_endpoint", "{detail}");
    assert_eq!(lb("all")["frontend"], "LoadBalancerIP", "{detail}");
    let why = |row: &Value| -> Vec<(String, String)> {
        row["unused"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                let field = |f: &str| u[f].as_str().unwrap().to_owned();
                (field("endpoint"), field("reason"))
            })
            .collect()
    };
    let pod_a = format!("{}:{BACKEND_PORT}", world_pod(1));
    let pod_b = format!("{}:{BACKEND_PORT}", world_pod(2));
    assert_eq!(
        why(lb("all")),
        [
            (pod_b.clone(), "not_ready".into()),
            (pod_a, "not_local".into())
        ],
        "{detail}"
    );
    assert_eq!(
        why(lb("in-cluster")),
        [(pod_b, "not_ready".into())],
        "{detail}"
    );
    assert_eq!(lb("in-cluster")["new_connections"], "balanced", "{detail}");
    assert_eq!(
        lb("in-cluster")["backends"],
        serde_json::json!([format!("{}:{BACKEND_PORT}", world_pod(1))]),
        "{detail}"
    );
    let cluster_ip = frontends
        .iter()
        .find(|f| f["frontend"] == "ClusterIP")
        .unwrap();
    assert_eq!(cluster_ip["new_connections"], "balanced", "{detail}");
    let table = world.proxyctl_on(1, &["service", "get", &query]).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.contains(&query) && l.contains("DROPPED (no_local_endpoint)")),
        "{table}"
    );

    // kube-proxy's health-check answers, on each node.
    let (status, body) = health(&world, NODE_A);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["service"]["namespace"], "default");
    assert_eq!(body["service"]["name"], "web");
    assert_eq!(body["serviceProxyHealthy"], true);
    let (status, body) = health(&world, NODE_B);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["localEndpoints"], 0);

    // Clients inside the cluster are not subject to the external policy: a pod on node-b,
    // which has no local endpoint, reaches the service through the load-balancer IP and
    // node-b's node port, as kube-proxy sends pod traffic to every endpoint.
    for to in [format!("{LB_IP}:80"), format!("{NODE_B}:{NODE_PORT_TCP}")] {
        let results = world
            .probe(2, true, &["tcp", "--to", &to, "--count", "5"])
            .unwrap();
        let seen = seen_by_backend(&results);
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["pod-a"], "{to}: {seen:?}");
        for r in &results {
            assert_eq!(r["peer"], to, "the pod sees the address it used: {r}");
        }
    }

    // The local endpoint goes away: node-a's health check says so within a second.
    let gone = [
        (world_pod(1), "node-a", false),
        (world_pod(2), "node-b", false),
    ];
    let syncs = agents[0].syncs();
    let changed = Instant::now();
    world
        .write_manifest(&manifest(LOCAL_POLICY, &lb_status(LB_IP), &gone))
        .unwrap();
    loop {
        let (status, _) = health(&world, NODE_A);
        if status == 503 {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "node-a's health check still says {status} a second after its endpoint went away"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agents[0].wait_for_syncs(syncs + 1).unwrap();

    // proxyctl shows the type, addresses, node port and policies.
    let list = world
        .proxyctl(&["service", "list", "--output", "json"])
        .unwrap();
    let rows: Vec<Value> = serde_json::from_str(&list).unwrap();
    let http = rows
        .iter()
        .find(|r| r["namespace"] == "default" && r["name"] == "web" && r["port_name"] == "http")
        .unwrap_or_else(|| panic!("no default/web:http in {list}"));
    assert_eq!(http["type"], "LoadBalancer", "{http}");
    assert_eq!(http["node_port"], NODE_PORT_TCP, "{http}");
    assert_eq!(
        http["external_addresses"],
        serde_json::json!([LB_IP]),
        "{http}"
    );
    assert_eq!(http["external_traffic_policy"], "Local", "{http}");
    let table = world.proxyctl(&["service", "list"]).unwrap();
    for column in ["TYPE", "NODE-PORT", "EXTERNAL", "POLICY"] {
        assert!(table.contains(column), "no {column} column in\n{table}");
    }
}

#[test]
fn load_balancer_source_ranges_let_in_only_their_clients() {
    for mode in [Mode::Tc, Mode::XdpGeneric] {
        source_ranges(mode);
    }
}

/// kube-proxy's TestLoadBalancer "blocked external to LB1": a client outside the ranges
/// is dropped at the load-balancer IP, one inside is served; node ports are not filtered.
fn source_ranges(mode: Mode) {
    let endpoints = [
        (world_pod(1), "node-a", true),
        (world_pod(2), "node-b", true),
    ];
    let yaml = |range: &str| {
        let spec = format!("  loadBalancerSourceRanges: [{range}]\n");
        manifest(&spec, &lb_status(LB_IP), &endpoints)
    };
    let (world, agents) = cluster(&yaml(&format!("{EXT_IP}/32")), mode);
    let seen = seen_by_backend(&tcp(&world, format!("{LB_IP}:80"), 6));
    assert!(
        !seen.is_empty(),
        "{mode:?}: the client in the range is served"
    );
    let syncs: Vec<usize> = agents.iter().map(Agent::syncs).collect();
    world.write_manifest(&yaml("10.0.0.0/8")).unwrap();
    for (agent, n) in agents.iter().zip(syncs) {
        agent.wait_for_syncs(n + 1).unwrap();
    }
    let blocked = world
        .probe_ext(&["tcp", "--to", &format!("{LB_IP}:80"), "--timeout-ms", "500"])
        .unwrap();
    assert_eq!(blocked[0]["kind"], "timeout", "{mode:?}: {blocked:?}");
    let dropped: u64 = (0..2).map(|n| drops(&world, n, "source_range")).sum();
    assert!(dropped > 0, "{mode:?}: counted as source_range drops");
    let seen = seen_by_backend(&tcp(&world, format!("{NODE_A}:{NODE_PORT_TCP}"), 3));
    assert!(!seen.is_empty(), "{mode:?}: the node port is not filtered");
    // A pod is filtered by its own address, as with kube-proxy: its socket is left to tc
    // (10.244.0.0/16 is inside 10.0.0.0/8).
    let results = world
        .probe(
            1,
            true,
            &["tcp", "--to", &format!("{LB_IP}:80"), "--count", "3"],
        )
        .unwrap();
    assert!(
        !seen_by_backend(&results).is_empty(),
        "{mode:?}: a pod in the range"
    );
}

#[test]
fn load_balancer_and_external_ips_reach_pods_on_both_nodes() {
    load_balancer_and_external_ips(Mode::Tc);
}

fn load_balancer_and_external_ips(mode: Mode) {
    let spec = format!("  externalIPs: [{EXTERNAL_IP}]\n");
    let endpoints = [
        (world_pod(1), "node-a", true),
        (world_pod(2), "node-b", true),
    ];
    let (world, _agents) = cluster(&manifest(&spec, &lb_status(LB_IP), &endpoints), mode);
    for to in [format!("{LB_IP}:80"), format!("{EXTERNAL_IP}:80")] {
        let results = tcp(&world, to.clone(), 60);
        for r in &results {
            assert_eq!(r["peer"], to, "the client sees the address it used: {r}");
        }
        let seen = seen_by_backend(&results);
        assert_eq!(seen.len(), 2, "{to} reaches both nodes' pods: {seen:?}");
        assert_all(&seen["pod-a"], EXT_IP, &format!("{to} to node-a's own pod"));
        assert_all(&seen["pod-b"], NODE_A, &format!("{to} to node-b's pod"));
    }
    let udp = world
        .probe_ext(&["udp", "--to", &format!("{LB_IP}:53"), "--count", "20"])
        .unwrap();
    assert!(!seen_by_backend(&udp).is_empty());
}

#[test]
fn ipv6_load_balancer_and_external_ips_reach_pods_on_both_nodes() {
    ipv6_load_balancer_and_external_ips(Mode::Tc);
}

/// As `load_balancer_and_external_ips`, over IPv6 (ext routes `EXTERNAL_NET6` to node-a).
fn ipv6_load_balancer_and_external_ips(mode: Mode) {
    let (lb6, external6) = ("2001:db8:203::10", "2001:db8:203::20");
    let spec = format!("  externalIPs: [{EXTERNAL_IP}, \"{external6}\"]\n");
    let status =
        format!("status: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}, {{ip: \"{lb6}\"}}]}}}}\n");
    let endpoints = [
        (world_pod(1), "node-a", true),
        (world_pod(2), "node-b", true),
    ];
    let endpoints6 = [
        (world_pod6(1), "node-a", true),
        (world_pod6(2), "node-b", true),
    ];
    let dual = format!(
        "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [10.96.0.20, \"fd00:96::20\"]\n{spec}"
    );
    let yaml = manifest(&dual, &status, &endpoints) + &slice6(&endpoints6);
    let (world, _agents) = cluster(&yaml, mode);
    for ip in [lb6, external6] {
        let to = SocketAddr::new(ip.parse().unwrap(), 80).to_string();
        let results = tcp(&world, to.clone(), 60);
        for r in &results {
            assert_eq!(r["peer"], to, "the client sees the address it used: {r}");
        }
        let seen = seen_by_backend(&results);
        assert_eq!(seen.len(), 2, "{to} reaches both nodes' pods: {seen:?}");
        assert_all(
            &seen["pod-a"],
            lan6(100),
            &format!("{to} to node-a's own pod"),
        );
        assert_all(&seen["pod-b"], lan6(1), &format!("{to} to node-b's pod"));
    }
}

#[test]
fn hairpin_a_pod_balanced_to_itself_reaches_itself() {
    hairpin(Mode::Tc);
}

fn hairpin(mode: Mode) {
    // Only pod-a backs the service; pod-a calls it, through the socket hooks and through
    // the tc path (outside the hooked cgroup).
    let (world, _agents) = cluster(&manifest("", "", &[(world_pod(1), "node-a", true)]), mode);
    for hooked in [true, false] {
        for to in [
            format!("{CLUSTER_IP}:80"),
            format!("{NODE_A}:{NODE_PORT_TCP}"),
        ] {
            let results = world
                .probe(1, hooked, &["tcp", "--to", &to, "--count", "5"])
                .unwrap();
            let seen = seen_by_backend(&results);
            assert_eq!(
                seen.keys().collect::<Vec<_>>(),
                ["pod-a"],
                "hooked={hooked} {to}: {seen:?}"
            );
            for r in &results {
                assert_eq!(r["peer"], to, "hooked={hooked}: {r}");
            }
        }
        let udp = world
            .probe(
                1,
                hooked,
                &["udp", "--to", &format!("{CLUSTER_IP}:53"), "--count", "3"],
            )
            .unwrap();
        assert_eq!(
            seen_by_backend(&udp).len(),
            1,
            "hooked={hooked} UDP hairpin"
        );
    }
}

/// Every scenario above, with the agents attaching XDP in `mode` as `program`.
fn with_xdp(mode: Mode, program: &str) {
    let world = cluster_policy_node_port(mode);
    let status = world.proxyctl(&["status"]).unwrap();
    assert!(status.contains(&format!("{program} on eth0")), "{status}");
    if let Mode::XdpNative = mode {
        // The driver's own count: node-a sent masqueraded packets back out from XDP.
        let stats = world.device_stats(0, "eth0").unwrap();
        assert!(stats["rx_queue_0_xdp_tx"] > 0, "{stats:?}");
    }
    drop(world);
    local_policy(mode);
    load_balancer_and_external_ips(mode);
    hairpin(mode);
    ipv6_node_port(mode);
    ipv6_load_balancer_and_external_ips(mode);
}

#[test]
fn xdp_generic_passes_the_same_tests() {
    with_xdp(Mode::XdpGeneric, "proxy_xdp_generic");
}

#[test]
fn xdp_native_passes_the_same_tests() {
    with_xdp(Mode::XdpNative, "proxy_xdp_native");
}
