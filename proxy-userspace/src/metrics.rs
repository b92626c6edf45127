//! Prometheus metrics, with kube-proxy's names where the meaning matches so that existing
//! dashboards and alerts keep working.
use std::path::PathBuf;

use prometheus::{
    Encoder as _, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, core::Collector,
};
use tracing::debug;

use crate::{
    datapath_metrics::DatapathMetrics, rejection::Reason, rest_client_metrics::RestClientMetrics,
    sock_destroy::Protocol, sync_state::SharedSyncState,
};

pub struct Metrics {
    registry: Registry,
    /// Per-service and per-backend counters, map fill and drops, read from the maps at
    /// each scrape.
    datapath: DatapathMetrics,
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
    /// By `ip_family` (IPv4, IPv6): one conntrack map each.
    pub conntrack_entries: IntGaugeVec,
    pub conntrack_capacity: IntGaugeVec,
    pub conntrack_expired: IntCounter,
    pub conntrack_evicted: IntCounter,
    pub source_errors: IntCounter,
    pub stale_sockets_destroyed: IntCounterVec,
    pub stale_socket_destroyer: IntGaugeVec,
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
    pub fn new(
        bpffs: PathBuf,
        state: SharedSyncState,
        rest_client: &RestClientMetrics,
    ) -> prometheus::Result<Self> {
        let r = Registry::new();
        rest_client.register(&r)?;
        // process_resident_memory_bytes, process_cpu_seconds_total, process_start_time_seconds
        // and the rest, as the "Kubernetes / Proxy" dashboard reads them.
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "proxy_build_info",
                "1, labelled with the agent's version (kube-proxy's kubernetes_build_info).",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        r.register(Box::new(build_info))?;
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
            stale_sockets_destroyed: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "proxy_stale_sockets_destroyed_total",
                        "Connected sockets the socket hooks had pointed at a backend that left the service, destroyed so that they connect again, by protocol.",
                    ),
                    &["protocol"],
                )?,
            )?,
            stale_socket_destroyer: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "proxy_stale_socket_destroyer",
                        "1 for how this node destroys sockets connected to removed backends: bpf_iterator (bpf_sock_destroy), sock_diag (older kernels) or none.",
                    ),
                    &["mode"],
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
                IntGaugeVec::new(
                    Opts::new(
                        "proxy_conntrack_entries",
                        "Entries in the conntrack map of the family (two per translated flow).",
                    ),
                    &["ip_family"],
                )?,
            )?,
            conntrack_capacity: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "proxy_conntrack_capacity",
                        "Capacity of the conntrack map of the family; entries/capacity is its fill.",
                    ),
                    &["ip_family"],
                )?,
            )?,
            conntrack_expired: register(
                &r,
                IntCounter::new(
                    "proxy_conntrack_expired_total",
                    "Conntrack entries deleted by the GC: idle past their timeout, or left alone by a dropped partner.",
                )?,
            )?,
            conntrack_evicted: register(
                &r,
                IntCounter::new(
                    "proxy_conntrack_evicted_total",
                    "Conntrack entries the datapath dropped from a full map to make room for \
                     new flows (found by the GC): two per flow never answered, as Linux's \
                     early drop. New flows a full map refused are counted in \
                     proxy_datapath_drops_total{reason=\"conntrack_insert_failed\"}. Raise \
                     the map's size if either grows.",
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
            datapath: DatapathMetrics::new(bpffs),
            state,
        };
        for reason in Reason::ALL {
            m.rejected.with_label_values(&[reason.label()]);
        }
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            m.stale_sockets_destroyed
                .with_label_values(&[protocol.name()]);
        }
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
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        let mut text = String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        if let Err(e) = self.datapath.write(&mut text) {
            debug!("reading the maps for metrics: {e:#}");
        }
        // What the maps were read into is free now; the answer goes after it is sent.
        crate::allocator::release_free_memory();
        text
    }
}
