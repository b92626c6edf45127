//! The one value that says how programming is doing: when the last complete sync was, since
//! when a change has waited, whether the source is connected, what of the datapath is
//! missing, and when the agent's loop last went round. The agent's loop writes it;
//! `/healthz`, `/readyz`, `/livez`, the health-check node ports and the metrics read it, so
//! they never disagree.
use std::sync::{Arc, Mutex};

use crate::clock::unix_now;

#[derive(Clone, Debug, PartialEq)]
pub struct SyncState {
    /// Unix seconds of the last sync that left nothing waiting (0: none yet).
    pub last_sync: f64,
    /// Unix seconds since which a change has waited to be programmed.
    pub pending_since: Option<f64>,
    pub source_connected: bool,
    /// Attachments of the configuration the kernel does not show (empty: all in place).
    pub datapath_missing: Vec<String>,
    /// Unix seconds when the agent's loop last went round.
    pub loop_alive: f64,
    /// kube-proxy's `nodeEligible`: false while this node is being deleted.
    pub node_eligible: bool,
}

impl Default for SyncState {
    fn default() -> Self {
        Self {
            last_sync: 0.0,
            pending_since: None,
            source_connected: true,
            datapath_missing: Vec::new(),
            loop_alive: unix_now(),
            node_eligible: true,
        }
    }
}

impl SyncState {
    /// How long the oldest waiting change has waited, in seconds.
    pub fn lag(&self) -> f64 {
        self.pending_since.map_or(0.0, |since| unix_now() - since)
    }

    /// Why this node does not serve as configured, for readiness and `/healthz`: nothing
    /// programmed yet, a change waiting longer than `max_lag` seconds, or a part of the
    /// datapath missing. Empty when it does.
    pub fn problems(&self, max_lag: f64) -> Vec<String> {
        let mut problems = Vec::new();
        if self.last_sync == 0.0 {
            problems.push(
                "nothing programmed yet: waiting for the source's first complete listing"
                    .to_owned(),
            );
        }
        let lag = self.lag();
        if lag > max_lag {
            problems.push(format!(
                "a change has waited {lag:.1} s to be programmed (limit {max_lag} s)"
            ));
        }
        problems.extend(
            self.datapath_missing
                .iter()
                .map(|m| format!("datapath: {m}")),
        );
        problems
    }
}

#[derive(Clone, Debug, Default)]
pub struct SharedSyncState(Arc<Mutex<SyncState>>);

impl SharedSyncState {
    pub fn get(&self) -> SyncState {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update(&self, change: impl FnOnce(&mut SyncState)) {
        change(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_unhealthy_until_its_first_sync_and_while_its_datapath_is_incomplete() {
        let mut state = SyncState::default();
        assert_eq!(state.problems(10.0).len(), 1, "before the first sync");
        state.last_sync = unix_now();
        assert!(state.problems(10.0).is_empty());
        state.datapath_missing = vec!["proxy_ingress on eth0".into()];
        assert_eq!(state.problems(10.0), ["datapath: proxy_ingress on eth0"]);
        state.datapath_missing.clear();
        state.pending_since = Some(unix_now() - 30.0);
        assert!(state.problems(10.0)[0].starts_with("a change has waited"));
    }
}
