//! External traffic: a client outside the cluster (behind `ext`, which routes) reaches a
//! NodePort on node-a whose only backend is a pod on node-b, so every connection is
//! masqueraded by node-a; through kube-proxy's iptables rules, our tc path, and our XDP fast
//! path in generic and native mode. The baseline is the same client reaching the pod routed
//! by node-b, without NAT.
//!
//! Everything runs on one CPU: client, server and the softirqs their packets raise. The
//! figures are then the CPU cost of the path; across CPUs, the wake-ups between client and
//! server (IPIs, expensive on a VM) dominate and vary tenfold from run to run.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    process::Command,
};

use anyhow::{Context as _, ensure};
use proxy::testbed::{BACKEND_PORT, Binaries, World};
use serde_json::Value;

const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const NODE_PORT: u16 = 30080;

/// A data path from ext to the pod.
#[derive(Clone, Copy)]
pub enum Path {
    /// Routed by node-b, no NAT: the baseline.
    Routed,
    KubeProxyIptables,
    Tc,
    XdpGeneric,
    XdpNative,
}

impl Path {
    pub const ALL: [Path; 5] = [
        Path::Routed,
        Path::KubeProxyIptables,
        Path::Tc,
        Path::XdpGeneric,
        Path::XdpNative,
    ];

    /// Ours, rather than a baseline.
    fn ours(self) -> bool {
        matches!(self, Path::Tc | Path::XdpGeneric | Path::XdpNative)
    }

    pub fn label(self) -> &'static str {
        match self {
            Path::Routed => "routed to the pod, no NAT",
            Path::KubeProxyIptables => "kube-proxy iptables NodePort",
            Path::Tc => "our tc path (--xdp off)",
            Path::XdpGeneric => "our XDP, generic",
            Path::XdpNative => "our XDP, native",
        }
    }
}

/// Worlds each of our paths is measured in, in turns (tc, generic XDP, native XDP, then
/// again), each figure the median of the worlds': a fresh world's maps lie elsewhere in
/// memory, and the VM's load drifts over minutes; either moved a path's time per round trip
/// by 5-10% between quick runs of one world each.
pub const OUR_PATH_WORLDS: usize = 3;

/// Every path measured, in `Path::ALL`'s order: the baselines in one world each, ours in
/// `OUR_PATH_WORLDS` each.
pub fn measure_all(bins: &Binaries, duration_ms: u64) -> anyhow::Result<Vec<(Path, Figures)>> {
    let mut worlds: Vec<(Path, Vec<Figures>)> =
        Path::ALL.iter().map(|&path| (path, Vec::new())).collect();
    for round in 0..OUR_PATH_WORLDS {
        for (path, figures) in &mut worlds {
            if round > 0 && !path.ours() {
                continue;
            }
            let f = measure_path(*path, bins, duration_ms)
                .with_context(|| format!("measuring {}", path.label()))?;
            let (c, r) = (f.connections, f.round_trips);
            for v in [c.0, c.1, r.0, r.1] {
                ensure!(
                    v.is_finite() && v > 0.0,
                    "{}: a measurement is not a positive number: {v}",
                    path.label()
                );
            }
            figures.push(f);
        }
    }
    Ok(worlds
        .into_iter()
        .map(|(path, figures)| (path, Figures::median_of(&figures)))
        .collect())
}

/// Windows of round trips on one connection per path, each as long as the connection rate's:
/// each round-trip figure is their median, so that a window the shared VM disturbed (one
/// path's figure 10% off in a quick run) does not decide a comparison between paths.
pub const ROUND_TRIP_WINDOWS: usize = 3;

/// What a client in ext measured through one path.
pub struct Figures {
    /// New connections per second and median connect latency (µs), sequentially.
    pub connections: (f64, f64),
    /// Round trips per second and their median latency (µs) on one connection, each the
    /// median of `ROUND_TRIP_WINDOWS` windows.
    pub round_trips: (f64, f64),
    /// Connections that failed while measuring the connection rate.
    pub failed_connections: u64,
    /// Our packet programs per round trip (our paths only), each the median of the windows'.
    pub datapath_per_round_trip: Option<ProgramTime>,
    /// The same, program by program (our paths only).
    pub by_program: Vec<ProgramShare>,
}

