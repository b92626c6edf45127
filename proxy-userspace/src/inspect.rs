//! Read-only views of the pinned maps for `proxyctl`: services, one service's backends,
//! conntrack, map fill and the agent's status. They work while the agent is down.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{Array, HashMap as BpfHashMap, IterableMap as _, MapData, PerCpuArray};
use proxy_common::{
    AgentStatus, BACKEND_FLAG_LOCAL, CT_FLAG_PASS, CT_FLAG_SHARED, CT_FLAG_SNAT, CT_FORWARD,
    CT_KEY_CLIENT, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, Counters, CtEntry, CtEntry6, CtEntryOf,
    CtKey, CtKey6, CtKeyOf, DropReason, SCOPE_ALL, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_IF_EMPTY,
    ServiceInfo, ServiceValue, SlotKey, UNUSED_NOT_LOCAL, UnusedKey, maps,
};
use serde::Serialize;

use crate::{
    clock::{flow_clock_ns, unix_now},
    conntrack::Conntracks,
    desired::{Frontend, unused_reason},
    family::{Backend, ServiceKey, UnusedEndpoint, frontend_text, socket_text},
    link_target::LinkTarget,
    map_batch,
    maps::{Maps, decode_info, open},
    model::Protocol,
    model::family_name,
    reconcile::ServiceMeta,
};

pub fn protocol(proto: u8) -> &'static str {
    Protocol::from_ip_proto(proto).map_or("?", Protocol::name)
}

/// A frontend's map entry.
pub type FrontendEntry = (Frontend, ServiceKey, ServiceValue);

/// The service-side maps, each read whole in batches: the views below look entries up
/// here, not with a system call each (a scrape at 100,000 services made two million).
pub struct Tables {
    services: Vec<(ServiceKey, ServiceValue)>,
    // foldhash: our own keys, looked up hundreds of thousands of times per scrape.
    names: foldhash::HashMap<u32, ServiceInfo>,
    slots: foldhash::HashMap<SlotKey, u32>,
    backends: foldhash::HashMap<u32, Backend>,
    unused: foldhash::HashMap<UnusedKey, UnusedEndpoint>,
    /// Indexed by id.
    service_stats: Vec<Counters>,
    backend_stats: Vec<Counters>,
}

/// An array's values, in index order.
fn array_values(all: Vec<(u32, Counters)>) -> Vec<Counters> {
    let mut values = vec![Counters::default(); all.len()];
    for (i, c) in all {
        if let Some(slot) = values.get_mut(i as usize) {
            *slot = c;
        }
    }
    values
}

impl Tables {
    pub fn read(maps: &Maps) -> anyhow::Result<Self> {
        let read = |name: &str| format!("reading map {name}");
        Ok(Self {
            services: maps.read_services()?,
            names: map_batch::read_all(&maps.names)
                .with_context(|| read(maps::SERVICE_NAMES))?
                .into_iter()
                .collect(),
            slots: map_batch::read_all(&maps.slots)
                .with_context(|| read(maps::BACKEND_SLOTS))?
                .into_iter()
                .collect(),
            backends: maps.read_backends()?.into_iter().collect(),
            unused: maps.read_unused()?.into_iter().collect(),
            service_stats: array_values(
                map_batch::read_all(&maps.service_stats)
                    .with_context(|| read(maps::SERVICE_STATS))?,
            ),
            backend_stats: array_values(
                map_batch::read_all(&maps.backend_stats)
                    .with_context(|| read(maps::BACKEND_STATS))?,
            ),
        })
    }

    fn service_counters(&self, id: u32) -> Counters {
        self.service_stats
            .get(id as usize)
            .copied()
            .unwrap_or_default()
    }

    /// The backends of a frontend's entry, in slot order: (backend id, backend).
    fn slot_backends(
        &self,
        service: &ServiceRow,
        value: &ServiceValue,
    ) -> anyhow::Result<Vec<(u32, Backend)>> {
        (1..=value.count)
            .map(|slot| {
                let key = SlotKey {
                    service_id: value.id,
                    generation: value.generation,
                    pad: 0,
                    slot,
                };
                let id = *self.slots.get(&key).with_context(|| {
                    format!("slot {slot} of {} is not in the map", service.full_name())
                })?;
                let backend = *self
                    .backends
                    .get(&id)
                    .with_context(|| format!("backend {id} is not in the map"))?;
                Ok((id, backend))
            })
            .collect()
    }

