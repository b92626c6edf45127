//! kube-proxy's service health checks: for every `externalTrafficPolicy: Local` load
//! balancer, an HTTP server on its `healthCheckNodePort` tells the cloud load balancer
//! whether to send traffic to this node: 200 with the number of local endpoints when there
//! are some (and the proxy is healthy), 503 otherwise, in kube-proxy's JSON shape.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    desired::{HealthCheck, HealthChecks},
    http::{ProxyHealth, Responder, Response, status_line},
};

struct ServiceHealth {
    check: Mutex<HealthCheck>,
    proxy: ProxyHealth,
}

impl Responder for ServiceHealth {
    fn respond(&self, _path: &str) -> Response {
        let check = self.check.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (proxy_healthy, _) = self.proxy.check();
        let body = format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
            check.namespace, check.name, check.local_endpoints
        );
        Response {
            status: status_line(check.local_endpoints > 0 && proxy_healthy),
            content_type: "application/json",
            headers: vec![
                ("X-Content-Type-Options", "nosniff".to_owned()),
                (
                    "X-Load-Balancing-Endpoint-Weight",
                    check.local_endpoints.to_string(),
                ),
            ],
            body,
        }
    }
}

struct Server {
    health: Arc<ServiceHealth>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// The running health-check servers, by port.
pub struct HealthCheckServers {
    servers: HashMap<u16, Server>,
    /// What the last `update` asked for, for `retry`.
    wanted: HealthChecks,
    proxy: ProxyHealth,
}

impl HealthCheckServers {
    pub fn new(proxy: ProxyHealth) -> Self {
        Self {
            servers: HashMap::new(),
            wanted: HealthChecks::new(),
            proxy,
        }
    }

    /// Serves exactly `checks`: stops servers of ports no longer wanted, updates the
    /// others' answers, starts new ones. A port that cannot be bound (or a server that
    /// stopped) is reported and tried again on the next call. Must run inside the tokio
    /// runtime.
    pub fn update(&mut self, checks: &HealthChecks) -> Vec<anyhow::Error> {
        self.wanted = checks.clone();
        self.serve_wanted()
    }

    /// Starts the wanted servers that failed to start or stopped since the last `update`.
    pub fn retry(&mut self) -> Vec<anyhow::Error> {
        self.serve_wanted()
    }

    fn serve_wanted(&mut self) -> Vec<anyhow::Error> {
        let checks = &self.wanted;
        self.servers.retain(|port, server| {
            if server.task.is_finished() {
                warn!("health check on port {port} stopped on its own; restarting it");
                return false;
            }
            let keep = checks.contains_key(port);
            if !keep {
                info!("health check on port {port}: stopped");
                server.task.abort();
            }
            keep
        });
        let mut errors = Vec::new();
        for (port, check) in checks {
            if let Some(server) = self.servers.get(port) {
                *server
                    .health
                    .check
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = check.clone();
                continue;
            }
            match start(*port, check, &self.proxy) {
                Ok(server) => {
                    info!(
                        "health check of {}/{} on port {port}: serving",
                        check.namespace, check.name
                    );
                    self.servers.insert(*port, server);
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }
}

/// A listener on `port` of every address, IPv4 and IPv6 (a dual-stack socket: load
/// balancers of either family check the node), or IPv4 alone where IPv6 is off.
fn listen(port: u16) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let dual = || {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        socket.set_only_v6(false)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        socket.listen(1024)?;
        Ok(std::net::TcpListener::from(socket))
    };
    dual().or_else(|_: std::io::Error| {
        std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
    })
}

fn start(port: u16, check: &HealthCheck, proxy: &ProxyHealth) -> anyhow::Result<Server> {
    let bound = listen(port).and_then(|l| {
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    });
    let listener = bound.with_context(|| {
        format!(
            "binding health check port {port} of service {}/{}",
            check.namespace, check.name
        )
    })?;
    let health = Arc::new(ServiceHealth {
        check: Mutex::new(check.clone()),
        proxy: proxy.clone(),
    });
    let task = tokio::spawn(crate::http::serve(listener, health.clone()));
    Ok(Server { health, task })
}
