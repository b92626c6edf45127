//! Prometheus metrics, with kube-proxy's names where the meaning matches so that existing
//! dashboards and alerts keep working.
use std::path::PathBuf;

use prometheus::{
    Encoder as _, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, core::Collector, proto::MetricFamily,
};
use tracing::debug;

use crate::{rejection::Reason, sync_state::SharedSyncState};

pub struct Metrics {
    registry: Registry,
    /// Where the maps are pinned: per-service and per-backend counters and map fill are
    /// read from them at each scrape.
    bpffs: PathBuf,
    /// Read at each scrape into `last_sync`, `pending_since`, `source_connected` and
    /// `datapath_missing`.
    state: SharedSyncState,
    last_sync: Gauge,
    pending_since: Gauge,
    source_connected: IntGauge,
    pub sync_duration: Histogram,
    pub service_changes: IntCounter,
    pub endpoint_changes: IntCounter,
    pub endpoint_changes_pending: IntGauge,
    pub network_programming: Histogram,
    pub rejected: IntCounterVec,
    pub map_update_errors: IntCounter,
    pub map_writes: IntCounter,
    pub drift_repairs: IntCounter,
    pub datapath_repairs: IntCounter,
    datapath_missing: IntGauge,
    pub service_ports: IntGauge,
    pub conntrack_entries: IntGauge,
    pub conntrack_capacity: IntGauge,
    pub conntrack_expired: IntCounter,
    pub source_errors: IntCounter,
}

fn register<T: Collector + Clone + 'static>(
    registry: &Registry,
    metric: T,
) -> prometheus::Result<T> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn histogram(name: &str, help: &str) -> prometheus::Result<Histogram> {
    Histogram::with_opts(
        HistogramOpts::new(name, help).buckets(prometheus::exponential_buckets(0.0001, 2.0, 20)?),
    )
}

