//! Network programming latency as kube-proxy measures it
//! (`kubeproxy_network_programming_duration_seconds`): from the moment the change began in
//! the cluster — the EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`,
//! set by the endpointslice controller to when the pod or service changed — to the end of
//! the sync that programmed it.
use k8s_openapi::{
    api::discovery::v1::EndpointSlice,
    jiff::{SignedDuration, Timestamp},
};

pub const ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// A slice's trigger time, if it carries a valid one.
pub fn of(slice: &EndpointSlice) -> Option<Timestamp> {
    slice
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION)?
        .parse()
        .ok()
}

/// The trigger times of changes not programmed yet.
#[derive(Debug)]
pub struct TriggerTimes {
    /// When the agent started: earlier triggers are not measured, as kube-proxy does (a
    /// restarted agent would report the age of every slice as its latency).
    started: Timestamp,
    pending: Vec<Timestamp>,
}

impl TriggerTimes {
    pub fn new(started: Timestamp) -> Self {
        Self {
            started,
            pending: Vec::new(),
        }
    }

    /// An endpoint change received at `received`, triggered at `annotated`; one without
    /// the annotation (manifests, slices written by hand) counts from when it arrived.
    pub fn record(&mut self, annotated: Option<Timestamp>, received: Timestamp) {
        let at = annotated.unwrap_or(received);
        if at >= self.started {
            self.pending.push(at);
        }
    }

    /// Every pending change is programmed at `now`: their latencies, in seconds.
    pub fn programmed(&mut self, now: Timestamp) -> Vec<f64> {
        self.pending
            .drain(..)
            .map(|at| {
                now.duration_since(at)
                    .max(SignedDuration::ZERO)
                    .as_secs_f64()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    #[test]
    fn latency_runs_from_the_annotation_or_else_from_receipt() {
        let mut t = TriggerTimes::new(at(0));
        t.record(Some(at(10)), at(12));
        t.record(None, at(13));
        assert_eq!(t.programmed(at(14)), [4.0, 1.0]);
        assert!(
            t.programmed(at(15)).is_empty(),
            "each change is measured once"
        );
    }

    #[test]
    fn changes_from_before_the_agent_started_are_not_measured() {
        let mut t = TriggerTimes::new(at(100));
        t.record(Some(at(40)), at(101));
        t.record(Some(at(100)), at(101));
        assert_eq!(t.programmed(at(102)), [2.0]);
    }

    #[test]
    fn the_annotation_is_read_as_rfc3339() {
        let mut slice = EndpointSlice::default();
        assert_eq!(of(&slice), None);
        slice.metadata.annotations = Some(
            [(ANNOTATION.to_owned(), "2026-12-05T08:00:00Z".to_owned())]
                .into_iter()
                .collect(),
        );
        assert_eq!(of(&slice), Some("2026-12-05T08:00:00Z".parse().unwrap()));
        slice.metadata.annotations = Some(
            [(ANNOTATION.to_owned(), "yesterday".to_owned())]
                .into_iter()
                .collect(),
        );
        assert_eq!(of(&slice), None, "not a time: ignored");
    }
}