    fn backend_counters(&self, id: u32) -> Counters {
        self.backend_stats
            .get(id as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// One service port with all its frontends: cluster IP, node port, external and
/// load-balancer IPs.
#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    #[serde(rename = "type")]
    pub service_type: &'static str,
    /// IPv4 or IPv6: a dual-stack service port has a row per family.
    pub ip_family: &'static str,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    pub node_port: Option<u16>,
    /// External IPs, then load-balancer ingress IPs.
    pub external_addresses: Vec<IpAddr>,
    pub ready_backends: u16,
    pub terminating_backends: u16,
    pub session_affinity_timeout_seconds: Option<u32>,
    pub internal_traffic_policy: &'static str,
    pub external_traffic_policy: &'static str,
    /// Summed over the frontends.
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The map entries of its frontends, cluster IP first.
    #[serde(skip)]
    pub frontends: Vec<FrontendEntry>,
}

impl ServiceRow {
    pub fn full_name(&self) -> String {
        match self.port_name.as_str() {
            "" => format!("{}/{}", self.namespace, self.name),
            port => format!("{}/{}:{port}", self.namespace, self.name),
        }
    }

    /// The service ids (rev-NAT ids) of its frontends.
    pub fn ids(&self) -> Vec<u32> {
        self.frontends.iter().map(|(_, _, v)| v.id).collect()
    }
}

fn policy(local: bool) -> &'static str {
    if local { "Local" } else { "Cluster" }
}

/// A row from the frontends of one service port (non-empty, cluster IP first if any).
fn service_row(
    tables: &Tables,
    meta: &ServiceMeta,
    frontends: Vec<FrontendEntry>,
) -> anyhow::Result<ServiceRow> {
    let (namespace, rest) = meta.name.split_once('/').unwrap_or(("", &meta.name));
    let (name, port_name) = rest.split_once(':').unwrap_or((rest, ""));
    let (_, key, value) = frontends[0];
    let mut counters = Counters::default();
    for (_, _, v) in &frontends {
        let c = tables.service_counters(v.id);
        counters.conns += c.conns;
        counters.packets += c.packets;
        counters.bytes += c.bytes;
    }
    let (ready, terminating) = if meta.terminating {
        (0, value.count)
    } else {
        (value.count, 0)
    };
    Ok(ServiceRow {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        port_name: port_name.to_owned(),
        service_type: meta.service_type.name(),
        ip_family: family_name(key.addr),
        address: key.addr,
        port: key.port,
        protocol: protocol(key.proto),
        node_port: frontends
            .iter()
            .find(|(f, _, _)| *f == Frontend::NodePort)
            .map(|(_, k, _)| k.port),
        external_addresses: frontends
            .iter()
            .filter(|(f, k, _)| {
                matches!(f, Frontend::ExternalIp | Frontend::LoadBalancer) && k.scope == SCOPE_ALL
            })
            .map(|(_, k, _)| k.addr)
            .collect(),
        ready_backends: ready,
        terminating_backends: terminating,
        session_affinity_timeout_seconds: (value.flags & SVC_FLAG_AFFINITY != 0)
            .then_some(value.affinity_timeout_secs),
        internal_traffic_policy: policy(meta.internal_local),
        external_traffic_policy: policy(meta.external_local),
        connections: counters.conns,
        packets: counters.packets,
        bytes: counters.bytes,
        frontends,
    })
}

/// Every service port, a row per family, sorted by namespace, name, port and family.
pub fn services(tables: &Tables) -> anyhow::Result<Vec<ServiceRow>> {
    type Group = (ServiceMeta, Vec<FrontendEntry>);
    let mut by_port: BTreeMap<(String, bool), Group> = BTreeMap::new();
    for (key, value) in &tables.services {
        let meta = tables.names.get(&value.id).map_or_else(
            || ServiceMeta {
                name: format!("<id {}>", value.id),
                ..ServiceMeta::default()
            },
            decode_info,
        );
        let group = by_port
            .entry((meta.name.clone(), key.addr.is_ipv6()))
            .or_insert_with(|| (meta.clone(), Vec::new()));
        if meta.frontend == Frontend::ClusterIp {
            group.0 = meta.clone();
        }
        group.1.push((meta.frontend, *key, *value));
    }
    let mut rows = Vec::new();
    for (_, (meta, mut frontends)) in by_port {
        frontends.sort_by_key(|(f, k, _)| (f.code(), *k));
        rows.push(service_row(tables, &meta, frontends)?);
    }
    rows.sort_by(|a, b| {
        (&a.namespace, &a.name, a.port, a.protocol, a.ip_family).cmp(&(
            &b.namespace,
            &b.name,
            b.port,
            b.protocol,
            b.ip_family,
        ))
    });
    Ok(rows)
}

/// The service ports of `namespace/name`.
/// The service ports `query` names, in any form `proxyctl service list` prints.
pub fn service_ports(tables: &Tables, query: &str) -> anyhow::Result<Vec<ServiceRow>> {
    let query = ServiceQuery::parse(query);
    Ok(services(tables)?
        .into_iter()
        .filter(|r| query.matches(r))
        .collect())
}

/// How a service port is named: each form `proxyctl service list` prints.
#[derive(Debug, PartialEq)]
pub enum ServiceQuery {
    /// `namespace/name`: all its ports.
    Service(String),
    /// `namespace/name:port`, a named port.
    Port(String),
    /// `ADDRESS:PORT` or `ADDRESS:PORT/PROTOCOL` (`[ADDRESS]:PORT` for IPv6): the port with
    /// that frontend — cluster, external or load-balancer IP, or `0.0.0.0:NODEPORT`.
    Frontend {
        address: SocketAddr,
        protocol: Option<String>,
    },
}

impl ServiceQuery {
    pub fn parse(text: &str) -> Self {
        let (address, protocol) = match text.split_once('/') {
            Some((address, protocol)) => (address, Some(protocol.to_uppercase())),
            None => (text, None),
        };
        if let Ok(address) = address.parse() {
            return Self::Frontend { address, protocol };
        }
        if text.contains(':') {
            Self::Port(text.to_owned())
        } else {
            Self::Service(text.to_owned())
        }
    }

