//! ClusterIP services through the real datapath, with real TCP and UDP between network
//! namespaces: pods 1-3 serve as backends, pod 4 is the client. A "hooked" client runs in
//! the cgroup with the socket hooks (socket LB); an unhooked one goes through tc DNAT.
//! Scenarios whose packet path differs per family run over IPv4 and IPv6 (`Family::BOTH`).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use proxy::testbed::{BACKEND_PORT, Family, NO_ENDPOINTS, World, at, ready, service_manifest};
use serde_json::Value;

const VIP: &str = "10.96.0.10";
const CLIENT: usize = 4;

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

/// How many of `count` TCP connections from the client to `to` each backend answered.
fn tcp_spread(world: &World, hooked: bool, to: &str, count: u32) -> BTreeMap<String, usize> {
    let count = count.to_string();
    spread(
        &world
            .probe(CLIENT, hooked, &["tcp", "--to", to, "--count", &count])
            .unwrap(),
    )
}

/// Pods 1-3 serving as backend-1..3, pod 4 as client; the backends' IPv4 addresses.
fn three_backends() -> (World, Vec<Ipv4Addr>) {
    World::three_backends(proxy::test_binaries!()).expect("building the namespace world")
}

/// `three_backends`, with the backends' addresses of `family`.
fn three_backends_of(family: Family) -> (World, Vec<IpAddr>) {
    eprintln!("over {}", family.name());
    let (world, _) = three_backends();
    let backends = (1..=3).map(|i| world.pod(i).addr(family)).collect();
    (world, backends)
}

fn assert_each_backend_got_a_fair_share(counts: &BTreeMap<String, usize>, total: usize) {
    assert_eq!(counts.len(), 3, "every backend is reached: {counts:?}");
    // Uniform random over 3 backends: each count is binomial(total, 1/3). Allow 5 standard
    // deviations (a false alarm about once in three million checks).
    let mean = total as f64 / 3.0;
    let deviation = (total as f64 * 2.0 / 9.0).sqrt();
    for (backend, n) in counts {
        assert!(
            *n as f64 >= mean - 5.0 * deviation,
            "{backend} got {n} of {total}: {counts:?}"
        );
    }
}

#[test]
fn tcp_and_udp_spread_over_all_backends_and_apps_see_the_cluster_ip() {
    let (mut world, backends) = three_backends();
    world
        .start_agent(&service_manifest("web", VIP, None, &ready(&backends)), true)
        .unwrap();

    let tcp = world
        .probe(
            CLIENT,
            true,
            &["tcp", "--to", &format!("{VIP}:80"), "--count", "300"],
        )
        .unwrap();
    assert_each_backend_got_a_fair_share(&spread(&tcp), 300);
    for r in &tcp {
        assert_eq!(
            r["peer"],
            format!("{VIP}:80"),
            "getpeername() shows the ClusterIP: {r}"
        );
    }

    let udp = world
        .probe(
            CLIENT,
            true,
            &["udp", "--to", &format!("{VIP}:53"), "--count", "300"],
        )
        .unwrap();
    assert_each_backend_got_a_fair_share(&spread(&udp), 300);
    for r in &udp {
        assert_eq!(
            r["peer"],
            format!("{VIP}:53"),
            "recvfrom() reports the ClusterIP: {r}"
        );
    }
    let connected = world
        .probe(
            CLIENT,
            true,
            &[
                "udp",
                "--to",
                &format!("{VIP}:53"),
                "--count",
                "20",
                "--connected",
            ],
        )
        .unwrap();
    for r in &connected {
        assert_eq!(
            r["peer"],
            format!("{VIP}:53"),
            "getpeername() on connected UDP: {r}"
        );
    }

    let rows: serde_json::Value = serde_json::from_str(
        &world
            .proxyctl(&["service", "list", "--output", "json"])
            .unwrap(),
    )
    .unwrap();
    let row = |port: u64| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["port"] == port)
            .unwrap()
            .clone()
    };
    assert_eq!(row(80)["name"], "web");
    assert_eq!(row(80)["port_name"], "http");
    assert_eq!(row(80)["ready_backends"], 3);
    assert_eq!(
        row(80)["connections"],
        300,
        "one new connection per connect()"
    );
    assert_eq!(row(53)["connections"], 320, "one new flow per UDP socket");
    assert_eq!(
        row(53)["packets"],
        300,
        "one datagram per unconnected sendto()"
    );
    let table = world.proxyctl(&["service", "list"]).unwrap();
    assert!(
        table.contains("default/web:http") && table.contains("10.96.0.10:80/TCP"),
        "{table}"
    );
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend_until_it_expires() {
    for family in Family::BOTH {
        session_affinity(family);
    }
}

fn session_affinity(family: Family) {
    let (mut world, backends) = three_backends_of(family);
    let vip = family.cluster_ip(10);
    world
        .start_agent(
            &service_manifest("sticky", &vip.to_string(), Some(1), &ready(&backends)),
            true,
        )
        .unwrap();
    let to = at(vip, 80);

    let first = tcp_spread(&world, true, &to, 30);
    assert_eq!(
        first.len(),
        1,
        "all connections within the timeout stick: {first:?}"
    );
    let mut previous = first.keys().next().unwrap().clone();

    // After an idle period longer than the timeout the choice is random again; with 3
    // backends, 8 expiries all landing on the previous backend has probability 3^-8.
    let mut moved = false;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(1300));
        let round = tcp_spread(&world, true, &to, 5);
        assert_eq!(round.len(), 1, "a new affinity sticks again: {round:?}");
        let backend = round.keys().next().unwrap().clone();
        moved |= backend != previous;
        previous = backend;
        if moved {
            break;
        }
    }
    assert!(moved, "affinity never expired");

    // The tc path keys affinity on the client IP.
    let tc = tcp_spread(&world, false, &to, 20);
    assert_eq!(tc.len(), 1, "tc-path affinity: {tc:?}");
}

#[test]
fn removed_backend_gets_no_new_connections_while_established_ones_keep_working() {
    for family in Family::BOTH {
        removed_backend(family);
    }
}

fn removed_backend(family: Family) {
    let (mut world, backends) = three_backends_of(family);
    let agent = world
        .start_agent(&web(family, &ready(&backends)), true)
        .unwrap();
    let to = at(family.cluster_ip(10), 80);
    let hold = [
        "tcp",
        "--to",
        &to,
        "--hold-ms",
        "3000",
        "--interval-ms",
        "100",
    ];
    let (socket_lb, first) = world.spawn_probe(CLIENT, true, &hold).unwrap();
    let socket_backend = first["backend"].as_str().unwrap().to_owned();
    let (tc_path, first) = world.spawn_probe(CLIENT, false, &hold).unwrap();
    let tc_backend = first["backend"].as_str().unwrap().to_owned();

    let removed: BTreeSet<String> = [socket_backend.clone(), tc_backend.clone()].into();
    let kept: Vec<IpAddr> = (1..=3)
        .filter(|i| !removed.contains(&format!("backend-{i}")))
        .map(|i| world.pod(i).addr(family))
        .collect();
    reprogram(&mut world, &agent, family, &ready(&kept));

    for hooked in [true, false] {
        let counts = tcp_spread(&world, hooked, &to, 60);
        for backend in &removed {
            assert!(
                !counts.contains_key(backend),
                "removed {backend} got new connections (hooked={hooked}): {counts:?}"
            );
        }
    }
    for (handle, backend) in [(socket_lb, socket_backend), (tc_path, tc_backend)] {
        let summary = world.finish_probe(handle).unwrap();
        assert_eq!(
            summary["failures"], 0,
            "established connection broke: {summary}"
        );
        assert!(summary["exchanges"].as_u64().unwrap() >= 20, "{summary}");
        assert_eq!(summary["last_backend"], backend.as_str(), "{summary}");
    }
}

