//! The objects the proxy serves, by kind and namespace/name, as last validated. Sources
//! feed it whole sets (a watch re-list) or single changes (watch events, changed
//! manifests). An invalid new version is rejected and the last valid one stays served
//! ("nothing is lost").
use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::Timestamp,
};

use crate::{
    desired::Topology,
    model::{ServiceSpec, SliceSpec, Validated, validate_service, validate_slice},
    rejection::Rejection,
    trigger_times,
};

/// An object from any source (manifest files or the API server).
#[derive(Clone, Debug)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    /// A node of the cluster, from manifests: the agent's own gives its zone and whether it
    /// is eligible for traffic, as the Node watch does in Kubernetes mode. Not stored.
    Node(Box<Node>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
}

/// namespace, name
pub type Name = (String, String);

pub fn name_of(meta: &ObjectMeta) -> Name {
    (
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        meta.name.clone().unwrap_or_default(),
    )
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
        }
    }

    pub fn name(&self) -> Name {
        match self {
            Object::Service(s) => name_of(&s.metadata),
            Object::EndpointSlice(s) => name_of(&s.metadata),
            Object::Node(n) => name_of(&n.metadata),
        }
    }
}

/// What a store update made of its input.
#[derive(Debug, Default)]
pub struct Outcome {
    pub rejections: Vec<Rejection>,
    /// Objects that are legitimately not served, with why (headless, ExternalName, ...).
    pub ignored: Vec<String>,
    /// Services added, changed or removed (what is served, not every write).
    pub service_changes: usize,
    /// EndpointSlices added, changed or removed.
    pub endpoint_changes: usize,
    /// For each of those changes, its slice's last-change trigger time, if annotated.
    pub trigger_times: Vec<Option<Timestamp>>,
    /// The services whose translation may have changed: changed services, and the
    /// services of changed slices (before and after a slice changes its service).
    pub dirty: BTreeSet<Name>,
}

/// The served objects of one kind.
#[derive(Debug)]
struct Table<T> {
    items: BTreeMap<Name, T>,
}

impl<T: Clone + PartialEq> Table<T> {
    /// What `validated` leaves for `name`: the new version, nothing (ignored), or the last
    /// valid version (invalid).
    fn admit(&self, name: &Name, validated: Validated<T>, outcome: &mut Outcome) -> Option<T> {
        match validated {
            Validated::Valid(spec, warnings) => {
                outcome.rejections.extend(warnings);
                Some(spec)
            }
            Validated::Ignored(why) => {
                outcome.ignored.push(why);
                None
            }
            Validated::Invalid(mut rejections) => {
                let previous = self.items.get(name).cloned();
                if previous.is_some() {
                    for r in &mut rejections {
                        r.detail.push_str("; still serving its last valid version");
                    }
                }
                outcome.rejections.extend(rejections);
                previous
            }
        }
    }

    /// Sets `name` to `new`; when that changes what is served, returns the previous
    /// version (`Some(None)`: there was none).
    fn set(&mut self, name: &Name, new: Option<T>) -> Option<Option<T>> {
        let previous = match new {
            Some(spec) if self.items.get(name) == Some(&spec) => return None,
            Some(spec) => self.items.insert(name.clone(), spec),
            None => Some(self.items.remove(name)?),
        };
        Some(previous)
    }

    /// The names of this table that `validated` no longer lists.
    fn missing_from(&self, validated: &[(Name, Validated<T>)]) -> Vec<Name> {
        let listed: BTreeSet<&Name> = validated.iter().map(|(n, _)| n).collect();
        self.items
            .keys()
            .filter(|n| !listed.contains(n))
            .cloned()
            .collect()
    }
}

/// The service an EndpointSlice belongs to.
fn service_of(slice: &SliceSpec) -> Name {
    (slice.namespace.clone(), slice.service.clone())
}

#[derive(Debug)]
pub struct Store {
    services: Table<ServiceSpec>,
    slices: Table<SliceSpec>,
    /// The slices of each service, by their `kubernetes.io/service-name` label: a change to
    /// one slice dirties its service alone. A slice is in its service's namespace, so only
    /// its own name is kept.
    slices_by_service: HashMap<Name, Vec<String>>,
    /// The `service.kubernetes.io/service-proxy-name` this proxy serves (`None`: unlabelled).
    proxy_name: Option<String>,
    topology: Topology,
}