    pub fn matches(&self, row: &ServiceRow) -> bool {
        match self {
            Self::Service(name) => *name == format!("{}/{}", row.namespace, row.name),
            Self::Port(name) => *name == row.full_name(),
            Self::Frontend { address, protocol } => row.frontends.iter().any(|(_, key, _)| {
                key.addr == address.ip()
                    && key.port == address.port()
                    && protocol
                        .as_deref()
                        .is_none_or(|p| p == self::protocol(key.proto))
            }),
        }
    }
}

/// Every forward entry of the conntrack map of family `A`.
fn forward_entries<A>(
    map: &BpfHashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>,
    name: &str,
) -> anyhow::Result<Vec<(CtKeyOf<A>, CtEntryOf<A>)>>
where
    CtKeyOf<A>: aya::Pod,
    CtEntryOf<A>: aya::Pod,
{
    let mut forward = Vec::new();
    map_batch::for_each_chunk(map, |keys, entries| {
        let chunk = keys
            .iter()
            .zip(entries)
            .filter(|(_, e)| e.direction == CT_FORWARD);
        forward.extend(chunk.map(|(k, e)| (*k, *e)));
    })
    .with_context(|| format!("reading map {name}"))?;
    Ok(forward)
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    /// Whether the endpoint runs on this node (its `nodeName` is the agent's node).
    pub node_local: bool,
    pub state: &'static str,
    /// Open flows through the tc path (socket-balanced connections have no conntrack entry).
    pub active_connections: u64,
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Share of the new connections of this service port's backends, in percent.
    pub connection_share_percent: f64,
}

/// Open tc-path flows by (service-port id, backend id), from one pass over conntrack.
pub struct ActiveFlows(HashMap<(u32, u32), u64>);

impl ActiveFlows {
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let conntrack = Conntracks::open(dir)?;
        let mut active = HashMap::new();
        let v4 = forward_entries(&conntrack.v4, maps::CONNTRACK)?;
        let v6 = forward_entries(&conntrack.v6, maps::CONNTRACK6)?;
        let ids = v4
            .iter()
            .map(|(_, e)| (e.state, e.flags, e.rev_nat_id, e.backend_id));
        let ids = ids.chain(
            v6.iter()
                .map(|(_, e)| (e.state, e.flags, e.rev_nat_id, e.backend_id)),
        );
        for (state, flags, service_id, backend_id) in ids {
            if state != CT_STATE_CLOSING && flags & CT_FLAG_PASS == 0 {
                *active.entry((service_id, backend_id)).or_default() += 1;
            }
        }
        Ok(Self(active))
    }

    fn of(&self, service: &ServiceRow, backend_id: u32) -> u64 {
        service
            .ids()
            .iter()
            .filter_map(|id| self.0.get(&(*id, backend_id)))
            .sum()
    }
}

