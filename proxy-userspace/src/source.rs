//! What sources tell the agent: whole sets of objects (a manifest reload, a watch re-list),
//! single changes (watch events), this node's topology, and whether they are connected.
//! Every source feeds the same store, model and reconciler.
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::{
    desired::Topology,
    manifest::ManifestSource,
    rejection::Rejection,
    store::{Kind, Name, Object},
};

#[derive(Debug)]
pub enum SourceEvent {
    /// Every object of `kinds` (the others of those kinds are gone).
    Replace {
        kinds: Vec<Kind>,
        objects: Vec<Object>,
        rejections: Vec<Rejection>,
    },
    Apply(Object),
    Delete(Kind, Name),
    Topology(Topology),
    /// Lost (with why) or regained the connection to the API server.
    Connected(Result<(), String>),
}

/// Sends the manifests' objects now and after every change to them.
pub async fn run_manifests(
    mut source: ManifestSource,
    events: mpsc::Sender<SourceEvent>,
    debounce: Duration,
) -> anyhow::Result<()> {
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let _watcher = source.watch(move || {
        // A full channel already means "re-read": nothing is lost by dropping this one.
        let _ = changed_tx.try_send(());
    })?;
    loop {
        let loaded = source.load();
        let event = SourceEvent::Replace {
            kinds: vec![Kind::Service, Kind::EndpointSlice],
            objects: loaded.objects,
            rejections: loaded.rejections,
        };
        events
            .send(event)
            .await
            .context("the agent stopped listening")?;
        changed
            .recv()
            .await
            .context("the manifest watcher stopped")?;
        // Let a burst of writes settle, then read once.
        tokio::time::sleep(debounce).await;
        while changed.try_recv().is_ok() {}
    }
}
