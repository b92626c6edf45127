//! The benchmark behind `cargo xtask bench`, for N services of 3 endpoints each:
//! - per-packet cost of the tc ingress program with `BPF_PROG_TEST_RUN`, for a TCP SYN to
//!   the last service added (conntrack miss: a new client per run) and for an established
//!   flow (conntrack hit), against an empty classifier run the same way;
//! - the map memory of the datapath and the agent's resident memory;
//! - the agent's cold start: from its start to N services programmed from a manifest.
//!
//! Every figure is measured in the same run, and ratios are against the baseline of that run.
//! Writes `results.md` (and prints it) in the output directory.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::programs::{TestRun as _, TestRunOptions};
use clap::Parser;
use proxy::{
    datapath::Datapath,
    desired::{DesiredService, DesiredState},
    maps::Maps,
    reconcile::Reconciler,
};
use proxy_common::{Backend, ServiceKey, maps};

#[derive(Parser)]
struct Args {
    /// Numbers of services to measure.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,10000")]
    sizes: Vec<usize>,
    /// Program runs per measurement.
    #[arg(long, default_value_t = 100_000)]
    runs: u32,
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

fn vip(i: usize) -> [u8; 4] {
    [10, 96, (i >> 8) as u8, i as u8]
}

fn desired(n: usize) -> DesiredState {
    (0..n)
        .map(|i| {
            let backends = (1..=3)
                .map(|b| Backend {
                    addr: [10, 244, (i % 250) as u8, b],
                    port: 8080,
                    proto: 6,
                    flags: 0,
                })
                .collect();
            let key = ServiceKey {
                addr: vip(i),
                port: 80,
                proto: 6,
                pad: 0,
            };
            let service = DesiredService {
                name: format!("bench/svc-{i}:http"),
                backends,
                affinity_timeout_secs: None,
                terminating: false,
                internal_local: false,
            };
            (key, service)
        })
        .collect()
}

/// An Ethernet + IPv4 + TCP SYN packet from `client:40000` to `dst:80`.
fn syn(client: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + 20];
    p[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    p[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&client);
    ip[16..20].copy_from_slice(&dst);
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!((sum & 0xffff) + (sum >> 16)) as u16).to_be_bytes());
    let tcp = &mut p[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    p
}

/// Mean kernel-measured run time, in ns, of `runs` single runs of `program` on `packet(i)`.
/// Single runs because the program rewrites the packet: a repeated run would see the
/// rewritten packet, not the one being measured.
fn mean_ns(
    program: &aya::programs::SchedClassifier,
    runs: u32,
    packet: impl Fn(u32) -> Vec<u8>,
) -> anyhow::Result<f64> {
    let mut total = Duration::ZERO;
    let mut out = vec![0u8; 256];
    for i in 0..runs {
        let data = packet(i);
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&data);
        opts.data_out = Some(&mut out);
        total += program
            .test_run(opts)
            .context("BPF_PROG_TEST_RUN")?
            .duration;
    }
    Ok(total.as_nanos() as f64 / f64::from(runs))
}

/// Bytes of kernel memory charged to the maps pinned in `dir` (`memlock` in fdinfo).
fn map_memory(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for name in maps::ALL {
        let map = aya::maps::MapData::from_pin(dir.join(name))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(map.fd()));
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .context("no memlock in fdinfo")?
            .trim()
            .parse::<u64>()?;
    }
    Ok(total)
}

struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Datapoint {
    baseline_ns: f64,
    miss_ns: f64,
    hit_ns: f64,
    map_bytes: u64,
}