#[test]
fn a_tc_path_udp_flow_whose_backend_leaves_is_balanced_again() {
    // kube-proxy deletes the conntrack entries of UDP flows to an endpoint that left the
    // service (conntrack/cleanup.go): the next datagram is balanced again, although the
    // backend's process still answers. TCP flows keep their backend (test above).
    for family in Family::BOTH {
        tc_path_udp_flow_balanced_again(family);
    }
}

fn tc_path_udp_flow_balanced_again(family: Family) {
    let (mut world, backends) = three_backends_of(family);
    let held = HeldUdp::start(&mut world, family, &backends, false);
    let left = held.backend();
    remove_backend(&mut world, &held.agent, family, &left);
    let flow = held.flow;
    let summary = world.finish_probe(flow).unwrap();
    let last = summary["last_backend"].as_str().unwrap();
    assert_ne!(
        last, left,
        "the flow still reaches the removed backend: {summary}"
    );
    assert!(last.starts_with("backend-"), "{summary}");
    // A datagram answered while its flow was being deleted can be lost: no more.
    assert!(summary["failures"].as_u64().unwrap() <= 1, "{summary}");
    assert!(summary["exchanges"].as_u64().unwrap() >= 20, "{summary}");
}

/// Service `web` at `family`'s ClusterIP 10 (TCP 80, UDP 53) over `endpoints`.
fn web(family: Family, endpoints: &[(IpAddr, bool, bool, bool)]) -> String {
    service_manifest("web", &family.cluster_ip(10).to_string(), None, endpoints)
}

/// Gives the three-backend service `web` of `agent` `endpoints`, and waits for the agent
/// to have programmed them.
fn reprogram(
    world: &mut World,
    agent: &proxy::testbed::Agent,
    family: Family,
    endpoints: &[(IpAddr, bool, bool, bool)],
) {
    let syncs = agent.syncs();
    world.write_manifest(&web(family, endpoints)).unwrap();
    agent.wait_for_syncs(syncs + 1).unwrap();
}

/// Takes backend `left` out of the three-backend service `web` of `agent`.
fn remove_backend(world: &mut World, agent: &proxy::testbed::Agent, family: Family, left: &str) {
    let kept: Vec<IpAddr> = (1..=3)
        .filter(|i| format!("backend-{i}") != left)
        .map(|i| world.pod(i).addr(family))
        .collect();
    reprogram(world, agent, family, &ready(&kept));
}

/// A connected UDP socket held 4 s from the client to port 53 of the three-backend service
/// `web`, one exchange every 100 ms, through the socket hooks if `hooked`, opening a new
/// socket when it reports an error (as a DNS resolver does).
struct HeldUdp {
    agent: proxy::testbed::Agent,
    flow: usize,
    /// What its first exchange printed.
    first: Value,
    started: Instant,
}

impl HeldUdp {
    fn start(world: &mut World, family: Family, backends: &[IpAddr], hooked: bool) -> HeldUdp {
        let agent = world
            .start_agent(&web(family, &ready(backends)), true)
            .unwrap();
        let to = at(family.cluster_ip(10), 53);
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
        let (flow, first) = world.spawn_probe(CLIENT, hooked, &hold).unwrap();
        HeldUdp {
            agent,
            flow,
            first,
            started,
        }
    }

    /// The backend its first exchange reached.
    fn backend(&self) -> String {
        self.first["backend"].as_str().unwrap().to_owned()
    }

