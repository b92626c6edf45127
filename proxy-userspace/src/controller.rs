//! The control plane keyed by service, in the shape of kube-runtime's `Controller`: a source
//! event updates the store, which names the services it dirtied; the queue holds each dirty
//! service once; a sync takes the due services and, for each one alone, translates it (its
//! frontends, backends and health check), claims its frontend keys (the first service by
//! name owns a contested key, as a full pass would decide) and programs the entries of the
//! keys whose owner or contents changed. One change therefore costs one service, whatever
//! the number of services.
use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Instant,
};

use proxy_common::{SCOPE_ALL, SCOPE_INTERNAL};

use crate::{
    claims::{Claimant, Claims},
    desired::{
        DesiredService, FrontendEntry, HealthChecks, Topology, Translation, frontend_conflict,
        health_check_conflict, in_cluster_key, service_object, translate,
    },
    family::ServiceKey,
    reconcile::{KeyCounts, Reconciler, Repair, ServiceMaps, Snapshot},
    rejection::Rejection,
    store::{Kind, Name, Object, Outcome, Store},
    sync_queue::{SyncQueue, backoff},
};

/// A service port that could not be programmed; it keeps its previous state and its service
/// is retried with back-off.
#[derive(Debug)]
pub struct Failure {
    /// The service port's display name.
    pub port: String,
    pub error: anyhow::Error,
    /// Failures of its service in a row, this one included.
    pub failures: u32,
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncOutcome {
    /// Services translated and programmed.
    pub services: usize,
    pub keys: KeyCounts,
    /// Conflicts that appeared with this sync (each is reported once).
    pub rejections: Vec<Rejection>,
    pub failures: Vec<Failure>,
    /// Services programmed after failing, with how many times they had failed.
    pub recovered: Vec<(Name, u32)>,
    /// The first `NAMED_CHANGES` services whose entries this sync wrote or removed, and
    /// how many more did: what the sync's log line names.
    pub changed: Vec<Name>,
    pub changed_more: usize,
}

/// Services a sync names as changed; the rest are counted.
pub const NAMED_CHANGES: usize = 5;

/// What `key` must hold: the entry of the frontend that owns it (or its in-cluster view).
fn wanted<'a>(
    frontends: &Claims<ServiceKey>,
    translations: &'a HashMap<Arc<Name>, Translation>,
    key: &ServiceKey,
) -> Option<&'a DesiredService> {
    let base = ServiceKey {
        scope: SCOPE_ALL,
        ..*key
    };
    let entry = owner_entry(frontends, translations, &base)?;
    match key.scope {
        SCOPE_INTERNAL => entry.in_cluster.as_deref(),
        _ => Some(&entry.service),
    }
}

fn owner_entry<'a>(
    frontends: &Claims<ServiceKey>,
    translations: &'a HashMap<Arc<Name>, Translation>,
    key: &ServiceKey,
) -> Option<&'a FrontendEntry> {
    let (service, i) = frontends.owner(key)?;
    translations.get(service)?.frontends.get(*i)
}

pub struct Controller<M> {
    store: Store,
    reconciler: Reconciler<M>,
    /// The last translation of every service, as claimed.
    translations: HashMap<Arc<Name>, Translation>,
    frontends: Claims<ServiceKey>,
    health_ports: Claims<u16>,
    /// The health checks of the services that own their port.
    health_checks: HealthChecks,
    health_checks_changed: bool,
    queue: SyncQueue,
    /// When entries that no service claims must be removed: after adopting a previous
    /// agent's maps, and (with back-off) after such a removal failed.
    sweep: Option<Instant>,
    sweep_failures: u32,
}

/// A failure and whom to retry: the service that owns the entry, or (`None`) the sweep of
/// entries nobody claims.
type Failed = (Option<Name>, Failure);

impl<M: ServiceMaps> Controller<M> {
    pub fn new(store: Store, reconciler: Reconciler<M>) -> Self {
        Self {
            store,
            reconciler,
            translations: HashMap::new(),
            frontends: Claims::default(),
            health_ports: Claims::default(),
            health_checks: HealthChecks::new(),
            health_checks_changed: false,
            queue: SyncQueue::default(),
            sweep: Some(Instant::now()),
            sweep_failures: 0,
        }
    }

    fn enqueue(&mut self, outcome: Outcome) -> Outcome {
        for name in &outcome.dirty {
            self.queue.push(name.clone());
        }
        outcome
    }