impl Figures {
    /// Each figure the median of `worlds`' (failed connections: their sum).
    fn median_of(worlds: &[Figures]) -> Figures {
        let median = |f: &dyn Fn(&Figures) -> f64| super::median(worlds.iter().map(f).collect());
        let mut programs: BTreeMap<(&str, &str), Vec<&ProgramShare>> = BTreeMap::new();
        for p in worlds.iter().flat_map(|w| &w.by_program) {
            programs
                .entry((p.node.as_str(), p.program.as_str()))
                .or_default()
                .push(p);
        }
        Figures {
            connections: (median(&|f| f.connections.0), median(&|f| f.connections.1)),
            round_trips: (median(&|f| f.round_trips.0), median(&|f| f.round_trips.1)),
            failed_connections: worlds.iter().map(|f| f.failed_connections).sum(),
            datapath_per_round_trip: worlds[0].datapath_per_round_trip.as_ref().map(|_| {
                let of = |f: &Figures, g: fn(&ProgramTime) -> f64| {
                    f.datapath_per_round_trip.as_ref().map_or(0.0, g)
                };
                ProgramTime {
                    ns: median(&|f| of(f, |p| p.ns)),
                    runs: median(&|f| of(f, |p| p.runs)),
                }
            }),
            by_program: programs
                .into_iter()
                .map(|((node, program), shares)| ProgramShare {
                    node: node.to_owned(),
                    program: program.to_owned(),
                    ns_per_run: super::median(shares.iter().map(|p| p.ns_per_run).collect()),
                    runs: super::median(shares.iter().map(|p| p.runs).collect()),
                })
                .collect(),
        }
    }
}

/// Our packet programs' kernel time and runs (each program's each run, on both nodes).
pub struct ProgramTime {
    pub ns: f64,
    pub runs: f64,
}

/// One packet program of one node's agent: its mean time per run and its runs per round
/// trip, each the median of the windows'.
pub struct ProgramShare {
    /// node-a, node-b.
    pub node: String,
    /// `proxy_ingress`, `proxy_egress`, `proxy_xdp`.
    pub program: String,
    pub ns_per_run: f64,
    pub runs: f64,
}

/// A NodePort service on 30080 whose endpoint is `pod` on node-b.
fn manifest(pod: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: bench}}\nspec: {{type: NodePort, clusterIP: 10.96.0.20, ports: [{{name: http, port: 80, targetPort: {BACKEND_PORT}, nodePort: {NODE_PORT}}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: bench, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: {BACKEND_PORT}}}]\nendpoints: [{{addresses: [{pod}], nodeName: node-b}}]\n"
    )
}

/// kube-proxy's iptables rules for that service (nodePort, externalTrafficPolicy Cluster).
fn iptables_ruleset(pod: Ipv4Addr) -> String {
    let chains = ":KUBE-NODEPORTS - [0:0]\n:KUBE-EXT-WEB - [0:0]\n:KUBE-SVC-WEB - [0:0]\n:KUBE-SEP-WEB - [0:0]\n";
    let rules = format!(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         -A KUBE-NODEPORTS -p tcp -m comment --comment \"bench/web:http\" -m tcp --dport {NODE_PORT} -j KUBE-EXT-WEB\n\
         -A KUBE-EXT-WEB -m comment --comment \"masquerade traffic for bench/web:http external destinations\" -j KUBE-MARK-MASQ\n\
         -A KUBE-EXT-WEB -j KUBE-SVC-WEB\n\
         -A KUBE-SVC-WEB -m comment --comment \"bench/web:http -> {pod}:{BACKEND_PORT}\" -j KUBE-SEP-WEB\n\
         -A KUBE-SEP-WEB -p tcp -m comment --comment \"bench/web:http\" -m tcp -j DNAT --to-destination {pod}:{BACKEND_PORT}\n"
    );
    super::kube_nat_table(chains, &rules)
}

/// Runs netprobe `mode` from ext to `to` for `duration_ms`; returns (per second, median µs)
/// and the failed attempts. A few failed connections (at most 1 in 1,000: a known conntrack
/// clash when masquerade ports are reused, issue #13) are reported, not fatal.
fn measure(
    world: &World,
    mode: &str,
    to: &str,
    duration_ms: u64,
) -> anyhow::Result<((f64, f64), u64)> {
    let out = world.probe_ext(&[mode, "--to", to, "--duration-ms", &duration_ms.to_string()])?;
    let r: &Value = out.first().context("no result")?;
    let failures = r["failures"].as_u64().unwrap_or(0);
    let attempts = r["connections"].as_u64().unwrap_or(0) + failures;
    ensure!(
        r["ok"] != false && failures * 1000 <= attempts && (mode == "rate" || failures == 0),
        "{mode} through {to} failed: {r}"
    );
    let median = if mode == "rate" {
        "connect_p50_us"
    } else {
        "p50_us"
    };
    Ok((
        (
            r["per_second"].as_f64().context("per_second")?,
            r[median].as_f64().context("median")?,
        ),
        failures,
    ))
}

/// This thread's CPU affinity.
fn affinity() -> anyhow::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data, filled by the call.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid set of the size passed.
    let ret = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    ensure!(
        ret == 0,
        "reading the CPU affinity: {}",
        std::io::Error::last_os_error()
    );
    Ok(set)
}