    /// Milliseconds since it started.
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

#[test]
fn a_connected_udp_socket_the_hook_pointed_at_a_removed_backend_is_destroyed() {
    // The socket hook connected the socket to the backend itself, so no conntrack entry is
    // in the way: the socket is destroyed (ECONNABORTED) and a new one is balanced anew.
    // The removed backend's process still answers throughout.
    let (mut world, backends) = three_backends_of(Family::V4);
    let held = HeldUdp::start(&mut world, Family::V4, &backends, true);
    assert_eq!(
        held.first["peer"],
        format!("{VIP}:53"),
        "the hook reports the service: {}",
        held.first
    );
    let left = held.backend();
    remove_backend(&mut world, &held.agent, Family::V4, &left);
    let removed_at = held.now_ms();
    let flow = held.flow;
    let summary = world.finish_probe(flow).unwrap();
    let last = summary["last_backend"].as_str().unwrap();
    assert_ne!(
        last, left,
        "the socket still reaches the removed backend: {summary}"
    );
    assert!(last.starts_with("backend-"), "{summary}");
    assert_eq!(summary["reconnects"], 1, "{summary}");
    // The exchange the destruction interrupted, no more.
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
    assert!(metrics.contains(r#"proxy_stale_sockets_destroyed_total{protocol="tcp"} 0"#));
    assert!(
        metrics.contains(r#"proxy_stale_socket_destroyer{mode="bpf_iterator"} 1"#),
        "{metrics}"
    );
}

#[test]
fn a_udp_socket_to_a_terminating_endpoint_that_still_serves_is_kept_until_it_goes() {
    // kube-proxy's conntrack clean-up (cleanup.go) keeps UDP flows to serving endpoints,
    // whatever their terminating status, traffic policy or topology: a terminating pod
    // that still serves keeps its sockets; once it stops serving, they are destroyed.
    for family in Family::BOTH {
        udp_socket_to_a_terminating_endpoint(family);
    }
}

fn udp_socket_to_a_terminating_endpoint(family: Family) {
    let (mut world, backends) = three_backends_of(family);
    let held = HeldUdp::start(&mut world, family, &backends, true);
    let left = held.backend();
    let terminating: Vec<_> = (1..=3)
        .map(|i| {
            let ip = world.pod(i).addr(family);
            if format!("backend-{i}") == left {
                (ip, false, true, true)
            } else {
                (ip, true, true, false)
            }
        })
        .collect();
    reprogram(&mut world, &held.agent, family, &terminating);
    // New sockets no longer reach it, this one still does.
    let fresh = world
        .probe(
            CLIENT,
            true,
            &[
                "udp",
                "--to",
                &at(family.cluster_ip(10), 53),
                "--count",
                "20",
            ],
        )
        .unwrap();
    assert!(!spread(&fresh).contains_key(&left), "{fresh:?}");
    std::thread::sleep(Duration::from_millis(1000));
    // Nothing can destroy the socket before the endpoint's removal is written (an exchange
    // takes about a millisecond: one that failed began after that, give or take).
    let removing_at = held.now_ms();
    remove_backend(&mut world, &held.agent, family, &left);
    let flow = held.flow;
    let summary = world.finish_probe(flow).unwrap();
    assert_eq!(summary["reconnects"], 1, "{summary}");
    assert_eq!(summary["failures"], 1, "{summary}");
    let failed_at = summary["failed_at_ms"][0].as_u64().unwrap();
    assert!(
        failed_at + 20 >= removing_at,
        "destroyed while it still served ({failed_at} ms; removed at {removing_at} ms): {summary}"
    );
    assert_ne!(summary["last_backend"], left.as_str(), "{summary}");
}

#[test]
fn tcp_connections_to_a_removed_backend_are_destroyed_only_where_asked() {
    for family in Family::BOTH {
        tcp_to_a_removed_backend_destroyed(family);
    }
}

fn tcp_to_a_removed_backend_destroyed(family: Family) {
    let (mut world, backends) = three_backends_of(family);
    let manifest = world
        .write_manifest(&web(family, &ready(&backends)))
        .unwrap();
    let agent = world
        .start_agent_with(
            &[
                "--manifests",
                &manifest.to_string_lossy(),
                "--destroy-tcp-to-removed-backends",
            ],
            true,
        )
        .unwrap();
    let to = at(family.cluster_ip(10), 80);
    let hold = [
        "tcp",
        "--to",
        &to,
        "--hold-ms",
        "3000",
        "--interval-ms",
        "100",
    ];
    let (hooked, first) = world.spawn_probe(CLIENT, true, &hold).unwrap();
    let left = first["backend"].as_str().unwrap().to_owned();
    remove_backend(&mut world, &agent, family, &left);
    let summary = world.finish_probe(hooked).unwrap();
    assert!(
        summary["failures"].as_u64().unwrap() > 0,
        "the connection to the removed backend lived on: {summary}"
    );
    assert!(
        world
            .agent_http("/metrics")
            .unwrap()
            .contains(r#"proxy_stale_sockets_destroyed_total{protocol="tcp"} 1"#)
    );
}

#[test]
fn an_ipv6_socket_reaches_an_ipv4_service_through_its_mapped_address() {
    // Dual-stack applications (Java's default) reach IPv4 addresses from IPv6 sockets, as
    // `::ffff:a.b.c.d`: their connect(), recvmsg() and getpeername() run the IPv6 hooks.
    let (mut world, backends) = three_backends();
    let manifest = [
        service_manifest("web", VIP, None, &ready(&backends)),
        service_manifest("empty", "10.96.0.20", None, NO_ENDPOINTS),
    ]
    .join("---\n");
    world.start_agent(&manifest, true).unwrap();
    let mapped = |port| format!("[::ffff:{VIP}]:{port}");
    let client = world.pod(CLIENT).ip.to_string();
    let flows = |world: &World| {
        let list: Value = serde_json::from_str(
            &world
                .proxyctl(&["conntrack", "list", "-o", "json"])
                .unwrap(),
        )
        .unwrap();
        list.as_array().unwrap().len()
    };
    // The socket hooks first: the tc path never sees the service address, so no flow of
    // ours is tracked; then the tc path, which translates the packets.
    for hooked in [true, false] {
        let results = world
            .probe(
                CLIENT,
                hooked,
                &["tcp", "--to", &mapped(80), "--count", "30"],
            )
            .unwrap();
        assert_eq!(spread(&results).len(), 3, "hooked={hooked}: {results:?}");
        for r in &results {
            assert_eq!(r["peer"], mapped(80).as_str(), "the service, as asked: {r}");
            assert!(r["server_saw"].as_str().unwrap().contains(&client), "{r}");
        }
        let dns = mapped(53);
        for connected in [true, false] {
            let mut args = vec!["udp", "--to", &dns];
            args.extend(connected.then_some("--connected"));
            let udp = world.probe(CLIENT, hooked, &args).unwrap();
            assert_eq!(udp[0]["ok"], true, "{udp:?}");
            // recvfrom() or getpeername(): the service's address, not the backend's.
            assert_eq!(
                udp[0]["peer"],
                dns.as_str(),
                "connected={connected}: {udp:?}"
            );
        }
        assert_eq!(flows(&world) == 0, hooked, "hooked={hooked}");
    }
    // Without endpoints: refused at once, by the connect hook.
    let event = world
        .first_monitored(0, |world| {
            let refused = world
                .probe(CLIENT, true, &["tcp", "--to", "[::ffff:10.96.0.20]:80"])
                .unwrap();
            assert_eq!(refused[0]["kind"], "refused", "{refused:?}");
        })
        .unwrap();
    assert_eq!(event["hook"], "connect", "{event}");
    assert_eq!(event["destination"], "10.96.0.20:80", "{event}");
}

#[test]
fn service_without_usable_endpoints_refuses_at_once_and_conditions_are_honoured() {
    for family in Family::BOTH {
        without_usable_endpoints(family);
    }
}

fn without_usable_endpoints(family: Family) {
    let (mut world, backends) = three_backends_of(family);
    let [p1, p2, p3]: [IpAddr; 3] = backends.try_into().unwrap();
    let vip = |n| family.cluster_ip(n).to_string();
    let none: &[(IpAddr, bool, bool, bool)] = &[];
    let manifest = [
        service_manifest("empty", &vip(20), None, none),
        service_manifest("unready", &vip(21), None, &[(p1, false, false, false)]),
        // Ready endpoints only: the not-ready and the terminating ones get nothing.
        service_manifest(
            "mixed",
            &vip(22),
            None,
            &[
                (p1, true, true, false),
                (p2, false, false, false),
                (p3, false, true, true),
            ],
        ),
        // No ready endpoint: the serving+terminating one takes the traffic.
        service_manifest(
            "draining",
            &vip(23),
            None,
            &[(p2, false, false, true), (p3, false, true, true)],
        ),
    ]
    .join("---\n");
    world.start_agent(&manifest, true).unwrap();

    for vip in [family.cluster_ip(20), family.cluster_ip(21)] {
        for hooked in [true, false] {
            let tcp = &world
                .probe(
                    CLIENT,
                    hooked,
                    &["tcp", "--to", &at(vip, 80), "--timeout-ms", "3000"],
                )
                .unwrap()[0];
            assert_eq!(
                tcp["kind"], "refused",
                "TCP to {vip} (hooked={hooked}): {tcp}"
            );
            // At once, but for IPv6 through tc, where Linux's TCP sets aside the error
            // about a SYN that arrives while connect() still holds the socket and fails on
            // the retransmission a second later: exactly so with ip6tables' REJECT
            // (kube-proxy's) on a veth (TcpExtLockDroppedIcmps); IPv4's is not set aside.
            let at_once = match (family, hooked) {
                (Family::V6, false) => 2000.0,
                _ => 1000.0,
            };
            assert!(
                tcp["ms"].as_f64().unwrap() < at_once,
                "TCP to {vip} (hooked={hooked}) refused at once, not after a timeout: {tcp}"
            );
            let udp = &world
                .probe(
                    CLIENT,
                    hooked,
                    &[
                        "udp",
                        "--to",
                        &at(vip, 53),
                        "--connected",
                        "--timeout-ms",
                        "3000",
                    ],
                )
                .unwrap()[0];
            assert_eq!(
                udp["kind"], "refused",
                "UDP to {vip} (hooked={hooked}): {udp}"
            );
        }
    }
    // Each refused packet is counted: two services, both paths, TCP and UDP; over IPv6 the
    // two SYNs of each connection through tc (above).
    let refused = match family {
        Family::V4 => 8,
        Family::V6 => 10,
    };
    let status: Value =
        serde_json::from_str(&world.proxyctl(&["status", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(status["drops"]["no_endpoints"], refused, "{status}");
    for hooked in [true, false] {
        let mixed = tcp_spread(&world, hooked, &at(family.cluster_ip(22), 80), 30);
        assert_eq!(
            mixed.keys().collect::<Vec<_>>(),
            ["backend-1"],
            "only the ready endpoint: {mixed:?}"
        );
        let draining = tcp_spread(&world, hooked, &at(family.cluster_ip(23), 80), 30);
        assert_eq!(
            draining.keys().collect::<Vec<_>>(),
            ["backend-3"],
            "serving+terminating fallback: {draining:?}"
        );
    }
}

/// `default/local` with `internalTrafficPolicy: Local` at `family`'s ClusterIP 30 (TCP 80,
/// UDP 53), one ready endpoint `addr` on node `node`.
fn internal_local(family: Family, addr: IpAddr, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: local, namespace: default}}\nspec:\n  clusterIP: '{}'\n  internalTrafficPolicy: Local\n  ports:\n  - {{name: http, port: 80, targetPort: {BACKEND_PORT}}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: {BACKEND_PORT}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: local-1, namespace: default, labels: {{kubernetes.io/service-name: local}}}}\naddressType: {}\nports:\n- {{name: http, port: {BACKEND_PORT}}}\n- {{name: dns, port: {BACKEND_PORT}, protocol: UDP}}\nendpoints:\n- addresses: ['{addr}']\n  nodeName: {node}\n  conditions: {{ready: true}}\n",
        family.cluster_ip(30),
        family.name(),
    )
}

#[test]
fn internal_traffic_policy_local_without_a_local_endpoint_drops_on_both_paths() {
    // kube-proxy's TestInternalTrafficPolicy, "internalTrafficPolicy is local and there
    // are no local endpoints": DROP, the client times out, through the socket hooks too.
    for family in Family::BOTH {
        internal_traffic_policy_local(family);
    }
}

fn internal_traffic_policy_local(family: Family) {
    let (mut world, backends) = three_backends_of(family);
    let vip = family.cluster_ip(30);
    let agent = world
        .start_agent(&internal_local(family, backends[0], "node-b"), true)
        .unwrap();
    for hooked in [true, false] {
        let tcp = &world
            .probe(
                CLIENT,
                hooked,
                &["tcp", "--to", &at(vip, 80), "--timeout-ms", "1500"],
            )
            .unwrap()[0];
        assert_eq!(tcp["kind"], "timeout", "hooked={hooked}: {tcp}");
        let udp = &world
            .probe(
                CLIENT,
                hooked,
                &[
                    "udp",
                    "--to",
                    &at(vip, 53),
                    "--connected",
                    "--timeout-ms",
                    "1000",
                ],
            )
            .unwrap()[0];
        assert_eq!(udp["kind"], "timeout", "hooked={hooked}: {udp}");
    }
    let dropped = |world: &World| {
        let status: Value =
            serde_json::from_str(&world.proxyctl(&["status", "-o", "json"]).unwrap()).unwrap();
        assert_eq!(status["drops"]["no_endpoints"], 0, "none refused: {status}");
        status["drops"]["no_local_endpoint"].as_u64().unwrap()
    };
    let from_pods = dropped(&world);
    assert!(from_pods >= 4, "dropped by tc, both paths: {from_pods}");
    // The node's own connection (in the hooked cgroup) is dropped by tc on its way out: a
    // route to the ClusterIP through a pod's veth stands for the node's default route.
    let (veth, via) = (
        world.pod(CLIENT).iface.clone(),
        world.pod(CLIENT).addr(family).to_string(),
    );
    world
        .run_in_node(
            0,
            "ip",
            &["route", "add", &vip.to_string(), "via", &via, "dev", &veth],
        )
        .unwrap();
    let node = &world.nodes[0];
    let out = std::process::Command::new(&world.bins.netprobe)
        .args(["--netns", &node.netns, "--cgroup"])
        .arg(&node.cgroup)
        .args(["tcp", "--to", &at(vip, 80), "--timeout-ms", "1000"])
        .output()
        .unwrap();
    let tcp: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tcp["kind"], "timeout", "from the node: {tcp}");
    assert!(dropped(&world) > from_pods, "dropped on the veth's egress");
    // The endpoint is on this node: served, both paths.
    let syncs = agent.syncs();
    world
        .write_manifest(&internal_local(family, backends[0], "node-a"))
        .unwrap();
    agent.wait_for_syncs(syncs + 1).unwrap();
    for hooked in [true, false] {
        let spread = tcp_spread(&world, hooked, &at(vip, 80), 5);
        assert_eq!(
            spread.keys().collect::<Vec<_>>(),
            ["backend-1"],
            "{spread:?}"
        );
    }
}

/// A Node `node-a` in `zone` (none: no Node), and `default/hinted` at `family`'s ClusterIP
/// 40 over the three backends, each with `(zone hint, node hint)` (empty: none).
fn hinted(
    family: Family,
    zone: Option<&str>,
    backends: &[IpAddr],
    hints: [(&str, &str); 3],
) -> String {
    let mut yaml = match zone {
        Some(zone) => format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n---\n"
        ),
        None => String::new(),
    };
    yaml += &format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: hinted, namespace: default}}\nspec:\n  clusterIP: '{}'\n  ports:\n  - {{name: http, port: 80, targetPort: {BACKEND_PORT}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: hinted-1, namespace: default, labels: {{kubernetes.io/service-name: hinted}}}}\naddressType: {}\nports:\n- {{name: http, port: {BACKEND_PORT}}}\nendpoints:\n",
        family.cluster_ip(40),
        family.name(),
    );
    for (addr, (zone, node)) in backends.iter().zip(hints) {
        let mut hints = Vec::new();
        if !zone.is_empty() {
            hints.push(format!("forZones: [{{name: {zone}}}]"));
        }
        if !node.is_empty() {
            hints.push(format!("forNodes: [{{name: {node}}}]"));
        }
        yaml += &format!(
            "- addresses: ['{addr}']\n  conditions: {{ready: true}}\n  hints: {{{}}}\n",
            hints.join(", ")
        );
    }
    yaml
}