    /// Every object of `kinds` is now `objects` (a watch re-list): only the
    /// services that differ are queued.
    pub fn replace(&mut self, kinds: &[Kind], objects: &[Object]) -> Outcome {
        let outcome = self.store.replace(kinds, objects);
        self.enqueue(outcome)
    }

    pub fn apply(&mut self, object: &Object) -> Outcome {
        let outcome = self.store.apply(object);
        self.enqueue(outcome)
    }

    pub fn delete(&mut self, kind: Kind, name: Name) -> Outcome {
        let outcome = self.store.delete(kind, name);
        self.enqueue(outcome)
    }

    /// The node's topology changed: every service is queued. Returns whether it changed.
    pub fn set_topology(&mut self, topology: Topology) -> bool {
        if !self.store.set_topology(topology) {
            return false;
        }
        let all: Vec<Name> = self.store.service_names().cloned().collect();
        for name in all {
            self.queue.push(name);
        }
        true
    }

    /// Changes are waiting to be programmed.
    pub fn has_changes(&self) -> bool {
        self.queue.has_changes()
    }

    /// When failed services are due again, or unclaimed entries must be swept.
    pub fn next_retry(&self) -> Option<Instant> {
        [self.queue.next_retry(), self.sweep]
            .into_iter()
            .flatten()
            .min()
    }

    /// Services waiting for a retry.
    pub fn retrying(&self) -> usize {
        self.queue.retrying()
    }

    /// Unclaimed entries are waiting to be removed.
    pub fn needs_sweep(&self) -> bool {
        self.sweep.is_some()
    }

    /// Service ports (frontend entries) programmed.
    pub fn programmed(&self) -> usize {
        self.reconciler.len()
    }

    /// The health checks to serve; `Some` only when they changed since the last call.
    pub fn changed_health_checks(&mut self) -> Option<&HealthChecks> {
        std::mem::take(&mut self.health_checks_changed).then_some(&self.health_checks)
    }

    /// A snapshot of the maps for `repair` is about to be read.
    pub fn begin_snapshot(&mut self) {
        self.reconciler.begin_snapshot();
    }

    /// The snapshot could not be read.
    pub fn abandon_snapshot(&mut self) {
        self.reconciler.abandon_snapshot();
    }

    /// Starts comparing `snapshot`, read since `begin_snapshot`, with what is programmed.
    pub fn start_repair(&self, snapshot: Snapshot) -> Repair {
        Repair::new(snapshot, &self.reconciler)
    }

    /// Repairs, among the next `budget` entries of `repair`, those changed behind the
    /// agent's back; returns whether the repair is complete.
    pub fn repair_step(&mut self, repair: &mut Repair, budget: usize) -> anyhow::Result<bool> {
        repair.step(&mut self.reconciler, budget)
    }

    /// Map updates and deletes made so far.
    pub fn writes(&self) -> u64 {
        self.reconciler.writes()
    }

    /// Programs every service that is due, one at a time.
    pub fn sync(&mut self, now: Instant) -> SyncOutcome {
        let mut outcome = SyncOutcome::default();
        for name in self.queue.take_due(now) {
            outcome.services += 1;
            let mut failed = Vec::new();
            let before = (outcome.keys.changed, outcome.keys.removed);
            self.sync_service(&name, &mut outcome, &mut failed);
            if (outcome.keys.changed, outcome.keys.removed) != before {
                if outcome.changed.len() < NAMED_CHANGES {
                    outcome.changed.push(name.clone());
                } else {
                    outcome.changed_more += 1;
                }
            }
            let failed_itself = failed
                .iter()
                .any(|(owner, _)| owner.as_ref() == Some(&name));
            self.schedule_retries(failed, now, &mut outcome);
            if !failed_itself && self.queue.is_retrying(&name) {
                outcome
                    .recovered
                    .push((name.clone(), self.queue.succeeded(&name)));
            }
        }
        if self.sweep.is_some_and(|at| at <= now) {
            let mut failed = Vec::new();
            self.remove_unclaimed(&mut outcome, &mut failed);
            if failed.is_empty() {
                self.sweep = None;
                self.sweep_failures = 0;
            }
            self.schedule_retries(failed, now, &mut outcome);
        }
        outcome
    }