/// The backends of one service port, of all its frontends (an externalTrafficPolicy: Local
/// frontend has only the node-local ones), in slot order, with their counters.
pub fn backend_counters(
    tables: &Tables,
    service: &ServiceRow,
) -> anyhow::Result<Vec<(u32, Backend, Counters)>> {
    let mut rows: Vec<(u32, Backend, Counters)> = Vec::new();
    for (_, _, value) in &service.frontends {
        for (id, backend) in tables.slot_backends(service, value)? {
            if !rows.iter().any(|(seen, _, _)| *seen == id) {
                rows.push((id, backend, tables.backend_counters(id)));
            }
        }
    }
    Ok(rows)
}

pub fn backends(
    tables: &Tables,
    active: &ActiveFlows,
    service: &ServiceRow,
) -> anyhow::Result<Vec<BackendRow>> {
    let rows = backend_counters(tables, service)?;
    let total: u64 = rows.iter().map(|(_, _, c)| c.conns).sum();
    let state = if service.terminating_backends > 0 {
        "terminating"
    } else {
        "ready"
    };
    Ok(rows
        .into_iter()
        .map(|(id, b, c)| BackendRow {
            address: b.addr,
            port: b.port,
            protocol: protocol(b.proto),
            node_local: b.flags & BACKEND_FLAG_LOCAL != 0,
            state,
            active_connections: active.of(service, id),
            connections: c.conns,
            packets: c.packets,
            bytes: c.bytes,
            connection_share_percent: (c.conns * 1000)
                .checked_div(total)
                .map_or(0.0, |permille| permille as f64 / 10.0),
        })
        .collect())
}

