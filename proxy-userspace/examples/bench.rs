//! The benchmark behind `cargo xtask bench`, for N services of 3 endpoints each:
//! - per-packet cost of the tc ingress program with `BPF_PROG_TEST_RUN`, for a TCP SYN to
//!   the last service added (conntrack miss: a new client per run) and for an established
//!   flow (conntrack hit), against an empty classifier run the same way, IPv4 and IPv6
//!   (`bench/per_packet.rs`);
//! - the map memory of the datapath and the agent's resident memory;
//! - the agent's cold start: from its start to N services programmed from a manifest;
//! - end to end, new connections through each data path, ours and kube-proxy's;
//! - external traffic to a NodePort masqueraded to another node, through tc, XDP and
//!   kube-proxy's rules (`bench/node_port.rs`).
//!
//! Every figure is measured in the same run, and ratios are against the baseline of that run.
//! Writes `results.md` (and prints it) in the output directory.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use proxy::{
    agent::REPAIR_STEP,
    controller::Controller,
    datapath::{Datapath, XdpAttach},
    desired::Topology,
    manifest::parse_manifest,
    maps::Maps,
    metrics::Metrics,
    reconcile::{Reconciler, ServiceMaps as _, Snapshot},
    store::{Kind, Object, Store},
    sync_state::SharedSyncState,
    testbed::{Binaries, World, remove_cgroup},
};
use proxy_common::maps;

#[path = "bench/node_port.rs"]
mod node_port;
#[path = "bench/per_packet.rs"]
mod per_packet;

use per_packet::{
    Datapoint, fill_conntrack, first_packet_repeat_maps, first_packet_runs, per_packet,
};

#[derive(Parser)]
struct Args {
    /// Numbers of services to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10,1000,10000,30000,100000"
    )]
    sizes: Vec<usize>,
    /// Program runs per measurement.
    #[arg(long, default_value_t = 100_000)]
    runs: u32,
    /// Milliseconds of connections per data path in the end-to-end comparison.
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Numbers of services at which one endpoint change is measured, idle and under load.
    #[arg(long, value_delimiter = ',', default_value = "10000,30000,100000")]
    change_sizes: Vec<usize>,
    /// Largest number of services for which kube-proxy's rulesets are loaded and measured
    /// (iptables-restore takes about a minute at 10,000 services and grows faster than
    /// linearly).
    #[arg(long, default_value_t = 10_000)]
    baseline_max: usize,
    /// Conntrack entries while changes are measured under load.
    #[arg(long, default_value_t = 200_000)]
    change_flows: usize,
}

/// Service `i`'s cluster IP: 10.96.0.0 onwards (past 65,535 services, 10.97.x.y).
fn vip(i: usize) -> [u8; 4] {
    [10, 96 + (i >> 16) as u8, (i >> 8) as u8, i as u8]
}

/// Kernel memory of the maps pinned under `dir`: as measured, and as it would be with 128
/// possible CPUs (per-CPU maps grow with them; the others do not).
fn map_memory(dir: &Path) -> anyhow::Result<(u64, u64)> {
    use aya::maps::MapType;
    let cpus = aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?;
    let (mut measured, mut at_128) = (0, 0);
    for name in maps::ALL {
        let map = aya::maps::MapData::from_pin(dir.join(name))?;
        let bytes = proxy::inspect::kernel_memory(&map)?;
        let per_cpu = matches!(
            map.info()?.map_type()?,
            MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash
        );
        measured += bytes;
        at_128 += if per_cpu {
            bytes / cpus as u64 * 128
        } else {
            bytes
        };
    }
    Ok((measured, at_128))
}

/// A directory removed on drop (pins, scratch files).
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A cgroup made for a measurement, removed on drop (also on an early return).
struct CgroupDir(PathBuf);

impl CgroupDir {
    fn create(path: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating the cgroup {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        remove_cgroup(&self.0);
    }
}

/// `n` services (ClusterIP `vip(i)`, port 80) whose endpoints are `endpoints`, port 8080.
fn manifest(n: usize, endpoints: &[Ipv4Addr]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{addresses: [{e}]}}"))
        .collect();
    let endpoints = endpoints.join(", ");
    let mut yaml = String::new();
    for i in 0..n {
        let vip = Ipv4Addr::from(vip(i));
        yaml += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec: {{clusterIP: {vip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{endpoints}]\n"
        );
    }
    yaml
}

/// kube-proxy's nat table: its fixed chains and rules (service portals, masquerading of
/// marked connections), then `chains` (declarations) and `rules` of the services.
fn kube_nat_table(chains: &str, rules: &str) -> String {
    format!(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n{chains}\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         {rules}COMMIT\n"
    )
}

/// kube-proxy's iptables ruleset (nat table) for `n` services with `endpoints`, as its
/// iptables mode writes it on every full sync.
fn iptables_ruleset(n: usize, endpoints: &[Ipv4Addr]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for i in 0..n {
        let vip = Ipv4Addr::from(vip(i));
        let svc = format!("KUBE-SVC-{i:016X}");
        chains += &format!(":{svc} - [0:0]\n");
        rules += &format!(
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport 80 -j {svc}\n"
        );
        rules += &format!(
            "-A {svc} ! -s 10.244.0.0/16 -d {vip}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ\n"
        );
        for (e, addr) in endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i:012X}{e:04X}");
            chains += &format!(":{sep} - [0:0]\n");
            let left = endpoints.len() - e;
            if left > 1 {
                rules += &format!(
                    "-A {svc} -m comment --comment \"bench/svc-{i}:http -> {addr}:8080\" -m statistic --mode random --probability {:.11} -j {sep}\n",
                    1.0 / left as f64
                );
            } else {
                rules += &format!(
                    "-A {svc} -m comment --comment \"bench/svc-{i}:http -> {addr}:8080\" -j {sep}\n"
                );
            }
            rules += &format!(
                "-A {sep} -s {addr}/32 -m comment --comment \"bench/svc-{i}:http\" -j KUBE-MARK-MASQ\n"
            );
            rules += &format!(
                "-A {sep} -p tcp -m comment --comment \"bench/svc-{i}:http\" -m tcp -j DNAT --to-destination {addr}:8080\n"
            );
        }
    }
    kube_nat_table(&chains, &rules)
}