    /// Retries what failed on its own back-off: each service that owns a failed entry, or
    /// the sweep of entries nobody claims; counts the failures in a row into each.
    fn schedule_retries(&mut self, failed: Vec<Failed>, now: Instant, out: &mut SyncOutcome) {
        let mut counts: HashMap<Option<Name>, u32> = HashMap::new();
        for (owner, mut failure) in failed {
            failure.failures = *counts.entry(owner.clone()).or_insert_with(|| match &owner {
                Some(owner) => self.queue.failed(owner, now),
                None => {
                    self.sweep_failures += 1;
                    self.sweep = Some(now + backoff(self.sweep_failures));
                    self.sweep_failures
                }
            });
            out.failures.push(failure);
        }
    }

    /// Re-translates service `name` and reprograms the keys it claimed or claims.
    fn sync_service(&mut self, name: &Name, out: &mut SyncOutcome, failed: &mut Vec<Failed>) {
        let new = match self.store.service(name) {
            Some(spec) => translate(spec, &self.store.slices_of(name), self.store.topology()),
            None => Translation::default(),
        };
        // The name is shared by the translation and every claim of the service.
        let (shared, old) = match self.translations.remove_entry(name) {
            Some((shared, old)) => (shared, old),
            None => (Arc::new(name.clone()), Translation::default()),
        };
        let exists = self.store.service(name).is_some();
        // A retry reprograms even an unchanged translation: its entries did not land.
        if old == new && !self.queue.is_retrying(name) {
            if exists {
                self.translations.insert(shared, new);
            }
            return;
        }
        let keys: BTreeSet<ServiceKey> = old
            .frontends
            .iter()
            .chain(&new.frontends)
            .map(|f| f.key)
            .collect();
        let ports: BTreeSet<u16> = [&old.health_check, &new.health_check]
            .into_iter()
            .flatten()
            .map(|(port, _)| *port)
            .collect();
        // Claims that stay are left alone, so that their conflicts stay reported.
        let claims = |t: &Translation| -> BTreeSet<(ServiceKey, usize)> {
            t.frontends
                .iter()
                .enumerate()
                .map(|(i, f)| (f.key, i))
                .collect()
        };
        let (before, after) = (claims(&old), claims(&new));
        for (key, i) in before.difference(&after) {
            self.frontends.release(key, &(shared.clone(), *i));
        }
        for (key, i) in after.difference(&before) {
            self.frontends.claim(key, (shared.clone(), *i));
        }
        let port = |t: &Translation| t.health_check.as_ref().map(|(port, _)| *port);
        if port(&old) != port(&new) {
            if let Some(port) = port(&old) {
                self.health_ports.release(&port, &(shared.clone(), 0));
            }
            if let Some(port) = port(&new) {
                self.health_ports.claim(&port, (shared.clone(), 0));
            }
        }
        if exists {
            self.translations.insert(shared, new);
        }
        for key in &keys {
            self.program(key, out, failed);
            self.report_conflicts(key, out);
        }
        for port in ports {
            self.update_health_check(port, out);
        }
    }

    /// Programs `key` and its in-cluster scope with what their owner wants now.
    fn program(&mut self, key: &ServiceKey, out: &mut SyncOutcome, failed: &mut Vec<Failed>) {
        for k in [*key, in_cluster_key(key)] {
            let want = wanted(&self.frontends, &self.translations, &k);
            let programmed = self.reconciler.programmed_name(&k);
            if want.is_none() && programmed.is_none() {
                continue;
            }
            let port = want
                .map(|w| w.name.clone())
                .or_else(|| programmed.map(str::to_owned))
                .unwrap_or_default();
            match self.reconciler.sync_key(&k, want) {
                Ok(change) => out.keys.add(change),
                Err(error) => {
                    // Retried by its owner, or, when nobody claims it, by the sweep.
                    let owner = self
                        .frontends
                        .owner(key)
                        .map(|(service, _)| Name::clone(service));
                    let failure = Failure {
                        port,
                        error,
                        failures: 0,
                    };
                    failed.push((owner, failure));
                }
            }
        }
    }

