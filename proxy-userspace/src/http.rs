//! A minimal HTTP/1.0 server, enough for Prometheus, kubelet probes and load-balancer health
//! checks without a web framework in a node agent: `/metrics` and `/proxyMode` on the metrics
//! address, `/healthz`, `/readyz` and `/livez` on every address, and whatever another
//! `Responder` (e.g. a service health check) answers.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info, warn};

use crate::{
    clock::unix_now,
    metrics::Metrics,
    sync_state::{SharedSyncState, SyncState},
};

const MAX_REQUEST: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    fn new(status: &'static str, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            headers: Vec::new(),
            body,
        }
    }
}

pub fn status_line(ok: bool) -> &'static str {
    if ok {
        "200 OK"
    } else {
        "503 Service Unavailable"
    }
}

/// What a server answers for a path.
pub trait Responder: Send + Sync + 'static {
    fn respond(&self, path: &str) -> Response;
}

/// Whether the proxy serves as configured: unlike kube-proxy's, it is not before its first
/// complete sync, when programming lags the source or when a part of the datapath is
/// missing, not only when the process is stuck.
#[derive(Clone)]
pub struct ProxyHealth {
    pub state: SharedSyncState,
    /// Unhealthy when a change has waited longer than this to be programmed.
    pub max_lag: Duration,
    /// Not alive when the agent's loop has not gone round for this long.
    pub max_stall: Duration,
}

impl ProxyHealth {
    /// Healthy, and the state that says so.
    pub fn check(&self) -> (bool, SyncState) {
        let state = self.state.get();
        (state.problems(self.max_lag.as_secs_f64()).is_empty(), state)
    }
}

/// What an HTTP endpoint serves.
pub struct Endpoints {
    pub health: ProxyHealth,
    /// `/metrics` and `/proxyMode` too, or the health paths only.
    pub metrics: Option<Arc<Metrics>>,
}

/// A time as kube-proxy's `/healthz` writes it (Go's `time.Time` string).
fn go_time(unix: f64) -> String {
    let nanos = (unix * 1e9) as i128;
    k8s_openapi::jiff::Timestamp::from_nanosecond(nanos).map_or_else(
        |_| String::new(),
        |t| t.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string(),
    )
}

/// kube-proxy's health answer (`lastUpdated`, `currentTime`, `nodeEligible`), plus ours and
/// why it is unhealthy. `/readyz` is about this agent, so a node being deleted does not
/// fail it: the datapath serves the node's pods until the end; `/healthz` is what load
/// balancers ask, and fails then, as kube-proxy's does.
fn health(endpoints: &Endpoints, for_load_balancers: bool) -> (&'static str, String) {
    let state = endpoints.health.state.get();
    let mut problems = state.problems(endpoints.health.max_lag.as_secs_f64());
    if for_load_balancers && !state.node_eligible {
        problems.push("this node is being deleted".to_owned());
    }
    let body = serde_json::json!({
        "lastUpdated": go_time(state.last_sync),
        "currentTime": go_time(unix_now()),
        "nodeEligible": state.node_eligible,
        "lastUpdatedSeconds": (state.last_sync * 1000.0).round() / 1000.0,
        "pendingSeconds": (state.lag() * 1000.0).round() / 1000.0,
        "sourceConnected": state.source_connected,
        "healthy": problems.is_empty(),
        "problems": problems,
    });
    (status_line(problems.is_empty()), format!("{body}\n"))
}

/// Whether the agent's loop is going round (`/livez`): a restart is the cure only for a
/// stuck process, not for an unreachable API server or a missing interface.
fn liveness(endpoints: &Endpoints) -> (&'static str, String) {
    let stalled = unix_now() - endpoints.health.state.get().loop_alive;
    let alive = stalled <= endpoints.health.max_stall.as_secs_f64();
    let body = serde_json::json!({ "alive": alive, "loopStalledSeconds": (stalled * 10.0).round() / 10.0 });
    (status_line(alive), format!("{body}\n"))
}

