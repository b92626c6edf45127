//! A minimal HTTP/1.0 responder, enough for Prometheus and kubelet probes without a web
//! framework in a node agent: `/metrics`, `/proxyMode` and `/healthz` on the metrics address,
//! `/healthz` alone on the health address.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info};

use crate::{clock::unix_now, metrics::Metrics};

const MAX_REQUEST: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What an HTTP endpoint serves.
pub struct Endpoints {
    pub metrics: Arc<Metrics>,
    /// `/metrics` and `/proxyMode` too, or `/healthz` only.
    pub full: bool,
    /// `/healthz` fails when a change has waited longer than this to be programmed.
    pub max_lag: Duration,
}

/// kube-proxy's health answer, plus why it is unhealthy: unlike kube-proxy's, it fails when
/// programming lags the source, not only when the process is stuck.
fn health(endpoints: &Endpoints) -> (&'static str, String) {
    let m = &endpoints.metrics;
    let now = unix_now();
    let pending_since = m.pending_since.get();
    let lag = if pending_since > 0.0 {
        now - pending_since
    } else {
        0.0
    };
    let healthy = lag <= endpoints.max_lag.as_secs_f64();
    let body = format!(
        "{{\"lastUpdated\": {:.3}, \"currentTime\": {now:.3}, \"pendingSeconds\": {lag:.3}, \"sourceConnected\": {}, \"healthy\": {healthy}}}\n",
        m.last_sync.get(),
        m.source_connected.get() == 1,
    );
    (
        if healthy {
            "200 OK"
        } else {
            "503 Service Unavailable"
        },
        body,
    )
}

fn respond(path: &str, endpoints: &Endpoints) -> (&'static str, &'static str, String) {
    match (path, endpoints.full) {
        ("/healthz", _) => {
            let (status, body) = health(endpoints);
            (status, "application/json", body)
        }
        ("/metrics", true) => (
            "200 OK",
            "text/plain; version=0.0.4",
            endpoints.metrics.render(),
        ),
        ("/proxyMode", true) => ("200 OK", "text/plain", "ebpf".to_owned()),
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    }
}

async fn serve_one(mut stream: TcpStream, endpoints: &Endpoints) -> anyhow::Result<()> {
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
    let (status, content_type, body) = respond(path, endpoints);
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await
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

pub async fn serve(listener: TcpListener, endpoints: Endpoints) -> anyhow::Result<()> {
    let paths = if endpoints.full {
        "/metrics, /healthz and /proxyMode"
    } else {
        "/healthz"
    };
    info!("serving {paths} on http://{}", listener.local_addr()?);
    let endpoints = Arc::new(endpoints);
    loop {
        let (stream, peer) = listener
            .accept()
            .await
            .context("accepting an HTTP connection")?;
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &endpoints).await {
                debug!(%peer, "HTTP request: {e:#}");
            }
        });
    }
}
