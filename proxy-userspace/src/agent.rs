//! The agent's main loop: load and attach the datapath (or keep a previous agent's), then
//! keep the maps equal to what the source says — coalescing bursts of changes, retrying
//! failures, repairing drift — collect conntrack garbage and serve metrics, until
//! SIGTERM/SIGINT. The datapath and its maps stay in place when the agent stops.
use std::{
    collections::HashSet,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::{api::core::v1::Node, jiff::Timestamp};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::sleep_until,
};
use tracing::{debug, error, info, warn};

use proxy_common::{AgentStatus, DropReason};

use crate::{
    clock::unix_now,
    conntrack,
    controller::Controller,
    ct_account::CtAccount,
    datapath::{Datapath, TcAttach, XdpAttach},
    desired::Topology,
    health_check::HealthCheckServers,
    http::{Endpoints, ProxyHealth, serve_endpoints},
    interfaces::Interfaces,
    manifest::ManifestSource,
    map_error::MapWriteError,
    maps::Maps,
    metrics::Metrics,
    node::NodeAddresses,
    nodeport_addresses::NodePortAddresses,
    preflight,
    reconcile::{Reconciler, Repair, ServiceMaps as _, Snapshot},
    rejection::{Reason, Rejection},
    rest_client_metrics::RestClientMetrics,
    source::{self, SourceEvent},
    stale_sockets::StaleSockets,
    store::{Kind, Object, Outcome, Store, name_of},
    sync_state::SharedSyncState,
    trigger_times::TriggerTimes,
};

pub enum SourceConfig {
    Manifests(PathBuf),
    Kubernetes {
        /// `None`: KUBECONFIG, ~/.kube/config or in-cluster.
        kubeconfig: Option<PathBuf>,
        /// Watch one namespace only.
        namespace: Option<String>,
        /// Where the API server is, if not where the configuration says.
        api_server: Option<crate::kubernetes::ApiServer>,
    },
}

pub struct Config {
    pub source: SourceConfig,
    /// This node's name (for node-local endpoints and topology).
    pub node_name: Option<String>,
    pub proxy_name: Option<String>,
    /// `None`: the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub interfaces: Vec<String>,
    pub node_ip: crate::node::NodeIps,
    /// Which node addresses NodePorts answer on.
    pub node_port_addresses: NodePortAddresses,
    /// Destroy connected TCP sockets to removed backends too (UDP ones always are).
    pub destroy_tcp_to_removed_backends: bool,
    /// Source ports of masqueraded connections.
    pub masquerade_ports: std::ops::RangeInclusive<u16>,
    pub tc_attach: TcAttach,
    pub xdp: XdpAttach,
    /// Where XDP attaches; empty: the interfaces holding the node IP.
    pub xdp_interfaces: Vec<String>,
    pub metrics_bind: SocketAddr,
    pub healthz_bind: SocketAddr,
    /// The DaemonSet the agent runs in: when it is gone at SIGTERM, the agent is being
    /// uninstalled and removes the datapath (Kubernetes source only).
    pub owner: Option<crate::uninstall::Owner>,
    /// Where `/readyz` and `/livez` answer kubelet's probes, on a port kube-proxy never
    /// holds, so that readiness does not wait for kube-proxy's ports.
    pub probe_bind: Option<SocketAddr>,
    /// `/healthz` fails when a source change waits longer than this to be programmed.
    pub healthz_max_lag: Duration,
    /// Capacities of maps, by pin name, overriding the built-in ones.
    pub map_sizes: Vec<(String, u32)>,
    pub conntrack_gc_interval: Duration,
    /// Quiet time after a manifest change before re-reading.
    pub debounce: Duration,
    /// Least time between two syncs: a burst of changes is programmed together.
    pub min_sync_interval: Duration,
    /// How often the maps are compared with the desired state and repaired.
    pub resync_interval: Duration,
}

/// Map entries a drift repair compares between two looks at the event queue: well under a
/// millisecond of work.
pub const REPAIR_STEP: usize = 256;

