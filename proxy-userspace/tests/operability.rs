//! Operability against a live agent: `proxyctl`, `bpftool` and `/metrics` must match the
//! traffic the test sent.
use std::{collections::BTreeMap, net::Ipv4Addr, process::Command};

use proxy::testbed::{NO_ENDPOINTS, World, ready, service_manifest};
use serde_json::Value;

const VIP: &str = "10.96.0.10";
const CLIENT: usize = 4;

fn world() -> (World, Vec<Ipv4Addr>) {
    World::three_backends(proxy::test_binaries!()).expect("building the namespace world")
}

fn json(world: &World, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    serde_json::from_str(&world.proxyctl(&all).unwrap()).unwrap()
}

#[test]
fn per_backend_numbers_match_the_traffic_sent() {
    let (mut world, pods) = world();
    world
        .start_agent(&service_manifest("web", VIP, None, &ready(&pods)), true)
        .unwrap();
    // 300 connections, half through each path; count who answered.
    let mut answered: BTreeMap<String, u64> = BTreeMap::new();
    for hooked in [true, false] {
        for r in world
            .probe(
                CLIENT,
                hooked,
                &["tcp", "--to", &format!("{VIP}:80"), "--count", "150"],
            )
            .unwrap()
        {
            assert_eq!(r["ok"], true, "{r}");
            *answered
                .entry(r["backend"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    let detail = json(&world, &["service", "get", "default/web"]);
    let http = detail
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["service"]["port"] == 80)
        .unwrap();
    assert_eq!(http["service"]["connections"], 300);
    let backends = http["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 3);
    let mut total = 0;
    for b in backends {
        let pod = b["address"]
            .as_str()
            .unwrap()
            .split('.')
            .nth(2)
            .unwrap()
            .to_owned();
        let expected = answered[&format!("backend-{pod}")];
        assert_eq!(
            b["connections"], expected,
            "backend {b} vs what the servers answered {answered:?}"
        );
        assert_eq!(b["state"], "ready");
        assert_eq!(
            b["node_local"], false,
            "the manifest's endpoints have no nodeName"
        );
        total += b["connections"].as_u64().unwrap();
        let share = b["connection_share_percent"].as_f64().unwrap();
        assert!((share - expected as f64 * 100.0 / 300.0).abs() < 0.2, "{b}");
        // The tc-path half left flows in conntrack (closing now) and counted packets.
        assert!(b["packets"].as_u64().unwrap() >= 150 / 3, "{b}");
    }
    assert_eq!(total, 300, "counts add up to the connections made");

    // YAML and the table say the same.
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&world.proxyctl(&["service", "list", "-o", "yaml"]).unwrap()).unwrap();
    assert_eq!(yaml[0]["name"].as_str(), Some("web"));
    let table = world.proxyctl(&["service", "get", "default/web"]).unwrap();
    assert!(
        table.contains("BACKEND") && table.contains("10.244.1.2:8080/TCP"),
        "{table}"
    );

    // A service that is not there: exit code 3 and a readable message.
    let missing = Command::new(env!("CARGO_BIN_EXE_proxyctl"))
        .arg("--bpffs")
        .arg(&world.nodes[0].bpffs)
        .args(["service", "get", "default/nope"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("service default/nope is not programmed")
    );
    // Maps not pinned: exit code 1 and a hint.
    let unpinned = Command::new(env!("CARGO_BIN_EXE_proxyctl"))
        .args(["--bpffs", "/sys/fs/bpf/no-such-dir", "service", "list"])
        .output()
        .unwrap();
    assert_eq!(unpinned.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unpinned.stderr).contains("is proxy-agent running"));
}

/// Every name and address `service list` prints is accepted by `service get`,
/// `conntrack list --service` and `conntrack flush --service`, and names that port.
#[test]
fn every_name_service_list_prints_is_accepted() {
    let (mut world, pods) = world();
    let shop = service_manifest("shop", "10.96.0.20", None, &ready(&pods))
        .replace(
            "  clusterIP: 10.96.0.20\n",
            "  type: NodePort\n  clusterIP: 10.96.0.20\n  externalIPs: [192.0.2.20]\n",
        )
        .replace(
            "{name: http, port: 80,",
            "{name: http, port: 80, nodePort: 30080,",
        )
        .replace(
            "{name: dns, port: 53,",
            "{name: dns, port: 53, nodePort: 30053,",
        );
    let manifest = format!(
        "{}---\n{shop}",
        service_manifest("web", VIP, None, &ready(&pods))
    );
    world.start_agent(&manifest, true).unwrap();
    let rows = json(&world, &["service", "list"]);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    let text = |v: &Value| v.as_str().unwrap().to_owned();
    for row in rows {
        let (namespace, name) = (text(&row["namespace"]), text(&row["name"]));
        let (address, port, protocol) =
            (text(&row["address"]), &row["port"], text(&row["protocol"]));
        let mut names = vec![
            (format!("{namespace}/{name}"), 2),
            (format!("{namespace}/{name}:{}", text(&row["port_name"])), 1),
            (format!("{address}:{port}"), 1),
            (format!("{address}:{port}/{protocol}"), 1),
            (format!("{address}:{port}/{}", protocol.to_lowercase()), 1),
        ];
        for external in row["external_addresses"].as_array().unwrap() {
            names.push((format!("{}:{port}", text(external)), 1));
        }
        if let Some(node_port) = row["node_port"].as_u64() {
            names.push((format!("0.0.0.0:{node_port}"), 1));
        }
        if name == "shop" {
            assert_eq!(names.len(), 7, "external IP and node port listed: {row}");
        }
        for (query, ports) in names {
            let got = json(&world, &["service", "get", &query]);
            let got = got.as_array().unwrap();
            assert_eq!(got.len(), ports, "{query}: {got:?}");
            assert!(
                got.iter().any(|d| d["service"]["address"] == row["address"]
                    && d["service"]["port"] == row["port"]),
                "{query} names {row}: {got:?}"
            );
            for command in [&["list"][..], &["flush", "--yes"]] {
                let mut args = vec!["conntrack"];
                args.extend(command);
                args.extend(["--service", &query]);
                world
                    .proxyctl(&args)
                    .unwrap_or_else(|e| panic!("conntrack {command:?} --service {query}: {e:#}"));
            }
        }
    }
}

#[test]
fn conntrack_list_and_flush_maps_and_status() {
    let (mut world, pods) = world();
    world
        .start_agent(&service_manifest("web", VIP, None, &ready(&pods)), true)
        .unwrap();
    // Long-lived tc-path flows show up as established.
    let (held, first) = world
        .spawn_probe(
            CLIENT,
            false,
            &["tcp", "--to", &format!("{VIP}:80"), "--hold-ms", "1500"],
        )
        .unwrap();
    assert_eq!(first["ok"], true);
    world
        .probe(
            CLIENT,
            false,
            &["udp", "--to", &format!("{VIP}:53"), "--count", "5"],
        )
        .unwrap();
    let flows = json(&world, &["conntrack", "list", "--service", "default/web"]);
    let flows = flows.as_array().unwrap();
    assert_eq!(flows.len(), 6, "{flows:?}");
    let tcp: Vec<&Value> = flows.iter().filter(|f| f["protocol"] == "TCP").collect();
    assert_eq!(tcp.len(), 1);
    assert_eq!(tcp[0]["state"], "established");
    assert_eq!(tcp[0]["service"], "default/web:http");
    assert_eq!(tcp[0]["service_address"], format!("{VIP}:80"));
    let active = json(&world, &["service", "get", "default/web"]);
    let active: u64 = active[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .chain(active[1]["backends"].as_array().unwrap())
        .map(|b| b["active_connections"].as_u64().unwrap())
        .sum();
    assert_eq!(active, 6, "one active flow per open tc-path flow");

    // Flushing would break the established TCP connection: named, and nothing flushed
    // without --yes; --dry-run says what would go.
    let refused = world
        .proxyctl(&["conntrack", "flush", "--service", "default/web"])
        .unwrap_err();
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("would break 1 established TCP connections")
            && refused.contains(tcp[0]["client"].as_str().unwrap())
            && refused.contains("--yes"),
        "{refused}"
    );
    let dry = json(
        &world,
        &[
            "conntrack",
            "flush",
            "--service",
            "default/web",
            "--dry-run",
        ],
    );
    assert_eq!(dry["would_flush"], 6, "{dry}");
    assert_eq!(dry["would_break"][0]["client"], tcp[0]["client"], "{dry}");
    let still = json(&world, &["conntrack", "list"]);
    assert_eq!(still.as_array().unwrap().len(), 6, "nothing flushed yet");
    let flushed = json(
        &world,
        &["conntrack", "flush", "--service", "default/web", "--yes"],
    );
    assert_eq!(flushed["flushed"], 6);
    assert!(
        json(&world, &["conntrack", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    world.finish_probe(held).unwrap();

    let maps = json(&world, &["maps"]);
    let row = |name: &str| {
        maps.as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(row("services")["entries"], 2);
    assert_eq!(row("backends")["entries"], 6, "3 pods x TCP and UDP");
    assert!(
        row(proxy_common::maps::CONNTRACK)["capacity"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(row("service_stats")["entries"].is_null());
    // Counters are shared by all CPUs: entries × 24 bytes, not × CPUs.
    let stats = row("service_stats");
    let per_entry = stats["memory_bytes"].as_u64().unwrap() / stats["capacity"].as_u64().unwrap();
    assert!((24..48).contains(&per_entry), "{stats}");

    let status = json(&world, &["status"]);
    assert_eq!(status["agent_alive"], true, "{status}");
    // The pin directory from PROXY_BPFFS, as in the agent's container.
    let from_env = std::process::Command::new(&world.bins.proxyctl)
        .env("PROXY_BPFFS", &world.nodes[0].bpffs)
        .args(["status", "--output", "json"])
        .output()
        .unwrap();
    let from_env: Value = serde_json::from_slice(&from_env.stdout).unwrap();
    assert_eq!(from_env["agent_pid"], status["agent_pid"], "{from_env}");
    assert_eq!(status["service_ports"], 2);
    assert!(status["last_sync_seconds_ago"].as_u64().unwrap() < 60);
    let attachments: Vec<(&str, &str)> = status["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["pin"].as_str().unwrap(),
                a["attached_to"].as_str().unwrap(),
            )
        })
        .collect();
    let cgroup = attachments
        .iter()
        .find(|(pin, _)| pin.starts_with("proxy_connect4@"));
    assert!(
        cgroup.is_some_and(|(_, to)| to.starts_with("cgroup ")),
        "{attachments:?}"
    );
    let ingress = attachments
        .iter()
        .find(|(pin, _)| *pin == "proxy_ingress@vh1");
    assert!(
        ingress.is_some_and(|(_, to)| to.starts_with("interface ")),
        "{attachments:?}"
    );
}

#[test]
fn bpftool_dumps_services_and_backends_with_named_fields() {
    let (mut world, pods) = world();
    world
        .start_agent(&service_manifest("web", VIP, None, &ready(&pods)), true)
        .unwrap();
    for (map, fields) in [
        (
            "services",
            ["\"addr\": [10,96,0,10]", "\"port\": 80", "\"count\": 3"],
        ),
        (
            "backends",
            ["\"addr\": [10,244,1,2]", "\"port\": 8080", "\"proto\": 6"],
        ),
    ] {
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(world.nodes[0].bpffs.join(map))
            .output()
            .unwrap();
        assert!(out.status.success(), "bpftool map dump {map}");
        // bpftool breaks arrays over lines: compare without whitespace.
        let dump: String = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect();
        for field in fields {
            let field: String = field.split_whitespace().collect();
            assert!(dump.contains(&field), "{map}: {field} not in {dump}");
        }
    }
}

/// The value of the series `name` (with its labels, e.g. `x_total{a="b"}`) in a scrape.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn metrics_have_kube_proxy_names_and_per_service_and_backend_counters() {
    let (mut world, pods) = world();
    world
        .start_agent(&service_manifest("web", VIP, None, &ready(&pods)), true)
        .unwrap();
    let results = world
        .probe(
            CLIENT,
            true,
            &["tcp", "--to", &format!("{VIP}:80"), "--count", "90"],
        )
        .unwrap();
    let metrics = world.agent_http("/metrics").unwrap();
    let value = |series: &str| {
        sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in {metrics}"))
    };

    assert!(value("kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1.0);
    assert!(value("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.7e9);
    assert_eq!(
        value("kubeproxy_sync_proxy_rules_service_changes_total"),
        1.0
    );
    assert_eq!(
        value("kubeproxy_sync_proxy_rules_endpoint_changes_total"),
        1.0
    );
    assert_eq!(
        value("kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
        0.0
    );
    assert!(value("kubeproxy_network_programming_duration_seconds_count") >= 1.0);
    assert_eq!(value("proxy_map_update_errors_total"), 0.0);
    assert_eq!(value("proxy_service_ports"), 2.0);
    assert_eq!(
        value(
            "proxy_service_connections_total{address=\"10.96.0.10:80/TCP\",namespace=\"default\",port=\"http\",service=\"web\"}"
        ),
        90.0
    );
    let per_backend: f64 = (1..=3)
        .map(|i| {
            value(&format!(
                "proxy_backend_connections_total{{backend=\"10.244.{i}.2:8080/TCP\",namespace=\"default\",port=\"http\",service=\"web\"}}"
            ))
        })
        .sum();
    assert_eq!(per_backend, results.len() as f64);
    assert_eq!(value("proxy_map_entries{map=\"services\"}"), 2.0);
    assert!(value("proxy_map_capacity{map=\"ct_flows\"}") > 0.0);
    // What the "Kubernetes / Proxy" dashboard and the KubeProxyDown alert read.
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_start_time_seconds") > 1.6e9);
    assert!(metrics.contains("process_cpu_seconds_total "), "{metrics}");
    assert_eq!(
        value(&format!(
            "proxy_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert!(world.agent_http("/proxyMode").unwrap().ends_with("ebpf"));
    let healthz = world.node_http(10256, "/healthz").unwrap();
    assert!(
        healthz.starts_with("HTTP/1.0 200") && healthz.contains("\"healthy\":true"),
        "{healthz}"
    );
}

#[test]
fn logs_are_json_lines_with_log_format_json() {
    let (mut world, pods) = world();
    let path = world
        .write_manifest(&service_manifest("web", VIP, None, &ready(&pods)))
        .unwrap();
    let agent = world
        .start_agent_with(
            &[
                "--manifests",
                &path.to_string_lossy(),
                "--log-format",
                "json",
            ],
            true,
        )
        .unwrap();
    let lines = agent.log_lines();
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let synced = parsed
        .iter()
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("synced"))
        })
        .expect("a sync line");
    assert_eq!(synced["level"], "INFO", "{synced}");
    assert!(
        synced["timestamp"].is_string() && synced["target"].is_string(),
        "{synced}"
    );
}

#[test]
fn at_debug_the_agents_libraries_stay_at_info() {
    let (mut world, pods) = world();
    world.agent_log = "debug".to_owned();
    let agent = world
        .start_agent(&service_manifest("web", VIP, None, &ready(&pods)), false)
        .unwrap();
    let lines = agent.log_lines();
    let foreign: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(" DEBUG ") && !l.contains(" DEBUG proxy"))
        .collect();
    assert!(foreign.is_empty(), "library debug lines: {foreign:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" INFO proxy::agent: synced")),
        "{lines:?}"
    );
}

#[test]
fn monitor_shows_a_refused_connection_with_its_service_and_process() {
    let (mut world, _) = world();
    world
        .start_agent(&service_manifest("empty", VIP, None, NO_ENDPOINTS), true)
        .unwrap();
    let event = world
        .first_monitored(0, |world| {
            let refused = world
                .probe(
                    CLIENT,
                    true,
                    &["tcp", "--to", &format!("{VIP}:80"), "--timeout-ms", "200"],
                )
                .unwrap();
            assert_eq!(refused[0]["kind"], "refused", "{refused:?}");
        })
        .unwrap();
    assert_eq!(event["action"], "reject", "{event}");
    assert_eq!(event["reason"], "no_endpoints", "{event}");
    assert_eq!(event["service"], "default/empty:http", "{event}");
    assert_eq!(event["frontend"], "ClusterIP", "{event}");
    assert_eq!(event["destination"], format!("{VIP}:80"), "{event}");
    assert_eq!(event["protocol"], "TCP", "{event}");
    assert_eq!(event["hook"], "connect", "{event}");
    assert!(event["pid"].as_u64().is_some_and(|p| p > 1), "{event}");
    // The tc path refuses with ICMP port unreachable; its event has the client's flow.
    let event = world
        .first_monitored(0, |world| {
            world
                .probe(
                    CLIENT,
                    false,
                    &["udp", "--to", &format!("{VIP}:53"), "--timeout-ms", "200"],
                )
                .unwrap();
        })
        .unwrap();
    assert_eq!(event["reason"], "no_endpoints", "{event}");
    assert_eq!(event["service"], "default/empty:dns", "{event}");
    assert_eq!(event["hook"], "tc", "{event}");
    assert_eq!(event["destination"], format!("{VIP}:53"), "{event}");
    let source = event["source"].as_str().unwrap();
    assert!(
        source.starts_with(&format!("{}:", world.pod(CLIENT).ip)),
        "{event}"
    );
    // Table output has a header and one row per event.
    let (output, pid) = world
        .spawn_proxyctl_on(0, &["monitor", "--seconds", "1"])
        .unwrap();
    world
        .wait_exit(pid, std::time::Duration::from_secs(5))
        .unwrap();
    let table = world.finish_output(output).unwrap();
    assert!(table.starts_with("TIME "), "{table}");
}

/// `web`'s manifest with its slice's last-change trigger time set to `trigger` (Unix
/// seconds), and only the first `ready` pods ready.
fn annotated(pods: &[Ipv4Addr], ready_pods: usize, trigger: f64) -> String {
    let endpoints: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, i < ready_pods, i < ready_pods, false))
        .collect();
    let at = k8s_openapi::jiff::Timestamp::from_millisecond((trigger * 1000.0) as i64).unwrap();
    service_manifest("web", VIP, None, &endpoints).replace(
        "name: web-1, namespace: default,",
        &format!(
            "name: web-1, namespace: default, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{at}'}},"
        ),
    )
}

#[test]
fn network_programming_latency_runs_from_the_slices_trigger_time() {
    let (mut world, pods) = world();
    let agent = world
        .start_agent(&service_manifest("web", VIP, None, &ready(&pods)), true)
        .unwrap();
    let scrape = |world: &World, series: &str| {
        let metrics = world.agent_http("/metrics").unwrap();
        sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in {metrics}"))
    };
    let count = "kubeproxy_network_programming_duration_seconds_count";
    let sum = "kubeproxy_network_programming_duration_seconds_sum";
    let started = scrape(&world, "process_start_time_seconds");
    let before = (scrape(&world, count), scrape(&world, sum));

    // A change triggered before the agent started is not measured (kube-proxy's rule).
    let syncs = agent.syncs();
    world
        .write_manifest(&annotated(&pods, 2, started - 100.0))
        .unwrap();
    agent.wait_for_syncs(syncs + 1).unwrap();
    assert_eq!(scrape(&world, count), before.0);

    // One triggered 3 s before it reaches the agent counts those 3 s.
    let trigger = proxy::clock::unix_now();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let syncs = agent.syncs();
    world.write_manifest(&annotated(&pods, 1, trigger)).unwrap();
    agent.wait_for_syncs(syncs + 1).unwrap();
    assert_eq!(scrape(&world, count), before.0 + 1.0);
    let latency = scrape(&world, sum) - before.1;
    assert!(
        (3.0..30.0).contains(&latency),
        "measured {latency} s from a trigger time 3 s before the change was written"
    );
}

#[test]
fn service_get_lists_the_endpoints_a_frontend_does_not_use_and_why() {
    let (mut world, pods) = world();
    // Ready, not ready, serving-and-terminating.
    let endpoints = [
        (pods[0], true, true, false),
        (pods[1], false, false, false),
        (pods[2], false, true, true),
    ];
    let agent = world
        .start_agent(&service_manifest("web", VIP, None, &endpoints), true)
        .unwrap();
    let detail = json(&world, &["service", "get", "default/web:http"]);
    let cluster_ip = &detail[0]["frontends"][0];
    assert_eq!(cluster_ip["frontend"], "ClusterIP", "{detail}");
    assert_eq!(
        cluster_ip["backends"],
        serde_json::json!([format!("{}:8080", pods[0])]),
        "{detail}"
    );
    assert_eq!(
        cluster_ip["unused"],
        serde_json::json!([
            {"endpoint": format!("{}:8080", pods[1]), "reason": "not_ready"},
            {"endpoint": format!("{}:8080", pods[2]), "reason": "terminating"},
        ]),
        "{detail}"
    );
    let table = world
        .proxyctl(&["service", "get", "default/web:http"])
        .unwrap();
    assert!(
        table.contains(&format!("{}:8080(not_ready)", pods[1])),
        "{table}"
    );
    // The last ready endpoint goes: the terminating one serves, the list follows.
    let endpoints = [
        (pods[0], false, false, false),
        (pods[1], false, false, false),
        (pods[2], false, true, true),
    ];
    let syncs = agent.syncs();
    world
        .write_manifest(&service_manifest("web", VIP, None, &endpoints))
        .unwrap();
    agent.wait_for_syncs(syncs + 1).unwrap();
    let detail = json(&world, &["service", "get", "default/web:http"]);
    let cluster_ip = &detail[0]["frontends"][0];
    assert_eq!(cluster_ip["terminating_fallback"], true, "{detail}");
    assert_eq!(
        cluster_ip["unused"].as_array().unwrap().len(),
        2,
        "{detail}"
    );
}
