//! The Kubernetes source: watches Services, EndpointSlices and this node with kube-rs
//! watchers (list, then watch; re-list on 410 Gone; exponential back-off on errors) and
//! turns their events into `SourceEvent`s.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc;

use crate::{
    desired::Topology,
    model::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL},
    rest_client_metrics::RestClientMetrics,
    source::SourceEvent,
    store::{Kind, Object, name_of},
};

const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The cluster autoscaler's taint on a node it is about to delete.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// kube-proxy's `nodeEligible`: a node being deleted, or about to be by the cluster
/// autoscaler, tells load balancers to send it no more traffic.
pub fn eligible(node: &Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    node.metadata.deletion_timestamp.is_none() && !tainted
}

/// Where the API server is, when it is not where the configuration says: in a pod the
/// in-cluster configuration names the `kubernetes` Service's ClusterIP, which nothing serves
/// on a node whose service proxy is this agent before it has programmed it (a new or
/// rebooted node once kube-proxy is gone).
#[derive(Clone, Debug)]
pub enum ApiServer {
    /// `HOST:PORT` or a URL.
    Address(String),
    /// The server of a kubeconfig's current context, e.g. the kubelet's
    /// `/etc/kubernetes/kubelet.conf`; credentials still come from the configuration.
    FromKubeconfig(PathBuf),
}

impl ApiServer {
    fn url(&self) -> anyhow::Result<http::Uri> {
        let text = match self {
            ApiServer::Address(address) => address.clone(),
            ApiServer::FromKubeconfig(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                let context = kubeconfig.current_context.as_deref();
                let cluster = kubeconfig
                    .contexts
                    .iter()
                    .find(|c| Some(c.name.as_str()) == context)
                    .and_then(|c| c.context.as_ref())
                    .map(|c| c.cluster.clone());
                kubeconfig
                    .clusters
                    .iter()
                    .find(|c| cluster.is_none() || Some(&c.name) == cluster.as_ref())
                    .and_then(|c| c.cluster.as_ref()?.server.clone())
                    .with_context(|| {
                        format!(
                            "kubeconfig {} names no server for its current context",
                            path.display()
                        )
                    })?
            }
        };
        let url = if text.contains("://") {
            text.clone()
        } else {
            format!("https://{text}")
        };
        url.parse()
            .with_context(|| format!("API server address {text:?} is not HOST:PORT or a URL"))
    }
}

/// A client from `kubeconfig`, else `KUBECONFIG`/`~/.kube/config`, else the in-cluster
/// service account, talking to `api_server` if given, its requests counted in `metrics`;
/// and the URL it talks to.
pub async fn client(
    kubeconfig: Option<&Path>,
    api_server: Option<&ApiServer>,
    metrics: &RestClientMetrics,
) -> anyhow::Result<(Client, String)> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "finding a Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster); \
             pass --kubeconfig, or --manifests to run without an API server",
        )?,
    };
    if let Some(server) = api_server {
        config.cluster_url = server.url()?;
    }
    let url = config.cluster_url.to_string();
    let host = config
        .cluster_url
        .authority()
        .map_or_else(String::new, ToString::to_string);
    let client = kube::client::ClientBuilder::try_from(config)
        .with_context(|| format!("creating the Kubernetes client for {url}"))?
        .with_layer(&metrics.layer(host))
        .build();
    Ok((client, url))
}

pub struct Scope {
    /// The API server's URL, for messages.
    pub server: String,
    /// Watch one namespace only (`None`: all).
    pub namespace: Option<String>,
    /// `service.kubernetes.io/service-proxy-name` this proxy serves.
    pub proxy_name: Option<String>,
    /// This node, for node-local endpoints and the zone of topology hints.
    pub node_name: Option<String>,
}

/// What one watcher saw, tagged with its kind.
/// Boxed: the events are hundreds of bytes and the variants differ a lot in size.
enum Seen {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn stream<K>(
    api: Api<K>,
    config: watcher::Config,
    tag: fn(Box<watcher::Event<K>>) -> Seen,
) -> BoxStream<'static, Result<Seen, watcher::Error>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    watcher(api, config)
        .default_backoff()
        .map(move |r| r.map(|e| tag(Box::new(e))))
        .boxed()
}

/// This node's topology from its Node object (`None`: there is none).
pub fn topology(node_name: &str, node: Option<&Node>) -> Topology {
    Topology {
        node_name: Some(node_name.to_owned()),
        zone: node.and_then(|n| n.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned()),
    }
}

/// Buffers a kind's re-list until it is complete, then sends it as one `Replace`.
struct Relist<T> {
    kind: Kind,
    buffer: Vec<T>,
}

impl<T> Relist<T> {
    fn handle(&mut self, event: watcher::Event<T>, wrap: fn(T) -> Object) -> Option<SourceEvent> {
        match event {
            watcher::Event::Init => {
                self.buffer.clear();
                None
            }
            watcher::Event::InitApply(o) => {
                self.buffer.push(o);
                None
            }
            watcher::Event::InitDone => {
                let objects = self.buffer.drain(..).map(wrap).collect();
                Some(SourceEvent::Replace {
                    kinds: vec![self.kind],
                    objects,
                    rejections: Vec::new(),
                })
            }
            watcher::Event::Apply(o) => Some(SourceEvent::Apply(wrap(o))),
            watcher::Event::Delete(o) => {
                let object = wrap(o);
                Some(SourceEvent::Delete(self.kind, object.name()))
            }
        }
    }
}

