//! Installing the agent on a node as an operator does: in place of a running kube-proxy
//! (its iptables and nftables rules carrying live flows, its ports held), next to another
//! agent, with mistakes in the configuration, with its datapath removed behind its back,
//! and taken away again with `--cleanup`. Pods 1-3 serve as backends, pod 4 is the client.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use proxy::testbed::{BACKEND_PORT, Family, World, at, ready, service_manifest};
use serde_json::Value;

const CLIENT: usize = 4;
const VIP: &str = "10.96.0.10";
const PROBE_PORT: u16 = 10266;

fn three_backends() -> (World, Vec<Ipv4Addr>) {
    World::three_backends(proxy::test_binaries!()).expect("building the namespace world")
}

/// Backend → connections, over `count` new TCP connections from the client.
fn tcp_spread(world: &World, hooked: bool, count: u32) -> BTreeMap<String, usize> {
    tcp_spread_to(world, hooked, &format!("{VIP}:80"), count)
}

/// `tcp_spread` to `to`.
fn tcp_spread_to(world: &World, hooked: bool, to: &str, count: u32) -> BTreeMap<String, usize> {
    let lines = world
        .probe(
            CLIENT,
            hooked,
            &["tcp", "--to", to, "--count", &count.to_string()],
        )
        .unwrap();
    let mut counts = BTreeMap::new();
    for line in lines {
        assert_eq!(line["ok"], true, "{line}");
        *counts
            .entry(line["backend"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    counts
}

/// Polls `check` every 50 ms for at most `timeout`; panics with `what` if it never holds.
fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `proxy-agent --cleanup` on node-a's pin directory, run to its end.
fn cleanup(world: &World) -> std::process::Output {
    world
        .agent_command(0)
        .arg("--cleanup")
        .arg("--bpffs")
        .arg(&world.nodes[0].bpffs)
        .output()
        .unwrap()
}

fn status_of(response: &str) -> &str {
    response.lines().next().unwrap_or_default()
}

fn body_of(response: &str) -> Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

/// What kube-proxy's iptables mode programs for `vip` (TCP 80 and UDP 53 to the backends),
/// in the shape and with the names it uses; for `ip6tables-restore` with IPv6 addresses.
fn kube_proxy_iptables(vip: IpAddr, backends: &[IpAddr]) -> String {
    let host = if vip.is_ipv6() { 128 } else { 32 };
    let mut nat = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n:KUBE-PROXY-CANARY - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
    );
    for (proto, port) in [("tcp", 80), ("udp", 53)] {
        let svc = format!("KUBE-SVC-WEB{}", proto.to_uppercase());
        nat += &format!(":{svc} - [0:0]\n");
        rules += &format!(
            "-A KUBE-SERVICES -d {vip}/{host} -p {proto} -m {proto} --dport {port} -j {svc}\n"
        );
        for (i, backend) in backends.iter().enumerate() {
            let sep = format!("KUBE-SEP-WEB{}{i}", proto.to_uppercase());
            nat += &format!(":{sep} - [0:0]\n");
            let left = backends.len() - i;
            if left > 1 {
                rules += &format!(
                    "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}\n",
                    1.0 / left as f64
                );
            } else {
                rules += &format!("-A {svc} -j {sep}\n");
            }
            rules += &format!(
                "-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {}\n",
                at(*backend, BACKEND_PORT)
            );
        }
    }
    let filter = "*filter\n:KUBE-FORWARD - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
        -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
        -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
        -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
        -A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
        COMMIT\n";
    format!("{nat}{rules}COMMIT\n{filter}")
}

/// Packets that kube-proxy's `KUBE-SERVICES` rules (the service portals of both families)
/// matched: one per connection they balanced (the nat table sees a connection's first
/// packet only).
fn kube_proxy_balanced(world: &World) -> u64 {
    ["iptables-save", "ip6tables-save"]
        .iter()
        .flat_map(|save| {
            let saved = world.run_in_node(0, save, &["-c", "-t", "nat"]).unwrap();
            saved
                .lines()
                .filter(|l| l.contains("-A KUBE-SERVICES"))
                .map(|l| {
                    let counters = l.trim_start_matches('[').split(']').next().unwrap();
                    counters.split(':').next().unwrap().parse::<u64>().unwrap()
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

/// kube-proxy's rules for `family`'s ClusterIP 10 over pods 1-3, restored as it does.
fn restore_kube_proxy_rules(world: &World, family: Family) {
    let backends: Vec<IpAddr> = (1..=3).map(|i| world.pod(i).addr(family)).collect();
    let rules = kube_proxy_iptables(family.cluster_ip(10), &backends);
    let restore = match family {
        Family::V4 => "iptables-restore",
        Family::V6 => "ip6tables-restore",
    };
    let mut child = world
        .in_node(0, restore)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), rules.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "{restore} failed");
}

/// The chart's kube-proxy migration, step by step, on a dual-stack node where kube-proxy's
/// iptables and ip6tables rules carry long-lived TCP and UDP flows and kube-proxy holds
/// 10249 and 10256.
#[test]
fn replacing_kube_proxy_keeps_every_connection_and_leaves_none_of_its_rules() {
    let (mut world, backends) = three_backends();
    for family in Family::BOTH {
        restore_kube_proxy_rules(&world, family);
    }
    let vip6 = Family::V6.cluster_ip(10);
    // A node that once ran kube-proxy in nftables mode keeps its table too.
    world
        .run_in_node(
            0,
            "nft",
            &[
                "add",
                "table",
                "ip",
                "kube-proxy",
                "{ comment \"rules for kube-proxy\"; }",
            ],
        )
        .unwrap();
    let kube_proxy = world
        .spawn(Command::new(&world.bins.netprobe).args([
            "--netns",
            &world.nodes[0].netns,
            "serve",
            "--id",
            "kube-proxy",
            "--tcp",
            "10249",
            "--tcp",
            "10256",
            "--max-secs",
            "120",
        ]))
        .unwrap();
    let listening = |world: &World, port: u16| {
        let filter = format!("sport = :{port}");
        !world
            .run_in_node(0, "ss", &["-ltnH", &filter])
            .unwrap()
            .trim()
            .is_empty()
    };
    eventually(
        Duration::from_secs(5),
        "kube-proxy stand-in listening",
        || listening(&world, 10249) && listening(&world, 10256),
    );
    // Long-lived flows through kube-proxy's rules, from a pod in the cgroup that will be
    // hooked and from one outside it (tc path), TCP and connected UDP; over IPv6 through
    // tc.
    let hold = |proto: &'static str, vip: IpAddr| {
        let port = if proto == "tcp" { 80 } else { 53 };
        let mut args = vec![proto.to_owned(), "--to".into(), at(vip, port)];
        if proto == "udp" {
            args.push("--connected".into());
        }
        args.extend(["--hold-ms", "8000", "--interval-ms", "100"].map(String::from));
        args
    };
    let vip4: IpAddr = VIP.parse().unwrap();
    let mut flows = Vec::new();
    for (proto, hooked, vip) in [
        ("tcp", true, vip4),
        ("tcp", false, vip4),
        ("udp", false, vip4),
        ("tcp", false, vip6),
        ("udp", false, vip6),
    ] {
        let args = hold(proto, vip);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (handle, first) = world.spawn_probe(CLIENT, hooked, &args).unwrap();
        assert_eq!(first["ok"], true, "{first}");
        flows.push((
            format!("{proto} to {vip}"),
            hooked,
            handle,
            first["backend"].as_str().unwrap().to_owned(),
        ));
    }
    let balanced_by_kube_proxy = kube_proxy_balanced(&world);
    assert!(
        balanced_by_kube_proxy >= 5,
        "the flows went through kube-proxy's rules"
    );

    // 1. Install: the agent becomes ready while kube-proxy still holds its ports.
    let backends6: Vec<IpAddr> = (1..=3).map(|i| world.pod(i).addr(Family::V6)).collect();
    let services = [
        service_manifest("web", VIP, None, &ready(&backends)),
        service_manifest("web6", &vip6.to_string(), None, &ready(&backends6)),
    ];
    let manifest = world.write_manifest(&services.join("---\n")).unwrap();
    let probe_bind = format!("0.0.0.0:{PROBE_PORT}");
    let agent = world
        .start_agent_with(
            &[
                "--manifests",
                &manifest.to_string_lossy(),
                "--probe-bind",
                &probe_bind,
            ],
            true,
        )
        .unwrap();
    agent
        .wait_for_log(
            &["127.0.0.1:10249 (--metrics-bind) is in use"],
            Duration::from_secs(5),
        )
        .unwrap();
    agent
        .wait_for_log(
            &["0.0.0.0:10256 (--healthz-bind) is in use"],
            Duration::from_secs(5),
        )
        .unwrap();
    // The UDP flows kube-proxy translates (one per family) are left to the kernel's NAT.
    agent
        .wait_for_log(
            &["left 2 UDP flows to the kernel's NAT"],
            Duration::from_secs(1),
        )
        .unwrap();
    let readyz = world.node_http(PROBE_PORT, "/readyz").unwrap();
    assert!(status_of(&readyz).contains("200"), "{readyz}");
    assert!(
        world
            .node_http(PROBE_PORT, "/livez")
            .unwrap()
            .contains("200 OK")
    );

    // New connections go through eBPF: kube-proxy's rules balance none of them.
    for hooked in [true, false] {
        assert_eq!(tcp_spread(&world, hooked, 30).len(), 3);
        assert_eq!(tcp_spread_to(&world, hooked, &at(vip6, 80), 30).len(), 3);
    }
    assert_eq!(kube_proxy_balanced(&world), balanced_by_kube_proxy);

    // 2. kube-proxy goes: the agent takes its ports over.
    world.kill(kube_proxy).unwrap();
    agent
        .wait_for_log(&["took over 0.0.0.0:10256"], Duration::from_secs(5))
        .unwrap();
    agent
        .wait_for_log(&["took over 127.0.0.1:10249"], Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        body_of(&world.node_http(10256, "/healthz").unwrap())["healthy"],
        true
    );
    assert!(
        world
            .agent_http("/metrics")
            .unwrap()
            .contains("proxy_service_ports 4")
    );

    // 3. Its rules go, as `kube-proxy --cleanup` removes them.
    let out = world
        .agent_command(0)
        .arg("--cleanup-kube-proxy")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("nftables table ip kube-proxy"), "{log}");
    for save in ["iptables-save", "ip6tables-save"] {
        for table in ["nat", "filter"] {
            let saved = world.run_in_node(0, save, &["-t", table]).unwrap();
            assert!(!saved.contains("KUBE-"), "left in {save} {table}:\n{saved}");
        }
    }
    let tables = world.run_in_node(0, "nft", &["list", "tables"]).unwrap();
    assert!(!tables.contains("table ip kube-proxy"), "{tables}");
    // What keeps the kernel translating kube-proxy's connections without its rules.
    assert!(
        tables.contains("table inet ebpf-proxy-conntrack"),
        "{tables}"
    );
    for hooked in [true, false] {
        assert_eq!(tcp_spread(&world, hooked, 30).len(), 3);
    }

    // Every flow kube-proxy's rules set up lived through all of it, on its backend.
    let summaries: Vec<_> = flows
        .into_iter()
        .map(|(proto, hooked, handle, backend)| {
            (proto, hooked, world.finish_probe(handle).unwrap(), backend)
        })
        .collect();
    for (proto, hooked, summary, backend) in summaries {
        assert_eq!(
            summary["failures"], 0,
            "{proto} (hooked={hooked}): {summary}"
        );
        assert!(summary["exchanges"].as_u64().unwrap() >= 40, "{summary}");
        assert_eq!(summary["last_backend"], backend.as_str(), "{summary}");
    }

    // 4. A reboot: the datapath is gone with bpffs; the agent starts from nothing.
    world.kill(agent.pid).unwrap();
    let out = cleanup(&world);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = world
        .probe(
            CLIENT,
            true,
            &["tcp", "--to", "10.96.0.10:80", "--timeout-ms", "500"],
        )
        .unwrap();
    assert_eq!(
        refused[0]["ok"], false,
        "nothing serves the ClusterIP: {refused:?}"
    );
    world
        .start_agent_with(&["--manifests", &manifest.to_string_lossy()], true)
        .unwrap();
    assert_eq!(tcp_spread(&world, true, 30).len(), 3);
}

#[test]
fn a_second_agent_on_the_same_pin_directory_refuses_and_the_first_keeps_serving() {
    let (mut world, backends) = three_backends();
    let manifest = service_manifest("web", VIP, None, &ready(&backends));
    let first = world.start_agent(&manifest, true).unwrap();
    let path = world.dir.join("services.yaml");
    let second = world
        .spawn_agent_on(0, &["--manifests", &path.to_string_lossy()], true)
        .unwrap();
    let status = world
        .wait_exit(second.pid, Duration::from_secs(10))
        .unwrap();
    assert!(!status.success());
    second
        .wait_for_log(
            &[&format!(
                "agent pid {} already owns the datapath",
                first.pid
            )],
            Duration::from_secs(2),
        )
        .unwrap();
    for hooked in [true, false] {
        assert_eq!(tcp_spread(&world, hooked, 30).len(), 3);
    }
    let healthz = world.node_http(10256, "/healthz").unwrap();
    assert!(status_of(&healthz).contains("200"), "{healthz}");
    // And `--cleanup` will not pull the datapath from under a running agent.
    let out = cleanup(&world);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && log.contains(&format!("pid {}", first.pid)),
        "{log}"
    );
    assert!(!tcp_spread(&world, true, 10).is_empty());
}

/// Runs the agent to its exit with `args` (after the node's defaults) and a pin directory
/// of its own; returns its log, and checks that it failed and pinned nothing.
fn fails_cleanly(world: &World, prefix: &[&str], args: &[&str]) -> String {
    let bpffs = world.nodes[0].bpffs.with_extension("mistake");
    let manifest = world.dir.join("services.yaml");
    let mut command = world.in_node(0, prefix.first().copied().unwrap_or("env"));
    command.args(prefix.iter().skip(1));
    if !args.contains(&"--kubeconfig") && !args.contains(&"--manifests") {
        command.arg("--manifests").arg(&manifest);
    }
    if !args.contains(&"--cgroup") {
        command.arg("--cgroup").arg(&world.nodes[0].cgroup);
    }
    if !args.contains(&"--bpffs") {
        command.arg("--bpffs").arg(&bpffs);
    }
    let out = command
        .arg("--interfaces")
        .arg("vh1")
        .args(args)
        .args([
            "--metrics-bind",
            "127.0.0.1:0",
            "--healthz-bind",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} started: {log}");
    assert!(!bpffs.exists(), "{args:?} pinned something: {log}");
    let links = world.cgroup_programs(0).unwrap();
    assert!(links.trim().is_empty(), "{args:?} attached: {links}");
    log
}

#[test]
fn mistakes_fail_before_anything_is_pinned_with_the_fix_in_the_message() {
    let (world, backends) = three_backends();
    world
        .write_manifest(&service_manifest("web", VIP, None, &ready(&backends)))
        .unwrap();
    let agent = world.bins.agent.to_string_lossy().into_owned();
    let not_bpffs = world.dir.join("pins");
    let not_bpffs = not_bpffs.to_string_lossy();
    let tmp = world.dir.to_string_lossy();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--interfaces", "eht0"],
            "no interface eht0 in this network namespace (it has",
        ),
        (
            &["--cgroup", &tmp],
            "is not a cgroup v2 directory; pass one",
        ),
        (&["--bpffs", &not_bpffs], "is not on a BPF filesystem"),
        (
            &["--kubeconfig", "/nonexistent/kubeconfig"],
            "reading kubeconfig /nonexistent/kubeconfig",
        ),
        (
            &["--manifests", "/nonexistent/services.yaml"],
            "--manifests /nonexistent/services.yaml",
        ),
        (
            &["--probe-bind", "192.0.2.1:10266"],
            "binding 192.0.2.1:10266 (--probe-bind)",
        ),
    ];
    for (args, message) in cases {
        let log = fails_cleanly(&world, &[&agent], args);
        assert!(log.contains(message), "{args:?}: {message:?} not in {log}");
    }
    // Without the capabilities of the datapath (root with them dropped).
    let log = fails_cleanly(
        &world,
        &[
            "setpriv",
            "--bounding-set",
            "-bpf,-perfmon,-net_admin,-sys_admin",
            "--inh-caps",
            "-all",
            &agent,
        ],
        &[],
    );
    assert!(
        log.contains("missing capabilities CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"),
        "{log}"
    );
}

fn write_unreachable_kubeconfig(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"https://127.0.0.1:9\"}\n\
         users:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n\
         current-context: x\n",
    )
    .unwrap();
    path
}

