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
    /// Input that could not be used (a manifest that does not parse, a duplicate object).
    Rejected(Vec<Rejection>),
    /// Lost (with why) or regained the connection to the API server.
    Connected(Result<(), String>),
}

/// Sends the manifests' objects now, as a whole set, and after every change to them, what
/// changed, as single events.
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
    let first = source.read_changes();
    let initial = SourceEvent::Replace {
        kinds: vec![Kind::Service, Kind::EndpointSlice],
        objects: first.applied,
        rejections: first.rejections,
    };
    let send = |event| async {
        events
            .send(event)
            .await
            .context("the agent stopped listening")
    };
    send(initial).await?;
    loop {
        changed
            .recv()
            .await
            .context("the manifest watcher stopped")?;
        // Let a burst of writes settle, then read once.
        tokio::time::sleep(debounce).await;
        while changed.try_recv().is_ok() {}
        let changes = source.read_changes();
        if !changes.rejections.is_empty() {
            send(SourceEvent::Rejected(changes.rejections)).await?;
        }
        for object in changes.applied {
            send(SourceEvent::Apply(object)).await?;
        }
        for (kind, name) in changes.deleted {
            send(SourceEvent::Delete(kind, name)).await?;
        }
    }
}
