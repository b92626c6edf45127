//! proxyctl: inspect the datapath's pinned maps (works while the agent is down).
//!
//! Exit codes: 0 success, 1 error (e.g. maps not pinned, no permission), 2 usage error,
//! 3 the service asked for does not exist.
use std::{
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand, ValueEnum};
use proxy::{
    family::socket_text,
    inspect::{self, Tables},
    maps::Maps,
};
use serde::Serialize;

#[derive(Parser)]
#[command(version, about = "Inspect the eBPF service proxy's maps")]
struct Args {
    /// Directory where proxy-agent pinned its maps (its --bpffs; the chart sets PROXY_BPFFS
    /// in the agent's container, so `kubectl exec ... proxyctl` finds a changed one).
    #[arg(
        long,
        global = true,
        env = "PROXY_BPFFS",
        default_value = "/sys/fs/bpf/proxy"
    )]
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
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// Services as programmed in the datapath.
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Flows in the datapath's own conntrack (tc path).
    Conntrack {
        #[command(subcommand)]
        command: ConntrackCommand,
    },
    /// Each map: entries, capacity, fill.
    Maps,
    /// The agent: alive, last sync, attached programs.
    Status,
    /// Stream the datapath's drops and refused connections as they happen: time, action,
    /// reason, service, flow, hook. One monitor per node at a time.
    Monitor {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// One row per service port: name, address, backends, policies, counters.
    List,
    /// One row per backend of a service's ports: state, connections, traffic, share. The
    /// service as `service list` prints it: NAMESPACE/NAME, NAMESPACE/NAME:PORT, or a
    /// frontend ADDRESS:PORT[/PROTOCOL] (0.0.0.0:NODEPORT for a node port).
    Get { service: String },
}

#[derive(Subcommand)]
enum ConntrackCommand {
    /// One row per flow.
    List {
        /// Only the flows of a service (NAMESPACE/NAME, NAMESPACE/NAME:PORT or
        /// ADDRESS:PORT[/PROTOCOL], as `service get`).
        #[arg(long)]
        service: Option<String>,
    },
    /// Delete flows: their next packet is balanced again, as a new connection. An
    /// established TCP connection whose flow is deleted breaks (its next segment is not
    /// translated): without --yes, such flows are named and nothing is deleted.
    Flush {
        /// Only the flows of a service (NAMESPACE/NAME, NAMESPACE/NAME:PORT or
        /// ADDRESS:PORT[/PROTOCOL], as `service get`).
        #[arg(long)]
        service: Option<String>,
        /// Show what would be deleted, and which connections would break; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Delete the flows of established TCP connections too.
        #[arg(long)]
        yes: bool,
    },
}

/// A failure with its exit code.
struct Failure(u8, anyhow::Error);

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure(1, e)
    }
}

const NOT_FOUND: u8 = 3;
/// `conntrack flush` would break established connections and was not told `--yes`.
const NOT_CONFIRMED: u8 = 4;

/// Aligned columns; the first row is the header.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
                + "\n"
        })
        .collect()
}

fn structured<T: Serialize>(output: Output, value: &T) -> anyhow::Result<String> {
    Ok(match output {
        Output::Yaml => serde_yaml::to_string(value)?,
        _ => serde_json::to_string_pretty(value)? + "\n",
    })
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or("-".to_owned(), |v| v.to_string())
}

