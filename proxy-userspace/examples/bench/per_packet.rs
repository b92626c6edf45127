//! Per-packet cost of the tc ingress program with `BPF_PROG_TEST_RUN`, for each address
//! family: a TCP SYN to the last of N services (conntrack miss: a new client per run) and an
//! established flow's segment (conntrack hit), against an empty classifier run the same way;
//! and first packets in repeat mode, along a chain of services (`first_packet_repeat`).
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use aya::{
    Pod,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use proxy::{
    datapath::{Datapath, XdpAttach},
    desired::{DesiredService, DesiredState},
    family::{Backend, ServiceKey},
    maps::Maps,
    reconcile::Reconciler,
};
use proxy_common::{CtEntryOf, CtKeyOf, maps};

use super::{PinDir, map_memory};

/// An address family as the per-packet figures measure it: its addresses, the frames of
/// its TCP segments, its conntrack map.
pub trait Measured: Copy + Default + Eq + std::hash::Hash + Into<IpAddr> + 'static {
    const LABEL: &'static str;
    const CONNTRACK: &'static str;
    const CONNTRACK_CAPACITY: u32;
    /// Service `i`'s cluster IP.
    fn vip(i: usize) -> Self;
    /// Backend `b` (1-3) of service `i`.
    fn backend(i: usize, b: u8) -> Self;
    /// The `i`th of distinct clients (a new flow each; up to 2^20 + 1 of them).
    fn client(i: u32) -> Self;
    /// The Ethernet frame of a TCP segment with `flags` from `client:40000` to `dst:80`
    /// (its TCP checksum unset: the programs do not check it).
    fn tcp_frame(client: Self, dst: Self, flags: u8) -> Vec<u8>;
}

impl Measured for [u8; 4] {
    const LABEL: &'static str = "IPv4";
    const CONNTRACK: &'static str = maps::CONNTRACK;
    const CONNTRACK_CAPACITY: u32 = maps::MAX_CONNTRACK;
    fn vip(i: usize) -> Self {
        super::vip(i)
    }
    fn backend(i: usize, b: u8) -> Self {
        [10, 244, (i % 250) as u8, b]
    }
    fn client(i: u32) -> Self {
        [10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8]
    }
    fn tcp_frame(client: Self, dst: Self, flags: u8) -> Vec<u8> {
        let mut ip = vec![0u8; 20];
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
        frame(0x0800, ip, flags)
    }
}

impl Measured for [u8; 16] {
    const LABEL: &'static str = "IPv6";
    const CONNTRACK: &'static str = maps::CONNTRACK6;
    const CONNTRACK_CAPACITY: u32 = maps::MAX_CONNTRACK6;
    /// fd00:96::/96 and the service's number.
    fn vip(i: usize) -> Self {
        let mut a = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        a[12..].copy_from_slice(&(i as u32).to_be_bytes());
        a
    }
    fn backend(i: usize, b: u8) -> Self {
        [
            0xfd,
            0,
            2,
            0x44,
            0,
            (i % 250) as u8,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            b,
        ]
    }
    fn client(i: u32) -> Self {
        let mut a = [0xfd, 0, 0, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        a[12..].copy_from_slice(&i.to_be_bytes());
        a
    }
    fn tcp_frame(client: Self, dst: Self, flags: u8) -> Vec<u8> {
        let mut ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&20u16.to_be_bytes());
        ip[6] = 6;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&client);
        ip[24..40].copy_from_slice(&dst);
        frame(0x86dd, ip, flags)
    }
}

/// An Ethernet frame of `ethertype` around the IP header `ip` and a TCP header with
/// `flags` from port 40000 to port 80.
fn frame(ethertype: u16, ip: Vec<u8>, flags: u8) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend(ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    f.extend(tcp);
    f
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// `n` services of the family (TCP port 80), three backends each (port 8080).
fn desired<A: Measured>(n: usize) -> DesiredState
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    services::<A>(n, |i| (1..=3).map(|b| (A::backend(i, b), 8080)).collect())
}

/// `n` services of the family (TCP port 80), service `i`'s backends (address, TCP port)
/// `backends(i)`.
fn services<A: Measured>(n: usize, backends: impl Fn(usize) -> Vec<(A, u16)>) -> DesiredState
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    (0..n)
        .map(|i| {
            let backends = backends(i)
                .into_iter()
                .map(|(addr, port)| Backend {
                    addr: addr.into(),
                    port,
                    proto: 6,
                    flags: 0,
                })
                .collect();
            let key = ServiceKey::new(A::vip(i).into(), 80, 6);
            let service = DesiredService {
                name: format!("bench/svc-{i}:http"),
                backends,
                ..DesiredService::default()
            };
            (key, service)
        })
        .collect()
}