#[test]
fn health_fails_before_the_first_sync_and_while_an_attachment_cannot_be_put_back() {
    let (mut world, backends) = three_backends();
    // An API server that never answers: nothing is ever programmed.
    let kubeconfig = write_unreachable_kubeconfig(&world.dir);
    let agent = world
        .spawn_agent_on(0, &["--kubeconfig", &kubeconfig.to_string_lossy()], true)
        .unwrap();
    agent
        .wait_for_log(
            &["source: the Kubernetes API at https://127.0.0.1:9/"],
            Duration::from_secs(10),
        )
        .unwrap();
    eventually(Duration::from_secs(5), "healthz serving", || {
        world.node_http(10256, "/healthz").is_ok()
    });
    let healthz = world.node_http(10256, "/healthz").unwrap();
    assert!(status_of(&healthz).contains("503"), "{healthz}");
    assert!(
        body_of(&healthz)["problems"][0]
            .as_str()
            .unwrap()
            .starts_with("nothing programmed yet")
    );
    assert!(status_of(&world.node_http(10256, "/livez").unwrap()).contains("200"));
    world.kill(agent.pid).unwrap();

    // A programmed node whose pod interface disappears: its tc programs cannot be put back.
    let agent = world
        .start_agent(&service_manifest("web", VIP, None, &ready(&backends)), true)
        .unwrap();
    assert!(status_of(&world.node_http(10256, "/healthz").unwrap()).contains("200"));
    let veth = world.pod(CLIENT).iface.clone();
    world.run_in_node(0, "ip", &["link", "del", &veth]).unwrap();
    agent
        .wait_for_log(
            &[&format!("proxy_ingress on {veth}"), "is not attached"],
            Duration::from_secs(5),
        )
        .unwrap();
    let healthz = world.node_http(10256, "/healthz").unwrap();
    assert!(status_of(&healthz).contains("503"), "{healthz}");
    assert!(healthz.contains("its target no longer exists"), "{healthz}");
    let metrics = world.agent_http("/metrics").unwrap();
    assert!(metrics.contains("proxy_datapath_missing 2"), "{metrics}");
}

