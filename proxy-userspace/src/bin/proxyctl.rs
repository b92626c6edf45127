//! proxyctl: inspect the datapath's pinned maps (works while the agent is down).
use std::{net::Ipv4Addr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use proxy::{
    maps::{Maps, decode_info},
    model::Protocol,
};
use serde::Serialize;

#[derive(Parser)]
#[command(version, about = "Inspect the eBPF service proxy's maps")]
struct Args {
    /// Directory where proxy-agent pinned its maps (its --bpffs).
    #[arg(long, global = true, default_value = "/sys/fs/bpf/proxy")]
    bpffs: PathBuf,
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Services as programmed in the datapath.
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// One row per service port: name, address, backends and counters.
    List,
}

#[derive(Serialize)]
struct ServiceRow {
    namespace: String,
    name: String,
    port_name: String,
    address: Ipv4Addr,
    port: u16,
    protocol: &'static str,
    backends: u16,
    session_affinity_timeout_seconds: Option<u32>,
    connections: u64,
    packets: u64,
    bytes: u64,
}

/// Splits `namespace/name:port` as the agent writes it.
fn split_name(full: &str) -> (String, String, String) {
    let (namespace, rest) = full.split_once('/').unwrap_or(("", full));
    let (name, port) = rest.split_once(':').unwrap_or((rest, ""));
    (namespace.to_owned(), name.to_owned(), port.to_owned())
}

fn service_rows(maps: &Maps) -> anyhow::Result<Vec<ServiceRow>> {
    let mut rows = Vec::new();
    for entry in maps.services.iter() {
        let (key, value) = entry?;
        let full = maps
            .names
            .get(&value.id, 0)
            .map(|n| decode_info(&n).name)
            .unwrap_or_else(|_| format!("<id {}>", value.id));
        let (namespace, name, port_name) = split_name(&full);
        let counters = maps.service_counters(value.id)?;
        rows.push(ServiceRow {
            namespace,
            name,
            port_name,
            address: Ipv4Addr::from(key.addr),
            port: key.port,
            protocol: Protocol::from_ip_proto(key.proto).map_or("?", Protocol::name),
            backends: value.count,
            session_affinity_timeout_seconds: (value.flags & proxy_common::SVC_FLAG_AFFINITY != 0)
                .then_some(value.affinity_timeout_secs),
            connections: counters.conns,
            packets: counters.packets,
            bytes: counters.bytes,
        });
    }
    rows.sort_by(|a, b| {
        (&a.namespace, &a.name, a.port, a.protocol).cmp(&(
            &b.namespace,
            &b.name,
            b.port,
            b.protocol,
        ))
    });
    Ok(rows)
}

fn table(rows: &[ServiceRow]) -> String {
    let header = [
        "SERVICE",
        "ADDRESS",
        "BACKENDS",
        "AFFINITY",
        "CONNECTIONS",
        "PACKETS",
        "BYTES",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let service = match r.port_name.as_str() {
                "" => format!("{}/{}", r.namespace, r.name),
                port => format!("{}/{}:{port}", r.namespace, r.name),
            };
            [
                service,
                format!("{}:{}/{}", r.address, r.port, r.protocol),
                r.backends.to_string(),
                r.session_affinity_timeout_seconds
                    .map_or("-".to_owned(), |t| format!("ClientIP {t}s")),
                r.connections.to_string(),
                r.packets.to_string(),
                r.bytes.to_string(),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cols: &[&str]| {
        cols.iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(&header) + "\n";
    for row in &cells {
        out += &line(&row.iter().map(String::as_str).collect::<Vec<_>>());
        out.push('\n');
    }
    out
}

/// Writes the output; a reader that went away (`proxyctl ... | head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let maps = Maps::open(&args.bpffs)?;
    match args.command {
        Command::Service {
            command: ServiceCommand::List,
        } => {
            let rows = service_rows(&maps)?;
            emit(&match args.output {
                Output::Table => table(&rows),
                Output::Json => serde_json::to_string_pretty(&rows)? + "\n",
            })?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxyctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