#[test]
fn node_and_zone_hints_follow_the_node_manifest() {
    // kube-proxy's topologyModeFromHints: PreferSameNode when every ready endpoint has node
    // hints and one is for this node, else PreferSameZone likewise, else every endpoint.
    for family in Family::BOTH {
        node_and_zone_hints(family);
    }
}

fn node_and_zone_hints(family: Family) {
    let (mut world, backends) = three_backends_of(family);
    let to = at(family.cluster_ip(40), 80);
    let node_hints = [
        ("zone-a", "node-b"),
        ("zone-b", "node-a"),
        ("zone-a", "node-c"),
    ];
    let agent = world
        .start_agent(&hinted(family, Some("zone-a"), &backends, node_hints), true)
        .unwrap();
    let served = |world: &World| -> Vec<Vec<String>> {
        [true, false]
            .iter()
            .map(|hooked| tcp_spread(world, *hooked, &to, 24).into_keys().collect())
            .collect()
    };
    assert_eq!(served(&world), [["backend-2"], ["backend-2"]], "node hints");
    let steps = [
        // Zone hints only: this node's zone (from its Node manifest).
        (
            Some("zone-a"),
            [("zone-a", ""), ("zone-b", ""), ("zone-a", "")],
            vec!["backend-1", "backend-3"],
        ),
        // The Node moves to zone-b.
        (
            Some("zone-b"),
            [("zone-a", ""), ("zone-b", ""), ("zone-a", "")],
            vec!["backend-2"],
        ),
        // No Node: no zone, hints are not followed.
        (
            None,
            [("zone-a", ""), ("zone-b", ""), ("zone-a", "")],
            vec!["backend-1", "backend-2", "backend-3"],
        ),
    ];
    for (zone, hints, expected) in steps {
        let syncs = agent.syncs();
        world
            .write_manifest(&hinted(family, zone, &backends, hints))
            .unwrap();
        agent.wait_for_syncs(syncs + 1).unwrap();
        for got in served(&world) {
            assert_eq!(got, expected, "zone {zone:?}");
        }
    }
}