/// How often the API server's reachability is probed, and how long a probe may take.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// The watch streams of the three kinds, merged.
fn watch_all(
    client: &Client,
    scope: &Scope,
) -> futures::stream::SelectAll<BoxStream<'static, Result<Seen, watcher::Error>>> {
    // Server-side filtering as kube-proxy does; the model checks the same labels again.
    let services_selector = match &scope.proxy_name {
        Some(name) => format!("{SERVICE_PROXY_NAME_LABEL}={name},!{HEADLESS_LABEL}"),
        None => format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"),
    };
    let ns = scope.namespace.as_deref();
    let mut streams = vec![
        stream(
            api::<Service>(client, ns),
            watcher::Config::default().labels(&services_selector),
            Seen::Service,
        ),
        stream(
            api::<EndpointSlice>(client, ns),
            watcher::Config::default().labels(&format!("!{HEADLESS_LABEL}")),
            Seen::Slice,
        ),
    ];
    if let Some(node) = &scope.node_name {
        let nodes: Api<Node> = Api::all(client.clone());
        streams.push(stream(
            nodes,
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            Seen::Node,
        ));
    }
    futures::stream::select_all(streams)
}

/// Watches until the agent stops listening. Reachability does not rely on the watch
/// streams (a dead connection can look like a quiet watch): the API server is probed every
/// `PROBE_EVERY`, and when it comes back the watches start over with a full re-list.
pub async fn run(
    client: Client,
    scope: Scope,
    events: mpsc::Sender<SourceEvent>,
) -> anyhow::Result<()> {
    let send = |event| events.send(event);
    let mut probe = tokio::time::interval(PROBE_EVERY);
    let mut connected = true;
    loop {
        let mut merged = watch_all(&client, &scope);
        let mut services = Relist {
            kind: Kind::Service,
            buffer: Vec::new(),
        };
        let mut slices = Relist {
            kind: Kind::EndpointSlice,
            buffer: Vec::new(),
        };
        let mut node_seen: Option<Node> = None;
        loop {
            let item = tokio::select! {
                item = merged.next() => item.context("the Kubernetes watch streams ended")?,
                _ = probe.tick() => {
                    let reachable = tokio::time::timeout(PROBE_EVERY, client.apiserver_version()).await;
                    match reachable {
                        Ok(Ok(_)) if !connected => {
                            connected = true;
                            send(SourceEvent::Connected(Ok(()))).await.context("the agent stopped listening")?;
                            break;
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) if connected => {
                            connected = false;
                            send(SourceEvent::Connected(Err(format!("API server {} probe failed: {e}", scope.server)))).await.context("the agent stopped listening")?;
                        }
                        Err(_) if connected => {
                            connected = false;
                            send(SourceEvent::Connected(Err(format!("API server {} probe timed out after {PROBE_EVERY:?}", scope.server)))).await.context("the agent stopped listening")?;
                        }
                        _ => {}
                    }
                    continue;
                }
            };
            let event = match item {
                Err(e) => {
                    // The next successful probe re-lists everything.
                    connected = false;
                    Some(SourceEvent::Connected(Err(format!(
                        "watch of {} failed: {e}",
                        scope.server
                    ))))
                }
                Ok(Seen::Service(e)) => services.handle(*e, |s| Object::Service(Box::new(s))),
                Ok(Seen::Slice(e)) => slices.handle(*e, |s| Object::EndpointSlice(Box::new(s))),
                Ok(Seen::Node(e)) => {
                    let name = scope.node_name.as_deref().unwrap_or_default();
                    match *e {
                        watcher::Event::Init => {
                            node_seen = None;
                            None
                        }
                        watcher::Event::InitApply(n) | watcher::Event::Apply(n) => {
                            let t = topology(name, Some(&n));
                            let events = vec![
                                SourceEvent::NodeEligible(eligible(&n)),
                                SourceEvent::Topology(t),
                            ];
                            node_seen = Some(n);
                            Some(SourceEvent::Batch(events))
                        }
                        watcher::Event::InitDone => {
                            if node_seen.is_none() {
                                tracing::warn!(
                                    "no Node named {name:?}: --node-name (NODE_NAME) must be this node's \
                                     Kubernetes name, or endpoints on this node are not known as local \
                                     (externalTrafficPolicy: Local drops, topology hints are ignored)"
                                );
                            }
                            Some(SourceEvent::Topology(topology(name, node_seen.as_ref())))
                        }
                        watcher::Event::Delete(n) => {
                            tracing::warn!("node {:?} was deleted", name_of(&n.metadata).1);
                            node_seen = None;
                            Some(SourceEvent::Batch(vec![
                                SourceEvent::NodeEligible(false),
                                SourceEvent::Topology(topology(name, None)),
                            ]))
                        }
                    }
                }
            };
            if let Some(event) = event {
                send(event).await.context("the agent stopped listening")?;
            }
        }
    }
}