impl Responder for Endpoints {
    fn respond(&self, path: &str) -> Response {
        match (path, &self.metrics) {
            ("/healthz" | "/readyz", _) => {
                let (status, body) = health(self, path == "/healthz");
                Response::new(status, "application/json", body)
            }
            ("/livez", _) => {
                let (status, body) = liveness(self);
                Response::new(status, "application/json", body)
            }
            ("/metrics", Some(metrics)) => {
                Response::new("200 OK", "text/plain; version=0.0.4", metrics.render())
            }
            ("/proxyMode", Some(_)) => Response::new("200 OK", "text/plain", "ebpf".to_owned()),
            _ => Response::new("404 Not Found", "text/plain", "not found\n".to_owned()),
        }
    }
}

async fn serve_one(mut stream: TcpStream, responder: &impl Responder) -> anyhow::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        let n = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut buf)).await??;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let response = responder.respond(path);
    let mut head = format!(
        "HTTP/1.0 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    for (name, value) in &response.headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    let written = tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(response.body.as_bytes()).await
    })
    .await;
    if response.body.len() > LARGE_ANSWER {
        drop(response);
        crate::allocator::release_free_memory();
    }
    written??;
    Ok(())
}

/// An answer after which the memory it took is given back at once (metrics at scale).
const LARGE_ANSWER: usize = 1 << 20;

/// Binds `addr` now if it is free. `Ok(None)` when another process listens there (kube-proxy
/// on 10249/10256 until it is removed): `serve_endpoints` takes it over once it is free. Any
/// other failure (an address not on this node, a privileged port) is a configuration error.
pub fn try_bind(addr: SocketAddr, flag: &str) -> anyhow::Result<Option<std::net::TcpListener>> {
    match std::net::TcpListener::bind(addr) {
        Ok(listener) => {
            listener
                .set_nonblocking(true)
                .with_context(|| format!("{flag} {addr}: making the listener non-blocking"))?;
            Ok(Some(listener))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => Err(e).with_context(|| format!("binding {addr} ({flag})")),
    }
}

/// How often a busy address is tried again.
const TAKE_OVER_RETRY: Duration = Duration::from_secs(1);

/// Serves `endpoints` on `listener`, or, if `try_bind` found `addr` busy, on `addr` once
/// it is free.
pub async fn serve_endpoints(
    listener: Option<std::net::TcpListener>,
    addr: SocketAddr,
    flag: &'static str,
    endpoints: Endpoints,
) -> anyhow::Result<()> {
    let listener = match listener {
        Some(listener) => listener,
        None => {
            warn!(
                "{addr} ({flag}) is in use, by kube-proxy if it still runs on this node: \
                 serving it as soon as it is free"
            );
            loop {
                tokio::time::sleep(TAKE_OVER_RETRY).await;
                if let Some(listener) = try_bind(addr, flag)? {
                    info!("took over {addr} ({flag}), now free");
                    break listener;
                }
            }
        }
    };
    let listener = TcpListener::from_std(listener)
        .with_context(|| format!("{flag} {addr}: registering the listener"))?;
    let paths = if endpoints.metrics.is_some() {
        "/metrics, /healthz, /readyz, /livez and /proxyMode"
    } else {
        "/healthz, /readyz and /livez"
    };
    info!("serving {paths} on http://{}", listener.local_addr()?);
    serve(listener, Arc::new(endpoints)).await
}

/// Answers each connection to `listener` with `responder`, until the task is dropped.
pub async fn serve(listener: TcpListener, responder: Arc<impl Responder>) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = listener
            .accept()
            .await
            .context("accepting an HTTP connection")?;
        let responder = responder.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, responder.as_ref()).await {
                debug!(%peer, "HTTP request: {e:#}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_kube_proxy_writes_them() {
        assert_eq!(go_time(0.0), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(go_time(1_764_900_000.5), "2025-12-05 02:00:00.5 +0000 UTC");
    }
}