/// Source events (batches of up to 256 objects) waiting for the loop: enough to parse
/// ahead while the datapath loads, few enough that waiting objects cost little memory.
const SOURCE_BACKLOG: usize = 64;

/// How often `--interfaces` patterns and `auto` are resolved again: a new pod's veth gets
/// the tc programs within this time.
const FOLLOW_INTERFACES_EVERY: Duration = Duration::from_secs(1);

/// `/livez` fails when the loop has not gone round for three heartbeats, and never sooner.
const MIN_STALL: Duration = Duration::from_secs(30);
/// The `ip_family` label values of the per-family conntrack series, in `Conntracks` order.
const FAMILIES: [&str; 2] = ["IPv4", "IPv6"];

/// At most one warning a minute about a full conntrack map.
const FULL_MAP_WARNING_EVERY: Duration = Duration::from_secs(60);

struct Agent {
    controller: Controller<Maps>,
    metrics: Arc<Metrics>,
    /// Kinds the source has listed completely at least once: programming waits for both,
    /// so that a restarted agent never programs services before their endpoints are known.
    listed: HashSet<Kind>,
    /// A change is waiting to be programmed.
    pending: bool,
    /// `--node-name`: the Node among the manifests whose zone is this node's.
    node_name: Option<String>,
    /// When the endpoint changes waiting to be programmed began, for network programming
    /// latency.
    triggers: TriggerTimes,
    /// What health checks and metrics report.
    state: SharedSyncState,
    writes_reported: u64,
    status: StatusWriter,
    health_checks: HealthCheckServers,
}

/// Keeps the pinned `agent_status` entry current, for `proxyctl status`.
struct StatusWriter {
    map: aya::maps::Array<aya::maps::MapData, AgentStatus>,
    status: AgentStatus,
}

impl StatusWriter {
    fn write(&mut self) {
        self.status.heartbeat = unix_now() as u64;
        if let Err(e) = self.map.set(0, self.status, 0) {
            warn!("writing the agent status map: {e}");
        }
    }
}

impl Agent {
    fn ready(&self) -> bool {
        self.listed.contains(&Kind::Service) && self.listed.contains(&Kind::EndpointSlice)
    }

    fn report(&self, rejections: &[Rejection]) {
        for rejection in rejections {
            if rejection.reason == Reason::UnknownField {
                warn!("ignored: {rejection}");
            } else {
                error!("rejected: {rejection}");
            }
            self.metrics.reject(rejection.reason);
        }
    }

    /// Takes in what a store update did.
    fn account(&mut self, outcome: Outcome) {
        self.report(&outcome.rejections);
        for why in &outcome.ignored {
            info!("not proxied: {why}");
        }
        self.metrics
            .service_changes
            .inc_by(outcome.service_changes as u64);
        self.metrics
            .endpoint_changes
            .inc_by(outcome.endpoint_changes as u64);
        self.metrics
            .endpoint_changes_pending
            .add(outcome.endpoint_changes as i64);
        let received = Timestamp::now();
        for trigger in outcome.trigger_times {
            self.triggers.record(trigger, received);
        }
    }

