//! The one value that says how programming is doing: when the last complete sync was, since
//! when a change has waited, whether the source is connected. The agent's loop writes it;
//! `/healthz`, the health-check node ports and the metrics read it, so they never disagree.
use std::sync::{Arc, Mutex};

use crate::clock::unix_now;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyncState {
    /// Unix seconds of the last sync that left nothing waiting (0: none yet).
    pub last_sync: f64,
    /// Unix seconds since which a change has waited to be programmed.
    pub pending_since: Option<f64>,
    pub source_connected: bool,
}

impl Default for SyncState {
    fn default() -> Self {
        Self {
            last_sync: 0.0,
            pending_since: None,
            source_connected: true,
        }
    }
}

impl SyncState {
    /// How long the oldest waiting change has waited, in seconds.
    pub fn lag(&self) -> f64 {
        self.pending_since.map_or(0.0, |since| unix_now() - since)
    }
}

#[derive(Clone, Debug, Default)]
pub struct SharedSyncState(Arc<Mutex<SyncState>>);

impl SharedSyncState {
    pub fn get(&self) -> SyncState {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn update(&self, change: impl FnOnce(&mut SyncState)) {
        change(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}