/// One frontend of a service port as its clients meet it: what happens to a new
/// connection there, and the backends it is balanced over.
#[derive(Debug, Serialize)]
pub struct FrontendRow {
    /// ClusterIP, NodePort, ExternalIP, LoadBalancerIP.
    pub frontend: &'static str,
    /// `ADDRESS:PORT/PROTOCOL`; a node port as `0.0.0.0:PORT/PROTOCOL` (every node address).
    pub address: String,
    /// "all", or "in-cluster": what pods and nodes get at an external address whose
    /// `externalTrafficPolicy: Local` entry serves outside clients only.
    pub clients: &'static str,
    /// "balanced", "dropped" (the client times out) or "rejected" (refused at once).
    pub new_connections: &'static str,
    /// Why new connections are dropped or rejected (`proxyctl monitor`'s reasons).
    pub reason: Option<&'static str>,
    /// The backends are the serving-but-terminating fallback: no endpoint is ready.
    pub terminating_fallback: bool,
    /// `ADDRESS:PORT` of each backend, in slot order.
    pub backends: Vec<String>,
    /// The port's other endpoints, and why this frontend does not use them.
    pub unused: Vec<UnusedRow>,
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct UnusedRow {
    /// `ADDRESS:PORT`.
    pub endpoint: String,
    /// not_ready, terminating (used only when none is ready), not_local (a `Local` traffic
    /// policy), other_zone, other_node (topology hints).
    pub reason: &'static str,
}

/// The endpoints the cluster IP of `service` lists as unused (`ADDRESS:PORT`, reason).
fn unused_by_cluster_ip(tables: &Tables, service: &ServiceRow) -> Vec<(String, &'static str)> {
    let Some((_, _, cluster_ip)) = service
        .frontends
        .iter()
        .find(|(f, k, _)| *f == Frontend::ClusterIp && k.scope == SCOPE_ALL)
    else {
        return Vec::new();
    };
    (1..)
        .map_while(|index| {
            let key = UnusedKey {
                service_id: cluster_ip.id,
                index,
                pad: 0,
            };
            let u = tables.unused.get(&key)?;
            let endpoint = socket_text(u.addr, u.port);
            Some((endpoint, unused_reason(u.reason)))
        })
        .collect()
}

/// Each frontend of `service`, cluster IP first. Endpoints a frontend does not use are the
/// cluster IP's list, plus those the cluster IP uses and it does not: a `Local` external
/// traffic policy's other nodes.
pub fn frontends(tables: &Tables, service: &ServiceRow) -> anyhow::Result<Vec<FrontendRow>> {
    let listed = unused_by_cluster_ip(tables, service);
    let mut rows: Vec<FrontendRow> = service
        .frontends
        .iter()
        .map(|(frontend, key, value)| {
            let (new_connections, reason) = match value.count {
                0 if value.flags & SVC_FLAG_DROP_IF_EMPTY != 0 => {
                    ("dropped", Some(DropReason::NoLocalEndpoint.name()))
                }
                0 => ("rejected", Some(DropReason::NoEndpoints.name())),
                _ => ("balanced", None),
            };
            let backends: Vec<String> = tables
                .slot_backends(service, value)?
                .iter()
                .map(|(_, b)| socket_text(b.addr, b.port))
                .collect();
            let counters = tables.service_counters(value.id);
            Ok(FrontendRow {
                frontend: frontend.name(),
                address: frontend_text(key),
                clients: if key.scope == SCOPE_ALL {
                    "all"
                } else {
                    "in-cluster"
                },
                new_connections,
                reason,
                terminating_fallback: tables
                    .names
                    .get(&value.id)
                    .is_some_and(|info| info.terminating != 0),
                unused: listed
                    .iter()
                    .filter(|(e, _)| !backends.contains(e))
                    .map(|(endpoint, reason)| UnusedRow {
                        endpoint: endpoint.clone(),
                        reason,
                    })
                    .collect(),
                backends,
                connections: counters.conns,
                packets: counters.packets,
                bytes: counters.bytes,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let cluster_wide: Vec<String> = rows
        .iter()
        .find(|r| r.frontend == Frontend::ClusterIp.name() && r.clients == "all")
        .map_or_else(Vec::new, |r| r.backends.clone());
    for row in &mut rows {
        for endpoint in cluster_wide.iter().filter(|e| !row.backends.contains(e)) {
            row.unused.push(UnusedRow {
                endpoint: endpoint.clone(),
                reason: unused_reason(UNUSED_NOT_LOCAL),
            });
        }
    }
    Ok(rows)
}

#[derive(Clone, Debug, Serialize)]
pub struct FlowRow {
    pub protocol: &'static str,
    pub client: String,
    pub service_address: String,
    pub backend: String,
    /// The address and port the backend sees when they are not the client's: the node's,
    /// for a masqueraded flow, or the client's address with another port, for a flow moved
    /// off a source port that another flow to the same backend held.
    pub masqueraded_as: Option<String>,
    pub service: String,
    pub state: &'static str,
    pub idle_seconds: u64,
}

fn state_name(state: u8) -> &'static str {
    match state {
        CT_STATE_ESTABLISHED => "established",
        CT_STATE_CLOSING => "closing",
        _ => "new",
    }
}

/// The keys of a flow's entries in its family's map: its forward entry's, its reply
/// entry's if it has one, and whether the forward entry is a client key that other flows
/// need (`CT_FLAG_SHARED`: removing the flow leaves an anchor there).
#[derive(Clone, Copy, Debug)]
pub enum FlowKeys {
    V4(CtKey, Option<CtKey>, bool),
    V6(CtKey6, Option<CtKey6>, bool),
}

/// A flow's forward entry with its addresses as `IpAddr`s, and its entries' keys.
fn as_flow<A: Copy + Default + Into<IpAddr>>(
    key: CtKeyOf<A>,
    entry: CtEntryOf<A>,
    keys: fn(CtKeyOf<A>, Option<CtKeyOf<A>>, bool) -> FlowKeys,
) -> (CtKeyOf<IpAddr>, CtEntryOf<IpAddr>, FlowKeys) {
    let shared = key.kind == CT_KEY_CLIENT && entry.flags & CT_FLAG_SHARED != 0;
    let flow_keys = keys(key, key.peer(&entry), shared);
    let key = CtKeyOf {
        src: key.src.into(),
        dst: key.dst.into(),
        sport: key.sport,
        dport: key.dport,
        proto: key.proto,
        kind: key.kind,
        pad: 0,
    };
    let entry = CtEntryOf {
        nat_addr: entry.nat_addr.into(),
        peer_addr: entry.peer_addr.into(),
        src_addr: entry.src_addr.into(),
        nat_port: entry.nat_port,
        direction: entry.direction,
        state: entry.state,
        reply_state: entry.reply_state,
        rev_nat_id: entry.rev_nat_id,
        backend_id: entry.backend_id,
        peer_port: entry.peer_port,
        src_port: entry.src_port,
        flags: entry.flags,
        pad: 0,
        last_seen_ns: entry.last_seen_ns,
    };
    (key, entry, flow_keys)
}

/// Flows in our conntrack maps (one row per flow: its forward entry), of one service's
/// ports if `ids` is given.
pub fn flows(
    maps: &Maps,
    dir: &Path,
    ids: Option<&[u32]>,
) -> anyhow::Result<Vec<(FlowKeys, FlowRow)>> {
    let conntrack = Conntracks::open(dir)?;
    let now = flow_clock_ns();
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut rows = Vec::new();
    let v4 = forward_entries(&conntrack.v4, maps::CONNTRACK)?
        .into_iter()
        .map(|(k, e)| as_flow(k, e, FlowKeys::V4));
    let v6 = forward_entries(&conntrack.v6, maps::CONNTRACK6)?
        .into_iter()
        .map(|(k, e)| as_flow(k, e, FlowKeys::V6));
    for (key, entry, keys) in v4.chain(v6) {
        if ids.is_some_and(|ids| !ids.contains(&entry.rev_nat_id)) {
            continue;
        }
        let service = if entry.flags & CT_FLAG_PASS != 0 {
            "<left to the kernel's NAT>".to_owned()
        } else {
            names
                .entry(entry.rev_nat_id)
                .or_insert_with(|| {
                    maps.names
                        .get(&entry.rev_nat_id, 0)
                        .map(|n| decode_info(&n).name)
                        .unwrap_or_else(|_| "<removed>".into())
                })
                .clone()
        };
        let row = FlowRow {
            protocol: protocol(key.proto),
            client: socket_text(key.src, key.sport),
            service_address: socket_text(entry.peer_addr, entry.peer_port),
            backend: socket_text(entry.nat_addr, entry.nat_port),
            masqueraded_as: (entry.flags & CT_FLAG_SNAT != 0
                || (entry.src_addr, entry.src_port) != (key.src, key.sport))
                .then(|| socket_text(entry.src_addr, entry.src_port)),
            service,
            state: state_name(entry.state),
            idle_seconds: now.saturating_sub(entry.last_seen_ns) / 1_000_000_000,
        };
        rows.push((keys, row));
    }
    rows.sort_by(|a, b| (&a.1.service, &a.1.client).cmp(&(&b.1.service, &b.1.client)));
    Ok(rows)
}

/// Deletes flows (every entry of each); returns how many flows. A client key that other
/// flows need is left as an anchor, as the datapath leaves it.
pub fn flush(maps: &Maps, dir: &Path, ids: Option<&[u32]>) -> anyhow::Result<usize> {
    let flows = flows(maps, dir, ids)?;
    let mut conntrack = Conntracks::open(dir)?;
    let account = crate::ct_account::CtAccount::open(dir)?;
    let mut removed = 0;
    for (keys, _) in &flows {
        // Gone already (expired, evicted) is fine.
        removed += match keys {
            FlowKeys::V4(key, reply, shared) => remove_flow(&mut conntrack.v4, key, reply, *shared),
            FlowKeys::V6(key, reply, shared) => remove_flow(&mut conntrack.v6, key, reply, *shared),
        };
    }
    // Deleted by us, not evicted.
    account.add_deleted(removed);
    Ok(flows.len())
}

/// Removes a flow's entries from `map`: how many were removed.
fn remove_flow<A: Copy + Default>(
    map: &mut BpfHashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>,
    key: &CtKeyOf<A>,
    reply: &Option<CtKeyOf<A>>,
    shared: bool,
) -> u64
where
    CtKeyOf<A>: aya::Pod,
    CtEntryOf<A>: aya::Pod,
{
    let reply = reply.is_some_and(|reply| map.remove(&reply).is_ok());
    u64::from(reply) + u64::from(crate::conntrack::retire(map, key, shared))
}

#[derive(Debug, Serialize)]
pub struct MapRow {
    pub name: &'static str,
    /// `None` for arrays, which always hold all their entries.
    pub entries: Option<u64>,
    pub capacity: u32,
    pub fill_percent: Option<f64>,
    /// Kernel memory the map is charged for now (fdinfo's `memlock`).
    pub memory_bytes: u64,
}

/// The kernel memory `map` is charged for (`memlock` in its fdinfo).
pub fn kernel_memory(map: &MapData) -> anyhow::Result<u64> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(map.fd()));
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .context("reading a map's fdinfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .context("no memlock in a map's fdinfo")?
        .trim()
        .parse()
        .context("parsing a map's memlock")
}

fn count<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> anyhow::Result<u64> {
    let map: BpfHashMap<MapData, K, V> = open(dir, name)?;
    map_batch::count(&map).with_context(|| format!("counting the entries of map {name}"))
}

/// Entries, capacity and fill of every map; the service-side maps counted from `tables`
/// if given (a scrape read them already), else read.
pub fn map_fill(dir: &Path, tables: Option<&Tables>) -> anyhow::Result<Vec<MapRow>> {
    let mut rows = Vec::new();
    for name in maps::ALL {
        let path = dir.join(name);
        let map = MapData::from_pin(&path).with_context(|| {
            format!(
                "reading map {} (is proxy-agent running with --bpffs {}?)",
                path.display(),
                dir.display()
            )
        })?;
        let info = map
            .info()
            .with_context(|| format!("reading map {}", path.display()))?;
        let of_family = |addrs: &mut dyn Iterator<Item = IpAddr>, v6: bool| {
            addrs.filter(|a| a.is_ipv6() == v6).count() as u64
        };
        let entries = match (name, tables) {
            (maps::SERVICES | maps::SERVICES6, Some(t)) => Some(of_family(
                &mut t.services.iter().map(|(k, _)| k.addr),
                name == maps::SERVICES6,
            )),
            (maps::BACKEND_SLOTS, Some(t)) => Some(t.slots.len() as u64),
            (maps::BACKENDS | maps::BACKENDS6, Some(t)) => Some(of_family(
                &mut t.backends.values().map(|b| b.addr),
                name == maps::BACKENDS6,
            )),
            (maps::SERVICE_NAMES, Some(t)) => Some(t.names.len() as u64),
            (maps::SERVICES, None) => {
                Some(count::<proxy_common::ServiceKey, ServiceValue>(dir, name)?)
            }
            (maps::SERVICES6, None) => {
                Some(count::<proxy_common::ServiceKey6, ServiceValue>(dir, name)?)
            }
            (maps::BACKEND_SLOTS, None) => Some(count::<SlotKey, u32>(dir, name)?),
            (maps::BACKENDS, None) => Some(count::<u32, proxy_common::Backend>(dir, name)?),
            (maps::BACKENDS6, None) => Some(count::<u32, proxy_common::Backend6>(dir, name)?),
            (maps::SERVICE_NAMES, None) => Some(count::<u32, ServiceInfo>(dir, name)?),
            (maps::CONNTRACK, _) => Some(count::<CtKey, CtEntry>(dir, name)?),
            (maps::CONNTRACK6, _) => Some(count::<CtKey6, CtEntry6>(dir, name)?),
            (maps::AFFINITY, _) => Some(count::<
                proxy_common::AffinityKey,
                proxy_common::AffinityValue,
            >(dir, name)?),
            (maps::SOCK_REV_NAT, _) => {
                Some(count::<proxy_common::SockRevKey, proxy_common::SockRevValue>(dir, name)?)
            }
            (maps::SOCK_REV_NAT6, _) => Some(count::<
                proxy_common::SockRevKey6,
                proxy_common::SockRevValue6,
            >(dir, name)?),
            _ => None,
        };
        let capacity = info.max_entries();
        let fill_percent = entries.map(|e| (e * 1000 / u64::from(capacity.max(1))) as f64 / 10.0);
        rows.push(MapRow {
            name,
            entries,
            capacity,
            fill_percent,
            memory_bytes: kernel_memory(&map)?,
        });
    }
    Ok(rows)
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub agent_pid: u32,
    /// The process exists and its heartbeat is recent.
    pub agent_alive: bool,
    pub started_seconds_ago: Option<u64>,
    pub last_sync_seconds_ago: Option<u64>,
    pub heartbeat_seconds_ago: Option<u64>,
    pub service_ports: u32,
    pub failed_service_ports: u32,
    /// Pinned attachments, with what the kernel says they are attached to.
    pub attachments: Vec<PinnedAttachment>,
    /// Packets the datapath dropped, by reason (`DropReason`).
    pub drops: BTreeMap<&'static str, u64>,
}

/// Packets the datapath dropped since its maps were created, by reason. A reason newer
/// than a still-pinned older map has no slot there and reads as 0.
pub fn drops(dir: &Path) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let map: PerCpuArray<MapData, u64> = open(dir, maps::DROPS)?;
    let slots = map.map().info()?.max_entries();
    DropReason::ALL
        .iter()
        .map(|reason| {
            let index = *reason as u32;
            let packets = if index < slots {
                let per_cpu = map
                    .get(&index, 0)
                    .with_context(|| format!("reading drops of reason {}", reason.name()))?;
                per_cpu.iter().sum()
            } else {
                0
            };
            Ok((reason.name(), packets))
        })
        .collect()
}

#[derive(Debug, serde::Serialize)]
pub struct PinnedAttachment {
    /// "program@target".
    pub pin: String,
    /// "cgroup ID", "interface INDEX", "DETACHED" (the pin outlived its attachment) or
    /// "unknown".
    pub attached_to: String,
}

pub fn status(dir: &Path) -> anyhow::Result<Status> {
    let map: Array<MapData, AgentStatus> = open(dir, maps::AGENT_STATUS)?;
    let s = map.get(&0, 0).context("reading the agent status")?;
    let now = unix_now() as u64;
    let ago = |t: u64| (t > 0).then(|| now.saturating_sub(t));
    let process_exists = s.pid != 0 && PathBuf::from(format!("/proc/{}", s.pid)).exists();
    let fresh = ago(s.heartbeat).is_some_and(|a| a <= 3 * u64::from(s.heartbeat_interval.max(1)));
    let links = dir.join("links");
    let mut attachments: Vec<PinnedAttachment> = std::fs::read_dir(&links)
        .with_context(|| format!("listing {}", links.display()))?
        .filter_map(|e| {
            let entry = e.ok()?;
            let attached_to = match crate::link_target::of_pin(&entry.path()) {
                Ok(LinkTarget::Cgroup(id)) => format!("cgroup {id}"),
                Ok(LinkTarget::Interface(index)) => format!("interface {index}"),
                Ok(LinkTarget::Detached) => "DETACHED".to_owned(),
                Ok(LinkTarget::Other) | Err(_) => "unknown".to_owned(),
            };
            Some(PinnedAttachment {
                pin: entry.file_name().into_string().ok()?,
                attached_to,
            })
        })
        .collect();
    attachments.sort_by(|a, b| a.pin.cmp(&b.pin));
    Ok(Status {
        agent_pid: s.pid,
        agent_alive: process_exists && fresh,
        started_seconds_ago: ago(s.started),
        last_sync_seconds_ago: ago(s.last_sync),
        heartbeat_seconds_ago: ago(s.heartbeat),
        service_ports: s.service_ports,
        failed_service_ports: s.failed,
        attachments,
        drops: drops(dir)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_printed_name_is_a_query() {
        let key = |addr: &str, port| ServiceKey {
            addr: addr.parse().unwrap(),
            port,
            proto: 6,
            scope: 0,
        };
        let value = ServiceValue::default();
        let row = |frontends: Vec<FrontendEntry>| ServiceRow {
            namespace: "shop".into(),
            name: "web".into(),
            port_name: "http".into(),
            service_type: "LoadBalancer",
            ip_family: family_name(frontends[0].1.addr),
            address: frontends[0].1.addr,
            port: 80,
            protocol: "TCP",
            node_port: Some(30080),
            external_addresses: vec![frontends[2].1.addr],
            ready_backends: 0,
            terminating_backends: 0,
            session_affinity_timeout_seconds: None,
            internal_traffic_policy: "Cluster",
            external_traffic_policy: "Cluster",
            connections: 0,
            packets: 0,
            bytes: 0,
            frontends,
        };
        let six = row(vec![
            (Frontend::ClusterIp, key("fd00::10", 80), value),
            (Frontend::NodePort, key("::", 30080), value),
            (Frontend::LoadBalancer, key("2001:db8::7", 80), value),
        ]);
        for query in ["[fd00::10]:80/TCP", "[2001:db8::7]:80", "shop/web:http"] {
            assert!(ServiceQuery::parse(query).matches(&six), "{query}");
        }
        let row = row(vec![
            (Frontend::ClusterIp, key("10.96.0.10", 80), value),
            (Frontend::NodePort, key("0.0.0.0", 30080), value),
            (Frontend::LoadBalancer, key("192.0.2.7", 80), value),
        ]);
        assert!(!ServiceQuery::parse("[fd00::10]:80").matches(&row));
        let accepted = [
            "shop/web",
            "shop/web:http",
            "10.96.0.10:80",
            "10.96.0.10:80/TCP",
            "10.96.0.10:80/tcp",
            "192.0.2.7:80",
            "0.0.0.0:30080",
        ];
        for query in accepted {
            assert!(ServiceQuery::parse(query).matches(&row), "{query}");
        }
        let refused = [
            "shop/webx",
            "shop/web:https",
            "10.96.0.10:81",
            "10.96.0.10:80/UDP",
            "10.96.0.11:80",
        ];
        for query in refused {
            assert!(!ServiceQuery::parse(query).matches(&row), "{query}");
        }
        assert_eq!(
            ServiceQuery::parse("shop/web:http"),
            ServiceQuery::Port("shop/web:http".into())
        );
    }
}