/// An nftables block: `kind name { line; line; ... }`, one statement per line.
fn nft_block(kind: &str, name: &str, lines: &[String]) -> String {
    format!(
        "\t{kind} {name} {{\n{}\t}}\n",
        lines
            .iter()
            .map(|l| format!("\t\t{l}\n"))
            .collect::<String>()
    )
}

/// kube-proxy's nftables ruleset for `n` services: a verdict map from (address, protocol,
/// port) to a per-service chain that picks an endpoint chain with `numgen random`.
fn nftables_ruleset(n: usize, endpoints: &[Ipv4Addr]) -> String {
    let line = |s: &str| vec![s.to_owned()];
    let mut out = String::from("table ip kube-proxy {\n");
    out += &nft_block(
        "chain",
        "mark-for-masquerade",
        &line("mark set mark or 0x4000"),
    );
    out += &nft_block(
        "chain",
        "masquerading",
        &[
            "mark and 0x4000 == 0 return".into(),
            "mark set mark xor 0x4000".into(),
            "masquerade fully-random".into(),
        ],
    );
    let mut elements = Vec::new();
    for i in 0..n {
        let vip = Ipv4Addr::from(vip(i));
        let picks: Vec<String> = (0..endpoints.len())
            .map(|e| format!("{e} : goto endpoint-{i}-{e}"))
            .collect();
        out += &nft_block(
            "chain",
            &format!("service-{i}"),
            &[
                format!(
                    "ip daddr {vip} tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade"
                ),
                format!(
                    "numgen random mod {} vmap {{ {} }}",
                    endpoints.len(),
                    picks.join(", ")
                ),
            ],
        );
        for (e, addr) in endpoints.iter().enumerate() {
            out += &nft_block(
                "chain",
                &format!("endpoint-{i}-{e}"),
                &[
                    format!("ip saddr {addr} jump mark-for-masquerade"),
                    format!("meta l4proto tcp dnat to {addr}:8080"),
                ],
            );
        }
        elements.push(format!("{vip} . tcp . 80 : goto service-{i}"));
    }
    out += &nft_block(
        "map",
        "service-ips",
        &[
            "type ipv4_addr . inet_proto . inet_service : verdict".into(),
            format!("elements = {{ {} }}", elements.join(", ")),
        ],
    );
    out += &nft_block(
        "chain",
        "services",
        &line("ip daddr . meta l4proto . th dport vmap @service-ips"),
    );
    out += &nft_block(
        "chain",
        "nat-prerouting",
        &[
            "type nat hook prerouting priority dstnat; policy accept;".into(),
            "jump services".into(),
        ],
    );
    out += &nft_block(
        "chain",
        "nat-output",
        &[
            "type nat hook output priority -100; policy accept;".into(),
            "jump services".into(),
        ],
    );
    out += &nft_block(
        "chain",
        "nat-postrouting",
        &[
            "type nat hook postrouting priority srcnat; policy accept;".into(),
            "jump masquerading".into(),
        ],
    );
    out + "}\n"
}

