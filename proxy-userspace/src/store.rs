//! The objects the proxy serves, by namespace/name, as last validated. Invalid new versions
//! are rejected and the last valid version stays served ("nothing is lost").
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    desired::{DesiredState, desired_state},
    model::{ServiceSpec, SliceSpec, Validated, validate_service, validate_slice},
    rejection::Rejection,
};

/// An object from any source (manifest files or the API server).
#[derive(Clone, Debug)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

/// What a store update made of its input.
#[derive(Debug, Default)]
pub struct Outcome {
    pub rejections: Vec<Rejection>,
    /// Objects that are legitimately not served, with why (headless, ExternalName, ...).
    pub ignored: Vec<String>,
}

type Name = (String, String);

#[derive(Debug, Default)]
pub struct Store {
    services: BTreeMap<Name, ServiceSpec>,
    slices: BTreeMap<Name, SliceSpec>,
}

fn name_of(meta: &ObjectMeta) -> Name {
    (
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Validates one object into `next`, falling back to its version in `last` when invalid.
fn admit<T: Clone>(
    name: Name,
    validated: Validated<T>,
    last: &BTreeMap<Name, T>,
    next: &mut BTreeMap<Name, T>,
    outcome: &mut Outcome,
) {
    match validated {
        Validated::Valid(spec, warnings) => {
            outcome.rejections.extend(warnings);
            next.insert(name, spec);
        }
        Validated::Ignored(why) => outcome.ignored.push(why),
        Validated::Invalid(mut rejections) => {
            if let Some(previous) = last.get(&name) {
                for r in &mut rejections {
                    r.detail.push_str("; still serving its last valid version");
                }
                next.insert(name, previous.clone());
            }
            outcome.rejections.extend(rejections);
        }
    }
}

impl Store {
    /// Replaces the whole content with `objects` (a manifest reload or a re-list).
    pub fn replace(&mut self, objects: &[Object]) -> Outcome {
        let mut outcome = Outcome::default();
        let mut services = BTreeMap::new();
        let mut slices = BTreeMap::new();
        for object in objects {
            match object {
                Object::Service(s) => admit(
                    name_of(&s.metadata),
                    validate_service(s),
                    &self.services,
                    &mut services,
                    &mut outcome,
                ),
                Object::EndpointSlice(s) => admit(
                    name_of(&s.metadata),
                    validate_slice(s),
                    &self.slices,
                    &mut slices,
                    &mut outcome,
                ),
            }
        }
        self.services = services;
        self.slices = slices;
        outcome
    }

    pub fn desired(&self) -> (DesiredState, Vec<Rejection>) {
        desired_state(self.services.values(), self.slices.values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Object {
        Object::Service(Box::new(serde_yaml::from_str(yaml).unwrap()))
    }

    #[test]
    fn invalid_update_keeps_the_last_valid_version() {
        let mut store = Store::default();
        let good =
            service("metadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}");
        assert!(store.replace(&[good]).rejections.is_empty());
        let bad = service("metadata: {name: web}\nspec: {clusterIP: bogus, ports: [{port: 80}]}");
        let outcome = store.replace(&[bad]);
        assert_eq!(outcome.rejections.len(), 1);
        assert!(
            outcome.rejections[0]
                .to_string()
                .ends_with("still serving its last valid version")
        );
        let (state, _) = store.desired();
        assert_eq!(
            state.len(),
            1,
            "the last valid web service is still desired"
        );
        // Removing the object removes it, even after an invalid version.
        store.replace(&[]);
        assert!(store.desired().0.is_empty());
    }

    #[test]
    fn new_invalid_object_is_not_served() {
        let mut store = Store::default();
        let outcome = store.replace(&[service(
            "metadata: {name: x}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 0}]}",
        )]);
        assert_eq!(outcome.rejections.len(), 2);
        assert!(store.desired().0.is_empty());
    }
}