fn service_table(rows: &[inspect::ServiceRow]) -> String {
    let mut cells = vec![
        [
            "SERVICE",
            "TYPE",
            "ADDRESS",
            "NODE-PORT",
            "EXTERNAL",
            "BACKENDS(READY/TERM)",
            "AFFINITY",
            "POLICY(INT/EXT)",
            "CONNECTIONS",
            "PACKETS",
            "BYTES",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rows {
        cells.push(vec![
            r.full_name(),
            r.service_type.to_owned(),
            format!("{}/{}", socket_text(r.address, r.port), r.protocol),
            or_dash(r.node_port),
            match r.external_addresses.as_slice() {
                [] => "-".to_owned(),
                addrs => addrs
                    .iter()
                    .map(IpAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            },
            format!("{}/{}", r.ready_backends, r.terminating_backends),
            r.session_affinity_timeout_seconds
                .map_or("-".to_owned(), |t| format!("ClientIP {t}s")),
            format!(
                "{}/{}",
                r.internal_traffic_policy, r.external_traffic_policy
            ),
            r.connections.to_string(),
            r.packets.to_string(),
            r.bytes.to_string(),
        ]);
    }
    table(&cells)
}

/// The service ports of NAMESPACE/NAME, or a not-found failure.
fn ports_of(tables: &Tables, service: &str) -> Result<Vec<inspect::ServiceRow>, Failure> {
    let ports = inspect::service_ports(tables, service)?;
    if ports.is_empty() {
        return Err(Failure(
            NOT_FOUND,
            anyhow::anyhow!(
                "service {service} is not programmed (namespace/name, namespace/name:port or address:port[/protocol], as `proxyctl service list` prints them)"
            ),
        ));
    }
    Ok(ports)
}

/// The service ids of every frontend of NAMESPACE/NAME, if a service is given.
fn service_ids(maps: &Maps, service: Option<&str>) -> Result<Option<Vec<u32>>, Failure> {
    service
        .map(|s| {
            let ports = ports_of(&Tables::read(maps)?, s)?;
            Ok(ports.iter().flat_map(|r| r.ids()).collect())
        })
        .transpose()
}

#[derive(Serialize)]
struct ServiceDetail {
    service: inspect::ServiceRow,
    /// What each of its addresses does with a new connection.
    frontends: Vec<inspect::FrontendRow>,
    backends: Vec<inspect::BackendRow>,
}

fn frontends_table(rows: &[inspect::FrontendRow]) -> String {
    let mut cells = vec![
        [
            "FRONTEND",
            "ADDRESS",
            "CLIENTS",
            "NEW-CONNECTIONS",
            "BACKENDS",
            "UNUSED(WHY)",
            "CONNECTIONS",
            "PACKETS",
            "BYTES",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for f in rows {
        let verdict = match f.reason {
            Some(reason) => format!("{} ({reason})", f.new_connections.to_uppercase()),
            None if f.terminating_fallback => format!("{} (terminating)", f.new_connections),
            None => f.new_connections.to_owned(),
        };
        cells.push(vec![
            f.frontend.to_owned(),
            f.address.clone(),
            f.clients.to_owned(),
            verdict,
            match f.backends.as_slice() {
                [] => "-".to_owned(),
                all => all.join(","),
            },
            match f.unused.as_slice() {
                [] => "-".to_owned(),
                all => all
                    .iter()
                    .map(|u| format!("{}({})", u.endpoint, u.reason))
                    .collect::<Vec<_>>()
                    .join(","),
            },
            f.connections.to_string(),
            f.packets.to_string(),
            f.bytes.to_string(),
        ]);
    }
    table(&cells)
}

fn run(args: Args) -> Result<String, Failure> {
    let dir = &args.bpffs;
    let out = args.output;
    let maps = || Maps::open(dir).map_err(Failure::from);
    Ok(match args.command {
        Command::Service {
            command: ServiceCommand::List,
        } => {
            let rows = inspect::services(&Tables::read(&maps()?)?)?;
            match out {
                Output::Table => service_table(&rows),
                _ => structured(out, &rows)?,
            }
        }
        Command::Service {
            command: ServiceCommand::Get { service },
        } => {
            let tables = Tables::read(&maps()?)?;
            let mut details = Vec::new();
            let active = inspect::ActiveFlows::read(dir)?;
            for port in ports_of(&tables, &service)? {
                let backends = inspect::backends(&tables, &active, &port)?;
                details.push(ServiceDetail {
                    frontends: inspect::frontends(&tables, &port)?,
                    service: port,
                    backends,
                });
            }
            match out {
                Output::Table => details
                    .iter()
                    .map(|d| {
                        let mut cells = vec![
                            [
                                "BACKEND",
                                "NODE-LOCAL",
                                "STATE",
                                "ACTIVE",
                                "CONNECTIONS",
                                "PACKETS",
                                "BYTES",
                                "SHARE",
                            ]
                            .map(String::from)
                            .to_vec(),
                        ];
                        for b in &d.backends {
                            cells.push(vec![
                                format!("{}/{}", socket_text(b.address, b.port), b.protocol),
                                if b.node_local { "yes" } else { "no" }.to_owned(),
                                b.state.to_owned(),
                                b.active_connections.to_string(),
                                b.connections.to_string(),
                                b.packets.to_string(),
                                b.bytes.to_string(),
                                format!("{:.1}%", b.connection_share_percent),
                            ]);
                        }
                        format!(
                            "{}\n{}\n{}",
                            service_table(std::slice::from_ref(&d.service)),
                            frontends_table(&d.frontends),
                            table(&cells)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => structured(out, &details)?,
            }
        }
        Command::Conntrack {
            command: ConntrackCommand::List { service },
        } => {
            let maps = maps()?;
            let ids = service_ids(&maps, service.as_deref())?;
            let flows: Vec<inspect::FlowRow> = inspect::flows(&maps, dir, ids.as_deref())?
                .into_iter()
                .map(|(_, r)| r)
                .collect();
            match out {
                Output::Table => flows_table(&flows),
                _ => structured(out, &flows)?,
            }
        }
        Command::Conntrack {
            command:
                ConntrackCommand::Flush {
                    service,
                    dry_run,
                    yes,
                },
        } => {
            let maps = maps()?;
            let ids = service_ids(&maps, service.as_deref())?;
            let flows: Vec<inspect::FlowRow> = inspect::flows(&maps, dir, ids.as_deref())?
                .into_iter()
                .map(|(_, r)| r)
                .collect();
            let breaking: Vec<&inspect::FlowRow> = flows
                .iter()
                .filter(|f| f.protocol == "TCP" && f.state == "established")
                .collect();
            if dry_run {
                return Ok(match out {
                    Output::Table => format!(
                        "would flush {} flows, breaking {} established TCP connections:\n{}",
                        flows.len(),
                        breaking.len(),
                        flows_table(&flows)
                    ),
                    _ => structured(
                        out,
                        &serde_json::json!({"would_flush": flows.len(), "would_break": breaking}),
                    )?,
                });
            }
            if !breaking.is_empty() && !yes {
                let named: Vec<inspect::FlowRow> = breaking.into_iter().cloned().collect();
                return Err(Failure(
                    NOT_CONFIRMED,
                    anyhow::anyhow!(
                        "flushing would break {} established TCP connections (their next \
                         segment would not be translated); nothing flushed. Run again with \
                         --yes to flush them, or --dry-run to see every flow:\n{}",
                        named.len(),
                        flows_table(&named)
                    ),
                ));
            }
            let flushed = inspect::flush(&maps, dir, ids.as_deref())?;
            match out {
                Output::Table => format!("flushed {flushed} flows\n"),
                _ => structured(out, &serde_json::json!({"flushed": flushed}))?,
            }
        }
        Command::Maps => {
            let rows = inspect::map_fill(dir, None)?;
            match out {
                Output::Table => {
                    let mut cells = vec![
                        ["MAP", "ENTRIES", "CAPACITY", "FILL", "KERNEL MEMORY"]
                            .map(String::from)
                            .to_vec(),
                    ];
                    for r in &rows {
                        cells.push(vec![
                            r.name.to_owned(),
                            or_dash(r.entries),
                            r.capacity.to_string(),
                            r.fill_percent
                                .map_or("-".to_owned(), |f| format!("{f:.1}%")),
                            format!("{:.1} MiB", r.memory_bytes as f64 / (1 << 20) as f64),
                        ]);
                    }
                    table(&cells)
                }
                _ => structured(out, &rows)?,
            }
        }
        Command::Monitor { count, seconds } => {
            // Streams its lines as they come.
            monitor(dir, out, count, seconds)?;
            String::new()
        }
        Command::Status => {
            let s = inspect::status(dir)?;
            match out {
                Output::Table => {
                    let ago =
                        |v: Option<u64>| v.map_or("never".to_owned(), |s| format!("{s}s ago"));
                    let mut text = format!(
                        "agent:       pid {} {}\nstarted:     {}\nlast sync:   {} ({} service ports, {} failed)\nheartbeat:   {}\nattachments:\n",
                        s.agent_pid,
                        if s.agent_alive {
                            "alive"
                        } else {
                            "NOT RUNNING (the datapath keeps serving the pinned state)"
                        },
                        ago(s.started_seconds_ago),
                        ago(s.last_sync_seconds_ago),
                        s.service_ports,
                        s.failed_service_ports,
                        ago(s.heartbeat_seconds_ago),
                    );
                    for a in &s.attachments {
                        let pin = a.pin.replacen('@', " on ", 1);
                        text += &format!("  {pin:<56} {}\n", a.attached_to);
                    }
                    text += "datapath drops:\n";
                    for (reason, packets) in &s.drops {
                        text += &format!("  {reason:<24} {packets}\n");
                    }
                    text
                }
                _ => structured(out, &s)?,
            }
        }
    })
}

/// Writes the output; a reader that went away (`proxyctl ... | head`) is not an error.
fn emit(text: &str) -> std::io::Result<()> {
    match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e),
        _ => Ok(()),
    }
}

/// Flows as `conntrack list` prints them.
fn flows_table(flows: &[inspect::FlowRow]) -> String {
    let mut cells = vec![
        [
            "PROTO",
            "CLIENT",
            "SERVICE-ADDRESS",
            "BACKEND",
            "MASQUERADED-AS",
            "SERVICE",
            "STATE",
            "IDLE(S)",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for f in flows {
        cells.push(vec![
            f.protocol.to_owned(),
            f.client.clone(),
            f.service_address.clone(),
            f.backend.clone(),
            or_dash(f.masqueraded_as.as_ref()),
            f.service.clone(),
            f.state.to_owned(),
            f.idle_seconds.to_string(),
        ]);
    }
    table(&cells)
}

/// One line per event: a table row, or a JSON object (`-o json`, `-o yaml`: JSON lines too,
/// which stream).
fn monitor(
    dir: &std::path::Path,
    output: Output,
    count: Option<usize>,
    seconds: Option<u64>,
) -> Result<(), Failure> {
    let mut monitor = proxy::monitor::Monitor::open(dir)?;
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let mut seen = 0;
    if matches!(output, Output::Table) {
        emit(&format!(
            "{:<15}  {:<6}  {:<23}  {:<32}  {:<21}  {:<21}  {:<5}  HOOK\n",
            "TIME", "ACTION", "REASON", "SERVICE", "SOURCE", "DESTINATION", "PROTO"
        ))
        .map_err(|e| Failure(1, e.into()))?;
    }
    while count.is_none_or(|c| seen < c) {
        let wait = deadline.map_or(Duration::from_millis(500), |d| {
            d.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500))
        });
        if wait.is_zero() {
            break;
        }
        for event in monitor.wait(wait)? {
            if count.is_some_and(|c| seen >= c) {
                break;
            }
            seen += 1;
            let line = match output {
                Output::Table => monitor_row(&event),
                _ => serde_json::to_string(&event).map_err(anyhow::Error::from)? + "\n",
            };
            emit(&line).map_err(|e| Failure(1, e.into()))?;
        }
    }
    Ok(())
}

fn monitor_row(e: &proxy::monitor::Event) -> String {
    let time = k8s_openapi::jiff::Timestamp::from_microsecond((e.time * 1e6) as i64).map_or_else(
        |_| e.time.to_string(),
        |t| t.strftime("%H:%M:%S%.6f").to_string(),
    );
    let service = match (&e.service, e.frontend) {
        (Some(s), Some(f)) => format!("{s} ({f})"),
        _ => "-".to_owned(),
    };
    let hook = match e.pid {
        Some(pid) => format!("{} pid {pid}", e.hook),
        None => e.hook.to_owned(),
    };
    format!(
        "{time:<15}  {:<6}  {:<23}  {service:<32}  {:<21}  {:<21}  {:<5}  {hook}\n",
        e.action,
        e.reason,
        e.source.as_deref().unwrap_or("-"),
        e.destination,
        e.protocol
    )
}

fn main() -> ExitCode {
    let result = run(Args::parse()).and_then(|text| emit(&text).map_err(|e| Failure(1, e.into())));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("proxyctl: {e:#}");
            ExitCode::from(code)
        }
    }
}
