//! proxy-agent: the node agent that programs the eBPF service datapath.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use proxy::{
    agent::{self, SourceConfig},
    datapath::{TcAttach, XdpAttach},
    kubernetes::ApiServer,
    node::NodeIps,
    nodeport_addresses::NodePortAddresses,
};

#[derive(Parser)]
#[command(
    version,
    about = "eBPF Kubernetes service proxy (kube-proxy replacement) node agent"
)]
struct Args {
    /// Serve Kubernetes YAML manifests instead of watching an API server (v1 Service,
    /// discovery.k8s.io/v1 EndpointSlice): a file, a multi-document file or a directory;
    /// re-read when they change.
    #[arg(long, env = "PROXY_MANIFESTS", conflicts_with_all = ["kubeconfig", "namespace", "k8s_api_server", "k8s_api_server_from"])]
    manifests: Option<PathBuf>,
    /// Watch the API server of this kubeconfig [default: KUBECONFIG, ~/.kube/config, or
    /// the in-cluster service account].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The API server to talk to, HOST:PORT or a URL, instead of the one the configuration
    /// names: in a pod, the in-cluster configuration names the `kubernetes` Service's
    /// ClusterIP, which only a service proxy serves — on a new or rebooted node, nothing,
    /// until this agent has programmed it. Credentials still come from the configuration.
    #[arg(
        long,
        env = "PROXY_K8S_API_SERVER",
        conflicts_with = "k8s_api_server_from"
    )]
    k8s_api_server: Option<String>,
    /// Take the API server's address (not the credentials) from this kubeconfig, e.g. the
    /// kubelet's /etc/kubernetes/kubelet.conf: --k8s-api-server without writing it down.
    #[arg(long, env = "PROXY_K8S_API_SERVER_FROM")]
    k8s_api_server_from: Option<PathBuf>,
    /// The DaemonSet this agent runs in, NAMESPACE/NAME: when it is gone (or being deleted)
    /// at SIGTERM, the agent is being uninstalled and removes everything it created, as
    /// --cleanup; otherwise (an update, a restart) the datapath stays for the next agent.
    #[arg(long, env = "PROXY_OWNER_DAEMONSET", conflicts_with = "manifests")]
    owner_daemonset: Option<proxy::uninstall::Owner>,
    /// Log lines as text, or as one JSON object each (for log collectors).
    #[arg(long, env = "PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Remove everything an agent created on this node (pinned links and maps under
    /// --bpffs, tc filters on every interface) and exit; refused while an agent runs.
    #[arg(long, conflicts_with = "cleanup_kube_proxy")]
    cleanup: bool,
    /// Remove kube-proxy's iptables chains and nftables tables from this node, as
    /// `kube-proxy --cleanup` does, and exit: run it once kube-proxy is gone. Connections
    /// its rules set up keep their translation (the kernel's conntrack holds it; a table
    /// `inet ebpf-proxy-conntrack` keeps connection tracking on until --cleanup).
    #[arg(long)]
    cleanup_kube_proxy: bool,
    /// Watch Services and EndpointSlices of this namespace only [default: all].
    #[arg(long, env = "PROXY_NAMESPACE")]
    namespace: Option<String>,
    /// This node's name, for node-local endpoints and topology hints [default: the
    /// hostname].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Serve the services labelled service.kubernetes.io/service-proxy-name=NAME [default:
    /// the services without that label, as kube-proxy].
    #[arg(long, env = "PROXY_SERVICE_PROXY_NAME")]
    service_proxy_name: Option<String>,
    /// cgroup v2 directory whose processes get socket-level load balancing
    /// [default: the cgroup v2 root, detected from /proc/self/mountinfo].
    #[arg(long, env = "PROXY_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Directory on a BPF filesystem where the maps and attachments are pinned.
    #[arg(long, env = "PROXY_BPFFS", default_value = "/sys/fs/bpf/proxy")]
    bpffs: PathBuf,
    /// Interfaces that get the tc programs (DNAT on ingress, reverse NAT on egress),
    /// comma-separated: the node's external interface(s), for NodePort, external and
    /// load-balancer IPs, and optionally the host side of pod veths. NodePorts answer on
    /// their IPv4 addresses.
    #[arg(long, env = "PROXY_INTERFACES", value_delimiter = ',')]
    interfaces: Vec<String>,
    /// This node's address, or one per family (`IPV4,IPV6`, as kubelet's --node-ip):
    /// NodePorts answer on it, and connections to other nodes' backends are masqueraded to
    /// the IPv4 one [default: the first address of each family of --interfaces].
    #[arg(long, env = "PROXY_NODE_IP", value_parser = NodeIps::parse, default_value = "", hide_default_value = true)]
    node_ip: NodeIps,
    /// Which node addresses NodePorts answer on, as kube-proxy's --nodeport-addresses:
    /// `primary` (the node IP of each family only: kube-proxy's nftables default), `all`
    /// (every address of --interfaces and the node IPs), or CIDRs of either family (those
    /// addresses inside them; a family without a CIDR answers on all its addresses).
    #[arg(
        long,
        env = "PROXY_NODEPORT_ADDRESSES",
        default_value = "primary",
        value_parser = NodePortAddresses::parse
    )]
    nodeport_addresses: NodePortAddresses,
    /// Also destroy connected TCP sockets that the socket hooks pointed at a backend which
    /// has left its service (the application sees ECONNABORTED and connects again). Connected
    /// UDP sockets always are; TCP connections keep their backend by default, as with
    /// kube-proxy, where they last as long as the backend answers.
    #[arg(long, env = "PROXY_DESTROY_TCP_TO_REMOVED_BACKENDS")]
    destroy_tcp_to_removed_backends: bool,
    /// Source ports of masqueraded connections, MIN-MAX [default: 61000-65535]: keep them
    /// outside the node's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by
    /// default) or reserve them (net.ipv4.ip_local_reserved_ports), so that the node's own
    /// connections never use them.
    #[arg(long, env = "PROXY_MASQUERADE_PORTS", value_parser = proxy::node::parse_port_range)]
    masquerade_ports: Option<std::ops::RangeInclusive<u16>>,
    /// How tc programs attach.
    #[arg(long, env = "PROXY_TC_ATTACH", value_enum, default_value_t = TcAttach::Auto)]
    tc_attach: TcAttach,
    /// The XDP fast path on --xdp-interfaces: masqueraded NodePort, external and
    /// load-balancer traffic to other nodes' backends (and its replies) is forwarded from
    /// the driver; everything else goes on to tc. `generic` works on any interface;
    /// `native` needs driver support.
    #[arg(long, env = "PROXY_XDP", value_enum, default_value_t = XdpAttach::Off)]
    xdp: XdpAttach,
    /// Interfaces of --interfaces that get the XDP fast path, comma-separated [default:
    /// those holding the node IP, i.e. the external interface].
    #[arg(long, env = "PROXY_XDP_INTERFACES", value_delimiter = ',')]
    xdp_interfaces: Vec<String>,
    /// Address of the /metrics, /healthz and /proxyMode endpoint.
    #[arg(long, env = "PROXY_METRICS_BIND", default_value = "127.0.0.1:10249")]
    metrics_bind: SocketAddr,
    /// Address of kube-proxy's /healthz for load balancers' node health checks (also
    /// /readyz and /livez).
    #[arg(long, env = "PROXY_HEALTHZ_BIND", default_value = "0.0.0.0:10256")]
    healthz_bind: SocketAddr,
    /// Address of /readyz and /livez (and /healthz) for kubelet's probes, on a port that
    /// kube-proxy does not hold, so that the agent becomes ready while kube-proxy still runs
    /// and holds --metrics-bind and --healthz-bind (which are taken over once free)
    /// [default: none].
    #[arg(long, env = "PROXY_PROBE_BIND")]
    probe_bind: Option<SocketAddr>,
    /// /healthz answers 503 when a source change has waited longer than this many seconds
    /// to be programmed (kube-proxy's stays 200 while its rules rot).
    #[arg(long, env = "PROXY_HEALTHZ_MAX_LAG_SECS", default_value_t = 10)]
    healthz_max_lag_secs: u64,
    /// Capacity of a map, as NAME=ENTRIES (repeatable), e.g. ct_flows=1048576 (`conntrack`,
    /// an earlier name, is taken too). Applies when the map is created: a map already
    /// pinned keeps its capacity.
    #[arg(long = "map-size", env = "PROXY_MAP_SIZES", value_delimiter = ',', value_parser = parse_map_size)]
    map_sizes: Vec<(String, u32)>,
    /// Seconds between conntrack garbage collections; the interfaces' addresses (where
    /// NodePorts answer, the masquerade address) are re-read as often.
    #[arg(long, env = "PROXY_CONNTRACK_GC_INTERVAL", default_value_t = 10)]
    conntrack_gc_interval: u64,
    /// Least milliseconds between two syncs: changes arriving closer together are
    /// programmed together (kube-proxy's minSyncPeriod). An isolated change is programmed
    /// at once.
    #[arg(long, env = "PROXY_MIN_SYNC_INTERVAL_MS", default_value_t = 100)]
    min_sync_interval_ms: u64,
    /// Seconds between comparisons of the maps with the desired state (drift repair).
    #[arg(long, env = "PROXY_RESYNC_INTERVAL", default_value_t = 30)]
    resync_interval: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_map_size(text: &str) -> Result<(String, u32), String> {
    let (name, size) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=ENTRIES"))?;
    let size: u32 = size
        .parse()
        .map_err(|_| format!("{size:?} is not a number of entries"))?;
    if size == 0 {
        return Err("a map needs at least one entry".into());
    }
    let name = proxy_common::maps::FORMER_CONNTRACK
        .iter()
        .find(|(_, former)| *former == name)
        .map_or(name, |(map, _)| map);
    Ok((name.to_owned(), size))
}

