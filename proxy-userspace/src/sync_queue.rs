//! The services waiting to be programmed: each at most once however often it changed, and a
//! service whose programming failed retried on its own back-off, so that one service that
//! does not fit (a full map) neither blocks the others nor makes them retry with it.
use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use crate::store::Name;

const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// How long to wait after the `failures`-th failure in a row: 1 s, doubling, at most 60 s.
pub fn backoff(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_RETRY)
}

#[derive(Debug)]
struct Retry {
    failures: u32,
    at: Instant,
}

#[derive(Debug, Default)]
pub struct SyncQueue {
    dirty: BTreeSet<Name>,
    retries: HashMap<Name, Retry>,
}

impl SyncQueue {
    pub fn push(&mut self, name: Name) {
        self.dirty.insert(name);
    }

    /// Changes are waiting (retries not counted).
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Services to program now: every changed one and the retries that are due.
    pub fn take_due(&mut self, now: Instant) -> BTreeSet<Name> {
        let mut due = std::mem::take(&mut self.dirty);
        due.extend(
            self.retries
                .iter()
                .filter(|(_, r)| r.at <= now)
                .map(|(n, _)| n.clone()),
        );
        due
    }

    /// When the next retry is due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retries.values().map(|r| r.at).min()
    }

    /// Whether `name` is waiting for a retry.
    pub fn is_retrying(&self, name: &Name) -> bool {
        self.retries.contains_key(name)
    }

    /// Programming `name` failed; returns how many times in a row it has.
    pub fn failed(&mut self, name: &Name, now: Instant) -> u32 {
        let retry = self.retries.entry(name.clone()).or_insert(Retry {
            failures: 0,
            at: now,
        });
        retry.failures += 1;
        retry.at = now + backoff(retry.failures);
        retry.failures
    }

    /// Programming `name` succeeded; returns after how many failures.
    pub fn succeeded(&mut self, name: &Name) -> u32 {
        self.retries.remove(name).map_or(0, |r| r.failures)
    }

    pub fn retrying(&self) -> usize {
        self.retries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> Name {
        ("ns".into(), n.into())
    }

    #[test]
    fn changes_are_deduplicated_and_failures_back_off_per_service() {
        let mut queue = SyncQueue::default();
        let t0 = Instant::now();
        queue.push(name("a"));
        queue.push(name("a"));
        queue.push(name("b"));
        assert_eq!(queue.take_due(t0).len(), 2);
        assert!(queue.take_due(t0).is_empty());
        assert_eq!(queue.failed(&name("a"), t0), 1);
        assert_eq!(queue.next_retry(), Some(t0 + FIRST_RETRY));
        assert!(queue.take_due(t0).is_empty(), "not before its back-off");
        assert_eq!(queue.take_due(t0 + FIRST_RETRY).len(), 1);
        assert_eq!(queue.failed(&name("a"), t0), 2);
        assert_eq!(queue.next_retry(), Some(t0 + 2 * FIRST_RETRY));
        for _ in 0..20 {
            queue.failed(&name("a"), t0);
        }
        assert_eq!(queue.next_retry(), Some(t0 + MAX_RETRY));
        assert_eq!(queue.succeeded(&name("a")), 22);
        assert_eq!(queue.next_retry(), None);
    }
}