/// Mean kernel-measured run time, in ns, of `runs` single runs of `program` on `packet(i)`.
/// Single runs let every run see a packet of its own (a new flow each time), but each is
/// cache-cold and carries about 50 ns of the kernel's timer: compare them with the empty
/// program measured the same way.
fn mean_ns(
    program: &SchedClassifier,
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

/// Batches a repeat-mode figure is measured in; it is the median batch's mean, so that a
/// pause of the shared VM inside one batch (which lifted single rows by 20-60 ns when a
/// figure was one batch) does not make it.
pub const REPEAT_BATCHES: u32 = 5;

/// Run time, in ns, of `program` run `repeat` times in a row by the kernel, in `batches`
/// batches (one timer around each, caches warm), batch `b` on `packet(b)`: the mean of the
/// median batch. The kernel runs every repetition of a batch on the same buffer, as the one
/// before left it.
fn repeat_ns(
    program: &SchedClassifier,
    batches: u32,
    repeat: u32,
    packet: impl Fn(u32) -> Vec<u8>,
) -> anyhow::Result<f64> {
    let mut means = Vec::with_capacity(batches as usize);
    for b in 0..batches {
        let data = packet(b);
        let mut out = vec![0u8; 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&data);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let run = program.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        means.push(run.duration.as_nanos() as f64);
    }
    Ok(super::median(means))
}

pub struct Datapoint {
    pub baseline_ns: f64,
    pub miss_ns: f64,
    /// First packets again after the GC freed the first ones' entries (`free_as_gc`).
    pub churned_miss_ns: f64,
    pub hit_ns: f64,
    /// Repeat mode: the empty program and an established flow's packet.
    pub repeat_baseline_ns: f64,
    pub repeat_hit_ns: f64,
    /// Conntrack fill (entries / capacity) around which first packets were measured.
    pub conntrack_fill: f64,
    /// Kernel memory of the maps, measured and for 128 possible CPUs.
    pub map_bytes: (u64, u64),
}

impl Datapoint {
    pub fn figures(&self) -> [f64; 6] {
        [
            self.baseline_ns,
            self.miss_ns,
            self.churned_miss_ns,
            self.hit_ns,
            self.repeat_baseline_ns,
            self.repeat_hit_ns,
        ]
    }
}

/// How many of `runs` first packets are measured: at most a quarter of the conntrack map's
/// capacity (IPv6's is the smaller), so that the map never fills: an insert into a full map
/// must make room first, or is refused.
pub fn first_packet_runs<A: Measured>(runs: u32) -> u32 {
    runs.min(A::CONNTRACK_CAPACITY / 4)
}

/// The per-packet figures of family `A` with `n` of its services programmed, each from
/// `runs` runs.
pub fn per_packet<A: Measured>(n: usize, runs: u32) -> anyhow::Result<Datapoint>
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    let pins = pin_dir::<A>(&n.to_string());
    let mut datapath = programmed::<A>(&pins.0, &desired::<A>(n))?;
    let capacity = A::CONNTRACK_CAPACITY as usize;
    let first_runs = first_packet_runs::<A>(runs);
    let start = fill_below_half::<A>(&pins.0, first_runs as usize)?;
    let last = A::vip(n - 1);
    let syn = |i| A::tcp_frame(A::client(i), last, SYN);
    let baseline = datapath.load_classifier("proxy_bench_baseline")?;
    let baseline_ns = mean_ns(baseline, runs, syn)?;
    let per_batch = (runs / REPEAT_BATCHES).max(1);
    let repeat_baseline_ns = repeat_ns(baseline, REPEAT_BATCHES, per_batch, |_| syn(0))?;
    let ingress = datapath.load_classifier("proxy_ingress")?;
    // A new client every run: conntrack miss, backend selection, one conntrack insert.
    let miss_ns = mean_ns(ingress, first_runs, syn)?;
    let mut conntrack: HashMap<MapData, CtKeyOf<A>, CtEntryOf<A>> =
        proxy::maps::open(&pins.0, A::CONNTRACK)?;
    // The fill halfway through the runs.
    let middle = (start as u64 + proxy::map_batch::count(&conntrack)?) / 2;
    // As in steady state: the flows end, the GC frees their entries, and new ones (the same
    // number again, from new clients) take them, around the same fill.
    let flows = (0..first_runs).map(|i| flow_key(A::client(i), 40000));
    free_as_gc::<A>(&mut conntrack, flows)?;
    let churned_miss_ns = mean_ns(ingress, first_runs, |i| syn(first_runs + i))?;
    // An established flow: its SYN made the entries, its segments hit them.
    let client = A::client(1 << 20);
    mean_ns(ingress, 1, |_| A::tcp_frame(client, last, SYN))?;
    let hit_ns = mean_ns(ingress, runs, |_| A::tcp_frame(client, last, ACK))?;
    // Repeat mode runs one buffer again and again: the flow's entry is made to translate
    // the packet to itself, so every repetition is an established flow's packet. It costs
    // what any translation costs (the same lookups, stores and checksum updates), or a
    // little more: from an address change summing to zero, tc cannot tell a partial
    // checksum from a full one, so the ports' change takes the helper.
    let key = flow_key(client, 40000);
    let entry = conntrack.get(&key, 0).context("the flow's entry")?;
    conntrack.insert(
        key,
        CtEntryOf {
            nat_addr: last,
            nat_port: 80,
            ..entry
        },
        0,
    )?;
    let repeat_hit_ns = repeat_ns(ingress, REPEAT_BATCHES, per_batch, |_| {
        A::tcp_frame(client, last, ACK)
    })?;
    Ok(Datapoint {
        baseline_ns,
        miss_ns,
        churned_miss_ns,
        hit_ns,
        repeat_baseline_ns,
        repeat_hit_ns,
        conntrack_fill: middle as f64 / capacity as f64,
        map_bytes: map_memory(&pins.0)?,
    })
}