fn hostname() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the hostname")?
        .trim()
        .to_owned())
}

/// The log filter for `RUST_LOG`: a bare `debug` or `trace` applies to the agent's own
/// code, its libraries (kube, hyper, rustls, aya…) staying at `info`, so that the agent's
/// lines are not lost in hundreds of theirs; any other value, directives included, is used
/// as given; unset, `info`.
fn log_directives(rust_log: Option<&str>) -> String {
    match rust_log.map(str::trim) {
        None | Some("") => "info".to_owned(),
        Some(level @ ("debug" | "trace")) => format!("info,proxy={level},proxy_agent={level}"),
        Some(other) => other.to_owned(),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = tracing_subscriber::EnvFilter::try_new(log_directives(rust_log.as_deref()))
        .unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One JSON object per line, for log collectors.
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    if args.cleanup {
        let removed = proxy::cleanup::agent_datapath(&args.bpffs)?;
        tracing::info!("cleanup: {removed}");
        return Ok(());
    }
    if args.cleanup_kube_proxy {
        let removed = proxy::kube_proxy_cleanup::run()?;
        if removed.is_empty() {
            tracing::info!("cleanup of kube-proxy: nothing of kube-proxy's found");
        }
        for what in removed {
            tracing::info!("cleanup of kube-proxy: removed {what}");
        }
        return Ok(());
    }
    let source = match args.manifests {
        Some(path) => SourceConfig::Manifests(path),
        None => SourceConfig::Kubernetes {
            kubeconfig: args.kubeconfig,
            namespace: args.namespace,
            api_server: match (args.k8s_api_server, args.k8s_api_server_from) {
                (Some(address), _) => Some(ApiServer::Address(address)),
                (None, Some(path)) => Some(ApiServer::FromKubeconfig(path)),
                (None, None) => None,
            },
        },
    };
    let config = agent::Config {
        source,
        node_name: Some(match args.node_name {
            Some(name) => name,
            None => hostname()?,
        }),
        proxy_name: args.service_proxy_name,
        cgroup: args.cgroup,
        bpffs: args.bpffs,
        interfaces: args.interfaces,
        node_ip: args.node_ip,
        node_port_addresses: args.nodeport_addresses,
        destroy_tcp_to_removed_backends: args.destroy_tcp_to_removed_backends,
        masquerade_ports: args
            .masquerade_ports
            .unwrap_or(proxy_common::SNAT_PORT_MIN..=proxy_common::SNAT_PORT_MAX),
        tc_attach: args.tc_attach,
        xdp: args.xdp,
        xdp_interfaces: args.xdp_interfaces,
        metrics_bind: args.metrics_bind,
        healthz_bind: args.healthz_bind,
        probe_bind: args.probe_bind,
        owner: args.owner_daemonset,
        healthz_max_lag: Duration::from_secs(args.healthz_max_lag_secs),
        map_sizes: args.map_sizes,
        conntrack_gc_interval: Duration::from_secs(args.conntrack_gc_interval.max(1)),
        debounce: Duration::from_millis(20),
        min_sync_interval: Duration::from_millis(args.min_sync_interval_ms),
        resync_interval: Duration::from_secs(args.resync_interval.max(1)),
    };
    tokio::runtime::Runtime::new()?.block_on(agent::run(config))
}

#[cfg(test)]
mod tests {
    use super::log_directives;

    #[test]
    fn debug_and_trace_are_the_agents_own_and_other_filters_pass_through() {
        assert_eq!(log_directives(None), "info");
        assert_eq!(
            log_directives(Some("debug")),
            "info,proxy=debug,proxy_agent=debug"
        );
        assert_eq!(
            log_directives(Some("trace")),
            "info,proxy=trace,proxy_agent=trace"
        );
        assert_eq!(log_directives(Some("warn")), "warn");
        assert_eq!(log_directives(Some("debug,kube=trace")), "debug,kube=trace");
    }
}