/// Loads a ruleset into the node namespace with `tool` (`iptables-restore` or `nft -f -`);
/// returns how long it took.
fn load_ruleset(world: &World, tool: &[&str], ruleset: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &world.nodes[0].netns])
        .args(tool)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool:?}"))?;
    std::io::Write::write_all(
        &mut child.stdin.take().context("stdin")?,
        ruleset.as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{tool:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(started.elapsed())
}

/// Connections per second and median first-packet (connect) latency of a sequential client
/// in pod 4.
/// Connection rate from pod `client` to `to`: (connections per second, median connect
/// latency in µs).
fn rate(
    world: &World,
    client: usize,
    hooked: bool,
    to: &str,
    duration_ms: u64,
) -> anyhow::Result<(f64, f64)> {
    let out = world.probe(
        client,
        hooked,
        &[
            "rate",
            "--to",
            to,
            "--duration-ms",
            &duration_ms.to_string(),
        ],
    )?;
    let r = out.first().context("no rate result")?;
    ensure!(r["failures"] == 0, "connections failed through {to}: {r}");
    Ok((
        r["per_second"].as_f64().context("per_second")?,
        r["connect_p50_us"].as_f64().context("connect_p50_us")?,
    ))
}

/// One size's figures: per packet (IPv4, IPv6), the agent's process, end to end, change
/// latency (p50, p99).
type Row = (
    (Datapoint, Datapoint),
    AgentFigures,
    EndToEnd,
    (Duration, Duration),
);

struct EndToEnd {
    /// (connections per second, median connect latency in microseconds) per data path.
    direct: (f64, f64),
    socket_lb: (f64, f64),
    tc: (f64, f64),
    /// Kernel-measured ns per run of the tc programs during the tc path's run.
    tc_run_ns: f64,
    /// kube-proxy's data paths, up to `--baseline-max` services.
    kube_proxy: Option<KubeProxy>,
}

struct KubeProxy {
    iptables: (f64, f64),
    nftables: (f64, f64),
    iptables_restore: Duration,
    nft_load: Duration,
}

/// Connection rate through each data path to the last of `n` services, and the time to
/// load kube-proxy's full rulesets.
fn end_to_end(
    n: usize,
    bins: &Binaries,
    duration_ms: u64,
    baselines: bool,
) -> anyhow::Result<EndToEnd> {
    let last = format!("{}:80", Ipv4Addr::from(vip(n - 1)));
    // One client pod per data path: a path run after another from the same address would
    // meet its TIME_WAIT tuples to the same pods, and slow down finding free ports.
    let mut ours = World::new(6, bins.clone())?;
    for i in 1..=3 {
        ours.serve(i, &format!("backend-{i}"))?;
    }
    let pods: Vec<Ipv4Addr> = (1..=3).map(|i| ours.pod(i).ip).collect();
    let direct = rate(&ours, 4, false, &format!("{}:8080", pods[0]), duration_ms)?;
    ours.start_agent(&manifest(n, &pods), false)?;
    let socket_lb = rate(&ours, 5, true, &last, duration_ms)?;
    let (tc, tc_run_ns) = tc_program_cost(|| rate(&ours, 6, false, &last, duration_ms))?;
    drop(ours);
    let kube_proxy = if baselines {
        Some(kube_proxy(n, &last, bins, duration_ms)?)
    } else {
        None
    };
    Ok(EndToEnd {
        direct,
        socket_lb,
        tc,
        tc_run_ns,
        kube_proxy,
    })
}

/// The datapath's packet programs, by their kernel names.
const PACKET_PROGRAMS: [&str; 3] = ["proxy_ingress", "proxy_egress", "proxy_xdp"];

/// The middle one of `values` (the upper middle of an even count), for figures taken as the
/// median of a few measurements so that one the shared VM disturbed does not make them.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One packet program's kernel-measured time and runs over a measurement.
pub struct ProgramRuns {
    pub name: String,
    pub time: Duration,
    pub runs: u64,
}

/// What `measure` returns, with each of the datapath's packet programs' kernel-measured time
/// and runs while it did (`BPF_ENABLE_STATS`), by program id.
fn program_cost<T>(
    measure: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, BTreeMap<u32, ProgramRuns>)> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;
    let sample = || -> BTreeMap<u32, ProgramRuns> {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter_map(|p| {
                let name = p.name_as_str().filter(|n| PACKET_PROGRAMS.contains(n))?;
                let runs = ProgramRuns {
                    name: name.to_owned(),
                    time: p.run_time(),
                    runs: p.run_count(),
                };
                Some((p.id(), runs))
            })
            .collect()
    };
    let before = sample();
    let result = measure()?;
    let mut after = sample();
    for (id, p) in &mut after {
        // A program loaded meanwhile counts from zero.
        if let Some(b) = before.get(id) {
            p.time = p.time.saturating_sub(b.time);
            p.runs = p.runs.saturating_sub(b.runs);
        }
    }
    Ok((result, after))
}

/// The time and runs of all of `programs` together.
fn total(programs: &BTreeMap<u32, ProgramRuns>) -> (Duration, u64) {
    programs
        .values()
        .fold((Duration::ZERO, 0), |(t, n), p| (t + p.time, n + p.runs))
}

/// What `measure` returns, and the mean kernel-measured time of one run of the packet
/// programs (every packet through them, ingress and egress) while it ran.
fn tc_program_cost<T>(measure: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let (result, programs) = program_cost(measure)?;
    let (time, runs) = total(&programs);
    ensure!(runs > 0, "the tc programs did not run");
    Ok((result, time.as_nanos() as f64 / runs as f64))
}

/// Where our paths' time per round trip goes: each node's packet programs, their mean time
/// per run and their runs per round trip.
fn program_breakdown(external: &[(node_port::Path, node_port::Figures)]) -> String {
    let mut columns: Vec<(&str, &str)> = external
        .iter()
        .flat_map(|(_, f)| &f.by_program)
        .map(|p| (p.node.as_str(), p.program.as_str()))
        .collect();
    columns.sort_by_key(|&(node, program)| {
        let hook = PACKET_PROGRAMS.iter().position(|&p| p == program);
        (node, hook)
    });
    columns.dedup();
    let hook = |program: &str| match program {
        "proxy_ingress" => "tc ingress",
        "proxy_egress" => "tc egress",
        _ => "XDP",
    };
    let mut md = String::from(
        "\n**Where our programs' time goes**, on the same windows: each node's packet programs, their mean kernel time per run (ns) × their runs per round trip (each the median of the windows', then of the worlds'; a program that ran fewer than once in 20 round trips is left out):\n\n| data path |",
    );
    for (node, program) in &columns {
        md += &format!(" {node} {} |", hook(program));
    }
    md += &format!("\n| --- |{}\n", " ---: |".repeat(columns.len()));
    for (path, f) in external.iter().filter(|(_, f)| !f.by_program.is_empty()) {
        md += &format!("| {} |", path.label());
        for &(node, program) in &columns {
            let share = f
                .by_program
                .iter()
                .find(|p| p.node == node && p.program == program && p.runs >= 0.05);
            md += &match share {
                Some(p) => format!(" {:.0} × {:.1} |", p.ns_per_run, p.runs),
                None => " — |".to_owned(),
            };
        }
        md += "\n";
    }
    md
}