/// Sets this thread's CPU affinity, which the processes it starts inherit.
fn set_affinity(set: &libc::cpu_set_t) -> anyhow::Result<()> {
    // SAFETY: a valid set of the size passed.
    let ret = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) };
    ensure!(
        ret == 0,
        "setting the CPU affinity: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Builds the two-node world for `path` and measures it, on one CPU.
fn measure_path(path: Path, bins: &Binaries, duration_ms: u64) -> anyhow::Result<Figures> {
    let all = affinity()?;
    // SAFETY: a valid set and CPU numbers below CPU_SETSIZE.
    let first = (0..libc::CPU_SETSIZE as usize)
        .find(|&c| unsafe { libc::CPU_ISSET(c, &all) })
        .context("no CPU in this thread's affinity")?;
    let mut one = affinity()?;
    // SAFETY: a valid set and a CPU number below CPU_SETSIZE.
    unsafe {
        libc::CPU_ZERO(&mut one);
        libc::CPU_SET(first, &mut one);
    }
    set_affinity(&one)?;
    let figures = measure_on_this_cpu(path, bins, duration_ms);
    set_affinity(&all)?;
    figures
}

fn measure_on_this_cpu(path: Path, bins: &Binaries, duration_ms: u64) -> anyhow::Result<Figures> {
    let mut world = World::two_nodes(0, 1, bins.clone())?;
    // As outside clients are: a routed hop away, its packets in buffers of their own.
    world.client_behind_ext()?;
    // Complete checksums on every path alike: XDP needs them (see the testbed).
    world.use_wire_checksums()?;
    world.serve(1, "pod")?;
    let pod = world.pod(1).ip;
    let ext = world.ext.clone().context("the world has no ext")?;
    let node_port = format!("{NODE_A}:{NODE_PORT}");
    let (to, xdp) = match path {
        Path::Routed => {
            let out = Command::new("ip")
                .args(["-n", &ext, "route", "add", &format!("{pod}/32"), "via"])
                .arg(NODE_B.to_string())
                .output()?;
            ensure!(
                out.status.success(),
                "adding ext's route to the pod: {out:?}"
            );
            (format!("{pod}:{BACKEND_PORT}"), None)
        }
        Path::KubeProxyIptables => {
            super::load_ruleset(
                &world,
                &["iptables-restore", "--noflush"],
                &iptables_ruleset(pod),
            )?;
            (node_port, None)
        }
        Path::Tc => (node_port, Some("off")),
        Path::XdpGeneric => (node_port, Some("generic")),
        Path::XdpNative => {
            world.ready_lan_for_native_xdp()?;
            (node_port, Some("native"))
        }
    };
    let mut agents = Vec::new();
    if let Some(mode) = xdp {
        let manifest = world.write_manifest(&manifest(pod))?;
        let manifest = manifest.to_string_lossy().into_owned();
        for node in 0..2 {
            agents.push(world.start_agent_on(
                node,
                &["--manifests", &manifest, "--xdp", mode],
                false,
            )?);
        }
    }
    let (connections, failed_connections) = measure(&world, "rate", &to, duration_ms)?;
    let owners = agents
        .iter()
        .zip(&world.nodes)
        .map(|(agent, node)| Ok((node.name.clone(), programs_held_by(agent.pid)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut windows = Vec::with_capacity(ROUND_TRIP_WINDOWS);
    let mut shares: BTreeMap<(String, String), Vec<[f64; 2]>> = BTreeMap::new();
    for _ in 0..ROUND_TRIP_WINDOWS {
        let ((round_trips, _), programs) =
            super::program_cost(|| measure(&world, "rr", &to, duration_ms))?;
        let count = round_trips.0 * duration_ms as f64 / 1000.0;
        let (time, runs) = super::total(&programs);
        windows.push([
            round_trips.0,
            round_trips.1,
            time.as_nanos() as f64 / count,
            runs as f64 / count,
        ]);
        for (id, p) in &programs {
            let Some((node, _)) = owners.iter().find(|(_, ids)| ids.contains(id)) else {
                continue;
            };
            let per_run = p.time.as_nanos() as f64 / p.runs.max(1) as f64;
            shares
                .entry((node.clone(), p.name.clone()))
                .or_default()
                .push([per_run, p.runs as f64 / count]);
        }
    }
    let median = |i: usize| super::median(windows.iter().map(|w| w[i]).collect());
    let by_program = shares
        .into_iter()
        .map(|((node, program), w)| {
            let median = |i: usize| super::median(w.iter().map(|v| v[i]).collect());
            ProgramShare {
                node,
                program,
                ns_per_run: median(0),
                runs: median(1),
            }
        })
        .collect();
    Ok(Figures {
        connections,
        round_trips: (median(0), median(1)),
        failed_connections,
        datapath_per_round_trip: xdp.map(|_| ProgramTime {
            ns: median(2),
            runs: median(3),
        }),
        by_program,
    })
}

/// The ids of the BPF programs process `pid` holds (its programs' and links' descriptors), by
/// which the programs each node's agent loaded are told apart.
fn programs_held_by(pid: u32) -> anyhow::Result<BTreeSet<u32>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        // A descriptor closed since the listing has no information left: skipped.
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        ids.extend(info.lines().filter_map(|l| {
            l.strip_prefix("prog_id:")
                .and_then(|id| id.trim().parse::<u32>().ok())
        }));
    }
    Ok(ids)
}