#[test]
fn attachments_and_pins_removed_behind_the_agent_are_put_back() {
    let (mut world, backends) = three_backends();
    let agent = world
        .start_agent(&service_manifest("web", VIP, None, &ready(&backends)), true)
        .unwrap();
    let bpffs = world.nodes[0].bpffs.clone();
    // A link detached behind the agent's back (`bpftool link detach`): re-attached.
    let pin = bpffs.join(format!("links/proxy_ingress@{}", world.pod(CLIENT).iface));
    let shown = world
        .run_in_node(
            0,
            "bpftool",
            &["-j", "link", "show", "pinned", &pin.to_string_lossy()],
        )
        .unwrap();
    let id = serde_json::from_str::<Value>(&shown).unwrap()["id"].to_string();
    world
        .run_in_node(0, "bpftool", &["link", "detach", "id", &id])
        .unwrap();
    agent
        .wait_for_log(
            &["put back proxy_ingress on vh4", "(it had been detached)"],
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(tcp_spread(&world, false, 30).len(), 3);

    // The whole pin directory removed: the links stay attached (the agent holds them), and
    // every pin comes back.
    std::fs::remove_dir_all(&bpffs).unwrap();
    assert_eq!(tcp_spread(&world, true, 30).len(), 3);
    assert_eq!(tcp_spread(&world, false, 30).len(), 3);
    agent
        .wait_for_log(&["put back the pin directory"], Duration::from_secs(5))
        .unwrap();
    agent
        .wait_for_log(
            &["put back the pin of proxy_connect4"],
            Duration::from_secs(5),
        )
        .unwrap();
    for name in proxy_common::maps::ALL {
        assert!(bpffs.join(name).exists(), "map {name} pinned again");
    }
    let services = world.proxyctl(&["service", "list"]).unwrap();
    assert!(services.contains("default/web"), "{services}");
    let metrics = world.agent_http("/metrics").unwrap();
    assert!(
        !metrics.contains("proxy_datapath_repairs_total 0"),
        "{metrics}"
    );
    assert!(status_of(&world.node_http(10256, "/healthz").unwrap()).contains("200"));
}

#[test]
fn cleanup_removes_everything_the_agent_created() {
    let (mut world, backends) = three_backends();
    let manifest = service_manifest("web", VIP, None, &ready(&backends));
    let bpffs = world.nodes[0].bpffs.clone();
    for tc in ["tcx", "netlink"] {
        // A program array an earlier version pinned (`maps::RETIRED`): the agent removes it.
        pin_retired_map(&bpffs, "tc_ipv6");
        let path = world.write_manifest(&manifest).unwrap();
        let agent = world
            .start_agent_with(
                &["--manifests", &path.to_string_lossy(), "--tc-attach", tc],
                true,
            )
            .unwrap();
        assert!(
            !bpffs.join("tc_ipv6").exists(),
            "{tc}: the retired pin stayed"
        );
        assert!(!tcp_spread(&world, false, 10).is_empty());
        // Killed, not stopped: an agent that exits detaches its netlink filters itself.
        world.kill(agent.pid).unwrap();
        // So does cleanup, which then removes the directory too.
        pin_retired_map(&bpffs, "xdp_ipv6");
        let out = cleanup(&world);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert!(log.contains("and the pin directory"), "{log}");
        assert!(!world.nodes[0].bpffs.exists());
        let cgroup = world.cgroup_programs(0).unwrap();
        assert!(cgroup.trim().is_empty(), "{tc}: {cgroup}");
        for pod in 1..=4 {
            let iface = world.pod(pod).iface.clone();
            for direction in ["ingress", "egress"] {
                let filters = world
                    .run_in_node(0, "tc", &["filter", "show", "dev", &iface, direction])
                    .unwrap();
                assert!(!filters.contains("proxy_"), "{tc}: {filters}");
            }
        }
        // Nothing translates any more, at the socket or on the interfaces.
        for hooked in [true, false] {
            let refused = world
                .probe(
                    CLIENT,
                    hooked,
                    &["tcp", "--to", "10.96.0.10:80", "--timeout-ms", "500"],
                )
                .unwrap();
            assert_eq!(refused[0]["ok"], false, "{tc} hooked={hooked}: {refused:?}");
        }
    }
}

/// Pins a program array under `name` in `bpffs`, as an earlier version of the agent did.
fn pin_retired_map(bpffs: &Path, name: &str) {
    std::fs::create_dir_all(bpffs).unwrap();
    let path = bpffs.join(name);
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&path)
        .args([
            "type",
            "prog_array",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "2",
        ])
        .args(["name", name])
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The chart grants BPF, PERFMON, NET_ADMIN, SYS_RESOURCE and SYS_ADMIN, the last only to
/// enter pods' network namespaces: without it the agent loads, attaches, serves and cleans
/// up all the same, and says once which sockets it cannot destroy.
#[test]
fn the_agent_serves_with_the_charts_capabilities_but_sys_admin() {
    let (mut world, backends) = three_backends();
    world.agent_wrapper = [
        "setpriv",
        "--bounding-set",
        "-all,+bpf,+perfmon,+net_admin,+sys_resource",
        "--inh-caps",
        "-all",
        "--",
    ]
    .map(String::from)
    .to_vec();
    let agent = world
        .start_agent(&service_manifest("web", VIP, None, &ready(&backends)), true)
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid)).unwrap();
    let effective = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    let mask = u64::from_str_radix(effective.split_whitespace().nth(1).unwrap(), 16).unwrap();
    // The chart's set but SYS_ADMIN, less what this machine's bounding set lacks
    // (SYS_RESOURCE here).
    let chart = (1 << 39) | (1 << 38) | (1 << 12) | (1 << 24);
    let essential = (1 << 39) | (1 << 38) | (1 << 12);
    assert!(
        mask & !chart == 0 && mask & essential == essential,
        "{effective}"
    );
    // A pod's connected UDP socket whose backend leaves: it cannot be reached.
    let (flow, first) = world
        .spawn_probe(
            CLIENT,
            true,
            &[
                "udp",
                "--to",
                "10.96.0.10:53",
                "--connected",
                "--hold-ms",
                "1500",
            ],
        )
        .unwrap();
    let left = first["backend"].as_str().unwrap().to_owned();
    let kept: Vec<_> = backends
        .iter()
        .zip(1..)
        .filter(|(_, i)| format!("backend-{i}") != left)
        .map(|(ip, _)| *ip)
        .collect();
    world
        .write_manifest(&service_manifest("web", VIP, None, &ready(&kept)))
        .unwrap();
    agent
        .wait_for_log(
            &["cannot enter pods' network namespaces", "CAP_SYS_ADMIN"],
            Duration::from_secs(5),
        )
        .unwrap();
    world.finish_probe(flow).unwrap();
    for hooked in [true, false] {
        assert_eq!(tcp_spread(&world, hooked, 30).len(), kept.len());
    }
    assert!(status_of(&world.node_http(10256, "/healthz").unwrap()).contains("200"));
    world.kill(agent.pid).unwrap();
    let out = cleanup(&world);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!world.nodes[0].bpffs.exists());
}