    fn report_conflicts(&mut self, key: &ServiceKey, out: &mut SyncOutcome) {
        let Some((_, losers)) = self.frontends.new_losers(key) else {
            return;
        };
        let Some(owner) =
            owner_entry(&self.frontends, &self.translations, key).map(|e| e.service.name.clone())
        else {
            return;
        };
        for (service, i) in losers {
            if let Some(entry) = self
                .translations
                .get(&service)
                .and_then(|t| t.frontends.get(i))
            {
                let object = service_object(&service.0, &service.1);
                out.rejections
                    .push(frontend_conflict(&object, entry, &owner));
            }
        }
    }

    fn update_health_check(&mut self, port: u16, out: &mut SyncOutcome) {
        let check = |claimant: &Claimant| {
            self.translations
                .get(&claimant.0)
                .and_then(|t| t.health_check.as_ref())
                .map(|(_, check)| check.clone())
        };
        let owned = self.health_ports.owner(&port).and_then(check);
        if self.health_checks.get(&port) != owned.as_ref() {
            match owned.clone() {
                Some(c) => self.health_checks.insert(port, c),
                None => self.health_checks.remove(&port),
            };
            self.health_checks_changed = true;
        }
        if let Some((_, losers)) = self.health_ports.new_losers(&port)
            && let Some(owner) = owned
        {
            for (service, _) in losers {
                let object = service_object(&service.0, &service.1);
                out.rejections
                    .push(health_check_conflict(&object, port, &owner));
            }
        }
    }