fn per_packet(n: usize, runs: u32) -> anyhow::Result<Datapoint> {
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/proxy-bench-{}-{n}",
        std::process::id()
    )));
    let mut datapath = Datapath::load(&pins.0, &[])?;
    let mut reconciler = Reconciler::adopt(Maps::open(&pins.0)?)?;
    let report = reconciler.apply(&desired(n));
    ensure!(
        report.errors.is_empty() && report.changed == n,
        "programming {n} services: {:?}",
        report.errors.first().map(|e| format!("{:#}", e.1))
    );
    let last = vip(n - 1);
    let baseline = datapath.load_classifier("proxy_bench_baseline")?;
    let baseline_ns = mean_ns(baseline, runs, |_| syn([10, 1, 0, 1], last))?;
    let ingress = datapath.load_classifier("proxy_ingress")?;
    // A new client every run: conntrack miss, backend selection, two conntrack inserts.
    let miss_ns = mean_ns(ingress, runs, |i| {
        syn([10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8], last)
    })?;
    // The same client every run: conntrack hit (the first run created the entry).
    let hit_ns = mean_ns(ingress, runs, |_| syn([10, 200, 0, 1], last))?;
    Ok(Datapoint {
        baseline_ns,
        miss_ns,
        hit_ns,
        map_bytes: map_memory(&pins.0)?,
    })
}

fn manifest(n: usize) -> String {
    let mut yaml = String::new();
    for i in 0..n {
        let [a, b, c, d] = vip(i);
        yaml += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec: {{clusterIP: {a}.{b}.{c}.{d}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [10.244.{}.1]}}, {{addresses: [10.244.{}.2]}}, {{addresses: [10.244.{}.3]}}]\n",
            i % 250,
            i % 250,
            i % 250
        );
    }
    yaml
}

/// Starts the agent on `n` services; returns (time to the first complete sync, RSS bytes).
fn agent(n: usize, bin_dir: &Path, work: &Path) -> anyhow::Result<(Duration, u64)> {
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/proxy-bench-agent-{}-{n}",
        std::process::id()
    )));
    let cgroup =
        proxy::datapath::cgroup2_mount()?.join(format!("proxy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup)?;
    let path = work.join(format!("services-{n}.yaml"));
    std::fs::write(&path, manifest(n))?;
    let started = Instant::now();
    let mut child = Command::new(bin_dir.join("proxy-agent"))
        .arg("--manifests")
        .arg(&path)
        .arg("--cgroup")
        .arg(&cgroup)
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
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            if line.contains(&format!("synced {n} service ports")) && line.contains(" 0 failed") {
                let elapsed = started.elapsed();
                let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
                let rss_kb: u64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .context("no VmRSS")?
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse()?;
                return Ok((elapsed, rss_kb * 1024));
            }
            if started.elapsed() > Duration::from_secs(300) {
                break;
            }
        }
        bail!("the agent did not program {n} services")
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir(&cgroup);
    result
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
    let mut rows: BTreeMap<usize, (Datapoint, Duration, u64)> = BTreeMap::new();
    for &n in &args.sizes {
        eprintln!("bench: {n} services");
        let point = per_packet(n, args.runs)?;
        let (cold_start, rss) = agent(n, &bin_dir, &args.out)?;
        for v in [
            point.baseline_ns,
            point.miss_ns,
            point.hit_ns,
            cold_start.as_secs_f64(),
        ] {
            ensure!(
                v.is_finite() && v > 0.0,
                "a measurement is not a positive number: {v}"
            );
        }
        rows.insert(n, (point, cold_start, rss));
    }
    let date = String::from_utf8(
        Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()?
            .stdout,
    )?;
    let mut md = format!(
        "Run {} on {} — {} runs per per-packet figure.\n\n\
         | services | empty tc program (ns/pkt) | first packet, conntrack miss (ns/pkt) | established flow, conntrack hit (ns/pkt) | map memory (MiB) | agent RSS (MiB) | agent cold start to all programmed (ms) |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        date.trim(),
        machine(),
        args.runs
    );
    for (n, (p, cold, rss)) in &rows {
        md += &format!(
            "| {n} | {:.0} | {:.0} ({:.1}x) | {:.0} ({:.1}x) | {:.1} | {:.1} | {:.0} |\n",
            p.baseline_ns,
            p.miss_ns,
            p.miss_ns / p.baseline_ns,
            p.hit_ns,
            p.hit_ns / p.baseline_ns,
            p.map_bytes as f64 / (1 << 20) as f64,
            *rss as f64 / (1 << 20) as f64,
            cold.as_secs_f64() * 1000.0
        );
    }
    let results = args.out.join("results.md");
    std::fs::write(&results, &md).with_context(|| format!("writing {}", results.display()))?;
    print!("{md}");
    eprintln!("bench: wrote {}", results.display());
    Ok(())
}