/// Pod veths by pattern, followed as pods come and go; the external interface by `auto`.
#[test]
fn interfaces_by_pattern_are_followed_and_auto_finds_the_external_one() {
    let (mut world, backends) = three_backends();
    world.agent_interfaces = Some("vh*".into());
    let agent = world
        .start_agent(&service_manifest("web", VIP, None, &ready(&backends)), true)
        .unwrap();
    // The client's veth was matched: the tc path serves it.
    assert_eq!(tcp_spread(&world, false, 30).len(), 3);
    // What the kernel says of the pinned link of proxy_ingress on vh9 (`proxyctl status`:
    // this bpftool does not show TCX links' interfaces).
    let pin = world.nodes[0].bpffs.join("links/proxy_ingress@vh9");
    let link = |world: &World| -> String {
        let status: Value =
            serde_json::from_str(&world.proxyctl(&["status", "--output", "json"]).unwrap())
                .unwrap();
        status["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["pin"] == "proxy_ingress@vh9")
            .map_or("absent".to_owned(), |a| a["attached_to"].to_string())
    };
    // A new pod's veth gets the programs; a deleted one is let go, and health stays good.
    world
        .run_in_node(
            0,
            "ip",
            &["link", "add", "vh9", "type", "veth", "peer", "name", "vh9p"],
        )
        .unwrap();
    agent
        .wait_for_log(
            &["interfaces: attached proxy_ingress to vh9"],
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(link(&world).starts_with("\"interface "), "{}", link(&world));
    world.run_in_node(0, "ip", &["link", "del", "vh9"]).unwrap();
    agent
        .wait_for_log(
            &["interfaces: let go of proxy_ingress on vh9"],
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(!pin.exists());
    std::thread::sleep(Duration::from_millis(1500));
    let healthz = world.node_http(10256, "/healthz").unwrap();
    assert!(status_of(&healthz).contains("200"), "{healthz}");
    world.kill(agent.pid).unwrap();
    let out = cleanup(&world);
    assert!(out.status.success());

    // `auto` with neither a default route nor --node-ip in this namespace: said, not guessed.
    let agent = world.bins.agent.to_string_lossy().into_owned();
    let log = fails_cleanly(&world, &[&agent], &["--interfaces", "auto"]);
    assert!(log.contains("--interfaces auto: no default route"), "{log}");
}

#[test]
fn auto_finds_the_interface_holding_the_node_ip() {
    let mut world = World::two_nodes(1, 1, proxy::test_binaries!()).unwrap();
    world.agent_interfaces = Some("auto".into());
    world.serve(1, "backend-1").unwrap();
    let agent = world
        .start_agent(
            &service_manifest("web", VIP, None, &ready(&[world.pod(1).ip])),
            true,
        )
        .unwrap();
    agent
        .wait_for_log(&["attached proxy_ingress on eth0"], Duration::from_secs(1))
        .unwrap();
    assert!(!agent.log_lines().iter().any(|l| l.contains("on vh1")));
}
