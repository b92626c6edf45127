//! The datapath's series — per service port, per backend, map fill, drops — written in
//! Prometheus' text format straight from the maps at each scrape. With 100,000 service
//! ports that is over 300,000 series: built as prometheus-crate metric vectors at every
//! scrape they cost seconds, mostly allocating and freeing (a 33 MB answer). The handles of
//! the maps stay open between scrapes, so a scrape also works while the pins are being put
//! back; conntrack is walked once (to count its entries), whatever the number of services.
use std::{fmt::Write as _, path::PathBuf, sync::Mutex};

use crate::{family::socket_text, inspect, maps::Maps};

/// Appends a metric family's header.
fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

/// `{a="1",b="2"}`: labels in name order, as the prometheus crate writes them; empty for
/// none.
fn label_text(labels: &[(&str, &str)]) -> String {
    let mut text = String::new();
    for (i, (label, value)) in labels.iter().enumerate() {
        text.push(if i == 0 { '{' } else { ',' });
        let _ = write!(text, "{label}=\"");
        for c in value.chars() {
            match c {
                '\\' => text.push_str("\\\\"),
                '"' => text.push_str("\\\""),
                '\n' => text.push_str("\\n"),
                c => text.push(c),
            }
        }
        text.push('"');
    }
    if !labels.is_empty() {
        text.push('}');
    }
    text
}

/// Appends one sample.
fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{name}{labels} {value}");
}

/// Series that share their labels, one value each per family (connections, packets,
/// bytes), written family after family.
struct Samples {
    rows: Vec<(String, [u64; 3])>,
}

impl Samples {
    /// The bytes `write` appends to the samples' headers.
    fn len(&self, families: &[(&str, &str); 3]) -> usize {
        let digits = |v: u64| v.checked_ilog10().map_or(1, |d| d as usize + 1);
        let line = |name: &str, labels: &str, value| name.len() + labels.len() + digits(value) + 2;
        let family = |(i, (name, _)): (usize, &(&str, &str))| {
            let rows = self.rows.iter();
            rows.map(|(labels, values)| line(name, labels, values[i]))
                .sum::<usize>()
        };
        families.iter().enumerate().map(family).sum()
    }

    fn write(&self, out: &mut String, families: &[(&str, &str); 3]) {
        for (i, (name, help)) in families.iter().enumerate() {
            header(out, name, help, "counter");
            for (labels, values) in &self.rows {
                sample(out, name, labels, values[i]);
            }
        }
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
        "New connections to a backend of a service port.",
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

    /// Appends the datapath's series to `out`. The label text of every series is made
    /// once, then `out` grows once, to its final size: at 100,000 service ports the answer
    /// is 33 MB, and growing it by doubling, family by family, held three times that.
    pub fn write(&self, out: &mut String) -> anyhow::Result<()> {
        let mut held = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let maps = match &mut *held {
            Some(maps) => maps,
            None => held.insert(Maps::open(&self.bpffs)?),
        };
        let mut services = Samples { rows: Vec::new() };
        let mut backends = Samples { rows: Vec::new() };
        let tables = inspect::Tables::read(maps)?;
        for row in inspect::services(&tables)? {
            let address = format!("{}/{}", socket_text(row.address, row.port), row.protocol);
            let labels = label_text(&[
                ("address", address.as_str()),
                ("namespace", row.namespace.as_str()),
                ("port", row.port_name.as_str()),
                ("service", row.name.as_str()),
            ]);
            services
                .rows
                .push((labels, [row.connections, row.packets, row.bytes]));
            // Each service port has its own backend ids, so its own counters per backend.
            for (_, b, c) in inspect::backend_counters(&tables, &row)? {
                let backend = format!(
                    "{}/{}",
                    socket_text(b.addr, b.port),
                    inspect::protocol(b.proto)
                );
                let labels = label_text(&[
                    ("backend", &backend),
                    ("namespace", row.namespace.as_str()),
                    ("port", row.port_name.as_str()),
                    ("service", row.name.as_str()),
                ]);
                backends.rows.push((labels, [c.conns, c.packets, c.bytes]));
            }
        }
        let small = 4096;
        out.reserve(services.len(&SERVICE_SERIES) + backends.len(&BACKEND_SERIES) + small);
        services.write(out, &SERVICE_SERIES);
        backends.write(out, &BACKEND_SERIES);
        let fill = inspect::map_fill(&self.bpffs, Some(&tables))?;
        let (entries, capacity) = ("proxy_map_entries", "proxy_map_capacity");
        header(
            out,
            entries,
            "Entries in a map (hash and LRU maps).",
            "gauge",
        );
        for row in &fill {
            if let Some(n) = row.entries {
                sample(out, entries, &label_text(&[("map", row.name)]), n);
            }
        }
        let help = "Capacity of a map; entries/capacity is its fill.";
        header(out, capacity, help, "gauge");
        for row in &fill {
            sample(
                out,
                capacity,
                &label_text(&[("map", row.name)]),
                row.capacity,
            );
        }
        let drops = "proxy_datapath_drops_total";
        header(
            out,
            drops,
            "Packets the datapath dropped, by reason.",
            "counter",
        );
        for (reason, packets) in inspect::drops(&self.bpffs)? {
            sample(out, drops, &label_text(&[("reason", reason)]), packets);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_written_as_prometheus_text_with_escaped_labels() {
        let mut body = String::new();
        header(&mut body, "x_total", "Things.", "counter");
        sample(
            &mut body,
            "x_total",
            &label_text(&[("a", "1"), ("b", "q\"\\\n")]),
            7,
        );
        sample(&mut body, "x_total", &label_text(&[]), 0);
        assert_eq!(
            body,
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"\\\\\\n\"} 7\nx_total 0\n"
        );
    }
}
