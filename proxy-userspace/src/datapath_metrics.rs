//! The datapath's series — per service port, per backend, map fill, drops — written in
//! Prometheus' text format straight from the maps at each scrape. With 100,000 service
//! ports that is over 300,000 series: built as prometheus-crate metric vectors at every
//! scrape they cost seconds, mostly allocating and freeing (a 33 MB answer). The handles of
//! the maps stay open between scrapes, so a scrape also works while the pins are being put
//! back; conntrack is walked once (to count its entries), whatever the number of services.
use std::{collections::HashSet, fmt::Write as _, net::Ipv4Addr, path::PathBuf, sync::Mutex};

use crate::{inspect, maps::Maps};

/// One metric family: its header, then its samples.
struct Family {
    body: String,
}

impl Family {
    fn new(name: &str, help: &str, kind: &str) -> Self {
        Self {
            body: format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"),
        }
    }

    /// A sample: labels in name order, as the prometheus crate writes them.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.body.push_str(name);
        for (i, (label, text)) in labels.iter().enumerate() {
            self.body.push(if i == 0 { '{' } else { ',' });
            let _ = write!(self.body, "{label}=\"");
            for c in text.chars() {
                match c {
                    '\\' => self.body.push_str("\\\\"),
                    '"' => self.body.push_str("\\\""),
                    '\n' => self.body.push_str("\\n"),
                    c => self.body.push(c),
                }
            }
            self.body.push('"');
        }
        if !labels.is_empty() {
            self.body.push('}');
        }
        let _ = writeln!(self.body, " {value}");
    }
}

const SERVICE_SERIES: [(&str, &str); 3] = [
    (
        "proxy_service_connections_total",
        "New connections to a service port.",
    ),
    (
        "proxy_service_packets_total",
        "Packets of a service port (tc path and UDP datagrams).",
    ),
    (
        "proxy_service_bytes_total",
        "Bytes of a service port (tc path).",
    ),
];
const BACKEND_SERIES: [(&str, &str); 3] = [
    (
        "proxy_backend_connections_total",
        "New connections to a backend.",
    ),
    (
        "proxy_backend_packets_total",
        "Packets to and from a backend (tc path and UDP datagrams).",
    ),
    (
        "proxy_backend_bytes_total",
        "Bytes to and from a backend (tc path).",
    ),
];

pub struct DatapathMetrics {
    bpffs: PathBuf,
    /// Opened at the first scrape, kept.
    maps: Mutex<Option<Maps>>,
}

impl DatapathMetrics {
    pub fn new(bpffs: PathBuf) -> Self {
        Self {
            bpffs,
            maps: Mutex::new(None),
        }
    }

    /// Appends the datapath's series to `out`.
    pub fn write(&self, out: &mut String) -> anyhow::Result<()> {
        let mut held = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let maps = match &mut *held {
            Some(maps) => maps,
            None => held.insert(Maps::open(&self.bpffs)?),
        };
        let mut services = SERVICE_SERIES.map(|(name, help)| Family::new(name, help, "counter"));
        let mut backends = BACKEND_SERIES.map(|(name, help)| Family::new(name, help, "counter"));
        let mut seen = HashSet::new();
        for row in inspect::services(maps)? {
            let address = format!("{}:{}/{}", row.address, row.port, row.protocol);
            let labels = [
                ("address", address.as_str()),
                ("namespace", row.namespace.as_str()),
                ("port", row.port_name.as_str()),
                ("service", row.name.as_str()),
            ];
            let values = [row.connections, row.packets, row.bytes];
            for ((family, (name, _)), value) in services.iter_mut().zip(SERVICE_SERIES).zip(values)
            {
                family.sample(name, &labels, value);
            }
            for (id, b, c) in inspect::backend_counters(maps, &row)? {
                // A backend shared by several service ports has one set of counters.
                if !seen.insert(id) {
                    continue;
                }
                let backend = format!(
                    "{}:{}/{}",
                    Ipv4Addr::from(b.addr),
                    b.port,
                    inspect::protocol(b.proto)
                );
                let values = [c.conns, c.packets, c.bytes];
                let series = backends.iter_mut().zip(BACKEND_SERIES).zip(values);
                for ((family, (name, _)), value) in series {
                    family.sample(name, &[("backend", &backend)], value);
                }
            }
        }
        let mut entries = Family::new(
            "proxy_map_entries",
            "Entries in a map (hash and LRU maps).",
            "gauge",
        );
        let mut capacity = Family::new(
            "proxy_map_capacity",
            "Capacity of a map; entries/capacity is its fill.",
            "gauge",
        );
        for row in inspect::map_fill(&self.bpffs)? {
            capacity.sample("proxy_map_capacity", &[("map", row.name)], row.capacity);
            if let Some(n) = row.entries {
                entries.sample("proxy_map_entries", &[("map", row.name)], n);
            }
        }
        let mut drops = Family::new(
            "proxy_datapath_drops_total",
            "Packets the datapath dropped, by reason.",
            "counter",
        );
        for (reason, packets) in inspect::drops(&self.bpffs)? {
            drops.sample("proxy_datapath_drops_total", &[("reason", reason)], packets);
        }
        let families = services
            .into_iter()
            .chain(backends)
            .chain([entries, capacity, drops]);
        for family in families {
            out.push_str(&family.body);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_written_as_prometheus_text_with_escaped_labels() {
        let mut family = Family::new("x_total", "Things.", "counter");
        family.sample("x_total", &[("a", "1"), ("b", "q\"\\\n")], 7);
        family.sample("x_total", &[], 0);
        assert_eq!(
            family.body,
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"\\\\\\n\"} 7\nx_total 0\n"
        );
    }
}
