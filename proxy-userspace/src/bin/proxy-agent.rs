//! proxy-agent: the node agent that programs the eBPF service datapath.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use proxy::{agent, datapath::TcAttach};

#[derive(Parser)]
#[command(
    version,
    about = "eBPF Kubernetes service proxy (kube-proxy replacement) node agent"
)]
struct Args {
    /// Kubernetes YAML manifests to serve (v1 Service, discovery.k8s.io/v1 EndpointSlice):
    /// a file, a multi-document file or a directory; re-read when they change.
    #[arg(long)]
    manifests: PathBuf,
    /// cgroup v2 directory whose processes get socket-level load balancing
    /// [default: the cgroup v2 root, detected from /proc/self/mountinfo].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Directory on a BPF filesystem where the maps are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/proxy")]
    bpffs: PathBuf,
    /// Interfaces that get the tc programs (DNAT on ingress, reverse NAT on egress),
    /// comma-separated, e.g. the host side of pod veths.
    #[arg(long, value_delimiter = ',')]
    interfaces: Vec<String>,
    /// This node's IPv4 address (used by NodePort and external traffic).
    #[arg(long)]
    node_ip: Option<std::net::Ipv4Addr>,
    /// How tc programs attach.
    #[arg(long, value_enum, default_value_t = TcAttach::Auto)]
    tc_attach: TcAttach,
    /// Address of the /metrics, /healthz and /proxyMode endpoint.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind: SocketAddr,
    /// Seconds between conntrack garbage collections.
    #[arg(long, default_value_t = 10)]
    conntrack_gc_interval: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let config = agent::Config {
        manifests: args.manifests,
        cgroup: args.cgroup,
        bpffs: args.bpffs,
        interfaces: args.interfaces,
        node_ip: args.node_ip,
        tc_attach: args.tc_attach,
        metrics_bind: args.metrics_bind,
        conntrack_gc_interval: Duration::from_secs(args.conntrack_gc_interval.max(1)),
        debounce: Duration::from_millis(20),
    };
    tokio::runtime::Runtime::new()?.block_on(agent::run(config))
}