/// kube-proxy's rulesets for `n` services: load time and connection rate to `last`.
fn kube_proxy(
    n: usize,
    last: &str,
    bins: &Binaries,
    duration_ms: u64,
) -> anyhow::Result<KubeProxy> {
    let (ipt, pods) = World::three_backends(bins.clone())?;
    let iptables_restore = load_ruleset(
        &ipt,
        &["iptables-restore", "--noflush"],
        &iptables_ruleset(n, &pods),
    )?;
    let iptables = rate(&ipt, 4, false, last, duration_ms)?;
    drop(ipt);
    let (nft, pods) = World::three_backends(bins.clone())?;
    let nft_load = load_ruleset(&nft, &["nft", "-f", "-"], &nftables_ruleset(n, &pods))?;
    let nftables = rate(&nft, 4, false, last, duration_ms)?;
    Ok(KubeProxy {
        iptables,
        nftables,
        iptables_restore,
        nft_load,
    })
}

/// What the agent's own process shows at one size.
struct AgentFigures {
    /// From start to every service in the maps.
    cold_start: Duration,
    rss_bytes: u64,
    /// From writing one small new file into the manifest directory to its service's
    /// sync being logged.
    small_file_edit: Duration,
}

/// The manifest of one extra service, outside the bench's address range.
const SMALL_FILE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: edited, namespace: bench}\nspec: {clusterIP: 10.99.0.1, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: edited-1, namespace: bench, labels: {kubernetes.io/service-name: edited}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.250.9], conditions: {ready: true}}]\n";

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()?;
    Ok(rss_kb * 1024)
}

