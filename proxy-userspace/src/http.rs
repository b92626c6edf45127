//! A minimal HTTP/1.0 responder for `/metrics`, `/healthz` and `/proxyMode`: enough for
//! Prometheus and kubelet probes, without a web framework in a node agent.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info};

use crate::metrics::Metrics;

const MAX_REQUEST: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn health(metrics: &Metrics) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    format!(
        "{{\"lastUpdated\": {:.3}, \"currentTime\": {now:.3}, \"sourceConnected\": {}}}\n",
        metrics.last_sync.get(),
        metrics.source_connected.get() == 1
    )
}

fn respond(path: &str, metrics: &Metrics) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        "/healthz" => ("200 OK", "application/json", health(metrics)),
        "/proxyMode" => ("200 OK", "text/plain", "ebpf".to_owned()),
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    }
}

async fn serve_one(mut stream: TcpStream, metrics: &Metrics) -> anyhow::Result<()> {
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
    let (status, content_type, body) = respond(path, metrics);
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

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics server to {addr} (--metrics-bind)"))
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    info!(
        "serving /metrics, /healthz and /proxyMode on http://{}",
        listener.local_addr()?
    );
    loop {
        let (stream, peer) = listener
            .accept()
            .await
            .context("accepting a metrics connection")?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &metrics).await {
                debug!(%peer, "metrics request: {e:#}");
            }
        });
    }
}