impl Store {
    pub fn new(proxy_name: Option<String>, topology: Topology) -> Self {
        Self {
            services: Table {
                items: BTreeMap::new(),
            },
            slices: Table {
                items: BTreeMap::new(),
            },
            slices_by_service: HashMap::new(),
            proxy_name,
            topology,
        }
    }

    fn set_service(&mut self, name: &Name, new: Option<ServiceSpec>, outcome: &mut Outcome) {
        if self.services.set(name, new).is_some() {
            outcome.service_changes += 1;
            outcome.dirty.insert(name.clone());
        }
    }

    fn set_slice(
        &mut self,
        name: &Name,
        new: Option<SliceSpec>,
        trigger: Option<Timestamp>,
        outcome: &mut Outcome,
    ) {
        let service = new.as_ref().map(service_of);
        let Some(previous) = self.slices.set(name, new) else {
            return;
        };
        outcome.endpoint_changes += 1;
        outcome.trigger_times.push(trigger);
        if let Some(old) = previous.as_ref().map(service_of) {
            if service.as_ref() != Some(&old)
                && let Some(slices) = self.slices_by_service.get_mut(&old)
            {
                slices.retain(|s| *s != name.1);
                if slices.is_empty() {
                    self.slices_by_service.remove(&old);
                }
            }
            outcome.dirty.insert(old);
        }
        if let Some(service) = service {
            let slices = self.slices_by_service.entry(service.clone()).or_default();
            // Sorted, as the slices of a service are read in name order.
            if let Err(at) = slices.binary_search(&name.1) {
                slices.insert(at, name.1.clone());
            }
            outcome.dirty.insert(service);
        }
    }

    /// Replaces every object of `kinds` with `objects` (a watch re-list).
    pub fn replace(&mut self, kinds: &[Kind], objects: &[Object]) -> Outcome {
        let mut outcome = Outcome::default();
        if kinds.contains(&Kind::Service) {
            let validated: Vec<_> = objects
                .iter()
                .filter_map(|o| match o {
                    Object::Service(s) => Some((
                        name_of(&s.metadata),
                        validate_service(s, self.proxy_name.as_deref()),
                    )),
                    _ => None,
                })
                .collect();
            for name in self.services.missing_from(&validated) {
                self.set_service(&name, None, &mut outcome);
            }
            for (name, v) in validated {
                let admitted = self.services.admit(&name, v, &mut outcome);
                self.set_service(&name, admitted, &mut outcome);
            }
        }
        if kinds.contains(&Kind::EndpointSlice) {
            let validated: Vec<_> = objects
                .iter()
                .filter_map(|o| match o {
                    Object::EndpointSlice(s) => Some((
                        name_of(&s.metadata),
                        (validate_slice(s), trigger_times::of(s)),
                    )),
                    _ => None,
                })
                .collect();
            let (validated, triggers): (Vec<_>, Vec<_>) = validated
                .into_iter()
                .map(|(name, (v, trigger))| ((name, v), trigger))
                .unzip();
            for name in self.slices.missing_from(&validated) {
                self.set_slice(&name, None, None, &mut outcome);
            }
            for ((name, v), trigger) in validated.into_iter().zip(triggers) {
                let admitted = self.slices.admit(&name, v, &mut outcome);
                self.set_slice(&name, admitted, trigger, &mut outcome);
            }
        }
        outcome
    }

    /// One object added or modified.
    pub fn apply(&mut self, object: &Object) -> Outcome {
        let mut outcome = Outcome::default();
        let name = object.name();
        match object {
            Object::Service(s) => {
                let validated = validate_service(s, self.proxy_name.as_deref());
                let admitted = self.services.admit(&name, validated, &mut outcome);
                self.set_service(&name, admitted, &mut outcome);
            }
            Object::EndpointSlice(s) => {
                let admitted = self.slices.admit(&name, validate_slice(s), &mut outcome);
                self.set_slice(&name, admitted, trigger_times::of(s), &mut outcome);
            }
            // The agent takes its own node's topology from it; nothing is served.
            Object::Node(_) => {}
        }
        outcome
    }