/// Services in the chain that first packets are measured in repeat mode along: few enough
/// that their own map entries stay in the caches, as the single runs' one service's do.
pub const CHAIN: u32 = 100;

/// First packets in repeat mode, the program's code and the services' entries in the
/// caches as on a node taking new flows one after another.
struct ChainPoint {
    /// The empty program, run the same way.
    baseline_ns: f64,
    first_ns: f64,
    /// First packets again after the GC freed the first ones' entries (`free_as_gc`).
    churned_ns: f64,
    /// Conntrack fill (entries / capacity) halfway through.
    conntrack_fill: f64,
}

/// Fresh maps each family's chain is measured on, one after another. What a first packet
/// costs depends on where a fresh map's memory lies (its buckets' cache and TLB misses):
/// the same chain on fresh maps, back to back, took 525-824 ns above empty.
pub const CHAIN_MAPS: usize = 3;

/// A family's chain on its fresh maps: each figure the median of the maps', and each map's
/// first packets above empty (fresh, after churn).
pub struct Chain {
    pub baseline_ns: f64,
    pub first_above_ns: f64,
    pub churned_above_ns: f64,
    /// Conntrack fill (entries / capacity) halfway through, the same on every map.
    pub conntrack_fill: f64,
    pub each_map: Vec<(f64, f64)>,
}

/// The chain on `CHAIN_MAPS` fresh maps.
pub fn first_packet_repeat_maps<A: Measured>(runs: u32) -> anyhow::Result<Chain>
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    let points = (0..CHAIN_MAPS)
        .map(|_| first_packet_repeat::<A>(runs))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let median = |f: fn(&ChainPoint) -> f64| super::median(points.iter().map(f).collect());
    Ok(Chain {
        baseline_ns: median(|p| p.baseline_ns),
        first_above_ns: median(|p| p.first_ns - p.baseline_ns),
        churned_above_ns: median(|p| p.churned_ns - p.baseline_ns),
        conntrack_fill: points[0].conntrack_fill,
        each_map: points
            .iter()
            .map(|p| (p.first_ns - p.baseline_ns, p.churned_ns - p.baseline_ns))
            .collect(),
    })
}

/// First packets of family `A` in repeat mode, as many as single runs measure
/// (`first_packet_runs`). Each service of a chain of `CHAIN` has one backend, the next
/// service's address (port 80), so that each repetition's packet, as the one before
/// translated it, is addressed to the next service; the program measured first steps its
/// source port (`proxy_bench_next_client`, its baseline the same step alone), so that it
/// is a new client's first packet: lookups that miss, a backend chosen, a conntrack entry
/// made, the packet translated. Each batch sends a client address of its own along the
/// chain, around a half-full conntrack map.
fn first_packet_repeat<A: Measured>(runs: u32) -> anyhow::Result<ChainPoint>
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    let pins = pin_dir::<A>("chain");
    let chain = services::<A>(CHAIN as usize, |i| vec![(A::vip(i + 1), 80)]);
    let mut datapath = programmed::<A>(&pins.0, &chain)?;
    let batches = first_packet_runs::<A>(runs) / CHAIN;
    let first_packets = (batches * CHAIN) as usize;
    let start = fill_below_half::<A>(&pins.0, first_packets)?;
    let syn = |b| A::tcp_frame(A::client(b), A::vip(0), SYN);
    let baseline = datapath.load_classifier("proxy_bench_next_client_baseline")?;
    let baseline_ns = repeat_ns(baseline, batches, CHAIN, syn)?;
    let ingress = datapath.load_classifier("proxy_bench_next_client")?;
    let first_ns = repeat_ns(ingress, batches, CHAIN, syn)?;
    let mut conntrack: HashMap<MapData, CtKeyOf<A>, CtEntryOf<A>> =
        proxy::maps::open(&pins.0, A::CONNTRACK)?;
    let made = |conntrack: &HashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>| -> anyhow::Result<()> {
        let entries = proxy::map_batch::count(conntrack)? as usize;
        ensure!(
            entries == start + first_packets,
            "{} chain: {entries} conntrack entries after {first_packets} first packets into \
             {start}: not every repetition made a flow",
            A::LABEL
        );
        Ok(())
    };
    made(&conntrack)?;
    // After churn, as the single runs: the flows freed as the GC frees them, then as many
    // again from new clients.
    let flows = (0..batches)
        .flat_map(|b| (1..=CHAIN as u16).map(move |i| flow_key(A::client(b), 40000 + i)));
    free_as_gc::<A>(&mut conntrack, flows)?;
    let churned_ns = repeat_ns(ingress, batches, CHAIN, |b| syn(batches + b))?;
    made(&conntrack)?;
    Ok(ChainPoint {
        baseline_ns,
        first_ns,
        churned_ns,
        // Halfway through: one entry per first packet.
        conntrack_fill: (start + first_packets / 2) as f64 / A::CONNTRACK_CAPACITY as f64,
    })
}