    /// Applies a source event to the store, which queues the services it changed.
    fn handle(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Replace {
                kinds,
                objects,
                rejections,
            } => {
                self.report(&rejections);
                let outcome = self.controller.replace(&kinds, &objects);
                self.listed.extend(kinds);
                self.account(outcome);
            }
            SourceEvent::Apply(Object::Node(node)) => {
                self.own_node(&name_of(&node.metadata).1, Some(&node));
            }
            SourceEvent::Delete(Kind::Node, (_, name)) => self.own_node(&name, None),
            SourceEvent::Apply(object) => {
                let outcome = self.controller.apply(&object);
                self.account(outcome);
            }
            SourceEvent::Delete(kind, name) => {
                let outcome = self.controller.delete(kind, name);
                self.account(outcome);
            }
            SourceEvent::Rejected(rejections) => self.report(&rejections),
            SourceEvent::Listed(kinds) => self.listed.extend(kinds),
            SourceEvent::Batch(events) => {
                for event in events {
                    self.handle(event);
                }
            }
            SourceEvent::NodeEligible(eligible) => {
                // The state first: once the line below is logged, /healthz says so.
                let was = self.state.get().node_eligible;
                self.state.update(|s| s.node_eligible = eligible);
                if eligible != was {
                    if eligible {
                        info!("this node is eligible for load-balanced traffic again");
                    } else {
                        warn!(
                            "this node is being deleted: /healthz fails so that load balancers \
                             drain it (the datapath keeps serving)"
                        );
                    }
                }
            }
            SourceEvent::Topology(topology) => {
                if self.controller.set_topology(topology.clone()) {
                    info!("node topology: {topology}");
                }
            }
            SourceEvent::Connected(Ok(())) => {
                info!("the source is reachable again; re-listing to catch up");
                self.state.update(|s| s.source_connected = true);
            }
            SourceEvent::Connected(Err(e)) => {
                // Said once; the watches retry with growing back-off meanwhile.
                if self.state.get().source_connected {
                    warn!(
                        "the source is unreachable; still serving the last programmed state: {e}"
                    );
                } else {
                    debug!("the source is still unreachable: {e}");
                }
                self.state.update(|s| s.source_connected = false);
                self.metrics.source_errors.inc();
            }
        }
        if self.controller.has_changes() && !self.pending {
            self.pending = true;
            self.state.update(|s| s.pending_since = Some(unix_now()));
        }
    }

    /// A Node from the manifests: this node's gives its zone and eligibility, as the Node
    /// watch does in Kubernetes mode (`None`: it was removed).
    fn own_node(&mut self, name: &str, node: Option<&Node>) {
        if self.node_name.as_deref() != Some(name) {
            return;
        }
        self.handle(SourceEvent::Topology(crate::kubernetes::topology(
            name, node,
        )));
        let eligible = node.is_none_or(crate::kubernetes::eligible);
        self.handle(SourceEvent::NodeEligible(eligible));
    }

    /// Checks that the kernel still shows the datapath attached as configured, puts back
    /// what went missing, and reports the rest in health.
    fn verify_datapath(&mut self, datapath: &mut Datapath) {
        let (repaired, failed) = datapath.verify();
        for what in &repaired {
            warn!("datapath: put back {what}, removed behind the agent's back");
        }
        self.metrics.datapath_repairs.inc_by(repaired.len() as u64);
        let missing: Vec<String> = failed.iter().map(|e| format!("{e:#}")).collect();
        if missing != self.state.get().datapath_missing {
            // Logged when it changes, not at every heartbeat.
            for problem in &missing {
                error!("datapath: {problem}; /healthz fails until it is back");
            }
            if missing.is_empty() {
                info!("datapath: attached as configured again");
            }
        }
        self.state.update(|s| s.datapath_missing = missing);
    }

    fn count_writes(&mut self) {
        let writes = self.controller.writes();
        self.metrics
            .map_writes
            .inc_by(writes - self.writes_reported);
        self.writes_reported = writes;
    }

    /// Programs the services that changed or are due for a retry; returns whether
    /// everything is programmed.
    fn sync(&mut self) -> bool {
        let started = Instant::now();
        let outcome = self.controller.sync(started);
        self.report(&outcome.rejections);
        if let Some(checks) = self.controller.changed_health_checks() {
            let errors = self.health_checks.update(checks);
            self.report_health_check_errors(errors);
        }
        for failure in &outcome.failures {
            self.metrics.map_update_errors.inc();
            // A service that keeps failing (a full map) is reported once, then retried
            // with back-off quietly.
            if failure.failures == 1 {
                error!(
                    "programming {} failed, keeping its previous state and retrying with back-off: {:#}",
                    failure.port, failure.error
                );
                self.metrics
                    .reject(MapWriteError::reason_of(&failure.error));
            } else {
                debug!(
                    "programming {} failed again ({} times): {:#}",
                    failure.port, failure.failures, failure.error
                );
            }
        }
        for ((namespace, name), failures) in &outcome.recovered {
            info!("service {namespace}/{name} programmed after {failures} failed attempts");
        }
        let elapsed = started.elapsed();
        self.metrics.sync_duration.observe(elapsed.as_secs_f64());
        let programmed = self.controller.programmed();
        self.metrics.service_ports.set(programmed as i64);
        self.count_writes();
        let retrying = self.controller.retrying();
        let complete = retrying == 0 && !self.controller.needs_sweep();
        self.status.status.service_ports = programmed as u32;
        self.status.status.failed = retrying as u32;
        if complete {
            self.status.status.last_sync = unix_now() as u64;
        }
        self.status.write();
        if complete {
            self.state.update(|s| {
                s.last_sync = unix_now();
                s.pending_since = None;
            });
            self.metrics.endpoint_changes_pending.set(0);
            self.pending = false;
            for latency in self.triggers.programmed(Timestamp::now()) {
                self.metrics.network_programming.observe(latency);
            }
        }
        info!(
            "synced {} services in {:.1} ms{}: {} service ports changed, {} removed, {} unchanged; {} service ports programmed, {} services retrying",
            outcome.services,
            elapsed.as_secs_f64() * 1000.0,
            changed_names(&outcome.changed, outcome.changed_more),
            outcome.keys.changed,
            outcome.keys.removed,
            outcome.keys.unchanged,
            programmed,
            retrying,
        );
        complete
    }

    fn report_health_check_errors(&self, errors: Vec<anyhow::Error>) {
        for e in errors {
            error!("{e:#}; retrying at the next sync or resync");
            self.metrics.reject(Reason::HealthCheckPort);
        }
    }

    /// Retries health-check servers that could not start, and starts reading a snapshot of
    /// the maps on a background thread; `start_repair` gets it.
    fn begin_resync(
        &mut self,
        bpffs: &std::path::Path,
        snapshots: &mpsc::Sender<anyhow::Result<Snapshot>>,
    ) -> bool {
        let errors = self.health_checks.retry();
        self.report_health_check_errors(errors);
        self.controller.begin_snapshot();
        let (bpffs, snapshots) = (bpffs.to_path_buf(), snapshots.clone());
        let started = crate::background::spawn("resync-snapshot", move || {
            let snapshot = Maps::open(&bpffs).and_then(|maps| maps.read_existing());
            let _ = snapshots.blocking_send(snapshot.map(Snapshot::from));
        });
        if let Err(e) = &started {
            error!("resync: starting the thread that reads the maps: {e}");
            self.controller.abandon_snapshot();
        }
        started.is_ok()
    }

    fn start_repair(&mut self, snapshot: anyhow::Result<Snapshot>) -> Option<Repair> {
        match snapshot {
            Ok(snapshot) => Some(self.controller.start_repair(snapshot)),
            Err(e) => {
                error!("resync: reading the maps: {e:#}");
                self.controller.abandon_snapshot();
                None
            }
        }
    }

    /// Repairs the next entries of `repair` that drifted; returns whether it is over.
    fn repair_step(&mut self, repair: &mut Repair) -> bool {
        let done = match self.controller.repair_step(repair, REPAIR_STEP) {
            Ok(false) => return false,
            Ok(true) => match repair.repaired {
                0 => true,
                n => {
                    warn!("resync: repaired {n} map entries that differed from the desired state");
                    self.metrics.drift_repairs.inc_by(n as u64);
                    true
                }
            },
            Err(e) => {
                error!("resync failed: {e:#}");
                true
            }
        };
        self.count_writes();
        done
    }
}