#[test]
fn manifest_edit_is_live_within_a_second() {
    let (mut world, backends) = three_backends();
    let base = service_manifest("web", VIP, None, &ready(&backends));
    world.start_agent(&base, true).unwrap();
    let new_service = service_manifest("late", "10.96.0.30", None, &ready(&backends[..1]));
    let written = Instant::now();
    world
        .write_manifest(&format!("{base}---\n{new_service}"))
        .unwrap();
    loop {
        let r = &world
            .probe(
                CLIENT,
                true,
                &["tcp", "--to", "10.96.0.30:80", "--timeout-ms", "200"],
            )
            .unwrap()[0];
        if r["ok"] == true {
            assert_eq!(r["backend"], "backend-1");
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(1),
            "new service not reachable within 1 s: {r}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn invalid_manifest_keeps_serving_the_last_good_state_and_says_why() {
    let (mut world, backends) = three_backends();
    let good = service_manifest("web", VIP, None, &ready(&backends));
    let agent = world.start_agent(&good, true).unwrap();
    let works = |world: &World| tcp_spread(world, true, &format!("{VIP}:80"), 9).len() > 1;

    // A reload that changes nothing served programs nothing: wait for its rejection.
    let path = world
        .write_manifest("apiVersion: v1\nkind: [Service\n")
        .unwrap();
    let line = agent
        .wait_for_log(
            &["rejected", &path.display().to_string(), "not valid YAML"],
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(line.contains("line 2"), "the error says where: {line}");
    assert!(works(&world), "web keeps working after a YAML syntax error");

    // One bad object among good ones: it alone is rejected; the others are served.
    let syncs = agent.syncs();
    let other = service_manifest("other", "10.96.0.31", None, &ready(&backends[..1]));
    world
        .write_manifest(&format!(
            "{}---\n{other}",
            good.replace("clusterIP: 10.96.0.10", "clusterIP: 10.96.0.300")
        ))
        .unwrap();
    agent.wait_for_syncs(syncs + 1).unwrap();
    let line = agent
        .wait_for_log(
            &[
                "Service default/web",
                "spec.clusterIP",
                "10.96.0.300",
                "still serving its last valid version",
            ],
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(line.contains("rejected"), "{line}");
    assert!(works(&world), "web keeps its last valid version");
    let other = tcp_spread(&world, true, "10.96.0.31:80", 3);
    assert_eq!(other.keys().collect::<Vec<_>>(), ["backend-1"]);
    let metrics = world.agent_http("/metrics").unwrap();
    assert!(
        metrics.contains("proxy_rejected_objects_total{reason=\"invalid_address\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("proxy_rejected_objects_total{reason=\"parse_error\"} 1"),
        "{metrics}"
    );

    // Fields that do not type-check (a port as a word, a port as a list) leave the
    // Service and its EndpointSlice at their last valid versions.
    let typed = good.replacen("port: 80,", "port: eighty,", 1).replacen(
        &format!("port: {BACKEND_PORT}}}"),
        &format!("port: [{BACKEND_PORT}]}}"),
        1,
    );
    assert_ne!(typed, good);
    world.write_manifest(&typed).unwrap();
    for field in ["spec.ports[0].port", "ports[0].port"] {
        agent
            .wait_for_log(
                &["rejected", field, "still serving its last valid version"],
                Duration::from_secs(5),
            )
            .unwrap();
    }
    assert_eq!(tcp_spread(&world, true, &format!("{VIP}:80"), 30).len(), 3);
    // A misspelt field is named, and the rest of the object served.
    let misspelt = good.replacen("clusterIP:", "clusterIp: 10.96.0.99\n  clusterIP:", 1);
    world.write_manifest(&misspelt).unwrap();
    agent
        .wait_for_log(
            &["WARN", "ignored", "spec.clusterIp", "unknown field"],
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(tcp_spread(&world, true, &format!("{VIP}:80"), 30).len(), 3);
    let healthz = world.node_http(10256, "/healthz").unwrap();
    assert!(healthz.starts_with("HTTP/1.0 200"), "{healthz}");
}

#[test]
fn tc_path_dnat_and_reverse_nat_for_pods_outside_the_hooked_cgroup() {
    let (mut world, backends) = three_backends();
    world
        .start_agent(&service_manifest("web", VIP, None, &ready(&backends)), true)
        .unwrap();
    let client_ip = world.pod(CLIENT).ip.to_string();

    let tcp = world
        .probe(
            CLIENT,
            false,
            &["tcp", "--to", &format!("{VIP}:80"), "--count", "90"],
        )
        .unwrap();
    assert_each_backend_got_a_fair_share(&spread(&tcp), 90);
    for r in &tcp {
        // The handshake completing at all proves the replies were reverse-NATed.
        assert_eq!(r["peer"], format!("{VIP}:80"), "{r}");
        let saw = r["server_saw"].as_str().unwrap();
        assert!(
            saw.starts_with(&format!("{client_ip}:")),
            "the backend sees the real client (no SNAT): {r}"
        );
    }
    let udp = world
        .probe(
            CLIENT,
            false,
            &["udp", "--to", &format!("{VIP}:53"), "--count", "60"],
        )
        .unwrap();
    assert_each_backend_got_a_fair_share(&spread(&udp), 60);
    for r in &udp {
        assert_eq!(
            r["peer"],
            format!("{VIP}:53"),
            "reply source is the ClusterIP: {r}"
        );
    }

    // Our conntrack holds the flows (bpftool shows named fields) and its fill is a metric.
    let dump = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(world.nodes[0].bpffs.join(proxy_common::maps::CONNTRACK))
        .output()
        .expect("running bpftool");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("\"nat_port\": 8080") && dump.contains("\"rev_nat_id\""),
        "{dump}"
    );
    // One entry per flow, under the client's address and port. A UDP client port that came
    // round again is its earlier flow again (the same entry, the same backend), so count
    // the distinct client tuples rather than the flows.
    let expected = tcp
        .iter()
        .map(|r| ("tcp", r))
        .chain(udp.iter().map(|r| ("udp", r)))
        .map(|(proto, r)| (proto, r["server_saw"].to_string()))
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = world.agent_http("/metrics").unwrap();
        let entries = metrics
            .lines()
            .find_map(|l| l.strip_prefix(r#"proxy_conntrack_entries{ip_family="IPv4"} "#))
            .and_then(|v| v.trim().parse::<u64>().ok());
        if entries.is_some_and(|n| n >= expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "conntrack fill metric missing: {entries:?}, expected {expected}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Two ClusterIPs whose only endpoint is the same pod (of their family).
fn two_services_sharing_a_backend(world: &mut World, vips: [IpAddr; 2], backend: IpAddr) {
    let manifest = [("web", vips[0]), ("web2", vips[1])]
        .map(|(name, vip)| service_manifest(name, &vip.to_string(), None, &ready(&[backend])))
        .join("---\n");
    world.start_agent(&manifest, true).unwrap();
}

#[test]
fn one_client_port_to_two_cluster_ips_sharing_a_backend_keeps_both_flows_right() {
    for family in Family::BOTH {
        let (mut world, backends) = three_backends_of(family);
        let vips = [family.cluster_ip(10), family.cluster_ip(11)];
        two_services_sharing_a_backend(&mut world, vips, backends[0]);
        let client = world.pod(CLIENT).addr(family);
        both_flows_stay_right(&mut world, vips, client);
    }
}

/// The tc path, one client port to `vips`, which share their backend: the second flow's
/// reply tuple would be the first's, so its source port moves; every UDP answer comes from
/// the address it was sent to, and a TCP connection to the second opens while one from
/// the same port to the first lives on.
fn both_flows_stay_right(world: &mut World, vips: [IpAddr; 2], client: IpAddr) {
    let (to1, to2) = (at(vips[0], 53), at(vips[1], 53));
    let udp = world
        .probe(
            CLIENT,
            false,
            &[
                "udp",
                "--to",
                &to1,
                "--to",
                &to2,
                "--count",
                "6",
                "--source-port",
                "40001",
            ],
        )
        .unwrap();
    for (r, to) in udp.iter().zip([&to1, &to2].into_iter().cycle()) {
        assert_eq!(r["ok"], true, "{udp:?}");
        assert_eq!(&r["peer"], to, "{udp:?}");
    }
    // proxyctl shows the second flow moved to another port, as the backend saw it.
    let flows: Value = serde_json::from_str(
        &world
            .proxyctl(&["conntrack", "list", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    let moved: Vec<&Value> = flows
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["client"] == SocketAddr::new(client, 40001).to_string() && f["service_address"] == to2
        })
        .collect();
    assert_eq!(moved.len(), 1, "{flows}");
    assert_eq!(moved[0]["masqueraded_as"], udp[1]["server_saw"], "{flows}");
    let hold = |to: String, ms: &str| {
        [
            "tcp",
            "--to",
            &to,
            "--source-port",
            "40002",
            "--hold-ms",
            ms,
            "--interval-ms",
            "100",
        ]
        .map(str::to_owned)
    };
    let first = hold(at(vips[0], 80), "2500");
    let (long, opened) = world
        .spawn_probe(CLIENT, false, &first.each_ref().map(String::as_str))
        .unwrap();
    assert_eq!(opened["ok"], true, "{opened}");
    let second = hold(at(vips[1], 80), "1000");
    let other = world
        .probe(CLIENT, false, &second.each_ref().map(String::as_str))
        .unwrap();
    assert_eq!(other[0]["ok"], true, "{other:?}");
    assert_eq!(other.last().unwrap()["failures"], 0, "{other:?}");
    let summary = world.finish_probe(long).unwrap();
    assert_eq!(
        summary["failures"], 0,
        "the first connection lives on: {summary}"
    );
    assert!(summary["exchanges"].as_u64().unwrap() >= 20, "{summary}");
}

#[test]
fn a_direct_connection_reusing_a_closed_service_flows_tuple_is_not_rewritten() {
    for family in Family::BOTH {
        direct_connection_reusing_a_closed_flows_tuple(family);
    }
}

fn direct_connection_reusing_a_closed_flows_tuple(family: Family) {
    let (mut world, backends) = three_backends_of(family);
    let vip = family.cluster_ip(10);
    two_services_sharing_a_backend(&mut world, [vip, family.cluster_ip(11)], backends[0]);
    let direct = at(backends[0], BACKEND_PORT);
    for round in 0..3 {
        // A service connection from the port, closed; then one straight to its backend.
        for to in [at(vip, 80), direct.clone()] {
            let r = world
                .probe(
                    CLIENT,
                    false,
                    &[
                        "tcp",
                        "--to",
                        &to,
                        "--source-port",
                        "40003",
                        "--timeout-ms",
                        "3000",
                    ],
                )
                .unwrap();
            assert_eq!(r[0]["ok"], true, "round {round}, to {to}: {r:?}");
            assert_eq!(r[0]["peer"], to.as_str(), "round {round}: {r:?}");
        }
    }
}

#[test]
fn icmp_errors_about_tc_path_flows_reach_the_client_translated() {
    let (mut world, backends) = three_backends();
    // UDP port 54 leads to a port the backend does not serve.
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  ports:\n  - {{name: http, port: 80, targetPort: {BACKEND_PORT}}}\n  - {{name: closed, port: 54, protocol: UDP, targetPort: 9999}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports:\n- {{name: http, port: {BACKEND_PORT}}}\n- {{name: closed, port: 9999, protocol: UDP}}\nendpoints:\n- addresses: [{}]\n",
        backends[0]
    );
    world.start_agent(&manifest, true).unwrap();
    // The backend's port unreachable comes back as from the ClusterIP, quoting what the
    // client sent: a connected socket sees ECONNREFUSED at once, not a timeout.
    let closed = format!("{VIP}:54");
    let udp = world
        .probe(
            CLIENT,
            false,
            &[
                "udp",
                "--to",
                &closed,
                "--connected",
                "--count",
                "3",
                "--timeout-ms",
                "2000",
            ],
        )
        .unwrap();
    assert!(udp.iter().all(|r| r["kind"] == "refused"), "{udp:?}");
    // A smaller MTU towards the backend: the node's "fragmentation needed" quotes the
    // translated segment; translated back, the client's TCP lowers its segment size and a
    // line longer than any segment gets through (else the path is a black hole).
    let iface = world.pod(1).iface.clone();
    world
        .run_in_node(0, "ip", &["link", "set", &iface, "mtu", "1000"])
        .unwrap();
    for hooked in [false, true] {
        let tcp = world
            .probe(
                CLIENT,
                hooked,
                &[
                    "tcp",
                    "--to",
                    &format!("{VIP}:80"),
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
fn udp_datagrams_larger_than_the_mtu_arrive_whole_through_a_cluster_ip() {
    let (mut world, backends) = three_backends();
    world
        .start_agent(&service_manifest("web", VIP, None, &ready(&backends)), true)
        .unwrap();
    // 4,000 bytes: three fragments each way. On the tc path every fragment must follow its
    // datagram's flow (to one backend, and back from the ClusterIP) or nothing arrives.
    for hooked in [false, true] {
        let udp = world
            .probe(
                CLIENT,
                hooked,
                &[
                    "udp",
                    "--to",
                    &format!("{VIP}:53"),
                    "--count",
                    "30",
                    "--datagram-bytes",
                    "4000",
                ],
            )
            .unwrap();
        assert_each_backend_got_a_fair_share(&spread(&udp), 30);
        for r in &udp {
            assert_eq!(r["peer"], format!("{VIP}:53"), "hooked: {hooked}: {r}");
        }
    }
}

#[test]
fn syns_with_a_bad_ip_checksum_create_no_conntrack_state() {
    let (mut world, backends) = three_backends();
    world
        .start_agent(&service_manifest("web", VIP, None, &ready(&backends)), true)
        .unwrap();
    let client = world.pod(CLIENT).ip.to_string();
    let to = format!("{VIP}:80");
    let syn = |port: &str, bad: bool| {
        let mut args = vec![
            "syn",
            "--device",
            "eth0",
            "--from",
            &client,
            "--to",
            &to,
            "--source-port",
            port,
            "--count",
            "20",
        ];
        if bad {
            args.push("--bad-ip-checksum");
        }
        let out = world.probe(CLIENT, false, &args).unwrap();
        assert_eq!(out[0]["sent"], 20, "{out:?}");
    };
    // Twenty SYNs whose IPv4 header checksum is wrong, then twenty good ones from another
    // port, written onto the pod's interface: only the good ones are tracked.
    syn("45000", true);
    syn("45001", false);
    let flows = |world: &World| -> Vec<String> {
        let rows: Value = serde_json::from_str(
            &world
                .proxyctl(&["conntrack", "list", "-o", "json"])
                .unwrap(),
        )
        .unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["client"].as_str().unwrap().to_owned())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let tracked = loop {
        let tracked = flows(&world);
        if tracked.iter().any(|c| c.ends_with(":45001")) || Instant::now() > deadline {
            break tracked;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        tracked.contains(&format!("{client}:45001")),
        "the good SYNs reached the program: {tracked:?}"
    );
    assert!(
        !tracked.iter().any(|c| c.ends_with(":45000")),
        "no state from bad checksums: {tracked:?}"
    );
}

#[test]
fn resync_repairs_map_entries_changed_behind_the_agents_back() {
    let (mut world, backends) = three_backends();
    let manifest = world
        .write_manifest(&service_manifest("web", VIP, None, &ready(&backends)))
        .unwrap();
    let manifest = manifest.to_string_lossy().into_owned();
    let agent = world
        .start_agent_with(&["--manifests", &manifest, "--resync-interval", "1"], true)
        .unwrap();
    assert_eq!(tcp_spread(&world, true, &format!("{VIP}:80"), 60).len(), 3);

    // Someone deletes the service entry with bpftool: key = addr, port (LE), proto, scope.
    let deleted = std::process::Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(world.nodes[0].bpffs.join("services"))
        .args(["key", "10", "96", "0", "10", "80", "0", "6", "0"])
        .status()
        .unwrap();
    assert!(deleted.success());
    agent
        .wait_for_log(&["resync: repaired 1 map entries"], Duration::from_secs(5))
        .unwrap();
    assert_eq!(tcp_spread(&world, true, &format!("{VIP}:80"), 60).len(), 3);
    let metrics = world.agent_http("/metrics").unwrap();
    assert!(metrics.contains("proxy_drift_repairs_total 1"), "{metrics}");
}

#[test]
fn a_full_conntrack_map_drops_flows_never_answered_and_refuses_when_none_is_left() {
    for family in Family::BOTH {
        full_conntrack(family);
    }
}

/// Keeps the calling thread, and the processes it starts, on CPU 0 until dropped.
struct OnOneCpu(libc::cpu_set_t);

impl OnOneCpu {
    fn new() -> Self {
        // SAFETY: cpu_set_t is plain data; the calls get valid pointers and its size.
        unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            assert_eq!(libc::sched_getaffinity(0, size, &mut before), 0);
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut one);
            assert_eq!(libc::sched_setaffinity(0, size, &one), 0);
            Self(before)
        }
    }
}

impl Drop for OnOneCpu {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// A metric's value in an exposition `metrics`, by its line's start (name and labels).
fn metric(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {metrics}"))
}

fn full_conntrack(family: Family) {
    let (mut world, backends) = three_backends_of(family);
    // "silent"'s only endpoint is an address no pod has: its flows are never answered.
    let nobody = match world.pod(1).addr(family) {
        IpAddr::V4(a) => IpAddr::from({
            let mut o = a.octets();
            o[3] = 250;
            o
        }),
        IpAddr::V6(a) => IpAddr::from({
            let mut o = a.octets();
            o[15] = 250;
            o
        }),
    };
    let silent = family.cluster_ip(20);
    let manifest = format!(
        "{}---\n{}",
        web(family, &ready(&backends)),
        service_manifest("silent", &silent.to_string(), None, &ready(&[nobody]))
    );
    let path = world
        .write_manifest(&manifest)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    // Each family's flows have a conntrack map of their own: 64 entries, one per flow.
    let map = match family {
        Family::V4 => proxy_common::maps::CONNTRACK,
        Family::V6 => proxy_common::maps::CONNTRACK6,
    };
    let size = format!("{map}=64");
    let agent = world
        .start_agent_with(&["--manifests", &path, "--map-size", &size], true)
        .unwrap();
    // Early drop chooses among the flows the CPU recorded lately: the clients run on one
    // CPU, so that the flood's flows are among those its later flows meet (a real flood
    // reaches every CPU).
    let _cpu = OnOneCpu::new();
    let web_dns = at(family.cluster_ip(10), 53);
    let udp = |world: &World, to: &str, count: &str, timeout_ms: &str| {
        let args = [
            "udp",
            "--to",
            to,
            "--count",
            count,
            "--timeout-ms",
            timeout_ms,
        ];
        world.probe(CLIENT, false, &args).unwrap()
    };
    // Answered flows on the tc path (each UDP flow from a new socket, its entries kept a
    // minute): 12 done, one held open throughout.
    assert_eq!(
        spread(&udp(&world, &web_dns, "12", "1000"))
            .values()
            .sum::<usize>(),
        12
    );
    let hold = [
        "udp",
        "--to",
        &web_dns,
        "--hold-ms",
        "8000",
        "--interval-ms",
        "200",
    ];
    let (held, first) = world.spawn_probe(CLIENT, false, &hold).unwrap();
    assert_eq!(first["ok"], true, "{first}");
    // A flood of flows never answered fills the map; each new one past that makes room by
    // dropping an older one.
    let flood = udp(&world, &at(silent, 53), "60", "20");
    assert!(
        flood.iter().all(|r| r["ok"] != true),
        "silent answered: {flood:?}"
    );
    let line = agent
        .wait_for_log(
            &[
                &format!("conntrack map {map} full"),
                "entries of flows never answered dropped to make room",
                &format!("{map}=128"),
            ],
            Duration::from_secs(5),
        )
        .unwrap();
    let dropped: u64 = line
        .split("full: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a count in {line:?}"));
    assert!(dropped > 0, "{line}");
    // New answered flows still get in, in room the flood's flows make (as many as each
    // CPU's recent flows hold of them).
    assert_eq!(
        spread(&udp(&world, &web_dns, "6", "1000"))
            .values()
            .sum::<usize>(),
        6
    );
    // Answered flows are never dropped for new ones: with no flood flow left to drop among
    // the recent ones, new flows are refused, and counted.
    let more = udp(&world, &web_dns, "24", "100");
    let refused = more.iter().filter(|r| r["ok"] != true).count();
    assert!(
        refused > 0,
        "a full map of answered flows took 24 more: {more:?}"
    );
    let summary = world.finish_probe(held).unwrap();
    assert_eq!(summary["failures"], 0, "the held flow broke: {summary}");
    assert_eq!(summary["last_backend"], summary["backend"], "{summary}");
    let metrics = world.agent_http("/metrics").unwrap();
    let counted = metric(&metrics, "proxy_conntrack_evicted_total");
    assert!(counted >= dropped, "counted {counted}, logged {dropped}");
    let refusals = metric(
        &metrics,
        "proxy_datapath_drops_total{reason=\"conntrack_insert_failed\"}",
    );
    assert!(
        refusals >= refused as u64,
        "{refusals} drops counted, {refused} refused"
    );
    let capacity = format!(
        "proxy_conntrack_capacity{{ip_family=\"{}\"}} 64",
        family.name()
    );
    assert!(metrics.contains(&capacity), "{metrics}");
}

#[test]
fn an_lru_conntrack_map_of_an_earlier_agent_becomes_a_hash_map_with_its_entries() {
    let (mut world, backends) = three_backends_of(Family::V4);
    let path = world
        .write_manifest(&web(Family::V4, &ready(&backends)))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    // What an earlier agent pinned: an LRU map of 1024 entries, with one flow's entry (a
    // pass entry, which comes alone; seen now, so that the GC keeps it).
    let bpffs = world.nodes[0].bpffs.clone();
    std::fs::create_dir_all(&bpffs).unwrap();
    let pin = bpffs.join("conntrack");
    let bpftool = |args: &[&str]| {
        let out = std::process::Command::new("bpftool")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "bpftool {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let pin_arg = pin.to_str().unwrap();
    let create = "map create PIN type lru_hash key 16 value 32 entries 1024 name conntrack";
    let create: Vec<&str> = create
        .split(' ')
        .map(|a| if a == "PIN" { pin_arg } else { a })
        .collect();
    bpftool(&create);
    let key = "10 1 0 9 10 96 0 10 0x9c 0x40 0 53 17 0 0 0";
    // SAFETY: clock_gettime with a valid pointer.
    let now = unsafe {
        let mut t: libc::timespec = std::mem::zeroed();
        assert_eq!(libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut t), 0);
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    };
    let stamp: Vec<String> = now.to_le_bytes().iter().map(|b| b.to_string()).collect();
    let value = format!(
        "10 244 1 2 0 53 0 1 1 0 0 0 1 0 0 0 10 1 0 9 0x9c 0x40 2 0 {}",
        stamp.join(" ")
    );
    let update = format!("map update pinned {pin_arg} key {key} value {value}");
    bpftool(&update.split(' ').collect::<Vec<_>>());

    let agent = world
        .start_agent_with(&["--manifests", &path], true)
        .unwrap();
    for line in [
        "conntrack map ct_flows: 1 entries copied",
        "conntrack map ct_flows: now of this agent's kind and layout",
    ] {
        agent.wait_for_log(&[line], Duration::from_secs(5)).unwrap();
    }
    let new_pin = bpffs.join(proxy_common::maps::CONNTRACK);
    let new_pin = new_pin.to_str().unwrap();
    let shown = bpftool(&["map", "show", "pinned", new_pin]);
    assert!(
        shown.contains(": hash ") && shown.contains("max_entries 1024"),
        "{shown}"
    );
    // The flow, one entry under its client key (kind 1).
    let client_key = "10 1 0 9 0 0 0 0 0x9c 0x40 0 0 17 1 0 0";
    let lookup = format!("map lookup pinned {new_pin} key {client_key}");
    let found = bpftool(&lookup.split(' ').collect::<Vec<_>>());
    assert!(found.contains("\"flags\": 2"), "{found}");
    assert!(!bpffs.join("conntrack").exists());
    assert!(!bpffs.join("conntrack_lru").exists());
    // Flows of the new map are balanced and translated as ever.
    assert_eq!(tcp_spread(&world, false, &format!("{VIP}:80"), 30).len(), 3);
}

#[test]
fn healthz_turns_unhealthy_while_programming_lags_the_source() {
    let (mut world, backends) = three_backends();
    // Room for exactly the two ports of "web": a second service cannot be programmed.
    let good = service_manifest("web", VIP, None, &ready(&backends));
    let path = world
        .write_manifest(&good)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let agent = world
        .start_agent_with(
            &[
                "--manifests",
                &path,
                "--map-size",
                "services=2",
                "--healthz-max-lag-secs",
                "1",
            ],
            true,
        )
        .unwrap();
    let healthz = |world: &World| world.node_http(10256, "/healthz").unwrap();
    assert!(
        healthz(&world).starts_with("HTTP/1.0 200"),
        "{}",
        healthz(&world)
    );

    let extra = service_manifest("extra", "10.96.0.40", None, &ready(&backends));
    world
        .write_manifest(&format!("{good}---\n{extra}"))
        .unwrap();
    agent
        .wait_for_log(
            &[
                "programming default/extra",
                "failed, keeping its previous state",
            ],
            Duration::from_secs(5),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !healthz(&world).starts_with("HTTP/1.0 503") {
        assert!(
            Instant::now() < deadline,
            "still healthy while a change cannot be programmed: {}",
            healthz(&world)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(healthz(&world).contains("\"healthy\":false"));
    let metrics = world.agent_http("/metrics").unwrap();
    assert!(
        metrics.contains("proxy_rejected_objects_total{reason=\"map_full\"}"),
        "{metrics}"
    );
    // The last good state keeps serving meanwhile.
    assert_eq!(tcp_spread(&world, true, &format!("{VIP}:80"), 60).len(), 3);

    world.write_manifest(&good).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !healthz(&world).starts_with("HTTP/1.0 200") {
        assert!(
            Instant::now() < deadline,
            "healthy again once programming caught up: {}",
            healthz(&world)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tc_path_works_with_netlink_clsact_attachment_too() {
    let (mut world, backends) = three_backends();
    let path = world
        .write_manifest(&service_manifest("web", VIP, None, &ready(&backends)))
        .unwrap();
    let path = path.to_string_lossy().into_owned();
    let agent = world
        .start_agent_with(&["--manifests", &path, "--tc-attach", "netlink"], true)
        .unwrap();
    agent
        .wait_for_log(
            &["attached proxy_ingress on vh4 Ingress (netlink)"],
            Duration::from_secs(5),
        )
        .unwrap();
    let filters = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &world.nodes[0].netns,
            "tc",
            "filter",
            "show",
            "dev",
            "vh4",
            "ingress",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&filters.stdout).contains("proxy_ingress"),
        "tc filter show lists the program"
    );
    let tcp = world
        .probe(
            CLIENT,
            false,
            &["tcp", "--to", &format!("{VIP}:80"), "--count", "60"],
        )
        .unwrap();
    assert_each_backend_got_a_fair_share(&spread(&tcp), 60);
    assert!(tcp.iter().all(|r| r["peer"] == format!("{VIP}:80")));
    let udp = world
        .probe(
            CLIENT,
            false,
            &["udp", "--to", &format!("{VIP}:53"), "--count", "30"],
        )
        .unwrap();
    assert!(
        udp.iter()
            .all(|r| r["ok"] == true && r["peer"] == format!("{VIP}:53")),
        "{udp:?}"
    );
}

#[test]
fn more_than_65536_frontends_are_served_and_a_small_file_edit_lands_alone() {
    let (mut world, backends) = three_backends();
    // 33,000 services of two ports each: 66,000 frontends, in 33 files of 1,000 services.
    let dir = world.dir.join("many");
    std::fs::create_dir_all(&dir).unwrap();
    let vip = |i: usize| format!("10.96.{}.{}", i / 250, i % 250 + 1);
    for file in 0..33 {
        let yaml: String = (file * 1000..(file + 1) * 1000)
            .map(|i| service_manifest(&format!("s{i}"), &vip(i), None, &ready(&backends[..1])))
            .collect::<Vec<_>>()
            .join("---\n");
        std::fs::write(dir.join(format!("{file:02}.yaml")), yaml).unwrap();
    }
    let dir_arg = dir.to_string_lossy().into_owned();
    let agent = world
        .spawn_agent_on(0, &["--manifests", &dir_arg], false)
        .unwrap();
    agent
        .wait_for_log(
            &["; 66000 service ports programmed, 0 services retrying"],
            Duration::from_secs(600),
        )
        .unwrap();
    // The last frontend answers, over TCP and UDP.
    let last = vip(32_999);
    for (proto, port) in [("tcp", 80), ("udp", 53)] {
        let r = &world
            .probe(CLIENT, true, &[proto, "--to", &format!("{last}:{port}")])
            .unwrap()[0];
        assert_eq!(r["backend"], "backend-1", "{proto}: {r}");
    }
    // One small file added beside the 33 big ones: only its service is programmed.
    let small = service_manifest("small", "10.97.0.1", None, &ready(&backends[1..2]));
    std::fs::write(dir.join("small.yaml"), small).unwrap();
    let line = agent
        .wait_for_log(&["synced 1 services"], Duration::from_secs(30))
        .unwrap();
    assert!(
        line.contains("(changed: default/small)") && line.contains("2 service ports changed"),
        "the sync names what changed: {line}"
    );
    let r = &world
        .probe(CLIENT, true, &["tcp", "--to", "10.97.0.1:80"])
        .unwrap()[0];
    assert_eq!(r["backend"], "backend-2", "{r}");
}
