//! The agent's main loop: load and attach the datapath, then keep the maps equal to what the
//! source says, collect conntrack garbage, and serve metrics, until SIGTERM/SIGINT.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info};

use crate::{
    conntrack,
    datapath::{Datapath, TcAttach},
    manifest::ManifestSource,
    maps::Maps,
    metrics::Metrics,
    reconcile::Reconciler,
    rejection::Reason,
    store::Store,
};

pub struct Config {
    pub manifests: PathBuf,
    /// `None`: the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub interfaces: Vec<String>,
    pub node_ip: Option<std::net::Ipv4Addr>,
    pub tc_attach: TcAttach,
    pub metrics_bind: SocketAddr,
    pub conntrack_gc_interval: Duration,
    /// Quiet time after a change before re-reading, so that a burst of writes is read once.
    pub debounce: Duration,
}

struct Agent {
    source: ManifestSource,
    store: Store,
    reconciler: Reconciler<Maps>,
    metrics: Arc<Metrics>,
}

impl Agent {
    /// Reads the source and programs the difference.
    fn sync(&mut self) {
        let started = Instant::now();
        let loaded = self.source.load();
        let outcome = self.store.replace(&loaded.objects);
        let (desired, conflicts) = self.store.desired();
        for rejection in loaded
            .rejections
            .iter()
            .chain(&outcome.rejections)
            .chain(&conflicts)
        {
            error!("rejected: {rejection}");
            self.metrics.reject(rejection.reason);
        }
        for why in &outcome.ignored {
            info!("not proxied: {why}");
        }
        let report = self.reconciler.apply(&desired);
        for (service, e) in &report.errors {
            error!("programming {service} failed, keeping its previous state: {e:#}");
            self.metrics.map_update_errors.inc();
            self.metrics.reject(Reason::MapUpdate);
        }
        let elapsed = started.elapsed();
        self.metrics.sync_duration.observe(elapsed.as_secs_f64());
        self.metrics.service_ports.set(self.reconciler.len() as i64);
        if report.errors.is_empty() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            self.metrics.last_sync.set(now.as_secs_f64());
        }
        info!(
            "synced {} service ports from {}: {} changed, {} removed, {} unchanged, {} failed, in {:.1} ms",
            self.reconciler.len(),
            self.source.path().display(),
            report.changed,
            report.removed,
            report.unchanged,
            report.errors.len(),
            elapsed.as_secs_f64() * 1000.0
        );
    }
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let cgroup = match config.cgroup {
        Some(c) => c,
        None => crate::datapath::cgroup2_mount()?,
    };
    let mut datapath = Datapath::load(&config.bpffs)?;
    datapath.attach_socket_hooks(&cgroup)?;
    datapath.attach_tc(&config.interfaces, config.tc_attach)?;
    for attachment in &datapath.attachments {
        info!("attached {attachment}");
    }
    if let Some(ip) = config.node_ip {
        info!("node IP {ip} (used by NodePort and external traffic)");
    }
    let maps = Maps::open(&config.bpffs)?;
    let reconciler = Reconciler::adopt(maps)?;
    if !reconciler.is_empty() {
        info!(
            "adopted {} service ports already in the pinned maps",
            reconciler.len()
        );
    }
    let mut conntrack = crate::maps::open(&config.bpffs, proxy_common::maps::CONNTRACK)?;
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let listener = crate::http::bind(config.metrics_bind).await?;
    let mut server = tokio::spawn(crate::http::serve(listener, metrics.clone()));

    let source = ManifestSource::new(&config.manifests);
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let _watcher = source.watch(move || {
        // A full channel already means "re-read": nothing is lost by dropping this one.
        let _ = changed_tx.try_send(());
    })?;
    let mut agent = Agent {
        source,
        store: Store::default(),
        reconciler,
        metrics,
    };
    agent.sync();

    let mut gc = tokio::time::interval(config.conntrack_gc_interval);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Some(()) = changed.recv() => {
                tokio::time::sleep(config.debounce).await;
                while changed.try_recv().is_ok() {}
                agent.sync();
            }
            _ = gc.tick() => {
                let report = conntrack::collect_garbage(&mut conntrack);
                agent.metrics.conntrack_entries.set(report.entries as i64);
                agent.metrics.conntrack_expired.inc_by(report.expired as u64);
            }
            signal = &mut shutdown => {
                info!("{}: detaching the datapath; maps stay pinned under {}", signal?, config.bpffs.display());
                break;
            }
            result = &mut server => {
                return Err(anyhow::anyhow!("the metrics server stopped: {result:?}"));
            }
        }
    }
    drop(datapath);
    Ok(())
}
