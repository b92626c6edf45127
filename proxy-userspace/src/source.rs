//! What sources tell the agent: whole sets of objects (a watch re-list), single changes
//! (watch events, and what changed in the manifests, in batches), this node's topology, and
//! whether they are connected. Every source feeds the same store, model and reconciler.
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::{
    desired::Topology,
    manifest::{Change, ManifestSource},
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
    /// Whether this node should receive load-balanced traffic (kube-proxy's
    /// `nodeEligible`): not while it is being deleted or tainted for deletion.
    NodeEligible(bool),
    /// Input that could not be used (a manifest that does not parse, a duplicate object).
    Rejected(Vec<Rejection>),
    /// Every object of these kinds has been sent (as single events): the source's first
    /// complete listing.
    Listed(Vec<Kind>),
    /// Several events at once.
    Batch(Vec<SourceEvent>),
    /// Lost (with why) or regained the connection to the API server.
    Connected(Result<(), String>),
}

/// Changes sent to the agent in one event: one event per change would cost a loop turn each.
const BATCH: usize = 256;

fn event_of(change: Change) -> SourceEvent {
    match change {
        Change::Applied(object) => SourceEvent::Apply(object),
        Change::Deleted(kind, name) => SourceEvent::Delete(kind, name),
        Change::Rejected(rejection) => SourceEvent::Rejected(vec![rejection]),
    }
}

/// Reads the manifests on a blocking thread and sends what changed as it is parsed, in
/// batches, so that the objects are never all held at once.
async fn send_changes(
    mut source: ManifestSource,
    events: &mpsc::Sender<SourceEvent>,
) -> anyhow::Result<ManifestSource> {
    let events = events.clone();
    tokio::task::spawn_blocking(move || {
        let mut batch = Vec::with_capacity(BATCH);
        let mut sent = Ok(());
        let mut send = |batch: &mut Vec<SourceEvent>| {
            if sent.is_ok() && !batch.is_empty() {
                let events_now = std::mem::replace(batch, Vec::with_capacity(BATCH));
                sent = events.blocking_send(SourceEvent::Batch(events_now));
            }
        };
        source.read_changes(&mut |change| {
            batch.push(event_of(change));
            if batch.len() == BATCH {
                send(&mut batch);
            }
        });
        send(&mut batch);
        sent.map(|()| source)
            .map_err(|_| anyhow::anyhow!("the agent stopped listening"))
    })
    .await
    .context("the manifest reader panicked")?
}

/// Sends the manifests' objects now, then `Listed`, and after every change to them what
/// changed.
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
    source = send_changes(source, &events).await?;
    events
        .send(SourceEvent::Listed(vec![
            Kind::Service,
            Kind::EndpointSlice,
        ]))
        .await
        .context("the agent stopped listening")?;
    loop {
        changed
            .recv()
            .await
            .context("the manifest watcher stopped")?;
        // Let a burst of writes settle, then read once.
        tokio::time::sleep(debounce).await;
        while changed.try_recv().is_ok() {}
        source = send_changes(source, &events).await?;
    }
}