    /// Removes every programmed entry that no service claims (a full scan: only after an
    /// agent restart adopted the maps, or a failed removal).
    fn remove_unclaimed(&mut self, out: &mut SyncOutcome, failed: &mut Vec<Failed>) {
        let unclaimed: Vec<ServiceKey> = self
            .reconciler
            .keys()
            .filter(|k| wanted(&self.frontends, &self.translations, k).is_none())
            .copied()
            .collect();
        for key in unclaimed {
            let port = self
                .reconciler
                .programmed_name(&key)
                .unwrap_or("")
                .to_owned();
            match self.reconciler.sync_key(&key, None) {
                Ok(change) => out.keys.add(change),
                Err(error) => {
                    let failure = Failure {
                        port,
                        error,
                        failures: 0,
                    };
                    failed.push((None, failure));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use crate::family::Backend;
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use serde_json::json;

    use super::*;
    use crate::reconcile::{ServiceMeta, fake::Fake};

    fn service(name: &str, spec: serde_json::Value) -> Object {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": spec,
        }))
        .unwrap();
        Object::Service(Box::new(svc))
    }

    fn cluster_ip(name: &str, ip: &str, port: u16) -> Object {
        service(name, json!({"clusterIP": ip, "ports": [{"port": port}]}))
    }

    fn endpoint(addr: &str, ready: bool, node: &str, zone: &str) -> serde_json::Value {
        json!({
            "addresses": [addr],
            "conditions": {"ready": ready, "serving": ready, "terminating": !ready},
            "nodeName": node,
            "hints": {"forZones": [{"name": zone}]},
        })
    }

    fn slice(name: &str, service: &str, port: u16, endpoints: Vec<serde_json::Value>) -> Object {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": "ns",
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "ports": [{"port": port}],
            "endpoints": endpoints,
        }))
        .unwrap();
        Object::EndpointSlice(Box::new(slice))
    }

    fn ready(addrs: &[&str]) -> Vec<serde_json::Value> {
        addrs
            .iter()
            .map(|a| endpoint(a, true, "node-a", "zone-a"))
            .collect()
    }

    /// A controller on `maps`, for node-a, adopting what they hold.
    fn controller(maps: &mut Fake) -> Controller<&mut Fake> {
        Controller::new(Store::new(None, here()), Reconciler::adopt(maps).unwrap())
    }

    fn name(n: &str) -> Name {
        ("ns".into(), n.into())
    }

    fn here() -> Topology {
        Topology {
            node_name: Some("node-a".into()),
            zone: None,
        }
    }

    /// What the maps serve, by key, independent of ids: metadata, flags, affinity timeout
    /// and backends in slot order.
    type Served = BTreeMap<ServiceKey, (ServiceMeta, u8, u32, Vec<Backend>)>;

    fn served(maps: &Fake) -> Served {
        maps.services
            .iter()
            .map(|(key, (value, meta))| {
                let backends = (1..=value.count)
                    .map(|slot| {
                        let slot = proxy_common::SlotKey {
                            service_id: value.id,
                            generation: value.generation,
                            pad: 0,
                            slot,
                        };
                        maps.backends[&maps.slots[&slot]]
                    })
                    .collect();
                let v = (
                    meta.clone(),
                    value.flags,
                    value.affinity_timeout_secs,
                    backends,
                );
                (*key, v)
            })
            .collect()
    }

    /// The maps a full pass over `store` programs.
    fn oracle(store: &Store) -> (Served, HealthChecks) {
        let desired = store.desired();
        let mut maps = Fake::default();
        let report = Reconciler::adopt(&mut maps)
            .unwrap()
            .apply(&desired.services);
        assert!(report.errors.is_empty());
        (served(&maps), desired.health_checks)
    }

    #[test]
    fn one_change_writes_only_its_service_among_10_000() {
        let mut maps = Fake::default();
        let mut c = controller(&mut maps);
        let mut objects = Vec::new();
        for i in 0..10_000u32 {
            let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
            objects.push(cluster_ip(&format!("s{i}"), &ip, 80));
            let backends = [1, 2, 3].map(|b| format!("10.244.{}.{b}", i % 200));
            let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
            objects.push(slice(
                &format!("s{i}-x"),
                &format!("s{i}"),
                8080,
                ready(&backends),
            ));
        }
        c.replace(&[Kind::Service, Kind::EndpointSlice], &objects);
        let first = c.sync(Instant::now());
        assert_eq!((first.services, first.keys.changed), (10_000, 10_000));
        assert_eq!(
            (first.changed.len(), first.changed_more),
            (NAMED_CHANGES, 10_000 - NAMED_CHANGES)
        );
        assert!(first.failures.is_empty() && first.rejections.is_empty());
        let id = c.reconciler.maps().services[&ServiceKey::new([10, 96, 20, 1].into(), 80, 6)]
            .0
            .id;
        c.reconciler.maps_mut().log.clear();

        let outcome = c.apply(&slice(
            "s5000-x",
            "s5000",
            8080,
            ready(&["10.244.0.1", "10.244.0.2", "10.244.9.9"]),
        ));
        assert_eq!(outcome.dirty, BTreeSet::from([name("s5000")]));
        let sync = c.sync(Instant::now());
        let keys = sync.keys;
        assert_eq!((sync.services, keys.changed, keys.unchanged), (1, 1, 0));
        assert_eq!((sync.changed, sync.changed_more), (vec![name("s5000")], 0));
        let log = &c.reconciler.maps().log;
        let slots: Vec<&String> = log.iter().filter(|l| l.contains("slot")).collect();
        assert_eq!(slots.len(), 6, "three new slots, three old ones: {log:?}");
        assert!(
            slots.iter().all(|l| l.contains(&format!(" {id}/"))),
            "{log:?}"
        );
        assert_eq!(
            c.writes(),
            1 + 6 + 1 + 1,
            "one new backend, six slots, the service flip and the backend it lost (its own: \
             each service port has its own backend ids): {log:?}"
        );
        // Nothing queued: a sync without changes touches nothing.
        assert_eq!(c.sync(Instant::now()).services, 0);
    }

    #[test]
    fn a_conflict_is_reported_once_and_the_loser_takes_over_when_the_key_is_freed() {
        let mut maps = Fake::default();
        let mut c = controller(&mut maps);
        c.apply(&cluster_ip("b", "10.96.0.1", 80));
        c.apply(&slice("b-x", "b", 8080, ready(&["10.244.0.2"])));
        c.apply(&cluster_ip("a", "10.96.0.1", 80));
        let sync = c.sync(Instant::now());
        assert_eq!(sync.rejections.len(), 1);
        assert!(
            sync.rejections[0]
                .to_string()
                .contains("Service ns/b: spec.clusterIP"),
            "{}",
            sync.rejections[0]
        );
        let key = ServiceKey::new([10, 96, 0, 1].into(), 80, 6);
        let owner = |c: &Controller<&mut Fake>| c.reconciler.maps().services[&key].1.name.clone();
        assert_eq!(owner(&c), "ns/a");
        // b's endpoints change: b still loses, and is not reported again.
        c.apply(&slice("b-x", "b", 8080, ready(&["10.244.0.3"])));
        assert!(c.sync(Instant::now()).rejections.is_empty());
        // a goes: b is served without being re-read.
        c.delete(Kind::Service, name("a"));
        let sync = c.sync(Instant::now());
        assert!(sync.rejections.is_empty());
        assert_eq!(sync.services, 1);
        assert_eq!(owner(&c), "ns/b");
        let backends = &served(c.reconciler.maps())[&key].3;
        assert_eq!(backends[0].addr, std::net::IpAddr::from([10, 244, 0, 3]));
        // a comes back and wins again: b's conflict is news again.
        c.apply(&cluster_ip("a", "10.96.0.1", 80));
        assert_eq!(c.sync(Instant::now()).rejections.len(), 1);
        assert_eq!(owner(&c), "ns/a");
    }

    #[test]
    fn a_failing_service_is_retried_alone_with_back_off() {
        let mut maps = Fake {
            slot_capacity: Some(2),
            ..Fake::default()
        };
        let mut c = controller(&mut maps);
        c.apply(&cluster_ip("big", "10.96.0.1", 80));
        c.apply(&slice(
            "big-x",
            "big",
            8080,
            ready(&["10.244.0.1", "10.244.0.2", "10.244.0.3"]),
        ));
        c.apply(&cluster_ip("small", "10.96.0.2", 80));
        c.apply(&slice("small-x", "small", 8080, ready(&["10.244.0.1"])));
        let t0 = Instant::now();
        let sync = c.sync(t0);
        assert_eq!(sync.failures.len(), 1);
        assert_eq!(
            (sync.failures[0].port.as_str(), sync.failures[0].failures),
            ("ns/big", 1)
        );
        assert_eq!(sync.keys.changed, 1, "the other service is programmed");
        assert_eq!(c.next_retry(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(c.sync(t0).services, 0, "not retried before its back-off");
        let sync = c.sync(t0 + Duration::from_secs(1));
        assert_eq!((sync.services, sync.failures[0].failures), (1, 2));
        assert_eq!(c.next_retry(), Some(t0 + Duration::from_secs(3)));
        c.reconciler.maps_mut().slot_capacity = None;
        let sync = c.sync(t0 + Duration::from_secs(3));
        assert!(sync.failures.is_empty());
        assert_eq!(sync.recovered, [(name("big"), 2)]);
        assert_eq!(c.retrying(), 0);
    }

    #[test]
    fn adopted_entries_nobody_claims_are_swept_once() {
        let mut maps = Fake::default();
        {
            let mut previous = controller(&mut maps);
            previous.apply(&cluster_ip("old", "10.96.0.9", 80));
            previous.apply(&cluster_ip("kept", "10.96.0.1", 80));
            previous.sync(Instant::now());
        }
        let mut store = Store::new(None, here());
        let objects = [cluster_ip("kept", "10.96.0.1", 80)];
        store.replace(&[Kind::Service, Kind::EndpointSlice], &objects);
        let mut c = controller(&mut maps);
        c.replace(&[Kind::Service, Kind::EndpointSlice], &objects);
        let sync = c.sync(Instant::now());
        let keys = sync.keys;
        assert_eq!((keys.changed, keys.removed, keys.unchanged), (0, 1, 1));
        assert!(!c.needs_sweep());
        assert_eq!(served(c.reconciler.maps()), oracle(&store).0);
    }

    #[test]
    fn a_failing_sweep_backs_off() {
        let mut maps = Fake::default();
        let mut previous = controller(&mut maps);
        previous.apply(&cluster_ip("old", "10.96.0.9", 80));
        previous.sync(Instant::now());
        maps.refuse_deletes = true;
        let mut c = controller(&mut maps);
        c.replace(&[Kind::Service, Kind::EndpointSlice], &[]);
        let t0 = Instant::now();
        let sync = c.sync(t0);
        assert_eq!(
            (sync.failures.len(), sync.failures[0].failures),
            (1, 1),
            "{:?}",
            sync.failures
        );
        assert_eq!(c.next_retry(), Some(t0 + Duration::from_secs(1)));
        assert!(c.sync(t0).failures.is_empty(), "not swept again at once");
        assert_eq!(c.sync(t0 + Duration::from_secs(1)).failures[0].failures, 2);
        c.reconciler.maps_mut().refuse_deletes = false;
        let sync = c.sync(t0 + Duration::from_secs(3));
        assert!(sync.failures.is_empty());
        assert_eq!(sync.keys.removed, 1);
        assert!(!c.needs_sweep() && c.next_retry().is_none());
    }

    /// A small deterministic generator (xorshift64*), so that a failing sequence replays.
    struct Random(u64);

    impl Random {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len() as u64) as usize]
        }
    }

    fn random_service(r: &mut Random, name: &str) -> Object {
        let ip = r.pick(&["10.96.0.1", "10.96.0.2", "10.96.0.3"]);
        let port = r.pick(&[80, 81]);
        match r.below(3) {
            0 => service(name, json!({"clusterIP": ip, "ports": [{"port": port}]})),
            1 => service(
                name,
                json!({
                    "type": "NodePort",
                    "clusterIP": ip,
                    "internalTrafficPolicy": r.pick(&["Cluster", "Local"]),
                    "ports": [{"port": port, "nodePort": r.pick(&[30000, 30001])}],
                }),
            ),
            _ => service(
                name,
                json!({
                    "type": "LoadBalancer",
                    "clusterIP": ip,
                    "externalTrafficPolicy": "Local",
                    "healthCheckNodePort": r.pick(&[32000, 32001]),
                    "externalIPs": [r.pick(&["203.0.113.1", "203.0.113.2"])],
                    "ports": [
                        {"name": "a", "port": port, "nodePort": r.pick(&[30000, 30002])},
                        {"name": "b", "port": 90, "nodePort": r.pick(&[30003, 30004])},
                    ],
                }),
            ),
        }
    }

    fn random_slice(r: &mut Random, name: &str, services: &[&str]) -> Object {
        let endpoints: Vec<serde_json::Value> = (0..r.below(4))
            .map(|_| {
                endpoint(
                    r.pick(&["10.244.0.1", "10.244.0.2", "10.244.1.1", "10.244.1.2"]),
                    r.below(3) > 0,
                    r.pick(&["node-a", "node-b"]),
                    r.pick(&["zone-a", "zone-b"]),
                )
            })
            .collect();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": "ns",
                "labels": {"kubernetes.io/service-name": r.pick(services)},
            },
            "addressType": "IPv4",
            "ports": [{"port": 8080}, {"name": "a", "port": 8081}, {"name": "b", "port": 8082}],
            "endpoints": endpoints,
        }))
        .unwrap();
        Object::EndpointSlice(Box::new(slice))
    }

    #[test]
    fn random_changes_end_where_a_full_rebuild_does() {
        let services = ["a", "b", "c", "d", "e", "f"];
        let slices = ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"];
        for seed in 1..=40u64 {
            let mut r = Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut maps = Fake::default();
            let mut c = controller(&mut maps);
            let mut store = Store::new(None, here());
            for step in 0..150 {
                match r.below(10) {
                    0..=2 => {
                        let n = r.pick(&services);
                        let o = random_service(&mut r, n);
                        c.apply(&o);
                        store.apply(&o);
                    }
                    3..=6 => {
                        let n = r.pick(&slices);
                        let o = random_slice(&mut r, n, &services);
                        c.apply(&o);
                        store.apply(&o);
                    }
                    7 => {
                        let n = name(r.pick(&services));
                        c.delete(Kind::Service, n.clone());
                        store.delete(Kind::Service, n);
                    }
                    8 => {
                        let n = name(r.pick(&slices));
                        c.delete(Kind::EndpointSlice, n.clone());
                        store.delete(Kind::EndpointSlice, n);
                    }
                    9 if r.below(2) == 0 => {
                        // A re-list that finds some slices gone and others changed.
                        let objects: Vec<Object> = (0..r.below(5))
                            .map(|_| {
                                let n = r.pick(&slices);
                                random_slice(&mut r, n, &services)
                            })
                            .collect();
                        c.replace(&[Kind::EndpointSlice], &objects);
                        store.replace(&[Kind::EndpointSlice], &objects);
                    }
                    _ => {
                        let topology = Topology {
                            zone: Some(r.pick(&["zone-a", "zone-b"]).to_string()),
                            ..here()
                        };
                        c.set_topology(topology.clone());
                        store.set_topology(topology);
                    }
                }
                if r.below(3) == 0 {
                    let sync = c.sync(Instant::now());
                    assert!(sync.failures.is_empty(), "seed {seed} step {step}");
                    let (want, checks) = oracle(&store);
                    assert_eq!(served(c.reconciler.maps()), want, "seed {seed} step {step}");
                    assert_eq!(c.health_checks, checks, "seed {seed} step {step}");
                }
            }
        }
    }
}