impl Metrics {
    pub fn new(bpffs: PathBuf, state: SharedSyncState) -> prometheus::Result<Self> {
        let r = Registry::new();
        let m = Self {
            sync_duration: register(
                &r,
                histogram(
                    "kubeproxy_sync_proxy_rules_duration_seconds",
                    "Time to program the maps from the source's state.",
                )?,
            )?,
            last_sync: register(
                &r,
                Gauge::new(
                    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                    "Unix time of the last successful map programming.",
                )?,
            )?,
            pending_since: register(
                &r,
                Gauge::new(
                    "proxy_sync_pending_since_timestamp_seconds",
                    "Unix time since when a source change waits to be programmed; 0 when the maps are up to date.",
                )?,
            )?,
            service_changes: register(
                &r,
                IntCounter::new(
                    "kubeproxy_sync_proxy_rules_service_changes_total",
                    "Service changes seen by the proxy.",
                )?,
            )?,
            endpoint_changes: register(
                &r,
                IntCounter::new(
                    "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                    "EndpointSlice changes seen by the proxy.",
                )?,
            )?,
            endpoint_changes_pending: register(
                &r,
                IntGauge::new(
                    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                    "EndpointSlice changes not yet programmed.",
                )?,
            )?,
            network_programming: register(
                &r,
                histogram(
                    "kubeproxy_network_programming_duration_seconds",
                    "Time from the agent receiving a change to the change being in the maps.",
                )?,
            )?,
            rejected: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "proxy_rejected_objects_total",
                        "Objects or parts of objects not served, by reason.",
                    ),
                    &["reason"],
                )?,
            )?,
            map_update_errors: register(
                &r,
                IntCounter::new(
                    "proxy_map_update_errors_total",
                    "Service ports whose map update failed (previous state kept).",
                )?,
            )?,
            map_writes: register(
                &r,
                IntCounter::new(
                    "proxy_map_writes_total",
                    "Map updates and deletes made by the reconciler.",
                )?,
            )?,
            drift_repairs: register(
                &r,
                IntCounter::new(
                    "proxy_drift_repairs_total",
                    "Map entries the periodic resync found different from the desired state and repaired.",
                )?,
            )?,
            datapath_repairs: register(
                &r,
                IntCounter::new(
                    "proxy_datapath_repairs_total",
                    "Pins and attachments removed behind the agent's back and put back.",
                )?,
            )?,
            datapath_missing: register(
                &r,
                IntGauge::new(
                    "proxy_datapath_missing",
                    "Attachments of the configuration the kernel does not show and the agent could not put back; /healthz fails while above 0.",
                )?,
            )?,
            service_ports: register(
                &r,
                IntGauge::new(
                    "proxy_service_ports",
                    "Service ports programmed in the datapath.",
                )?,
            )?,
            conntrack_entries: register(
                &r,
                IntGauge::new(
                    "proxy_conntrack_entries",
                    "Entries in the conntrack map (two per translated flow).",
                )?,
            )?,
            conntrack_capacity: register(
                &r,
                IntGauge::new(
                    "proxy_conntrack_capacity",
                    "Capacity of the conntrack map; entries/capacity is its fill.",
                )?,
            )?,
            conntrack_expired: register(
                &r,
                IntCounter::new(
                    "proxy_conntrack_expired_total",
                    "Conntrack entries deleted by the idle-timeout GC.",
                )?,
            )?,
            source_connected: register(
                &r,
                IntGauge::new(
                    "proxy_source_connected",
                    "1 while the source (API server or manifests) is reachable.",
                )?,
            )?,
            source_errors: register(
                &r,
                IntCounter::new(
                    "proxy_source_errors_total",
                    "Errors from the source (e.g. failed watches of the API server).",
                )?,
            )?,
            registry: r,
            bpffs,
            state,
        };
        m.conntrack_capacity
            .set(proxy_common::maps::MAX_CONNTRACK as i64);
        Ok(m)
    }

    pub fn reject(&self, reason: Reason) {
        self.rejected.with_label_values(&[reason.label()]).inc();
    }

    pub fn render(&self) -> String {
        let state = self.state.get();
        self.last_sync.set(state.last_sync);
        self.pending_since.set(state.pending_since.unwrap_or(0.0));
        self.source_connected.set(state.source_connected.into());
        self.datapath_missing
            .set(state.datapath_missing.len() as i64);
        let mut families = self.registry.gather();
        match datapath_families(&self.bpffs) {
            Ok(more) => families.extend(more),
            Err(e) => debug!("reading the maps for metrics: {e:#}"),
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Per-service and per-backend traffic counters and map fill, as the maps hold them now.
fn datapath_families(bpffs: &std::path::Path) -> anyhow::Result<Vec<MetricFamily>> {
    let maps = crate::maps::Maps::open(bpffs)?;
    let counter =
        |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels);
    let service_labels = ["namespace", "service", "port", "address"];
    let svc = [
        counter(
            "proxy_service_connections_total",
            "New connections to a service port.",
            &service_labels,
        )?,
        counter(
            "proxy_service_packets_total",
            "Packets of a service port (tc path and UDP datagrams).",
            &service_labels,
        )?,
        counter(
            "proxy_service_bytes_total",
            "Bytes of a service port (tc path).",
            &service_labels,
        )?,
    ];
    let be = [
        counter(
            "proxy_backend_connections_total",
            "New connections to a backend.",
            &["backend"],
        )?,
        counter(
            "proxy_backend_packets_total",
            "Packets to and from a backend (tc path and UDP datagrams).",
            &["backend"],
        )?,
        counter(
            "proxy_backend_bytes_total",
            "Bytes to and from a backend (tc path).",
            &["backend"],
        )?,
    ];
    let mut seen = std::collections::HashSet::new();
    for row in crate::inspect::services(&maps)? {
        let address = format!("{}:{}/{}", row.address, row.port, row.protocol);
        let labels = [
            row.namespace.as_str(),
            row.name.as_str(),
            row.port_name.as_str(),
            address.as_str(),
        ];
        for (vec, value) in svc.iter().zip([row.connections, row.packets, row.bytes]) {
            vec.with_label_values(&labels).inc_by(value);
        }
        // Counters only: the scrape never scans conntrack.
        for (id, b, c) in crate::inspect::backend_counters(&maps, &row)? {
            // A backend shared by several service ports has one set of counters.
            if seen.insert(id) {
                let backend = format!(
                    "{}:{}/{}",
                    std::net::Ipv4Addr::from(b.addr),
                    b.port,
                    crate::inspect::protocol(b.proto)
                );
                for (vec, value) in be.iter().zip([c.conns, c.packets, c.bytes]) {
                    vec.with_label_values(&[backend.as_str()]).inc_by(value);
                }
            }
        }
    }
    let entries = IntGaugeVec::new(
        Opts::new("proxy_map_entries", "Entries in a map (hash and LRU maps)."),
        &["map"],
    )?;
    let capacity = IntGaugeVec::new(
        Opts::new(
            "proxy_map_capacity",
            "Capacity of a map; entries/capacity is its fill.",
        ),
        &["map"],
    )?;
    for row in crate::inspect::map_fill(bpffs)? {
        capacity
            .with_label_values(&[row.name])
            .set(i64::from(row.capacity));
        if let Some(n) = row.entries {
            entries.with_label_values(&[row.name]).set(n as i64);
        }
    }
    let drops = counter(
        "proxy_datapath_drops_total",
        "Packets the datapath dropped, by reason.",
        &["reason"],
    )?;
    for (reason, packets) in crate::inspect::drops(bpffs)? {
        drops.with_label_values(&[reason]).inc_by(packets);
    }
    let mut families: Vec<MetricFamily> = svc
        .iter()
        .chain(&be)
        .chain([&drops])
        .flat_map(Collector::collect)
        .collect();
    families.extend(entries.collect());
    families.extend(capacity.collect());
    Ok(families)
}