/// Starts the agent on a directory holding `n` services, waits until they are programmed,
/// then writes one small file beside them and waits until that lands.
fn agent(n: usize, bin_dir: &Path) -> anyhow::Result<AgentFigures> {
    // Dropped after the pins (which hold its attachments).
    let cgroup = CgroupDir::create(
        proxy::datapath::cgroup2_mount()?.join(format!("proxy-bench-{}", std::process::id())),
    )?;
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/proxy-bench-agent-{}-{n}",
        std::process::id()
    )));
    let manifests =
        PinDir(std::env::temp_dir().join(format!("proxy-bench-{}-{n}", std::process::id())));
    std::fs::create_dir_all(&manifests.0)?;
    let path = manifests.0.join("services.yaml");
    let small_file = manifests.0.join("edited.yaml");
    let endpoints = [
        Ipv4Addr::new(10, 244, 250, 1),
        Ipv4Addr::new(10, 244, 250, 2),
        Ipv4Addr::new(10, 244, 250, 3),
    ];
    std::fs::write(&path, manifest(n, &endpoints))?;
    let started = Instant::now();
    let mut child = Command::new(bin_dir.join("proxy-agent"))
        .arg("--manifests")
        .arg(&manifests.0)
        .arg("--cgroup")
        .arg(&cgroup.0)
        .arg("--bpffs")
        .arg(&pins.0)
        .args([
            "--metrics-bind",
            "127.0.0.1:0",
            "--healthz-bind",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .context("starting proxy-agent")?;
    let result = (|| {
        let stderr = child.stderr.take().context("agent stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut wait_for = |text: &str| -> anyhow::Result<()> {
            for line in lines.by_ref() {
                if line?.contains(text) {
                    return Ok(());
                }
                ensure!(
                    started.elapsed() < Duration::from_secs(600),
                    "the agent did not log {text:?} in 10 minutes"
                );
            }
            bail!("the agent stopped before logging {text:?}")
        };
        wait_for(&format!(
            "; {n} service ports programmed, 0 services retrying"
        ))?;
        let cold_start = started.elapsed();
        let rss_bytes = rss_bytes(child.id())?;
        let edited = Instant::now();
        std::fs::write(&small_file, SMALL_FILE)?;
        wait_for("synced 1 services")?;
        Ok(AgentFigures {
            cold_start,
            rss_bytes,
            small_file_edit: edited.elapsed(),
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// What one-change latency was measured under.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    Idle,
    /// The conntrack map holds this many entries, and GC passes and drift-repair snapshots
    /// run on other threads while changes are programmed, as in the agent.
    Busy(usize),
}

/// One-change latency and, under load, what else the agent does then.
struct ChangeLatency {
    p50: Duration,
    p99: Duration,
    /// The longest drift-repair step, which runs on the agent's loop and so can delay a
    /// change by that much.
    longest_repair_step: Option<Duration>,
    /// One `/metrics` scrape (rendering, without HTTP) with every service and the full
    /// conntrack map.
    scrape: Option<Duration>,
}

/// Latency of one EndpointSlice change landing in the maps while `n` services exist, through
/// the agent's path for a watch event: the controller's store update, then its sync of the
/// one dirty service.
fn change_latency(n: usize, changes: usize, load: Load) -> anyhow::Result<ChangeLatency> {
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/proxy-bench-change-{}-{n}",
        std::process::id()
    )));
    let _datapath = Datapath::load(&pins.0, &[], XdpAttach::Off)?;
    let reconciler = Reconciler::adopt(Maps::open(&pins.0)?)?;
    let endpoints = [
        Ipv4Addr::new(10, 244, 250, 1),
        Ipv4Addr::new(10, 244, 250, 2),
        Ipv4Addr::new(10, 244, 250, 3),
    ];
    let mut objects = Vec::new();
    let rejections = parse_manifest(&manifest(n, &endpoints), "bench", |(object, _)| {
        objects.push(object)
    })
    .map_err(|r| anyhow::anyhow!("{r}"))?;
    ensure!(
        rejections.is_empty(),
        "bench manifest rejected: {}",
        rejections[0].rejection
    );
    let mut controller = Controller::new(Store::new(None, Topology::default()), reconciler);
    controller.replace(&[Kind::Service, Kind::EndpointSlice], &objects);
    let outcome = controller.sync(Instant::now());
    ensure!(
        outcome.failures.is_empty(),
        "programming {n} services failed: {}",
        outcome.failures[0].error
    );
    // The agent's off-loop work, on threads of their own until `stop`.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (want_snapshot, snapshot_wanted) = std::sync::mpsc::channel::<()>();
    let (snapshot_tx, snapshots) = std::sync::mpsc::channel();
    let mut workers = Vec::new();
    if let Load::Busy(flows) = load {
        fill_conntrack::<[u8; 4]>(&pins.0, flows)?;
        let mut conntrack = proxy::conntrack::Conntracks::open(&pins.0)?;
        let account = proxy::ct_account::CtAccount::open(&pins.0)?;
        let stopped = stop.clone();
        workers.push(std::thread::spawn(move || {
            proxy::background::lower_priority();
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                proxy::conntrack::collect_garbage(&mut conntrack, &account);
            }
        }));
        let dir = pins.0.clone();
        workers.push(std::thread::spawn(move || {
            proxy::background::lower_priority();
            while snapshot_wanted.recv().is_ok() {
                let snapshot = Maps::open(&dir)
                    .and_then(|maps| maps.read_existing())
                    .map(Snapshot::from);
                if snapshot_tx.send(snapshot).is_err() {
                    break;
                }
            }
        }));
        controller.begin_snapshot();
        want_snapshot.send(())?;
    }
    let mut latencies = Vec::with_capacity(changes);
    let mut longest_repair: Option<Duration> = None;
    let mut repair = None;
    for c in 0..changes {
        if let Ok(snapshot) = snapshots.try_recv() {
            repair = Some(controller.start_repair(snapshot?));
        }
        // Between changes, as the agent does when its queue is empty: one repair step.
        if let Some(r) = &mut repair {
            let started = Instant::now();
            let done = controller.repair_step(r, REPAIR_STEP)?;
            let took = started.elapsed();
            longest_repair = Some(longest_repair.map_or(took, |l| l.max(took)));
            if done {
                repair = None;
                controller.begin_snapshot();
                want_snapshot.send(())?;
            }
        }
        // The manifest alternates Service, EndpointSlice.
        let Object::EndpointSlice(mut slice) = objects[2 * ((c * 7919) % n) + 1].clone() else {
            bail!("not a slice")
        };
        if let Some(endpoint) = slice.endpoints.as_mut().and_then(|e| e.first_mut()) {
            endpoint.addresses = vec![Ipv4Addr::new(10, 244, 251, (c % 250) as u8 + 1).to_string()];
        }
        let started = Instant::now();
        controller.apply(&Object::EndpointSlice(slice));
        let outcome = controller.sync(Instant::now());
        latencies.push(started.elapsed());
        ensure!(
            outcome.keys.changed == 1 && outcome.failures.is_empty(),
            "one change should program one service port: {outcome:?}"
        );
        if load != Load::Idle {
            // Changes a millisecond apart, so that the off-loop work overlaps them.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(want_snapshot);
    drop(snapshots);
    for worker in workers {
        let _ = worker.join();
    }
    let scrape = match load {
        Load::Idle => None,
        Load::Busy(_) => {
            let metrics = Metrics::new(
                pins.0.clone(),
                SharedSyncState::default(),
                &proxy::rest_client_metrics::RestClientMetrics::new()?,
            )?;
            let started = Instant::now();
            let text = metrics.render();
            let took = started.elapsed();
            ensure!(
                text.contains("proxy_service_connections_total{"),
                "the scrape has no per-service series"
            );
            Some(took)
        }
    };
    latencies.sort();
    Ok(ChangeLatency {
        p50: latencies[changes / 2],
        p99: latencies[changes * 99 / 100],
        longest_repair_step: longest_repair,
        scrape,
    })
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// A line chart of `series` (name, one value per size) against the number of services.
fn plot(
    path: &Path,
    title: &str,
    y_label: &str,
    sizes: &[usize],
    series: &[(&str, Vec<Option<f64>>)],
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .fold(0.0, f64::max)
        * 1.15;
    let (lo, hi) = (
        *sizes.first().context("no sizes")? as f64,
        *sizes.last().context("no sizes")? as f64,
    );
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0.0..max.max(1.0))?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("services (log scale)")
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()?;
    for (i, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        // A missing value (a baseline not run at that size) leaves its point out.
        let points: Vec<(f64, f64)> = sizes
            .iter()
            .zip(values)
            .filter_map(|(n, v)| Some((*n as f64, (*v)?)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("Linux {}, {cpu}, {cores} cores", kernel.trim())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let exe = std::env::current_exe()?;
    let bin_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .context("locating the target directory")?
        .to_path_buf();
    std::fs::create_dir_all(&args.out)?;
    let bins = Binaries::in_dir(&bin_dir);
    let mut rows: BTreeMap<usize, Row> = BTreeMap::new();
    for &n in &args.sizes {
        eprintln!("bench: {n} services");
        let point = (
            per_packet::<[u8; 4]>(n, args.runs)?,
            per_packet::<[u8; 16]>(n, args.runs)?,
        );
        let process = agent(n, &bin_dir)?;
        let e2e = end_to_end(n, &bins, args.duration_ms, n <= args.baseline_max)?;
        let idle = change_latency(n, 200, Load::Idle)?;
        let change = (idle.p50, idle.p99);
        let baselines = e2e.kube_proxy.iter().flat_map(|k| [k.iptables, k.nftables]);
        let paths = [e2e.direct, e2e.socket_lb, e2e.tc]
            .into_iter()
            .chain(baselines);
        let figures = point
            .0
            .figures()
            .into_iter()
            .chain(point.1.figures())
            .chain([process.cold_start.as_secs_f64()])
            .chain(paths.flat_map(|(r, l)| [r, l]));
        for v in figures {
            ensure!(
                v.is_finite() && v > 0.0,
                "a measurement is not a positive number: {v}"
            );
        }
        rows.insert(n, (point, process, e2e, change));
    }
    eprintln!("bench: first packets in repeat mode, along a chain of services");
    let chains = [
        ("IPv4", first_packet_repeat_maps::<[u8; 4]>(args.runs)?),
        ("IPv6", first_packet_repeat_maps::<[u8; 16]>(args.runs)?),
    ];
    for v in chains.iter().flat_map(|(_, c)| {
        [
            c.baseline_ns,
            c.baseline_ns + c.first_above_ns,
            c.baseline_ns + c.churned_above_ns,
        ]
    }) {
        ensure!(
            v.is_finite() && v > 0.0,
            "a measurement is not a positive number: {v}"
        );
    }
    let mut scale = Vec::new();
    for &n in &args.change_sizes {
        eprintln!("bench: one endpoint change among {n} services, idle and under load");
        let idle = change_latency(n, 500, Load::Idle)?;
        let busy = change_latency(n, 500, Load::Busy(args.change_flows))?;
        scale.push((n, idle, busy));
    }
    eprintln!("bench: NodePort from outside, masqueraded to another node");
    let external = node_port::measure_all(&bins, args.duration_ms)?;
    let date = String::from_utf8(
        Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()?
            .stdout,
    )?;
    let mut md = format!(
        "Run {} on {} — {} runs per per-packet figure, {} ms of connections per data path.\n\n\
         **Per packet** (`BPF_PROG_TEST_RUN` of the tc ingress program). *Repeat*: the kernel runs \
         one packet {} times, in {} batches under one timer each, caches warm; the median batch's \
         mean — an established flow's steady cost (its entry translates the packet to itself, so \
         that every repetition does the full work). \
         *Single*: {} runs of one packet each, each cache-cold and timed alone (about 50 ns of \
         timer in every figure, the empty program's included) — a first packet needs a new flow \
         every run. \"Above\" is the difference from the empty program measured the same way; \
         first packets are measured around the stated conntrack fill, at most a quarter of the \
         map's capacity of them, so that no insert meets a full map (which must make room, or \
         refuses). *After churn*: as many first packets again, of new clients, once the first ones' \
         entries have been freed as the agent's GC frees expired flows (one at a time, in random \
         order), at the same fill: new flows then take freed entries scattered over the map's \
         memory, as in a map that has run for a while, where a fresh map hands out entries in \
         the order they lie.\n\n\
         | services | empty program, repeat / single (ns) | established flow, repeat (ns; above empty) | established flow, single (ns; above empty) | first packet, single (ns; above empty; conntrack fill) | first packet after churn, single (ns; above empty) | map memory (MiB; with 128 possible CPUs) | agent RSS (MiB) |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        date.trim(),
        machine(),
        args.runs,
        args.duration_ms,
        args.runs,
        per_packet::REPEAT_BATCHES,
        args.runs,
    );
    for (n, ((p, _), process, _, _)) in &rows {
        md += &format!(
            "| {n} | {:.0} / {:.0} | {:.0} ({:.0}) | {:.0} ({:.0}) | {:.0} ({:.0}; {:.0}%) | {:.0} ({:.0}) | {:.1} ({:.1}) | {:.1} |\n",
            p.repeat_baseline_ns,
            p.baseline_ns,
            p.repeat_hit_ns,
            p.repeat_hit_ns - p.repeat_baseline_ns,
            p.hit_ns,
            p.hit_ns - p.baseline_ns,
            p.miss_ns,
            p.miss_ns - p.baseline_ns,
            p.conntrack_fill * 100.0,
            p.churned_miss_ns,
            p.churned_miss_ns - p.baseline_ns,
            p.map_bytes.0 as f64 / (1 << 20) as f64,
            p.map_bytes.1 as f64 / (1 << 20) as f64,
            process.rss_bytes as f64 / (1 << 20) as f64,
        );
    }
    md += &format!(
        "\n**Per packet, IPv6**: the same measurements with IPv6 services, clients and conntrack \
         map (`ct_flows6`, {} entries: {} first packets, around half of it). In brackets, the cost \
         above the empty program as a ratio to IPv4's in the table above (1.10x: 10% dearer).\n\n\
         | services | empty program, repeat / single (ns) | established flow, repeat (ns; above empty; to IPv4) | established flow, single (ns; above empty; to IPv4) | first packet, single (ns; above empty; to IPv4; conntrack fill) | first packet after churn, single (ns; above empty; to IPv4) |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        maps::MAX_CONNTRACK6,
        first_packet_runs::<[u8; 16]>(args.runs),
    );
    for (n, ((p4, p6), _, _, _)) in &rows {
        let above = |f: fn(&Datapoint) -> (f64, f64)| {
            let ((v6, base6), (v4, base4)) = (f(p6), f(p4));
            format!(
                "{v6:.0} ({:.0}; {:.2}x)",
                v6 - base6,
                (v6 - base6) / (v4 - base4)
            )
        };
        md += &format!(
            "| {n} | {:.0} / {:.0} | {} | {} | {}, {:.0}% | {} |\n",
            p6.repeat_baseline_ns,
            p6.baseline_ns,
            above(|p| (p.repeat_hit_ns, p.repeat_baseline_ns)),
            above(|p| (p.hit_ns, p.baseline_ns)),
            above(|p| (p.miss_ns, p.baseline_ns)),
            p6.conntrack_fill * 100.0,
            above(|p| (p.churned_miss_ns, p.baseline_ns)),
        );
    }
    md += &format!(
        "\n**First packets in repeat mode**: the kernel runs one SYN {} times in a row, in \
         batches from a client each (the median batch's mean), along a chain of as many \
         services, each one's only backend the next one's address, so that every repetition, \
         as the one before translated it, is addressed to the next service, and the program \
         (`proxy_bench_next_client`) steps its source port first, so that it is a new \
         client's first packet (lookups that miss, a backend chosen, a conntrack entry made, \
         the packet translated); its empty program is the step alone; around \
         the stated conntrack fill, as many first packets as single runs measure. The \
         program's code and the services' entries stay in the caches, as on a node taking new \
         flows one after another; the conntrack buckets do not, as in any map of that size. \
         \"Above\" is the difference from the empty program run the same way.\n\n\
         *After churn*: as many again, of new clients, once the first ones' entries have been \
         freed as the GC frees them, as in the single runs.\n\n\
         Each family's chain runs on {} fresh maps, one after another, and each figure is the \
         median of the maps': what a first packet costs depends on where a fresh map's memory \
         lies (its buckets' cache and TLB misses), and each map's figures are in the last \
         column.\n\n\
         | family | empty program, repeat (ns) | first packet, repeat (ns; above empty; conntrack fill) | first packet after churn, repeat (ns; above empty) | above empty, each map (fresh / after churn) |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
        per_packet::CHAIN,
        per_packet::CHAIN_MAPS,
    );
    for (family, c) in &chains {
        let each_map = c
            .each_map
            .iter()
            .map(|(first, churned)| format!("{first:.0} / {churned:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        md += &format!(
            "| {family} | {:.0} | {:.0} ({:.0}; {:.0}%) | {:.0} ({:.0}) | {each_map} |\n",
            c.baseline_ns,
            c.baseline_ns + c.first_above_ns,
            c.first_above_ns,
            c.conntrack_fill * 100.0,
            c.baseline_ns + c.churned_above_ns,
            c.churned_above_ns,
        );
    }
    md += "\n**New connections end to end** to the last service (sequential TCP connect, one exchange, close; connections/s, median first-packet latency (connect), and the rate as a ratio of connecting to the pod directly; each data path from a client pod of its own). The last column is the tc programs' own cost on that real traffic, kernel-measured (`BPF_ENABLE_STATS`): mean ns per run, ingress and egress, over every packet of the tc path's run:\n\n\
           | services | direct to pod | our socket LB | our tc path | kube-proxy iptables | kube-proxy nftables | tc programs on real traffic (ns/run) |\n\
           | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    let not_run = format!("not run (> {})", args.baseline_max);
    for (n, (_, _, e, _)) in &rows {
        let cell = |(rate, p50): (f64, f64)| {
            format!("{rate:.0}/s, {p50:.0} µs ({:.2}x)", rate / e.direct.0)
        };
        let baseline = |f: fn(&KubeProxy) -> (f64, f64)| {
            e.kube_proxy
                .as_ref()
                .map_or(not_run.clone(), |k| cell(f(k)))
        };
        md += &format!(
            "| {n} | {} | {} | {} | {} | {} | {:.0} |\n",
            cell(e.direct),
            cell(e.socket_lb),
            cell(e.tc),
            baseline(|k| k.iptables),
            baseline(|k| k.nftables),
            e.tc_run_ns
        );
    }
    md += "\n**Programming** (ours: agent start until every service is in the maps, from where the datapath answers at once; kube-proxy: loading its full ruleset, as on every full sync):\n\n\
           | services | our cold start (ms) | our one endpoint change, p50 / p99 (ms) | one small manifest file added beside them, to its sync (ms) | iptables-restore (ms) | nft -f (ms) |\n\
           | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    for (n, (_, process, e, (p50, p99))) in &rows {
        let load = |f: fn(&KubeProxy) -> Duration| {
            e.kube_proxy.as_ref().map_or(not_run.clone(), |k| {
                format!("{:.0}", f(k).as_secs_f64() * 1000.0)
            })
        };
        md += &format!(
            "| {n} | {:.0} | {:.2} / {:.2} | {:.1} | {} | {} |\n",
            process.cold_start.as_secs_f64() * 1000.0,
            p50.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0,
            process.small_file_edit.as_secs_f64() * 1000.0,
            load(|k| k.iptables_restore),
            load(|k| k.nft_load)
        );
    }
    md += &format!(
        "\n**One endpoint change at scale** (500 changes each; p50 / p99 in ms; under load: {} conntrack entries, GC passes and drift-repair snapshots running back to back on low-priority threads, as in the agent but without its pauses; the drift comparison runs on the agent's loop in steps of {} entries between changes, so the longest step is how long a change could wait behind it):\n\n\
         | services | idle | under GC and resync | longest drift-repair step (ms) | one /metrics scrape meanwhile (ms) |\n\
         | ---: | ---: | ---: | ---: | ---: |\n",
        args.change_flows, REPAIR_STEP
    );
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    for (n, idle, busy) in &scale {
        let optional = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.2}", ms(&d)));
        md += &format!(
            "| {n} | {:.2} / {:.2} | {:.2} / {:.2} | {} | {} |\n",
            ms(&idle.p50),
            ms(&idle.p99),
            ms(&busy.p50),
            ms(&busy.p99),
            optional(busy.longest_repair_step),
            optional(busy.scrape),
        );
    }
    md += &format!(
        "\n**External traffic**: a client outside the cluster connects to a NodePort on node-a whose only endpoint is a pod on node-b, so node-a masquerades every connection ({} ms per figure; round trips: the median of {} such windows; our paths each in {} worlds of their own, measured in turns, each figure the median of the worlds'; ratio to routing to the pod without NAT). The last column is the time all our packet programs ran (tc and XDP, kernel-measured) during the round trips, per round trip: the same work, a request and its answer translated and forwarded, done by tc or by XDP; and how many program runs that was, on both nodes (each run carries the kernel's cost of calling a program and timing it, whatever the program does):\n\n\
         | data path | new connections/s | median connect (µs) | failed connections | round trips/s on one connection | median round trip (µs) | our programs' kernel time per round trip (ns; program runs) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        args.duration_ms,
        node_port::ROUND_TRIP_WINDOWS,
        node_port::OUR_PATH_WORLDS,
    );
    // Path::ALL starts with the baseline.
    let base = &external[0].1;
    for (path, f) in &external {
        md += &format!(
            "| {} | {:.0} ({:.2}x) | {:.0} | {} | {:.0} ({:.2}x) | {:.0} | {} |\n",
            path.label(),
            f.connections.0,
            f.connections.0 / base.connections.0,
            f.connections.1,
            f.failed_connections,
            f.round_trips.0,
            f.round_trips.0 / base.round_trips.0,
            f.round_trips.1,
            f.datapath_per_round_trip
                .as_ref()
                .map_or("—".to_owned(), |p| format!(
                    "{:.0} ({:.1} runs)",
                    p.ns, p.runs
                )),
        );
    }
    md += &program_breakdown(&external);
    let font = std::fs::read(FONT).with_context(|| {
        format!("reading the plots' font {FONT} (apt package fonts-dejavu-core)")
    })?;
    plotters::style::register_font(
        "sans-serif",
        plotters::style::FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;
    let sizes: Vec<usize> = rows.keys().copied().collect();
    let column = |f: &dyn Fn(&Row) -> Option<f64>| rows.values().map(f).collect::<Vec<_>>();
    let ms = |d: Duration| Some(d.as_secs_f64() * 1000.0);
    plot(
        &args.out.join("per-packet.png"),
        "tc ingress program, cost per packet (BPF_PROG_TEST_RUN)",
        "ns per packet",
        &sizes,
        &[
            (
                "empty program (repeat)",
                column(&|r| Some(r.0.0.repeat_baseline_ns)),
            ),
            (
                "established flow (repeat)",
                column(&|r| Some(r.0.0.repeat_hit_ns)),
            ),
            (
                "empty program (single)",
                column(&|r| Some(r.0.0.baseline_ns)),
            ),
            ("established flow (single)", column(&|r| Some(r.0.0.hit_ns))),
            (
                "first packet (single, half-full conntrack)",
                column(&|r| Some(r.0.0.miss_ns)),
            ),
            (
                "first packet after the GC's churn",
                column(&|r| Some(r.0.0.churned_miss_ns)),
            ),
            (
                "IPv6 established flow (repeat)",
                column(&|r| Some(r.0.1.repeat_hit_ns)),
            ),
            (
                "IPv6 first packet (single, half-full conntrack)",
                column(&|r| Some(r.0.1.miss_ns)),
            ),
        ],
    )?;
    let baseline = |r: &Row, f: fn(&KubeProxy) -> f64| r.2.kube_proxy.as_ref().map(f);
    plot(
        &args.out.join("connection-rate.png"),
        "New connections per second to the last service (sequential client)",
        "connections / s",
        &sizes,
        &[
            ("direct to pod", column(&|r| Some(r.2.direct.0))),
            ("socket LB", column(&|r| Some(r.2.socket_lb.0))),
            ("tc path", column(&|r| Some(r.2.tc.0))),
            (
                "kube-proxy iptables",
                column(&|r| baseline(r, |k| k.iptables.0)),
            ),
            (
                "kube-proxy nftables",
                column(&|r| baseline(r, |k| k.nftables.0)),
            ),
        ],
    )?;
    plot(
        &args.out.join("programming.png"),
        "Programming N services",
        "ms",
        &sizes,
        &[
            ("our agent, cold start", column(&|r| ms(r.1.cold_start))),
            (
                "iptables-restore, full ruleset",
                column(&|r| baseline(r, |k| k.iptables_restore.as_secs_f64() * 1000.0)),
            ),
            (
                "nft -f, full ruleset",
                column(&|r| baseline(r, |k| k.nft_load.as_secs_f64() * 1000.0)),
            ),
        ],
    )?;
    md += "\n![per packet](per-packet.png) ![connection rate](connection-rate.png) ![programming](programming.png)\n";
    let results = args.out.join("results.md");
    std::fs::write(&results, &md).with_context(|| format!("writing {}", results.display()))?;
    print!("{md}");
    eprintln!("bench: wrote {}", results.display());
    Ok(())
}
