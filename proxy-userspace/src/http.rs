//! A minimal HTTP/1.0 server, enough for Prometheus, kubelet probes and load-balancer health
//! checks without a web framework in a node agent: `/metrics`, `/proxyMode` and `/healthz` on
//! the metrics address, `/healthz` alone on the health address, and whatever another
//! `Responder` (e.g. a service health check) answers.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info};

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

/// Whether the proxy is healthy: unlike kube-proxy's, it is not when programming lags the
/// source, not only when the process is stuck.
#[derive(Clone)]
pub struct ProxyHealth {
    pub state: SharedSyncState,
    /// Unhealthy when a change has waited longer than this to be programmed.
    pub max_lag: Duration,
}

impl ProxyHealth {
    /// Healthy, and the state that says so.
    pub fn check(&self) -> (bool, SyncState) {
        let state = self.state.get();
        (state.lag() <= self.max_lag.as_secs_f64(), state)
    }
}

/// What an HTTP endpoint serves.
pub struct Endpoints {
    pub health: ProxyHealth,
    /// `/metrics` and `/proxyMode` too, or `/healthz` only.
    pub metrics: Option<Arc<Metrics>>,
}

/// kube-proxy's health answer, plus why it is unhealthy.
fn health(endpoints: &Endpoints) -> (&'static str, String) {
    let now = unix_now();
    let (healthy, state) = endpoints.health.check();
    let body = format!(
        "{{\"lastUpdated\": {:.3}, \"currentTime\": {now:.3}, \"pendingSeconds\": {:.3}, \"sourceConnected\": {}, \"healthy\": {healthy}}}\n",
        state.last_sync,
        state.lag(),
        state.source_connected,
    );
    (status_line(healthy), body)
}

impl Responder for Endpoints {
    fn respond(&self, path: &str) -> Response {
        match (path, &self.metrics) {
            ("/healthz", _) => {
                let (status, body) = health(self);
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
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(response.body.as_bytes()).await
    })
    .await??;
    Ok(())
}

/// Binds `addr`; `flag` names the option that set it, for the error.
pub async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} ({flag})"))
}

/// Serves `endpoints` on `listener`.
pub async fn serve_endpoints(listener: TcpListener, endpoints: Endpoints) -> anyhow::Result<()> {
    let paths = if endpoints.metrics.is_some() {
        "/metrics, /healthz and /proxyMode"
    } else {
        "/healthz"
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
