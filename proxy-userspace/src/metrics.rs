//! Prometheus metrics, with kube-proxy's names where the meaning matches so that existing
//! dashboards and alerts keep working.
use prometheus::{
    Encoder as _, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::rejection::Reason;

pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub last_sync: Gauge,
    pub rejected: IntCounterVec,
    pub map_update_errors: IntCounter,
    pub service_ports: IntGauge,
    pub conntrack_entries: IntGauge,
    pub conntrack_capacity: IntGauge,
    pub conntrack_expired: IntCounter,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let m = Self {
            sync_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "kubeproxy_sync_proxy_rules_duration_seconds",
                    "Time to program the maps from a source change.",
                )
                .buckets(prometheus::exponential_buckets(0.0001, 2.0, 18)?),
            )?,
            last_sync: Gauge::new(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "Unix time of the last successful map programming.",
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "proxy_rejected_objects_total",
                    "Objects or parts of objects not served, by reason.",
                ),
                &["reason"],
            )?,
            map_update_errors: IntCounter::new(
                "proxy_map_update_errors_total",
                "Service ports whose map update failed (previous state kept).",
            )?,
            service_ports: IntGauge::new(
                "proxy_service_ports",
                "Service ports programmed in the datapath.",
            )?,
            conntrack_entries: IntGauge::new(
                "proxy_conntrack_entries",
                "Entries in the conntrack map (two per translated flow).",
            )?,
            conntrack_capacity: IntGauge::new(
                "proxy_conntrack_capacity",
                "Capacity of the conntrack map; entries/capacity is its fill.",
            )?,
            conntrack_expired: IntCounter::new(
                "proxy_conntrack_expired_total",
                "Conntrack entries deleted by the idle-timeout GC.",
            )?,
            registry,
        };
        m.registry.register(Box::new(m.sync_duration.clone()))?;
        m.registry.register(Box::new(m.last_sync.clone()))?;
        m.registry.register(Box::new(m.rejected.clone()))?;
        m.registry.register(Box::new(m.map_update_errors.clone()))?;
        m.registry.register(Box::new(m.service_ports.clone()))?;
        m.registry.register(Box::new(m.conntrack_entries.clone()))?;
        m.registry
            .register(Box::new(m.conntrack_capacity.clone()))?;
        m.registry.register(Box::new(m.conntrack_expired.clone()))?;
        m.conntrack_capacity
            .set(proxy_common::maps::MAX_CONNTRACK as i64);
        Ok(m)
    }

    pub fn reject(&self, reason: Reason) {
        self.rejected.with_label_values(&[reason.label()]).inc();
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}