/// Moves the tc programs to the interfaces `--interfaces` selects now, if they changed.
fn follow_interfaces(
    interfaces: &Interfaces,
    served: &mut Vec<String>,
    datapath: &mut Datapath,
    node_addresses: &mut NodeAddresses,
) {
    let now = match interfaces.resolve() {
        Ok(now) if now != *served => now,
        Ok(_) => return,
        Err(e) => {
            // A named interface that vanished: the heartbeat's check reports it in health.
            debug!("resolving --interfaces: {e:#}");
            return;
        }
    };
    match datapath.follow_tc(&now) {
        Ok(done) => {
            for what in done {
                info!("interfaces: {what}");
            }
        }
        Err(e) => error!("interfaces: following {now:?}: {e:#}"),
    }
    node_addresses.set_interfaces(&now);
    *served = now;
}

/// Why a task that should run until the agent stops has ended.
fn why_ended(result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    result.map_or_else(anyhow::Error::from, |r| {
        r.err().unwrap_or_else(|| anyhow::anyhow!("ended"))
    })
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// The configured source, checked (a kubeconfig read, a manifest path that exists) but not
/// started.
enum Source {
    Manifests(ManifestSource),
    Kubernetes(kube::Client, String),
}

async fn prepare_source(
    config: &Config,
    rest_metrics: &RestClientMetrics,
) -> anyhow::Result<Source> {
    Ok(match &config.source {
        SourceConfig::Manifests(path) => {
            preflight::readable(path, "--manifests")?;
            Source::Manifests(ManifestSource::new(path))
        }
        SourceConfig::Kubernetes {
            kubeconfig,
            api_server,
            ..
        } => {
            let (client, url) =
                crate::kubernetes::client(kubeconfig.as_deref(), api_server.as_ref(), rest_metrics)
                    .await?;
            Source::Kubernetes(client, url)
        }
    })
}

/// Starts the source; it sends its events until the agent stops.
fn start_source(
    source: Source,
    config: &Config,
    events: mpsc::Sender<SourceEvent>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    match source {
        Source::Manifests(source) => {
            info!("source: manifests at {}", source.path().display());
            tokio::spawn(source::run_manifests(source, events, config.debounce))
        }
        Source::Kubernetes(client, url) => {
            let namespace = match &config.source {
                SourceConfig::Kubernetes { namespace, .. } => namespace.clone(),
                SourceConfig::Manifests(_) => None,
            };
            info!(
                "source: the Kubernetes API at {url}, namespace {}",
                namespace.as_deref().unwrap_or("<all>")
            );
            let scope = crate::kubernetes::Scope {
                server: url,
                namespace,
                proxy_name: config.proxy_name.clone(),
                node_name: config.node_name.clone(),
            };
            tokio::spawn(crate::kubernetes::run(client, scope, events))
        }
    }
}

/// The HTTP addresses, bound now when free (`None`: busy, taken over later).
struct Listeners {
    metrics: Option<std::net::TcpListener>,
    healthz: Option<std::net::TcpListener>,
    probe: Option<Option<std::net::TcpListener>>,
}

fn bind_listeners(config: &Config) -> anyhow::Result<Listeners> {
    Ok(Listeners {
        metrics: crate::http::try_bind(config.metrics_bind, "--metrics-bind")?,
        healthz: crate::http::try_bind(config.healthz_bind, "--healthz-bind")?,
        probe: config
            .probe_bind
            .map(|addr| crate::http::try_bind(addr, "--probe-bind"))
            .transpose()?,
    })
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Everything that can be checked is, before the datapath is touched: a mistake must
    // leave nothing pinned or attached.
    let cgroup = match &config.cgroup {
        Some(c) => c.clone(),
        None => crate::datapath::cgroup2_mount()?,
    };
    preflight::capabilities()?;
    preflight::bpffs(&config.bpffs)?;
    preflight::cgroup(&cgroup)?;
    let interfaces = Interfaces::new(&config.interfaces, config.node_ip);
    let mut served = interfaces.resolve()?;
    preflight::interfaces(&config.xdp_interfaces, "--xdp-interfaces")?;
    let rest_metrics = RestClientMetrics::new().context("creating the client metrics")?;
    let source = prepare_source(&config, &rest_metrics).await?;
    let listeners = bind_listeners(&config)?;
    // The source starts reading (a big manifest takes seconds to parse) while the datapath
    // loads; its events wait in the channel until the loop runs, at most SOURCE_BACKLOG.
    let (events_tx, mut events) = mpsc::channel(SOURCE_BACKLOG);
    let client = match &source {
        Source::Kubernetes(client, _) => Some(client.clone()),
        Source::Manifests(_) => None,
    };
    let mut source = start_source(source, &config, events_tx);
    let mut node_addresses = NodeAddresses::new(
        config.node_ip,
        config.node_port_addresses.clone(),
        &served,
        config.masquerade_ports.clone(),
        &config.bpffs,
    )?;
    let xdp_interfaces = match config.xdp {
        XdpAttach::Off => Vec::new(),
        _ => node_addresses.current.xdp_interfaces(
            &served,
            &node_addresses.interface_addrs,
            &config.xdp_interfaces,
        )?,
    };
    if served.is_empty() && !interfaces.followed() {
        warn!(
            "no --interfaces: socket-level load balancing only; NodePorts, external and \
             load-balancer IPs are not served to clients outside this node (pass the \
             external interface, or `auto`)"
        );
    }

    let mut datapath = Datapath::load(&config.bpffs, &config.map_sizes, config.xdp)?;
    datapath.attach_socket_hooks(&cgroup)?;
    datapath.attach_tc(&served, config.tc_attach)?;
    datapath.attach_xdp(&xdp_interfaces, config.xdp)?;
    datapath.detach_stale()?;
    datapath.finish_upgrade()?;
    node_addresses.current.program(&config.bpffs)?;
    info!("{}", node_addresses.current);
    let state = SharedSyncState::default();
    let metrics = Arc::new(
        Metrics::new(config.bpffs.clone(), state.clone(), &rest_metrics)
            .context("registering metrics")?,
    );
    let mut maps = Maps::open(&config.bpffs)?;
    maps.stale_sockets = StaleSockets::new(
        &config.bpffs,
        &cgroup,
        config.destroy_tcp_to_removed_backends,
        metrics.stale_sockets_destroyed.clone(),
    );
    let mode = maps
        .stale_sockets
        .as_ref()
        .map_or("none", StaleSockets::mode);
    metrics
        .stale_socket_destroyer
        .with_label_values(&[mode])
        .set(1);
    let reconciler = Reconciler::adopt(maps)?;
    if !reconciler.is_empty() {
        info!(
            "adopted {} service ports already in the pinned maps",
            reconciler.len()
        );
    }
    let mut conntrack = conntrack::Conntracks::open(&config.bpffs)?;
    let ct_account = CtAccount::open(&config.bpffs)?;
    let entries = crate::map_batch::count(&conntrack.v4).unwrap_or(0)
        + crate::map_batch::count(&conntrack.v6).unwrap_or(0);
    ct_account.start_from(entries);
    // Entries dropped and flows refused before this agent started are counted, not warned
    // about.
    let mut evicted_before =
        crate::ct_account::evicted(ct_account.read(), ct_account.read(), entries);
    let refused = {
        let bpffs = config.bpffs.clone();
        move || {
            crate::inspect::drops(&bpffs)
                .ok()
                .and_then(|drops| drops.get(DropReason::ConntrackInsert.name()).copied())
                .unwrap_or(0)
        }
    };
    let mut refused_before = refused();
    if reconciler.is_empty() {
        // A first start on this node, maybe beside kube-proxy: its UDP flows stay its own.
        match crate::kernel_flows::pass_translated_udp(
            &mut conntrack,
            crate::clock::flow_clock_ns(),
        ) {
            Ok(0) => {}
            Ok(n) => {
                ct_account.add_created(n as u64);
                info!(
                    "left {n} UDP flows to the kernel's NAT (kube-proxy's), which translates them"
                )
            }
            Err(e) => warn!(
                "cannot read the kernel's connection table ({e}): UDP flows that kube-proxy \
                 translates may be balanced anew by the tc programs"
            ),
        }
    }
    let conntrack_capacities = conntrack
        .capacities()
        .context("reading the conntrack maps' definitions")?;
    for (family, capacity) in FAMILIES.iter().zip(conntrack_capacities) {
        metrics
            .conntrack_capacity
            .with_label_values(&[family])
            .set(i64::from(capacity));
        // Exported before the first collection counts them.
        metrics
            .conntrack_entries
            .with_label_values(&[family])
            .set(0);
    }
    let proxy_health = ProxyHealth {
        state,
        max_lag: config.healthz_max_lag,
        max_stall: (config.conntrack_gc_interval * 3).max(MIN_STALL),
    };
    let endpoints = |metrics| Endpoints {
        health: proxy_health.clone(),
        metrics,
    };
    let mut metrics_server = tokio::spawn(serve_endpoints(
        listeners.metrics,
        config.metrics_bind,
        "--metrics-bind",
        endpoints(Some(metrics.clone())),
    ));
    let mut healthz_server = tokio::spawn(serve_endpoints(
        listeners.healthz,
        config.healthz_bind,
        "--healthz-bind",
        endpoints(None),
    ));
    let mut probe_server = match (listeners.probe, config.probe_bind) {
        (Some(listener), Some(addr)) => tokio::spawn(serve_endpoints(
            listener,
            addr,
            "--probe-bind",
            endpoints(None),
        )),
        _ => tokio::spawn(std::future::pending()),
    };

    let status = StatusWriter {
        map: crate::maps::open(&config.bpffs, proxy_common::maps::AGENT_STATUS)?,
        status: AgentStatus {
            pid: std::process::id(),
            started: unix_now() as u64,
            heartbeat_interval: config.conntrack_gc_interval.as_secs() as u32,
            ..AgentStatus::default()
        },
    };
    let topology = Topology {
        node_name: config.node_name.clone(),
        zone: None,
    };
    let mut agent = Agent {
        controller: Controller::new(Store::new(config.proxy_name.clone(), topology), reconciler),
        metrics,
        listed: HashSet::new(),
        pending: false,
        node_name: config.node_name.clone(),
        triggers: TriggerTimes::new(Timestamp::now()),
        state: proxy_health.state.clone(),
        writes_reported: 0,
        status,
        health_checks: HealthCheckServers::new(proxy_health),
    };

    let metrics = agent.metrics.clone();
    let mut warnings = conntrack::FullMapWarnings::new(FULL_MAP_WARNING_EVERY);
    let mut gc = conntrack::collect_garbage_every(
        conntrack,
        ct_account,
        config.conntrack_gc_interval,
        move |report| {
            for (family, entries) in FAMILIES.iter().zip(report.entries) {
                metrics
                    .conntrack_entries
                    .with_label_values(&[family])
                    .set(entries as i64);
            }
            metrics.conntrack_expired.inc_by(report.expired as u64);
            let counted = metrics.conntrack_evicted.get();
            metrics
                .conntrack_evicted
                .inc_by(report.evicted.saturating_sub(counted));
            let dropped = report.evicted.saturating_sub(evicted_before);
            evicted_before = evicted_before.max(report.evicted);
            let refused_now = refused();
            let refused = refused_now.saturating_sub(refused_before);
            refused_before = refused_before.max(refused_now);
            let now = std::time::Instant::now();
            if let Some(warning) =
                warnings.note(dropped, refused, report.entries, conntrack_capacities, now)
            {
                warn!("{warning}");
            }
        },
    )
    .context("starting the conntrack garbage collector")?;
    let mut heartbeat = tokio::time::interval(config.conntrack_gc_interval);
    let mut follow = tokio::time::interval(FOLLOW_INTERFACES_EVERY);
    let mut resync = tokio::time::interval(config.resync_interval);
    resync.reset();
    // Drift repair reads every map off the loop, one snapshot at a time, and compares it
    // between changes, a step at a time.
    let (snapshots_tx, mut snapshots) = mpsc::channel(1);
    let mut resyncing = false;
    let mut repair: Option<Repair> = None;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut last_sync = tokio::time::Instant::now() - config.min_sync_interval;
    loop {
        // Changes wait for the minimum interval since the last sync (a burst is programmed
        // together); failed services, and the sweep of unclaimed entries, wait for their
        // own back-off.
        let sync_at = agent.ready().then(|| {
            if agent.controller.has_changes() {
                Some(tokio::time::Instant::now())
            } else {
                agent
                    .controller
                    .next_retry()
                    .map(tokio::time::Instant::from_std)
            }
        });
        let sync_at = sync_at
            .flatten()
            .map(|at| at.max(last_sync + config.min_sync_interval));
        let sync_due = async {
            match sync_at {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        agent.state.update(|s| s.loop_alive = unix_now());
        tokio::select! {
            // Changes first; the repair steps only when nothing else is ready.
            biased;
            event = events.recv() => match event {
                Some(event) => agent.handle(event),
                None => bail!("the source stopped"),
            },
            _ = sync_due => {
                last_sync = tokio::time::Instant::now();
                agent.sync();
            }
            _ = resync.tick(), if agent.ready() && !resyncing => {
                resyncing = agent.begin_resync(&config.bpffs, &snapshots_tx);
            }
            Some(snapshot) = snapshots.recv() => {
                repair = agent.start_repair(snapshot);
                resyncing = repair.is_some();
            }
            _ = follow.tick(), if interfaces.followed() => {
                follow_interfaces(&interfaces, &mut served, &mut datapath, &mut node_addresses);
            }
            _ = heartbeat.tick() => {
                agent.verify_datapath(&mut datapath);
                match node_addresses.refresh() {
                    Ok(true) => info!("node addresses changed: {}", node_addresses.current),
                    Ok(false) => {}
                    Err(e) => warn!("re-reading the node's addresses: {e:#}"),
                }
                agent.status.write();
            }
            _ = &mut gc => bail!("the conntrack garbage collector stopped (it panicked)"),
            result = &mut source => bail!("the source stopped: {:#}", why_ended(result)),
            result = &mut metrics_server => bail!("the metrics server stopped: {result:?}"),
            result = &mut healthz_server => bail!("the health server stopped: {result:?}"),
            result = &mut probe_server => bail!("the probe server stopped: {result:?}"),
            signal = &mut shutdown => {
                let signal = signal?;
                if let (Some(owner), Some(client)) = (&config.owner, &client)
                    && crate::uninstall::uninstalling(client, owner).await
                {
                    info!("{signal}: DaemonSet {owner} is gone: uninstalled, removing the datapath");
                    // The datapath holds the pin directory's lock and the links.
                    drop(datapath);
                    let removed = crate::cleanup::agent_datapath(&config.bpffs)?;
                    info!("cleanup: {removed}");
                    return Ok(());
                }
                info!("{signal}: exiting; the datapath keeps serving from the maps and links pinned under {}", config.bpffs.display());
                return Ok(());
            }
            _ = std::future::ready(()), if repair.is_some() => {
                if repair.as_mut().is_some_and(|r| agent.repair_step(r)) {
                    repair = None;
                    resyncing = false;
                }
            }
        }
    }
}

/// " (changed: ns/a, ns/b and 3 more)" for a sync's log line; empty when nothing changed.
fn changed_names(changed: &[crate::store::Name], more: usize) -> String {
    if changed.is_empty() {
        return String::new();
    }
    let names: Vec<String> = changed
        .iter()
        .map(|(ns, name)| format!("{ns}/{name}"))
        .collect();
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(" (changed: {}{more})", names.join(", "))
}
