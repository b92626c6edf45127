//! Who owns a key that several services ask for (a frontend address, a health-check port):
//! every claimant is kept, ordered, and the first one owns the key — the same winner as a
//! full pass over the services in name order. When the owner lets go, the next claimant
//! owns the key without anyone re-reading the others.
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use crate::store::Name;

/// A service and the position of the claim in its translation: a service can claim one
/// key twice (two ports on the same address), and its first claim wins. The name is shared
/// with the service's translation: one is kept per frontend of every service.
pub type Claimant = (Arc<Name>, usize);

/// The claimants of one key, sorted: almost always one, so a small vector rather than a
/// B-tree (whose first leaf would hold room for eleven).
#[derive(Debug, Default)]
struct Claim {
    claimants: Vec<Claimant>,
    /// Only while the key is contested (boxed: one claim is kept per frontend).
    reported: Option<Box<Reported>>,
}

/// The losers reported, and the owner they were reported against.
#[derive(Debug)]
struct Reported {
    owner: Claimant,
    losers: Vec<Claimant>,
}

#[derive(Debug)]
pub struct Claims<K> {
    claims: HashMap<K, Claim>,
}

impl<K> Default for Claims<K> {
    fn default() -> Self {
        Self {
            claims: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> Claims<K> {
    pub fn claim(&mut self, key: &K, claimant: Claimant) {
        let claimants = &mut self.claims.entry(key.clone()).or_default().claimants;
        if let Err(at) = claimants.binary_search(&claimant) {
            claimants.insert(at, claimant);
        }
    }

    pub fn release(&mut self, key: &K, claimant: &Claimant) {
        if let Some(claim) = self.claims.get_mut(key) {
            claim.claimants.retain(|c| c != claimant);
            if let Some(reported) = &mut claim.reported {
                reported.losers.retain(|c| c != claimant);
            }
            if claim.claimants.is_empty() {
                self.claims.remove(key);
            }
        }
    }

    pub fn owner(&self, key: &K) -> Option<&Claimant> {
        self.claims.get(key)?.claimants.first()
    }

    pub fn is_owned(&self, key: &K) -> bool {
        self.claims.contains_key(key)
    }

    /// The owner of `key` and the claimants that lose to it but were not yet reported as
    /// losing to that owner: each conflict is reported once, when it appears.
    pub fn new_losers(&mut self, key: &K) -> Option<(Claimant, Vec<Claimant>)> {
        let claim = self.claims.get_mut(key)?;
        let owner = claim.claimants.first()?.clone();
        if claim.claimants.len() == 1 {
            claim.reported = None;
            return Some((owner, Vec::new()));
        }
        let reported = match &mut claim.reported {
            Some(r) if r.owner == owner => r,
            stale => stale.insert(Box::new(Reported {
                owner: owner.clone(),
                losers: Vec::new(),
            })),
        };
        let losers: Vec<Claimant> = claim
            .claimants
            .iter()
            .skip(1)
            .filter(|c| !reported.losers.contains(*c))
            .cloned()
            .collect();
        reported.losers.extend(losers.iter().cloned());
        Some((owner, losers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, ordinal: usize) -> Claimant {
        (Arc::new(("ns".into(), name.into())), ordinal)
    }

    #[test]
    fn first_by_name_owns_and_the_next_takes_over() {
        let mut claims = Claims::default();
        claims.claim(&1, c("b", 0));
        claims.claim(&1, c("a", 3));
        assert_eq!(claims.owner(&1), Some(&c("a", 3)));
        assert_eq!(claims.new_losers(&1), Some((c("a", 3), vec![c("b", 0)])));
        assert_eq!(
            claims.new_losers(&1),
            Some((c("a", 3), vec![])),
            "reported once"
        );
        claims.release(&1, &c("a", 3));
        assert_eq!(claims.owner(&1), Some(&c("b", 0)));
        assert_eq!(claims.new_losers(&1), Some((c("b", 0), vec![])));
        // A new owner that sorts first: the old one loses, and is reported again.
        claims.claim(&1, c("a", 0));
        assert_eq!(claims.new_losers(&1), Some((c("a", 0), vec![c("b", 0)])));
        claims.release(&1, &c("a", 0));
        claims.release(&1, &c("b", 0));
        assert!(!claims.is_owned(&1));
        assert_eq!(claims.new_losers(&1), None);
    }
}