    /// One object deleted.
    pub fn delete(&mut self, kind: Kind, name: Name) -> Outcome {
        let mut outcome = Outcome::default();
        match kind {
            Kind::Service => self.set_service(&name, None, &mut outcome),
            Kind::EndpointSlice => self.set_slice(&name, None, None, &mut outcome),
            Kind::Node => {}
        }
        outcome
    }

    /// This node's topology changed (its zone label); returns whether it did. Every
    /// service's endpoint selection may depend on it.
    pub fn set_topology(&mut self, topology: Topology) -> bool {
        std::mem::replace(&mut self.topology, topology.clone()) != topology
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn service(&self, name: &Name) -> Option<&ServiceSpec> {
        self.services.items.get(name)
    }

    /// The names of every served service, in order.
    pub fn service_names(&self) -> impl Iterator<Item = &Name> {
        self.services.items.keys()
    }

    /// The slices labelled with service `name`, in order of their own names.
    pub fn slices_of(&self, name: &Name) -> Vec<&SliceSpec> {
        self.slices_by_service
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|slice| self.slices.items.get(&(name.0.clone(), slice.clone())))
            .collect()
    }

    /// The whole desired state computed at once: the tests' oracle.
    #[cfg(test)]
    pub fn desired(&self) -> crate::desired::Desired {
        crate::desired::desired_state(
            self.services.items.values(),
            self.slices.items.values(),
            &self.topology,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Object {
        Object::Service(Box::new(serde_yaml::from_str(yaml).unwrap()))
    }

    fn store() -> Store {
        Store::new(None, Topology::default())
    }

    const WEB: &str = "metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}";

    #[test]
    fn invalid_update_keeps_the_last_valid_version() {
        let mut store = store();
        assert!(
            store
                .replace(&[Kind::Service], &[service(WEB)])
                .rejections
                .is_empty()
        );
        let bad = service("metadata: {name: web}\nspec: {clusterIP: bogus, ports: [{port: 80}]}");
        let outcome = store.replace(&[Kind::Service], std::slice::from_ref(&bad));
        assert_eq!(outcome.rejections.len(), 1);
        assert!(
            outcome.rejections[0]
                .to_string()
                .ends_with("still serving its last valid version")
        );
        assert_eq!(outcome.service_changes, 0);
        assert_eq!(
            store.desired().services.len(),
            1,
            "the last valid web service is still desired"
        );
        // The same through a watch event.
        assert_eq!(store.apply(&bad).service_changes, 0);
        assert_eq!(store.desired().services.len(), 1);
        // Removing the object removes it, even after an invalid version.
        assert_eq!(store.replace(&[Kind::Service], &[]).service_changes, 1);
        assert!(store.desired().services.is_empty());
    }

    #[test]
    fn new_invalid_object_is_not_served() {
        let mut store = store();
        let outcome = store.replace(
            &[Kind::Service],
            &[service(
                "metadata: {name: x}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 0}]}",
            )],
        );
        assert_eq!(outcome.rejections.len(), 2);
        assert!(store.desired().services.is_empty());
    }

    #[test]
    fn events_count_only_real_changes() {
        let mut store = store();
        assert_eq!(store.apply(&service(WEB)).service_changes, 1);
        assert_eq!(
            store.apply(&service(WEB)).service_changes,
            0,
            "an identical update changes nothing"
        );
        // A re-list of slices leaves services alone.
        assert_eq!(
            store.replace(&[Kind::EndpointSlice], &[]).service_changes,
            0
        );
        assert_eq!(store.desired().services.len(), 1);
        // Becoming headless removes it.
        let headless =
            service("metadata: {name: web}\nspec: {clusterIP: None, ports: [{port: 80}]}");
        assert_eq!(store.apply(&headless).service_changes, 1);
        assert!(store.desired().services.is_empty());
        assert_eq!(
            store
                .delete(Kind::Service, ("default".into(), "web".into()))
                .service_changes,
            0
        );
    }
}