/// A pin directory of its own for a measurement of family `A` (`what`), removed on drop.
fn pin_dir<A: Measured>(what: &str) -> PinDir {
    PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/proxy-bench-{what}-{}-{}",
        std::process::id(),
        A::LABEL
    )))
}

/// The datapath loaded with its maps pinned in `dir`, `services` of family `A` programmed.
fn programmed<A: Measured>(dir: &Path, services: &DesiredState) -> anyhow::Result<Datapath> {
    let datapath = Datapath::load(dir, &[], XdpAttach::Off)?;
    let mut reconciler = Reconciler::adopt(Maps::open(dir)?)?;
    let report = reconciler.apply(services);
    ensure!(
        report.errors.is_empty() && report.keys.changed == services.len(),
        "programming {} {} services: {:?}",
        services.len(),
        A::LABEL,
        report.errors.first().map(|e| format!("{:#}", e.1))
    );
    Ok(datapath)
}

/// Fills family `A`'s conntrack map (`fill_conntrack`) so that `first_packets`, one entry
/// each, are measured around half of it: they start half as far below half as they make
/// entries, and end as far above. Returns the entries filled.
fn fill_below_half<A: Measured>(dir: &Path, first_packets: usize) -> anyhow::Result<usize>
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    let start = A::CONNTRACK_CAPACITY as usize / 2 - first_packets / 2;
    fill_conntrack::<A>(dir, start)?;
    Ok(start)
}

/// The key of `client`'s TCP flow from `port` (`tcp_frame`'s is 40000): its client key.
fn flow_key<A: Measured>(client: A, port: u16) -> CtKeyOf<A> {
    CtKeyOf::client(client, port, 6)
}

/// Removes the flows under `keys` from the conntrack map as the agent's GC removes expired
/// flows: each entry, one at a time, in the random order of a `std` hash map
/// (`proxy::conntrack::collect_garbage`). The map's free entries are then scattered over
/// its memory, as in a map that has run for a while, where a fresh one hands them out in
/// the order they lie.
fn free_as_gc<A: Measured>(
    conntrack: &mut HashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>,
    keys: impl Iterator<Item = CtKeyOf<A>>,
) -> anyhow::Result<()>
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    let mut entries = std::collections::HashSet::new();
    for key in keys {
        let entry = conntrack.get(&key, 0).context("a first packet's entry")?;
        entries.extend([Some(key), key.peer(&entry)].into_iter().flatten());
    }
    for key in entries {
        conntrack.remove(&key).context("freeing a flow's entry")?;
    }
    Ok(())
}

/// Fills family `A`'s conntrack map with `flows` established TCP entries (none expires
/// during a measurement, so every GC pass scans them all).
pub fn fill_conntrack<A: Measured>(dir: &Path, flows: usize) -> anyhow::Result<()>
where
    CtKeyOf<A>: Pod,
    CtEntryOf<A>: Pod,
{
    let mut conntrack: HashMap<MapData, CtKeyOf<A>, CtEntryOf<A>> =
        proxy::maps::open(dir, A::CONNTRACK)?;
    let now = proxy::clock::flow_clock_ns();
    for i in 0..flows {
        // From addresses of the backends' range, 256 ports each.
        let key = flow_key(A::backend(i >> 16, (i >> 8) as u8), i as u16);
        let entry = CtEntryOf {
            state: proxy_common::CT_STATE_ESTABLISHED,
            reply_state: proxy_common::CT_STATE_ESTABLISHED,
            last_seen_ns: now,
            ..CtEntryOf::default()
        };
        conntrack.insert(key, entry, 0)?;
    }
    Ok(())
}
